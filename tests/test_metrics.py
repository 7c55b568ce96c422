"""Prometheus metrics: counted as the agent works, the ledger's gauges read at scrape time, served at GET /metrics."""
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from agent.config import load
from agent.endpoint import serving
from agent.metrics import Metrics
from agent.poller import PollResult
from agent.process import Agent
from sinkserver import SinkServer
from state.base import Execution, Finish
from test_cli_integration import PASSWORD
from test_endpoint import TOKEN, free_port, listening_config, wait_for
from viewserver import ViewServer, make_leads


def samples(text: str) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, parsed by prometheus-client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: dict[tuple, float], name: str, **labels: str) -> float | None:
    return parsed.get((name, tuple(sorted(labels.items()))))


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def execution(ex_id: int, flow: str = "f") -> Execution:
    return Execution(id=ex_id, flow=flow, source="s", key=f"k{ex_id}", entity=f"k{ex_id}", step=1, attempts=1, first_attempt=None, context={})


def test_polls_and_records_are_counted_by_source_outcome_and_kind():
    metrics = Metrics(["leads", "other"])
    metrics.polled(PollResult("leads", new=3, duplicates=5, quarantined=1))
    metrics.polled(PollResult("leads", error="HTTP 500"))
    parsed = samples(metrics.scrape(None)[0].decode())
    assert value(parsed, "sync_agent_polls_total", source="leads", outcome="ok") == 1
    assert value(parsed, "sync_agent_polls_total", source="leads", outcome="failed") == 1
    assert value(parsed, "sync_agent_polls_total", source="other", outcome="ok") == 0  # there from the start
    assert [value(parsed, "sync_agent_records_total", source="leads", kind=k) for k in ("new", "duplicate", "primed", "quarantined")] == [3, 5, 0, 1]


def test_attempts_are_counted_and_delivery_is_timed_from_claim_to_outcome():
    clock = Clock()
    metrics = Metrics([], clock=clock)
    metrics.claimed([execution(1), execution(2)])
    clock.now += 2.5
    metrics.finished(execution(1), Finish("succeeded", 1, {}, attempt={"step": 1, "outcome": "succeeded"}))
    metrics.finished(execution(2), Finish("retrying", 1, {}, attempt={"step": 1, "outcome": "retryable"}))
    metrics.finished(execution(3), Finish("filtered", 0, {}))  # never claimed here, no attempt: nothing to count
    parsed = samples(metrics.scrape(None)[0].decode())
    assert value(parsed, "sync_agent_attempts_total", flow="f", step="1", outcome="succeeded") == 1
    assert value(parsed, "sync_agent_attempts_total", flow="f", step="1", outcome="retryable") == 1
    assert value(parsed, "sync_agent_delivery_seconds_count", flow="f") == 2
    assert value(parsed, "sync_agent_delivery_seconds_sum", flow="f") == 5.0
    assert value(parsed, "sync_agent_delivery_seconds_bucket", flow="f", le="2.5") == 2


@pytest.fixture
def env(monkeypatch):
    for name, value_ in (("VIEW_PASSWORD", PASSWORD), ("CRM_TOKEN", "crm-token-123"), ("AGENT_TOKEN", TOKEN)):
        monkeypatch.setenv(name, value_)


def test_metrics_of_a_running_agent_equal_what_the_sink_received(tmp_path, env):
    with SinkServer() as sink, ViewServer(make_leads(25), page_size=10, username="integration", password=PASSWORD) as view:
        config = load(listening_config(tmp_path, view, sink, free_port()))
        agent = Agent(config)
        loop = threading.Thread(target=agent.run_forever, name="test-agent-loop")
        try:
            with serving(agent) as endpoint:
                loop.start()
                url = f"http://127.0.0.1:{endpoint.port}/metrics"

                def scrape() -> dict[tuple, float]:
                    answer = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
                    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
                    scrape.text = answer.text
                    return samples(answer.text)

                assert wait_for(lambda: value(scrape(), "sync_agent_executions", flow="leads-to-crm", status="succeeded") == 25)
                parsed = scrape()
        finally:
            agent.stopping.set()
            loop.join(20)
            agent.close()
    delivered = len(sink.accepted)
    assert delivered == 25
    assert value(parsed, "sync_agent_records_total", source="leads", kind="new") == delivered
    assert value(parsed, "sync_agent_attempts_total", flow="leads-to-crm", step="1", outcome="succeeded") == delivered
    assert value(parsed, "sync_agent_delivery_seconds_count", flow="leads-to-crm") == delivered
    assert value(parsed, "sync_agent_polls_total", source="leads", outcome="ok") == 1
    assert value(parsed, "sync_agent_polls_total", source="leads", outcome="failed") == 0
    assert value(parsed, "sync_agent_executions", flow="leads-to-crm", status="dead") == 0
    assert value(parsed, "sync_agent_last_success_timestamp_seconds", source="leads") == pytest.approx(time.time(), abs=60)
    assert value(parsed, "sync_agent_ledger_bytes") > 0
    for secret in (PASSWORD, TOKEN, "crm-token-123", view.url, sink.url):
        assert secret not in scrape.text  # labels carry names, never URLs or credentials


def test_work_given_back_unstarted_leaves_no_delivery_time_behind():
    from agent.metrics import Metrics

    metrics = Metrics({})
    given_back = Execution(7, "f", "s", "k", "k", 0, 1, None, {})
    metrics.claimed([given_back])
    metrics.unclaimed([given_back])
    assert metrics._claimed == {}

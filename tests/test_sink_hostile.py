"""Hostile HTTP sinks: a drip costs at most the connector's timeout, a huge answer a bounded read and a small ledger row."""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
import requests

from agent.cli import main
from sinkserver import SinkServer
from hostileserver import HostileServer, big_json, drip_body, drip_headers, drip_until_close, silent, slow_json
from sinks.base import Action
from sinks.http import HttpConnector

KEY = "k-0123456789abcdef"
LEAD = {"email": "ann@example.invalid"}
MAX_RESPONSE = 1024 * 1024  # what the connector reads of an answer at most


def make(url: str, session: requests.Session, timeout: str = "300ms") -> HttpConnector:
    table = {"kind": "http", "base_url": url, "timeout": timeout, "objects": {"leads": {"path": "/leads", "key": "email"}}}
    return HttpConnector(HttpConnector.Config.model_validate(table), session=session, clock=time.time)


@pytest.fixture
def session():
    with requests.Session() as s:
        yield s


def timed(call):
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


# --- the timeout is a deadline for the whole exchange -------------------------------------------------


@pytest.mark.parametrize("script", [drip_headers(), drip_body(), drip_until_close(), silent()], ids=["headers", "body", "until-close", "silent"])
def test_a_dripping_sink_costs_at_most_the_timeout(session, script):
    with HostileServer(script) as server:
        outcome, took = timed(lambda: make(server.url, session).run(Action("leads", "create"), {"body": LEAD}, KEY))
    assert (outcome.status, outcome.condition) == ("retryable", "timeout"), outcome.error
    assert took < 1.0  # the server drips for 3 s, a byte every 20 ms: each read alone never times out


def test_the_deadline_covers_both_requests_of_an_upsert(session):
    with HostileServer(slow_json(0.25)) as server:  # each answer takes 0.25 s, under the timeout alone
        crm = make(server.url, session, timeout="400ms")
        outcome, took = timed(lambda: crm.run(Action("leads", "upsert"), {"body": LEAD}, KEY))
        assert (outcome.status, outcome.condition) == ("retryable", "timeout"), outcome.error
        assert took < 0.6 and len(server.requests) == 2  # the lookup, then the create that ran out of time


def test_a_connection_cut_by_the_deadline_is_not_reused(session):
    with HostileServer(drip_headers(seconds=0.5), big_json(10, status=201)) as server:
        crm = make(server.url, session)
        assert crm.run(Action("leads", "create"), {"body": LEAD}, KEY).condition == "timeout"
        outcome = crm.run(Action("leads", "create"), {"body": LEAD}, KEY)
        assert (outcome.status, outcome.output) == ("succeeded", "x" * 10)
        assert server.connections == 2


# --- a response is read up to a cap -------------------------------------------------------------------


def test_a_response_over_the_cap_fails_the_step_clearly(session):
    with HostileServer(big_json(5 * 1024 * 1024)) as server:
        outcome = make(server.url, session, timeout="10s").run(Action("leads", "create"), {"body": LEAD}, KEY)
    assert outcome.status == "failed" and "response over 1 MB" in outcome.error and len(outcome.error) <= 300


def test_a_response_under_the_cap_is_read_whole(session):
    with HostileServer(big_json(MAX_RESPONSE - 100)) as server:
        outcome = make(server.url, session, timeout="10s").run(Action("leads", "create"), {"body": LEAD}, KEY)
    assert outcome.status == "succeeded" and outcome.output == "x" * (MAX_RESPONSE - 100)


def test_a_huge_error_page_is_read_only_for_its_excerpt(session):
    with HostileServer(big_json(50 * 1024 * 1024, status=500)) as server:
        outcome, took = timed(lambda: make(server.url, session, timeout="10s").run(Action("leads", "create"), {"body": LEAD}, KEY))
    assert (outcome.status, outcome.condition) == ("retryable", "5xx") and len(outcome.error) <= 300
    assert took < 2.0


# --- through the real CLI -----------------------------------------------------------------------------


def write_config(folder: Path, url: str, *, records: int = 1, later_step: str = "", timeout: str = "300ms", retry: str = "") -> Path:
    """A file view of `records` leads, each POSTed to `url`/leads (then `later_step`, if given); the ledger is `agent.db`."""
    (folder / "view.json").write_text(json.dumps({"records": [{"id": i, "email": f"u{i}@example.invalid"} for i in range(records)]}))
    cfg = folder / "agent.toml"
    cfg.write_text(f"""
[agent]
ledger = "agent.db"
[sources.leads]
kind = "file"
path = "view.json"
id = "id"
first_run = "deliver"
[connectors.crm]
kind = "http"
base_url = "{url}"
timeout = "{timeout}"
[connectors.crm.objects.leads]
path = "/leads"
[connectors.out]
kind = "file"
path = "out.jsonl"
[[flows]]
name = "f"
source = "leads"
  [[flows.steps]]
  kind = "action"
  action = "crm > leads > create"
  body = {{ email = "{{{{ record.email }}}}" }}
  {retry}
{later_step}
""")
    return cfg


def stored_outputs(cfg: Path) -> list[str]:
    """The context column of every execution, as stored."""
    with sqlite3.connect(cfg.parent / "agent.db") as conn:
        return [row[0] for row in conn.execute("SELECT context FROM executions ORDER BY id")]


def test_run_once_against_a_dripping_sink_ends_in_time_and_retries_later(tmp_path, capfd):
    with HostileServer(drip_body()) as server:
        cfg = write_config(tmp_path, server.url, records=2)
        code, took = timed(lambda: main(["--config", str(cfg), "run", "--once"]))
    out, err = capfd.readouterr()
    assert code == 0 and "waiting: 2" in out, out + err
    assert took < 2.5
    rows = json.loads((main(["--config", str(cfg), "executions", "--json"]), capfd.readouterr().out)[1])
    assert {r["status"] for r in rows} == {"retrying"} and all("timed out" in r["last_error"] for r in rows)


def test_a_large_answer_nobody_reads_is_stored_as_an_excerpt(tmp_path, capfd):
    with HostileServer(big_json(900 * 1024, status=201)) as server:
        cfg = write_config(tmp_path, server.url, records=3, timeout="10s")
        assert main(["--config", str(cfg), "run", "--once"]) == 0
    assert "sent: 3" in capfd.readouterr().out
    assert all(len(context) < 8 * 1024 for context in stored_outputs(cfg))
    assert (tmp_path / "agent.db").stat().st_size < 1024 * 1024


def test_a_large_answer_a_later_step_reads_is_kept_whole(tmp_path, capfd):
    later = """
  [[flows.steps]]
  kind = "action"
  action = "out > record > write"
  body = { size = "{{ steps[0] | length }}" }
"""
    with HostileServer(big_json(900 * 1024, status=201)) as server:
        cfg = write_config(tmp_path, server.url, later_step=later, timeout="10s")
        assert main(["--config", str(cfg), "run", "--once"]) == 0
    [line] = (tmp_path / "out.jsonl").read_text().splitlines()
    assert json.loads(line)["body"] == {"size": 900 * 1024}


def test_a_huge_answer_fails_the_record_and_the_ledger_stays_small(tmp_path, capfd):
    with HostileServer(big_json(5 * 1024 * 1024, status=201)) as server:
        cfg = write_config(tmp_path, server.url, records=5, timeout="10s")
        assert main(["--config", str(cfg), "run", "--once"]) == 1
    out = capfd.readouterr().out
    assert "failed: 5" in out and "response over 1 MB" in out
    assert all(len(context) < 8 * 1024 for context in stored_outputs(cfg))
    assert (tmp_path / "agent.db").stat().st_size < 1024 * 1024


# --- 403: one record forbidden, or all of them ----------------------------------------------------------


def executions(cfg: Path, capfd) -> list[dict]:
    assert main(["--config", str(cfg), "executions", "--json"]) == 0
    return json.loads(capfd.readouterr().out)


def test_a_sink_forbidding_one_record_fails_only_that_record(tmp_path, capfd):
    with SinkServer() as sink:
        sink.fail_when(lambda r: r["json"] == {"email": "u7@example.invalid"}, 403)
        cfg = write_config(tmp_path, sink.url, records=30)
        assert main(["--config", str(cfg), "run", "--once"]) == 1
        out = capfd.readouterr().out
        assert "sent: 29" in out and "failed: 1" in out and "paused: 0" in out, out
        assert len(sink.accepted) == 29
    rows = executions(cfg, capfd)
    [failed] = [r for r in rows if r["status"] == "failed"]
    assert failed["key"] == "7" and "HTTP 403" in failed["last_error"]
    assert {r["status"] for r in rows} == {"succeeded", "failed"}


def test_a_sink_forbidding_everything_pauses_the_connector_and_loses_no_record(tmp_path, capfd):
    with SinkServer() as sink:
        forbidden = [True]
        sink.fail_when(lambda r: forbidden[0], 403)
        cfg = write_config(tmp_path, sink.url, records=30)
        main(["--config", str(cfg), "run", "--once"])
        out = capfd.readouterr().out
        assert "sent: 0" in out and "paused: 30" in out, out
        assert len(sink.requests) <= 4 + 1  # the calls in flight when the second refusal came, and the one put back
        assert main(["--config", str(cfg), "status"]) == 1
        assert "two records refused in a row" in capfd.readouterr().out
        forbidden[0] = False  # permissions fixed; a restart probes at once
        assert main(["--config", str(cfg), "run", "--once"]) == 0
        assert "sent: 30" in capfd.readouterr().out
        assert len(sink.accepted) == 30
    assert {r["status"] for r in executions(cfg, capfd)} == {"succeeded"}

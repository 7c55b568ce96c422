"""Runs on demand with parameters: `agent poll SOURCE --param k=v`, {{ run.k }} in a source's params and url."""
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from agent.cli import main
from sinkserver import SinkServer
from state.sqlite import SqliteLedger as Ledger
from test_cli_integration import PASSWORD, write_config
from viewserver import ViewServer, make_leads

PARAMS = "params = { since = \"{{ cursor }}\", sku = \"{{ run.sku | default('') }}\" }"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("VIEW_PASSWORD", PASSWORD)
    monkeypatch.setenv("CRM_TOKEN", "crm-token-123")


@pytest.fixture
def sink():
    with SinkServer() as server:
        yield server


@pytest.fixture
def view():
    with ViewServer(make_leads(5), username="integration", password=PASSWORD) as server:
        yield server


def configured(tmp_path: Path, view: ViewServer, sink: SinkServer, source_lines: str, url: str | None = None) -> Path:
    cfg = write_config(tmp_path, view, sink)
    text = cfg.read_text().replace('timeout = "5s"\nauth', f'timeout = "5s"\n{source_lines}\nauth', 1)
    if url is not None:
        text = text.replace(f'url = "{view.url}"', f'url = "{url}"', 1)
    cfg.write_text(text)
    return cfg


def cli(capfd, cfg: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(cfg), *args])
    out, err = capfd.readouterr()
    return code, out, err


def cursor_row(cfg: Path) -> dict:
    with Ledger(cfg.parent / "var" / "agent.db", hold=False) as ledger:
        return ledger.cursor("leads")


def queries(view: ViewServer) -> list[dict[str, list[str]]]:
    return [parse_qs(urlsplit(hit).query, keep_blank_values=True) for hit in view.hits]


def test_a_poll_with_a_parameter_reaches_the_view_and_leaves_the_cursor_where_it_was(tmp_path, capfd, view, sink):
    cfg = configured(tmp_path, view, sink, PARAMS)
    code, out, err = cli(capfd, cfg, "poll", "leads")
    assert code == 0, err
    assert queries(view)[-1]["sku"] == [""]  # `run` is an empty table on an ordinary poll
    before = cursor_row(cfg)
    assert before["value"] and before["last_success"]
    view.records.append(make_leads(1, start="2026-12-24T10:00:00Z")[0])  # newer than the cursor: a poll that moved it would say so
    view.hits.clear()

    code, out, err = cli(capfd, cfg, "poll", "leads", "--param", "sku=123")
    assert code == 0, err
    assert "new: 1" in out and "sent: 1" in out  # de-duplicated as usual: only the new lead goes out
    sent = queries(view)
    assert sent and all(q["sku"] == ["123"] for q in sent)
    after = cursor_row(cfg)
    assert (after["value"], after["last_poll"], after["last_success"]) == (before["value"], before["last_poll"], before["last_success"])
    assert len(sink.requests_to("POST", "/leads")) == 6
    assert "on demand: sku=123" in err


def test_a_run_parameter_fills_the_url_encoded(tmp_path, capfd, view, sink):
    base = view.url.rsplit("/", 1)[0]
    cfg = configured(tmp_path, view, sink, "", url=base + "/{{ run.view | default('All') }}")
    assert cli(capfd, cfg, "poll", "leads")[0] == 0
    assert urlsplit(view.hits[-1]).path == "/api/views/Leads/All"
    code, out, err = cli(capfd, cfg, "poll", "leads", "--param", "view=Open/1?x=#")
    assert code == 0, err
    assert urlsplit(view.hits[-1]).path == "/api/views/Leads/Open%2F1%3Fx%3D%23"  # a value cannot add a path, query or fragment


def test_a_run_parameter_cannot_choose_the_host(tmp_path, capfd, view, sink):
    cfg = configured(tmp_path, view, sink, "", url="http://{{ run.host | default('127.0.0.1') }}:" + str(urlsplit(view.url).port) + "/api")
    code, out, err = cli(capfd, cfg, "poll", "leads", "--param", "host=evil.example")
    assert code == 1
    assert "url: a template may fill the path and the query only" in out
    assert view.hits == []  # nothing was sent anywhere, the view's credentials least of all


def test_a_scheduled_poll_that_needs_a_missing_run_parameter_fails_naming_it(tmp_path, capfd, view, sink):
    cfg = configured(tmp_path, view, sink, 'params = { sku = "{{ run.sku }}" }')
    code, out, err = cli(capfd, cfg, "poll", "leads")
    assert code == 1
    assert "params: missing field" in out and "sku" in out
    code, out, err = cli(capfd, cfg, "poll", "leads", "--param", "sku=9")
    assert code == 0, err
    assert queries(view)[-1]["sku"] == ["9"]


@pytest.mark.parametrize("args, message", [
    (["--param", "sku"], "--param 'sku': write NAME=VALUE"),
    (["--param", "=1"], "--param '=1': write NAME=VALUE"),
    (["--param", "a=1", "--param", "a=2"], "--param 'a' is given twice"),
])
def test_a_malformed_param_is_a_usage_error(tmp_path, capfd, view, sink, args, message):
    cfg = configured(tmp_path, view, sink, PARAMS)
    code, out, err = cli(capfd, cfg, "poll", "leads", *args)
    assert code == 2
    assert message in err
    assert view.hits == [] and not (tmp_path / "var" / "agent.db").exists()  # nothing touched


def test_a_parameterised_poll_before_the_first_good_poll_primes_as_usual(tmp_path, capfd, view, sink):
    cfg = configured(tmp_path, view, sink, PARAMS)
    cfg.write_text(cfg.read_text().replace('first_run = "deliver"', 'first_run = "skip"'))
    code, out, err = cli(capfd, cfg, "poll", "leads", "--param", "sku=1")
    assert code == 0, err
    assert "primed: 5" in out and "sent: 0" in out
    row = cursor_row(cfg)
    assert row["last_success"] is None and row["value"] is None  # still unprimed as far as the schedule and `status` go
    code, out, err = cli(capfd, cfg, "status", "--json")
    assert json.loads(out)["sources"]["leads"]["stale"] is True

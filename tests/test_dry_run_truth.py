"""`agent test` builds the real request or message with the real connector code and stops only before the network."""
from __future__ import annotations

import json
from pathlib import Path

from fileconfig import write_file_flow
from urllib.parse import urlsplit

import pytest

from sinkserver import SinkServer


@pytest.fixture
def sink():
    with SinkServer() as server:
        yield server


def write(folder: Path, records: list[dict], connectors: str, steps: str) -> Path:
    (folder / "record.json").write_text(json.dumps(records[0]))
    return write_file_flow(folder, records, connectors, steps)


def http(url: str, actions: str) -> str:
    return f"""
[connectors.crm]
kind = "http"
base_url = "{url}"
headers = {{ X-Source = "sync-agent" }}
[connectors.crm.objects.jobs]
path = "/jobs"
key = "id"
{actions}
"""


RUN = '[connectors.crm.objects.jobs.actions.run]\nmethod = "POST"\npath = "/jobs/{{ body.id }}/run"\nquery = { at = "{{ body.at }}" }\n'
RUN_STEP = """  [[flows.steps]]
  kind = "action"
  id = "start"
  action = "crm > jobs > run"
  body = { id = "{{ record.job }}", at = "{{ record.at }}" }
  output = { run = "{{ response.id }}" }
"""


def test_the_dry_run_shows_the_exact_request_that_run_then_sends(tmp_path, sink, cli):
    cfg = write(tmp_path, [{"sid": "1", "job": "nightly #2", "at": "2026-01-01 02:00+01:00"}], http(sink.url, RUN), RUN_STEP)
    status, out, err = cli("--config", str(cfg), "test", "sync", "--record", str(tmp_path / "record.json"), "--json")
    assert status == 0, out + err
    [report] = json.loads(out)
    [step] = report["steps"]
    [shown] = step["built"]["requests"]
    assert sink.requests == []  # a dry run sends nothing
    status, out, err = cli("--config", str(cfg), "run", "--once")
    assert status == 0 and "sent: 1" in out, out + err
    [sent] = sink.requests
    url = urlsplit(shown["url"])
    assert (shown["method"], url.path, url.query) == (sent["method"], sent["path"], "at=2026-01-01+02%3A00%2B01%3A00")
    assert url.path == "/jobs/nightly%20%232/run" and sent["query"] == {"at": "2026-01-01 02:00+01:00"}
    assert shown["body"] == sent["json"] == {"id": "nightly #2", "at": "2026-01-01 02:00+01:00"}
    assert {name: sent["headers"][name] for name in shown["headers"]} == shown["headers"]  # every header shown went out as shown
    assert shown["headers"]["Idempotency-Key"] == step["idempotency_key"] and shown["headers"]["X-Source"] == "sync-agent"


def test_the_dry_run_text_shows_the_request_and_the_lookup_it_would_make(tmp_path, cli):
    actions = ('[connectors.crm.objects.jobs.actions.upsert]\n'
               'lookup = { path = "/jobs", query = { name = "eq.{{ body.name }}" }, found = "{{ response[0].id if response else \'\' }}" }\n'
               'create = { method = "POST", path = "/jobs" }\n')
    steps = '  [[flows.steps]]\n  kind = "action"\n  action = "crm > jobs > upsert"\n  body = { name = "{{ record.name }}" }\n'
    cfg = write(tmp_path, [{"sid": "1", "name": "a&b"}], http("http://127.0.0.1:9", actions), steps)
    status, out, err = cli("--config", str(cfg), "test", "sync", "--record", str(tmp_path / "record.json"))
    assert status == 0, out + err
    assert "GET http://127.0.0.1:9/jobs?name=eq.a%26b" in out and "POST http://127.0.0.1:9/jobs" in out
    assert "a dry run sends no lookup" in out


def test_a_path_value_the_real_request_refuses_fails_the_dry_run_too(tmp_path, cli):
    cfg = write(tmp_path, [{"sid": "1", "job": "../admin", "at": "x"}], http("http://127.0.0.1:9", RUN), RUN_STEP)
    status, out, err = cli("--config", str(cfg), "test", "sync", "--record", str(tmp_path / "record.json"))
    assert status == 1 and "failed" in out and "'../admin' cannot be one path segment" in out and "jobs > run" in out, out + err


MAIL = """
[connectors.mail]
kind = "smtp"
host = "127.0.0.1"
port = 9
security = "none"
sender = "agent@example.invalid"
"""
MAIL_STEP = """  [[flows.steps]]
  kind = "action"
  action = "mail > message > send"
  to = "sales@example.invalid"
  reply_to = "{{ record.reply }}"
  subject = "Lead {{ record.sid }}"
  text = "hello"
"""


def test_a_reply_to_the_real_send_rejects_fails_the_dry_run(tmp_path, cli):
    cfg = write(tmp_path, [{"sid": "1", "reply": "not an address"}], MAIL, MAIL_STEP)
    status, out, err = cli("--config", str(cfg), "test", "sync", "--record", str(tmp_path / "record.json"))
    assert status == 1 and "failed" in out and "reply_to: 'not an address' is not a valid address" in out, out + err


def test_a_good_message_shows_its_envelope_and_headers_without_connecting(tmp_path, cli):
    cfg = write(tmp_path, [{"sid": "7", "reply": "Ann <ann@example.invalid>"}], MAIL, MAIL_STEP)
    status, out, err = cli("--config", str(cfg), "test", "sync", "--record", str(tmp_path / "record.json"))
    assert status == 0, out + err  # port 9 of the loopback has no server: nothing connected
    assert "MAIL FROM agent@example.invalid, RCPT TO sales@example.invalid" in out
    assert "Reply-To: Ann <ann@example.invalid>" in out and "Subject: Lead 7" in out and "Message-ID: <" in out

"""The real CLI as a subprocess against a real view server and a real HTTP sink on 127.0.0.1."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sinkserver import SinkServer
from viewserver import ViewServer, make_leads, update

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-view-pass"


def agent(cfg: Path, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(cfg), *args],
        capture_output=True, text=True, timeout=timeout, cwd=cfg.parent,
        env={**os.environ, "VIEW_PASSWORD": PASSWORD, "CRM_TOKEN": "crm-token-123", **(env or {})},
    )


def write_config(tmp_path: Path, view: ViewServer, sink: SinkServer, *, first_run: str = "deliver", extra_steps: str = "",
                 body: str = 'body = "mapped"', size: int = 100) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[agent]
ledger = "var/agent.db"
concurrency = 4

[sources.leads]
kind = "rest"
url = "{view.url}"
id = "lastSubmissionID"
updated = "lastModified"
entity = "RecordId"
first_run = "{first_run}"
timeout = "5s"
auth = {{ kind = "basic", username = "integration", password = "${{VIEW_PASSWORD}}" }}
paging = {{ kind = "page", param = "page", size_param = "pageSize", size = {size}, start = 1 }}

[connectors.crm]
kind = "http"
base_url = "{sink.url}"
auth = {{ kind = "bearer", token = "${{CRM_TOKEN}}" }}
idempotency_header = "Idempotency-Key"
timeout = "5s"
[connectors.crm.objects.leads]
path = "/leads"
key = "email"

[[flows]]
name = "leads-to-crm"
source = "leads"

  [[flows.steps]]
  kind = "map"
  fields = {{ email = "{{{{ record.Email | lower }}}}", name = "{{{{ record.FirstName }}}} {{{{ record.LastName }}}}", version = "{{{{ record.lastSubmissionID }}}}" }}
{extra_steps}
  [[flows.steps]]
  kind = "action"
  action = "crm > leads > upsert"
  {body}
  retry = {{ attempts = 3, interval = "1s", jitter = false }}
""")
    return cfg


@pytest.fixture
def sink():
    with SinkServer() as server:
        yield server


def test_thousand_records_are_sent_once_then_never_again(tmp_path, sink):
    with ViewServer(make_leads(1000), paging="page", page_size=100, username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink)
        first = agent(cfg, "run", "--once")
        assert first.returncode == 0, first.stderr
        assert "new: 1000" in first.stdout and "sent: 1000" in first.stdout
        posts = sink.requests_to("POST", "/leads")
        assert len(posts) == 1000
        assert len({r["headers"]["Idempotency-Key"] for r in posts}) == 1000
        assert all(r["headers"]["Authorization"] == "Bearer crm-token-123" for r in posts)
        assert len([h for h in view.hits if "page=" in h]) == 11  # ten full pages, then the empty one that ends paging (no cursor: no second read)

        second = agent(cfg, "run", "--once")
        assert second.returncode == 0, second.stderr
        assert "new: 0" in second.stdout and "sent: 0" in second.stdout
        assert len(sink.requests_to("POST", "/leads")) == 1000

        view.records[5] = update(view.records[5], FirstName="Renée")
        third = agent(cfg, "run", "--once")
        assert "new: 1" in third.stdout and "sent: 1" in third.stdout
        [patch] = sink.requests_to("PATCH")
        assert patch["json"]["name"].startswith("Renée") and patch["json"]["version"] == view.records[5]["lastSubmissionID"]
        assert len(sink.requests_to("POST", "/leads")) == 1000
        assert sink.replays == 0


def test_first_run_skip_primes_and_sends_only_what_is_new_later(tmp_path, sink):
    with ViewServer(make_leads(30), page_size=100, username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink, first_run="skip")
        first = agent(cfg, "run", "--once")
        assert "primed: 30" in first.stdout and "sent: 0" in first.stdout
        view.records.append(make_leads(1)[0])
        second = agent(cfg, "run", "--once")
        assert "new: 1" in second.stdout and "sent: 1" in second.stdout
        assert len(sink.requests_to("POST")) == 1


def test_view_401_fails_the_poll_cleanly_without_leaking_the_password(tmp_path, sink):
    with ViewServer(make_leads(5), username="integration", password="another-password") as view:
        cfg = write_config(tmp_path, view, sink)
        result = agent(cfg, "run", "--once")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert "401" in result.stdout + result.stderr and "leads" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    status = agent(cfg, "status", "--json")
    report = json.loads(status.stdout)
    assert report["sources"]["leads"]["failing"] is True and report["sources"]["leads"]["cursor"] is None
    assert not sink.requests


def test_bad_records_are_quarantined_and_the_rest_of_the_page_goes_on(tmp_path, sink):
    leads = make_leads(6)
    leads[1].pop("lastSubmissionID")
    leads[2]["lastSubmissionID"] = None
    leads[3]["lastSubmissionID"] = 1.5
    with ViewServer(leads, username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink)
        result = agent(cfg, "run", "--once")
        assert result.returncode == 1
        assert "quarantined: 3" in result.stdout and "sent: 3" in result.stdout
        assert "Traceback" not in result.stderr
        assert result.stderr.count("quarantined:") == 3
        again = agent(cfg, "run", "--once")
        assert again.stderr.count("quarantined:") == 0  # reported once, not on every poll
        listing = agent(cfg, "executions", "--status", "quarantined", "--json")
        assert len(json.loads(listing.stdout)) == 3


def test_missing_template_field_fails_that_record_only(tmp_path, sink):
    leads = make_leads(3)
    del leads[0]["FirstName"]
    with ViewServer(leads, username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink)
        result = agent(cfg, "run", "--once")
    assert result.returncode == 1
    assert "sent: 2" in result.stdout and "failed: 1" in result.stdout
    assert "FirstName" in result.stdout
    failed = json.loads(agent(cfg, "executions", "--status", "failed", "--json").stdout)
    assert len(failed) == 1 and "FirstName" in failed[0]["last_error"]


def test_sink_5xx_is_retried_by_policy_with_the_same_key(tmp_path, sink):
    sink.fail_next(1, 503)
    with ViewServer(make_leads(1), username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink)
        first = agent(cfg, "run", "--once")
        assert first.returncode == 0  # a retry waiting for its time is not a failure
        assert "waiting: 1" in first.stdout
        rows = json.loads(agent(cfg, "executions", "--json").stdout)
        assert rows[0]["status"] == "retrying" and "503" in rows[0]["last_error"]
        import time
        time.sleep(1.1)  # the policy's interval is 1s; the ledger's due time is real wall time here
        second = agent(cfg, "run", "--once")
        assert "sent: 1" in second.stdout
    keys = {r["headers"]["Idempotency-Key"] for r in sink.requests}
    assert len(keys) == 1 and len(sink.requests_to("POST")) == 1


def test_embedded_default_runs_offline(tmp_path):
    for name in ("agent.toml",):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "leads.json").write_text((ROOT / "examples" / "leads.json").read_text())
    first = agent(tmp_path / "agent.toml", "run", "--once")
    assert first.returncode == 0, first.stderr
    records = json.loads((ROOT / "examples" / "leads.json").read_text())["records"]
    spam = sum(r["Status"] == "Spam" for r in records)
    lines = (tmp_path / "var" / "outbox.jsonl").read_text().splitlines()
    assert len(lines) == len(records) - spam
    mails = list((tmp_path / "var" / "mail" / "new").iterdir())
    assert len(mails) == len(records) - spam
    second = agent(tmp_path / "agent.toml", "run", "--once")
    assert "sent: 0" in second.stdout
    assert len((tmp_path / "var" / "outbox.jsonl").read_text().splitlines()) == len(lines)
    assert len(list((tmp_path / "var" / "mail" / "new").iterdir())) == len(mails)

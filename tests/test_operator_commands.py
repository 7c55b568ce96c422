"""Commands that answer an operator's questions, run in-process against real local servers: validate --connect logs in
for real, bulk re-queues, newest-first listings with filters, one record's whole story, quarantines of this run only,
and messages that name the usual fix."""
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sinkserver import SinkServer
from smtpserver import SmtpServer, make_certificate
from test_cli_integration import PASSWORD, write_config
from viewserver import ViewServer, make_leads, respond

TOKEN = "crm-token-123"
FUTURE, PAST = "2999-01-01T00:00:00Z", "2000-01-01T00:00:00Z"


@pytest.fixture
def cli(cli, monkeypatch):
    """The in-process `agent ...` of conftest, with the test config's secrets set."""
    monkeypatch.setenv("VIEW_PASSWORD", PASSWORD)
    monkeypatch.setenv("CRM_TOKEN", TOKEN)
    return cli


@pytest.fixture
def sink():
    with SinkServer() as server:
        yield server


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


# -- validate --connect ---------------------------------------------------------------------------------------

def test_validate_connect_logs_in_where_plain_validate_only_connects(tmp_path, cli, sink, monkeypatch):
    sink.fail_when(lambda request: request["headers"].get("Authorization") != f"Bearer {TOKEN}", 401)
    with ViewServer(make_leads(2), username="integration", password=PASSWORD) as view:
        cfg = str(write_config(tmp_path, view, sink))
        status, out, err = cli("--config", cfg, "validate", "--connect")
        assert status == 0, out + err
        assert "ok (HTTP 200)" in lines_with(out, "sources.leads")[0] and "ok (HTTP" in lines_with(out, "connectors.crm")[0]

        monkeypatch.setenv("VIEW_PASSWORD", "a-wrong-password")
        monkeypatch.setenv("CRM_TOKEN", "a-wrong-token")
        assert cli("--config", cfg, "validate")[0] == 0  # a TCP connection cannot tell a wrong password
        status, out, err = cli("--config", cfg, "validate", "--connect")
    assert status == 1
    assert "LOGIN FAILED: HTTP 401" in lines_with(out, "sources.leads")[0]
    assert "LOGIN FAILED: HTTP 401" in lines_with(out, "connectors.crm")[0]
    assert "a-wrong-password" not in out + err and "a-wrong-token" not in out + err


class _Https:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate, answering 200 to every GET."""

    def __init__(self, folder: Path):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*make_certificate(folder))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_validate_connect_says_an_untrusted_certificate_is_untrusted(tmp_path, cli, sink):
    with ViewServer([], username="integration", password=PASSWORD) as view, _Https(tmp_path) as https:
        cfg = write_config(tmp_path, view, sink)
        cfg.write_text(cfg.read_text().replace(sink.url, https.url))
        assert cli("--config", str(cfg), "validate")[0] == 0  # TCP gets through
        status, out, err = cli("--config", str(cfg), "validate", "--connect")
    assert status == 1 and "UNTRUSTED" in lines_with(out, "connectors.crm")[0] and "certificate" in out, out + err


def smtp_config(tmp_path: Path, server: SmtpServer, ca_file: Path | None, security: str = "starttls", login: bool = True) -> str:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[connectors.mail]
kind = "smtp"
host = "127.0.0.1"
port = {server.port}
security = "{security}"
{'username = "agent"' if login else ""}
{'password = "${SMTP_PASSWORD}"' if login else ""}
sender = "agent@example.invalid"
timeout = "5s"
{f'ca_file = "{ca_file.name}"' if ca_file else ""}
""")
    return str(cfg)


def test_validate_connect_logs_in_to_the_mail_server_over_verified_starttls(tmp_path, cli, monkeypatch):
    cert, key = make_certificate(tmp_path)
    with SmtpServer(auth=("agent", "s3cret-mail"), certificate=(cert, key)) as server:
        monkeypatch.setenv("SMTP_PASSWORD", "s3cret-mail")
        status, out, err = cli("--config", smtp_config(tmp_path, server, cert), "validate", "--connect")
        assert status == 0 and "ok (logged in)" in lines_with(out, "connectors.mail")[0], out + err
        assert server.logins == ["agent"]

        monkeypatch.setenv("SMTP_PASSWORD", "not-the-password")
        status, out, err = cli("--config", smtp_config(tmp_path, server, cert), "validate", "--connect")
        assert status == 1 and "LOGIN FAILED" in lines_with(out, "connectors.mail")[0] and "535" in out, out + err

        status, out, err = cli("--config", smtp_config(tmp_path, server, None), "validate", "--connect")
        assert status == 1 and "UNTRUSTED" in lines_with(out, "connectors.mail")[0], out + err
    assert not server.messages and "not-the-password" not in out + err


def test_validate_connect_verifies_implicit_tls(tmp_path, cli):
    cert, key = make_certificate(tmp_path)
    with SmtpServer(certificate=(cert, key), implicit_tls=True) as server:
        status, out, err = cli("--config", smtp_config(tmp_path, server, cert, "ssl", login=False), "validate", "--connect")
        assert status == 0 and "ok (ssl, no login configured)" in lines_with(out, "connectors.mail")[0], out + err
        status, out, err = cli("--config", smtp_config(tmp_path, server, None, "ssl", login=False), "validate", "--connect")
        assert status == 1 and "UNTRUSTED" in lines_with(out, "connectors.mail")[0], out + err


# -- retry --failed | --dead [--flow F] [--since T] ----------------------------------------------------------------

def two_flow_config(tmp_path: Path, sink: SinkServer, leads: list[dict]) -> str:
    """Two flows to one sink: `dead` gives up on a 503 after one attempt, `failed` fails on a 400."""
    (tmp_path / "leads.json").write_text(json.dumps({"records": leads}))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[agent]
ledger = "var/agent.db"
log_level = "WARNING"

[sources.leads]
kind = "file"
path = "leads.json"
id = "lastSubmissionID"
entity = "RecordId"
first_run = "deliver"

[connectors.crm]
kind = "http"
base_url = "{sink.url}"
timeout = "5s"
[connectors.crm.objects.dead]
path = "/dead"
[connectors.crm.objects.failed]
path = "/failed"

[[flows]]
name = "to-dead"
source = "leads"
  [[flows.steps]]
  kind = "action"
  action = "crm > dead > create"
  retry = {{ attempts = 1 }}

[[flows]]
name = "to-failed"
source = "leads"
  [[flows.steps]]
  kind = "action"
  action = "crm > failed > create"
""")
    return str(cfg)


def statuses(cli, cfg: str) -> dict[int, str]:
    return {row["id"]: row["status"] for row in json.loads(cli("--config", cfg, "executions", "--json")[1])}


def test_retry_requeues_failed_or_dead_work_in_bulk_by_flow_and_time(tmp_path, cli, sink):
    sink.fail_when(lambda request: request["path"] == "/dead", 503)
    sink.fail_when(lambda request: request["path"] == "/failed", 400)
    cfg = two_flow_config(tmp_path, sink, make_leads(2))
    assert cli("--config", cfg, "run", "--once")[0] == 1
    before = statuses(cli, cfg)
    assert sorted(before.values()) == ["dead", "dead", "failed", "failed"]

    status, out, err = cli("--config", cfg, "retry", "--failed", "--since", FUTURE)
    assert status == 0 and "re-queued 0" in out and statuses(cli, cfg) == before

    status, out, err = cli("--config", cfg, "retry", "--failed", "--flow", "to-dead")
    assert status == 0 and "re-queued 0" in out  # that flow's work is dead, not failed

    status, out, err = cli("--config", cfg, "retry", "--failed", "--since", PAST)
    assert status == 0 and "re-queued 2" in out
    after = statuses(cli, cfg)
    assert {i: s for i, s in after.items() if s == "retrying"} == {i: "retrying" for i, s in before.items() if s == "failed"}

    status, out, err = cli("--config", cfg, "retry", "--dead", "--flow", "to-dead", "--json")
    assert status == 0 and sorted(json.loads(out)["requeued"]) == sorted(i for i, s in before.items() if s == "dead")
    assert set(statuses(cli, cfg).values()) == {"retrying"}


@pytest.mark.parametrize("argv, says", [
    (["retry", "--flow", "to-dead"], "--failed or --dead"),
    (["retry", "1", "--dead"], "not both"),
    (["retry", "--dead", "--flow", "nope"], "unknown flow 'nope'"),
    (["retry", "--failed", "--since", "yesterday"], "not a time"),
])
def test_retry_usage_mistakes_exit_2_and_say_what_to_write(tmp_path, cli, sink, argv, says):
    cfg = two_flow_config(tmp_path, sink, make_leads(1))
    cli("--config", cfg, "run", "--once")
    status, out, err = cli("--config", cfg, *argv)
    assert status == 2 and says in err


# -- executions: newest first, filters, the entity beside the record ----------------------------------------------

def test_executions_lists_newest_first_with_the_entity_and_filters_by_record_entity_and_time(tmp_path, cli, sink):
    leads = make_leads(3)
    cfg = two_flow_config(tmp_path, sink, leads)
    cli("--config", cfg, "run", "--once")
    status, out, err = cli("--config", cfg, "executions")
    ids = [int(line.split()[0]) for line in out.splitlines()[1:]]
    assert status == 0 and ids == sorted(ids, reverse=True) and len(ids) == 6
    header = out.splitlines()[0].split()
    assert header.index("entity") == header.index("record") + 1
    [line] = [line for line in out.splitlines() if leads[1]["lastSubmissionID"] in line and "to-dead" in line]
    assert line.split()[3:5] == [leads[1]["lastSubmissionID"], leads[1]["RecordId"]]

    by_record = json.loads(cli("--config", cfg, "executions", "--record", leads[0]["lastSubmissionID"], "--json")[1])
    assert {(r["key"], r["flow"]) for r in by_record} == {(leads[0]["lastSubmissionID"], "to-dead"), (leads[0]["lastSubmissionID"], "to-failed")}
    by_entity = json.loads(cli("--config", cfg, "executions", "--entity", leads[2]["RecordId"], "--flow", "to-failed", "--json")[1])
    assert [r["entity"] for r in by_entity] == [leads[2]["RecordId"]]
    assert json.loads(cli("--config", cfg, "executions", "--since", FUTURE, "--json")[1]) == []
    assert len(json.loads(cli("--config", cfg, "executions", "--since", PAST, "--json")[1])) == 6


# -- why KEY -----------------------------------------------------------------------------------------------------

def test_why_tells_the_whole_story_of_one_record(tmp_path, cli, sink):
    sink.fail_when(lambda request: request["path"] == "/dead", 503)
    leads = make_leads(2)
    cfg = two_flow_config(tmp_path, sink, leads)
    cli("--config", cfg, "run", "--once")
    key = leads[1]["lastSubmissionID"]
    status, out, err = cli("--config", cfg, "why", key)
    assert status == 0, err
    assert f"record {key}" in out and "source leads" in out and f"entity {leads[1]['RecordId']}" in out
    assert "first seen" in out and "by poll 1" in out and "last shown" in out
    assert "flow to-dead" in out and "dead" in out and "503" in out and "attempt 1" in out
    assert "flow to-failed" in out and "succeeded" in out
    assert "agent retry" in out  # where it stands, and what to do about it

    story = json.loads(cli("--config", cfg, "why", key, "--json")[1])
    [record] = story
    assert record["key"] == key and record["first_poll"]["id"] == 1
    assert {e["flow"]: e["status"] for e in record["executions"]} == {"to-dead": "dead", "to-failed": "succeeded"}
    assert all(e["attempts_made"] for e in record["executions"])


def test_why_for_a_key_the_ledger_does_not_know_exits_1(tmp_path, cli, sink):
    cfg = two_flow_config(tmp_path, sink, make_leads(1))
    cli("--config", cfg, "run", "--once")
    status, out, err = cli("--config", cfg, "why", "S-nope")
    assert status == 1 and "S-nope" in out and "not in the ledger" in out


# -- run --once and quarantines -----------------------------------------------------------------------------------

def test_run_once_fails_for_quarantines_found_in_this_run_not_for_known_ones(tmp_path, cli, sink):
    leads = make_leads(2)
    del leads[0]["lastSubmissionID"]  # no id: quarantined
    cfg = two_flow_config(tmp_path, sink, leads)
    first = cli("--config", cfg, "run", "--once")
    assert first[0] == 1 and "quarantined: 1" in first[1]
    second = cli("--config", cfg, "run", "--once")
    assert second[0] == 0 and "quarantined: 1" in second[1] and "already quarantined" in second[1], second
    leads.append({**make_leads(1)[0], "lastSubmissionID": None})
    (tmp_path / "leads.json").write_text(json.dumps({"records": leads}))
    assert cli("--config", cfg, "run", "--once")[0] == 1  # a new one fails the run again


# -- messages that name the usual fix -------------------------------------------------------------------------------

def test_a_page_repeating_the_previous_one_names_paging_total(tmp_path, cli, sink):
    with ViewServer([], username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink, size=2)
        view.fail_with(respond(200, json.dumps({"records": make_leads(2)}).encode()))  # every page is the same full page
        status, out, err = cli("--config", str(cfg), "run", "--once")
    assert status == 1 and "repeats the previous page" in out and "paging.total" in out


def test_a_missing_field_in_a_template_suggests_a_default(tmp_path, cli, sink):
    record = make_leads(1)[0]
    del record["FirstName"]
    (tmp_path / "record.json").write_text(json.dumps(record))
    with ViewServer([], username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink)
        status, out, err = cli("--config", str(cfg), "test", "leads-to-crm", "--record", str(tmp_path / "record.json"))
    assert status == 1 and "FirstName" in out and "| default(" in out

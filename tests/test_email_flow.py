"""Email end to end: the real CLI (``python -m agent ... run --once``) against a real view, a real SMTP server, a Maildir.

Each test writes an ``agent.toml`` into ``tmp_path``, runs the agent as a
subprocess and asserts what the server (or the Maildir) received and what the
ledger says through ``agent executions --json`` / ``agent status --json``.
"""
import base64
import email
import email.policy
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.flows import idempotency_key
from state.sqlite import SqliteLedger as Ledger
from smtpserver import HostileSmtpServer, SmtpServer, make_certificate
from viewserver import ViewServer, make_leads, update

ROOT = Path(__file__).resolve().parent.parent
VIEW_PASSWORD = "view-pa55-Zq8rT"
SMTP_PASSWORD = "smtp-pa55-Kx3wV"
SALES = "sales@example.invalid"
SENDER = "Sync Agent <sync-agent@example.invalid>"
FLOW = "lead-email"


# -- running the agent -----------------------------------------------------------------

def agent(cfg: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI as a subprocess, in the config's folder, with the secrets in its environment."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    environ.update({"VIEW_PASSWORD": VIEW_PASSWORD, "SMTP_PASSWORD": SMTP_PASSWORD, **(env or {})})
    return subprocess.run([sys.executable, "-m", "agent", "--config", str(cfg), *args],
                          capture_output=True, text=True, timeout=30, cwd=cfg.parent, env=environ)


def summary(result: subprocess.CompletedProcess) -> dict[str, int]:
    """The ``run --once`` summary line: 'polled: 1, failed polls: 0, ...' -> {'polled': 1, 'failed polls': 0, ...}."""
    line = result.stdout.splitlines()[0]
    return {name: int(value) for name, _, value in (part.partition(": ") for part in line.split(", "))}


def executions(cfg: Path, *args: str) -> list[dict]:
    """``agent executions --json ARGS``, parsed."""
    listing = agent(cfg, "executions", "--json", *args)
    assert listing.returncode == 0, listing.stderr
    return json.loads(listing.stdout)


def ledger_rows(cfg: Path, status: str | None = None) -> list[dict]:
    """What ``agent executions --json`` lists, read through the same Ledger call in-process (a subprocess costs ~0.5 s)."""
    with Ledger(cfg.parent / "var" / "agent.db", hold=False) as ledger:
        return ledger.executions(status=status)


def message_id(key: str, flow: str = FLOW, step: int | str = 0) -> str:
    """The Message-ID the agent must give the email of record ``key``: the step's idempotency key at the sender's domain."""
    return f"<{idempotency_key(flow, step, 'leads', key)}@example.invalid>"


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=email.policy.default)


# -- writing a config -----------------------------------------------------------------

def rest_source(view: ViewServer) -> str:
    return f"""
[sources.leads]
kind = "rest"
url = "{view.url}"
id = "lastSubmissionID"
updated = "lastModified"
entity = "RecordId"
first_run = "deliver"
timeout = "5s"
auth = {{ kind = "basic", username = "integration", password = "${{VIEW_PASSWORD}}" }}
paging = {{ kind = "page", param = "page", size_param = "pageSize", size = 100, start = 1 }}
"""


def file_source(folder: Path, records: list[dict]) -> str:
    (folder / "leads.json").write_text(json.dumps({"records": records}, ensure_ascii=False), encoding="utf-8")
    return """
[sources.leads]
kind = "file"
path = "leads.json"
id = "lastSubmissionID"
entity = "RecordId"
first_run = "deliver"
"""


def smtp_connector(server: SmtpServer, *, security: str = "none", auth: bool = False, ca_file: str | None = None) -> str:
    lines = [f'host = "{server.host}"', f"port = {server.port}", f'security = "{security}"', f'sender = "{SENDER}"', 'timeout = "5s"']
    if auth:
        lines += ['username = "agent"', 'password = "${SMTP_PASSWORD}"']
    if ca_file:
        lines.append(f'ca_file = "{ca_file}"')
    return '\n[connectors.mail]\nkind = "smtp"\n' + "\n".join(lines) + "\n"


MAILBOX = f"""
[connectors.mail]
kind = "mailbox"
path = "var/mail"
sender = "{SENDER}"
"""

# Not an f-string: the templates' braces stay as they are.
ACTION = """
[[flows]]
name = "lead-email"
source = "leads"

  [[flows.steps]]
  kind = "action"
  action = "mail > message > send"
  to = @TO@
  @REPLY_TO@
  subject = "New lead: {{ record.FirstName }} {{ record.LastName }}"
  text = \"\"\"{{ record.FirstName }} {{ record.LastName }} ({{ record.Company }}) registered.
Email: {{ record.Email }}
\"\"\"
  html = \"\"\"<p><b>{{ record.FirstName }} {{ record.LastName }}</b> ({{ record.Company }}) registered.</p>
\"\"\"
  retry = { attempts = 3, interval = "500ms", jitter = false }
"""


def write_config(folder: Path, source: str, connector: str, *, to: str = f'["{SALES}"]',
                 reply_to: str = 'reply_to = ["{{ record.Email }}"]', concurrency: int = 4, log_level: str = "INFO") -> Path:
    cfg = folder / "agent.toml"
    head = f'[agent]\nledger = "var/agent.db"\nconcurrency = {concurrency}\nlog_level = "{log_level}"\n'
    cfg.write_text(head + source + connector + ACTION.replace("@TO@", to).replace("@REPLY_TO@", reply_to), encoding="utf-8")
    return cfg


class RecordingSmtpServer(SmtpServer):
    """An SmtpServer that also counts every MAIL/RCPT/DATA command (``data`` keeps every DATA payload, accepted or not)."""

    def __init__(self, **options):
        super().__init__(**options)
        self.commands: Counter = Counter()

    async def _play(self, stage, smtp, accept):
        self.commands[stage] += 1
        return await super()._play(stage, smtp, accept)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


def trust(folder: Path, certificate) -> str:
    """Copy the server's self-signed certificate beside the config; the relative ca_file that trusts it."""
    (folder / "ca.pem").write_bytes(certificate[0].read_bytes())
    return "ca.pem"


# -- 1. the repo's own agent.toml -----------------------------------------------------------------

def test_the_repo_config_writes_one_readable_email_per_lead_and_none_the_second_time(tmp_path):
    (tmp_path / "examples").mkdir()
    (tmp_path / "agent.toml").write_bytes((ROOT / "agent.toml").read_bytes())
    (tmp_path / "examples" / "leads.json").write_bytes((ROOT / "examples" / "leads.json").read_bytes())
    leads = [r for r in json.loads((ROOT / "examples" / "leads.json").read_text())["records"] if r["Status"] != "Spam"]
    inbox = tmp_path / "var" / "mail" / "new"

    first = agent(tmp_path / "agent.toml", "run", "--once")

    assert first.returncode == 0, first.stderr
    assert (summary(first)["filtered"], summary(first)["sent"], summary(first)["failed"], summary(first)["waiting"]) == (4, 2 * 23, 0, 0)
    files = sorted(inbox.iterdir())
    assert len(files) == len(leads) == 23
    by_id = {}
    for path in files:
        raw = path.read_bytes()
        assert raw.isascii()  # 7bit: non-ASCII travels encoded
        by_id[parse(raw)["Message-ID"]] = parse(raw)
    # the mail step of flow "new-leads" has id "mail-sales": its key derives from that
    assert set(by_id) == {message_id(r["lastSubmissionID"], flow="new-leads", step="id:mail-sales") for r in leads}
    for lead in leads:
        message = by_id[message_id(lead["lastSubmissionID"], flow="new-leads", step="id:mail-sales")]
        assert message["Subject"] == f"New lead: {lead['FirstName']} {lead['LastName']} ({lead['Company']})"
        assert message["To"] == "Sales Team <sales@example.invalid>"
        assert message["Reply-To"] == lead["Email"]
        assert message["Envelope-To"] == SALES
        text = message.get_body(("plain",)).get_content()
        assert f"Name:      {lead['FirstName']} {lead['LastName']}" in text and f"Company:   {lead['Company']}" in text
    rios = next(r for r in leads if r["Company"] == "Ríos & Hijos")
    html = by_id[message_id(rios["lastSubmissionID"], flow="new-leads", step="id:mail-sales")].get_body(("html",)).get_content()
    assert "<td>Ríos &amp; Hijos</td>" in html  # record data is escaped in html, verbatim in text

    second = agent(tmp_path / "agent.toml", "run", "--once")

    assert second.returncode == 0, second.stderr
    assert (summary(second)["new"], summary(second)["sent"]) == (0, 0)
    assert sorted(inbox.iterdir()) == files


# -- 2. a REST view into SMTP with STARTTLS (a private CA) and AUTH; AUTH in clear is in test 3 -----------------------------

def test_view_to_smtp_sends_each_version_once(tmp_path, certificate):
    with ViewServer(make_leads(4), username="integration", password=VIEW_PASSWORD) as view, \
            SmtpServer(auth=("agent", SMTP_PASSWORD), certificate=certificate) as smtp:
        connector = smtp_connector(smtp, security="starttls", auth=True, ca_file=trust(tmp_path, certificate))
        cfg = write_config(tmp_path, rest_source(view), connector)

        first = agent(cfg, "run", "--once")

        assert first.returncode == 0, first.stderr
        assert (summary(first)["new"], summary(first)["sent"], summary(first)["waiting"]) == (4, 4, 0)
        assert smtp.logins == ["agent"] and smtp.connections == 1  # one connection, one login, for the whole drain
        by_id = {m.message["Message-ID"]: m for m in smtp.messages}
        assert set(by_id) == {message_id(r["lastSubmissionID"]) for r in view.records}
        for lead in view.records:
            received = by_id[message_id(lead["lastSubmissionID"])]
            assert (received.mail_from, received.rcpt_tos) == ("sync-agent@example.invalid", [SALES])
            assert received.message["Subject"] == f"New lead: {lead['FirstName']} {lead['LastName']}"
            assert received.message["Reply-To"] == lead["Email"]

        second = agent(cfg, "run", "--once")

        assert second.returncode == 0, second.stderr
        assert (summary(second)["new"], summary(second)["sent"]) == (0, 0)
        assert len(smtp.messages) == 4 and smtp.connections == 1  # nothing to send: not even a connection

        view.records[1] = update(view.records[1], FirstName="Renée")
        third = agent(cfg, "run", "--once")

        assert third.returncode == 0, third.stderr
        assert (summary(third)["new"], summary(third)["sent"]) == (1, 1)
        assert len(smtp.messages) == 5
        latest = smtp.messages[-1].message
        assert latest["Message-ID"] == message_id(view.records[1]["lastSubmissionID"])
        assert latest["Subject"] == f"New lead: Renée {view.records[1]['LastName']}"
        assert len({m.message["Message-ID"] for m in smtp.messages}) == 5


# -- 3. transient and permanent replies -----------------------------------------------------------------

def test_transient_replies_wait_then_deliver_once_with_the_same_message_id(tmp_path):
    leads = make_leads(2)
    ids = [message_id(lead["lastSubmissionID"]) for lead in leads]
    with RecordingSmtpServer(auth=("agent", SMTP_PASSWORD)) as smtp:  # AUTH without TLS, as the server allows it
        smtp.reply_next(1, "451 4.3.0 mailbox busy, try later")
        smtp.reply_next(1, "421 4.3.2 service shutting down")  # smtplib closes the connection on a 421
        # one at a time: the first record meets the 451, the second the 421
        cfg = write_config(tmp_path, file_source(tmp_path, leads), smtp_connector(smtp, auth=True), concurrency=1)

        first = agent(cfg, "run", "--once")

        assert first.returncode == 0, first.stderr  # retries waiting for their time are not failures
        assert (summary(first)["sent"], summary(first)["failed"], summary(first)["waiting"]) == (0, 0, 2)
        rows = ledger_rows(cfg)
        assert [(r["key"], r["status"], r["attempts"]) for r in rows] == [(lead["lastSubmissionID"], "retrying", 1) for lead in leads]
        assert "451 4.3.0 mailbox busy, try later" in rows[0]["last_error"] and "421 4.3.2 service shutting down" in rows[1]["last_error"]
        assert smtp.messages == [] and [parse(raw)["Message-ID"] for raw in smtp.data] == ids

        time.sleep(max(0.0, max(r["next_at"] for r in rows) - time.time()) + 0.01)
        second = agent(cfg, "run", "--once")

        assert second.returncode == 0, second.stderr
        assert (summary(second)["sent"], summary(second)["waiting"]) == (2, 0)
        assert sorted(m.message["Message-ID"] for m in smtp.messages) == sorted(ids)  # delivered once each
        assert sorted(parse(raw)["Message-ID"] for raw in smtp.data) == sorted(ids * 2)  # the retry carried the same Message-ID
        assert [r["status"] for r in ledger_rows(cfg)] == ["succeeded"] * 2
        assert smtp.logins == ["agent", "agent"]  # once per run: each run opened one connection


def test_permanent_replies_fail_keep_the_reply_and_are_not_retried(tmp_path):
    leads = make_leads(2)
    with RecordingSmtpServer() as smtp:
        smtp.reply_next(1, "550 5.1.1 no such user here", at="RCPT")
        smtp.reply_next(1, "550 5.7.1 message refused by policy", at="DATA")
        # one at a time: the first record meets the RCPT refusal, the second (past RCPT) the DATA refusal
        cfg = write_config(tmp_path, file_source(tmp_path, leads), smtp_connector(smtp), concurrency=1)

        first = agent(cfg, "run", "--once")

        assert first.returncode == 1, first.stderr
        assert (summary(first)["sent"], summary(first)["failed"], summary(first)["waiting"]) == (0, 2, 0)
        assert "550 5.1.1 no such user here" in first.stdout and "550 5.7.1 message refused by policy" in first.stdout
        failed = {r["key"]: r for r in executions(cfg, "--status", "failed")}
        assert set(failed) == {lead["lastSubmissionID"] for lead in leads}
        assert "550 5.1.1 no such user here" in failed[leads[0]["lastSubmissionID"]]["last_error"]
        assert "550 5.7.1 message refused by policy" in failed[leads[1]["lastSubmissionID"]]["last_error"]
        assert [r["attempts"] for r in failed.values()] == [1, 1]

        second = agent(cfg, "run", "--once")  # the server would accept now: a retry would show

        assert second.returncode == 0, second.stderr
        assert (summary(second)["sent"], summary(second)["failed"]) == (0, 0)
        assert smtp.messages == [] and smtp.commands == Counter({"MAIL": 2, "RCPT": 2, "DATA": 1})
        assert [r["status"] for r in ledger_rows(cfg)] == ["failed"] * 2


# -- 4. credential and TLS problems pause -----------------------------------------------------------------

def test_a_rejected_password_pauses_without_spending_attempts(tmp_path):
    wrong = "wrong-pa55-Jd9vQ"
    leads = make_leads(3)
    with SmtpServer(auth=("agent", SMTP_PASSWORD)) as smtp:
        cfg = write_config(tmp_path, file_source(tmp_path, leads), smtp_connector(smtp, auth=True), concurrency=1)

        result = agent(cfg, "run", "--once", env={"SMTP_PASSWORD": wrong})

        # DESIGN §7: exit 1 is for failed polls, quarantined records, failed or dead executions; paused is none of those
        assert result.returncode == 0, result.stderr
        assert (summary(result)["sent"], summary(result)["failed"], summary(result)["waiting"]) == (0, 0, 3)
        assert "paused" in result.stderr.lower() and "535" in result.stderr
        rows = ledger_rows(cfg)
        assert [(r["status"], r["attempts"]) for r in rows] == [("paused", 0)] * 3
        assert all("535" in r["last_error"] and "check username, password and security" in r["last_error"] for r in rows)
        status = agent(cfg, "status", "--json")
        assert status.returncode == 1, status.stderr  # a paused connector needs an operator: the health check fails
        assert json.loads(status.stdout)["flows"][FLOW]["paused"] == 3
        assert smtp.messages == [] and smtp.logins == []
        assert smtp.connections == 1  # the connector paused: the other records did not try the refused password again
        for text in (result.stdout, result.stderr, status.stdout, json.dumps(rows)):
            assert wrong not in text and SMTP_PASSWORD not in text


def test_a_rejected_password_is_tried_once_even_with_deliveries_in_flight(tmp_path):
    leads = make_leads(3)
    with SmtpServer(auth=("agent", SMTP_PASSWORD)) as smtp:
        cfg = write_config(tmp_path, file_source(tmp_path, leads), smtp_connector(smtp, auth=True), concurrency=4)

        result = agent(cfg, "run", "--once", env={"SMTP_PASSWORD": "wrong-pa55-Jd9vQ"})

        assert result.returncode == 0, result.stderr
        assert [r["status"] for r in ledger_rows(cfg)] == ["paused"] * 3
        assert smtp.connections == 1, f"{smtp.connections} logins with a password the server already refused"


def test_starttls_to_an_untrusted_certificate_pauses_by_default(tmp_path, certificate):
    leads = make_leads(2)
    with SmtpServer(certificate=certificate) as smtp:
        cfg = write_config(tmp_path, file_source(tmp_path, leads), smtp_connector(smtp, security="starttls"))

        result = agent(cfg, "run", "--once")

        assert result.returncode == 0, result.stderr
        assert (summary(result)["sent"], summary(result)["failed"], summary(result)["waiting"]) == (0, 0, 2)
        rows = ledger_rows(cfg)
        assert [(r["status"], r["attempts"]) for r in rows] == [("paused", 0)] * 2
        assert all("TLS certificate not trusted" in r["last_error"] and "ca_file" in r["last_error"] for r in rows)
        assert smtp.messages == []


# -- 5. a crash between the server's acceptance and the ledger -----------------------------------------------------------------

def test_a_crash_after_smtp_accepted_resends_with_the_same_message_id(tmp_path):
    leads = make_leads(3)
    with SmtpServer() as smtp:
        cfg = write_config(tmp_path, file_source(tmp_path, leads), smtp_connector(smtp), concurrency=1)

        crashed = agent(cfg, "run", "--once", env={"AGENT_FAILPOINTS": "after_send:1"})

        assert crashed.returncode == -signal.SIGKILL, crashed.stderr
        [accepted] = smtp.messages
        assert accepted.message["Message-ID"] == message_id(leads[0]["lastSubmissionID"])

        again = agent(cfg, "run", "--once")

        assert again.returncode == 0, again.stderr
        assert (summary(again)["new"], summary(again)["sent"], summary(again)["waiting"]) == (0, 3, 0)
        assert "interrupted" in again.stderr
        ids = Counter(m.message["Message-ID"] for m in smtp.messages)
        assert ids == Counter({message_id(leads[0]["lastSubmissionID"]): 2, message_id(leads[1]["lastSubmissionID"]): 1,
                               message_id(leads[2]["lastSubmissionID"]): 1})
        assert [r["status"] for r in ledger_rows(cfg)] == ["succeeded"] * 3


def test_a_crash_after_the_maildir_write_does_not_write_it_twice(tmp_path):
    leads = make_leads(3)
    cfg = write_config(tmp_path, file_source(tmp_path, leads), MAILBOX, concurrency=1)
    inbox = tmp_path / "var" / "mail" / "new"

    crashed = agent(cfg, "run", "--once", env={"AGENT_FAILPOINTS": "after_send:1"})

    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert [parse(p.read_bytes())["Message-ID"] for p in inbox.iterdir()] == [message_id(leads[0]["lastSubmissionID"])]

    again = agent(cfg, "run", "--once")

    assert again.returncode == 0, again.stderr
    ids = Counter(parse(p.read_bytes())["Message-ID"] for p in inbox.iterdir())
    assert ids == Counter({message_id(lead["lastSubmissionID"]): 1 for lead in leads})
    assert summary(again)["sent"] == 3  # the skipped duplicate counts as sent (see the report)
    assert [r["status"] for r in ledger_rows(cfg)] == ["succeeded"] * 3


# -- 6. record data cannot inject headers or recipients -----------------------------------------------------------------

def test_record_data_cannot_inject_headers_or_recipients_and_html_is_escaped(tmp_path):
    leads = make_leads(8)
    for lead in leads:
        lead["ReplyTo"] = lead["Email"]
    evil = "evil@x.invalid"
    leads[0]["FirstName"] = f"Eve\r\nBcc: {evil}"
    leads[1]["FirstName"] = f"=?UTF-8?Q?=0A?=Bcc: {evil}"
    leads[2]["Email"] = f"ok@example.invalid, {evil}"
    leads[3]["Email"] = f"ok@example.invalid\nBcc: {evil}"
    leads[4]["Email"] = f"=?UTF-8?Q?Ok=0ABcc:_{evil}?= <ok@example.invalid>"
    leads[5]["ReplyTo"] = f"ok@example.invalid, {evil}"
    leads[6]["ReplyTo"] = f"=?UTF-8?Q?Ok=0D=0ABcc:_{evil}?= <ok@example.invalid>"
    leads[7]["FirstName"] = "<script>alert(1)</script>"
    expected_field = {0: "subject", 1: "subject", 2: "to", 3: "to", 4: "to", 5: "reply_to", 6: "reply_to"}
    with SmtpServer() as smtp:
        # the record's Email is a recipient too; the list form makes each item exactly one address
        cfg = write_config(tmp_path, file_source(tmp_path, leads), smtp_connector(smtp),
                           to=f'["{SALES}", "{{{{ record.Email }}}}"]', reply_to='reply_to = ["{{ record.ReplyTo }}"]')

        result = agent(cfg, "run", "--once")

        assert result.returncode == 1, result.stderr
        assert (summary(result)["sent"], summary(result)["failed"]) == (1, 7)
        failed = {r["key"]: r["last_error"] for r in ledger_rows(cfg, "failed")}
        assert set(failed) == {leads[i]["lastSubmissionID"] for i in expected_field}
        for i, field in expected_field.items():
            assert f"step 0 (mail > message > send): {field}: " in failed[leads[i]["lastSubmissionID"]]
        [received] = smtp.messages
        assert received.rcpt_tos == [SALES, leads[7]["Email"]]
        assert evil.encode() not in received.raw and b"Bcc" not in received.raw
        message = received.message
        assert message["Message-ID"] == message_id(leads[7]["lastSubmissionID"])
        assert message["Subject"] == f"New lead: <script>alert(1)</script> {leads[7]['LastName']}"
        assert message.get_body(("html",)).get_content().startswith("<p><b>&lt;script&gt;alert(1)&lt;/script&gt; ")
        assert message.get_body(("plain",)).get_content().startswith("<script>alert(1)</script> ")


def test_a_comma_in_record_data_cannot_add_a_recipient_through_a_string_address_template(tmp_path):
    leads = make_leads(2)
    leads[0]["Email"] = "ok@example.invalid, evil@x.invalid"
    with SmtpServer() as smtp:
        cfg = write_config(tmp_path, file_source(tmp_path, leads), smtp_connector(smtp), to='"{{ record.Email }}"', reply_to="")

        agent(cfg, "run", "--once")

        assert [m.rcpt_tos for m in smtp.messages] == [[leads[1]["Email"]]]
        [row] = ledger_rows(cfg, "failed")
        assert "to: " in row["last_error"]


# -- 7. secrets stay secret -----------------------------------------------------------------

def test_no_secret_reaches_output_json_or_the_ledger(tmp_path, certificate):
    secrets = [VIEW_PASSWORD, SMTP_PASSWORD,
               base64.b64encode(f"integration:{VIEW_PASSWORD}".encode()).decode(),  # the Authorization header
               base64.b64encode(f"\0agent\0{SMTP_PASSWORD}".encode()).decode()]  # AUTH PLAIN
    leads = make_leads(2)
    leads[0]["lastSubmissionID"] = None  # a quarantined record: its excerpt goes into the ledger and the log
    with ViewServer(leads, username="integration", password=VIEW_PASSWORD) as view, \
            SmtpServer(auth=("agent", SMTP_PASSWORD), certificate=certificate) as smtp:
        connector = smtp_connector(smtp, security="starttls", auth=True, ca_file=trust(tmp_path, certificate))
        cfg = write_config(tmp_path, rest_source(view), connector, log_level="DEBUG")
        smtp.reply_next(1, "451 4.3.0 try later")  # an error path too

        run = agent(cfg, "run", "--once")

        assert run.returncode == 1, run.stderr  # the quarantined record
        assert (summary(run)["quarantined"], summary(run)["waiting"]) == (1, 1)
        assert smtp.logins == ["agent"]
        with ThreadPoolExecutor(2) as pool:  # both only read the ledger
            listing, status = pool.map(lambda command: agent(cfg, command, "--json"), ["executions", "status"])
    texts = [run.stdout, run.stderr, listing.stdout, listing.stderr, status.stdout, status.stderr]
    ledger_bytes = b"".join(p.read_bytes() for p in sorted((tmp_path / "var").iterdir()) if p.name.startswith("agent.db"))
    assert ledger_bytes and "DEBUG" in run.stderr
    for secret in secrets:
        assert not [t for t in texts if secret in t], secret
        assert secret.encode() not in ledger_bytes, secret


# -- 8. values email cannot carry, hostile and idle servers -----------------------------------------------------------------

def with_retry(cfg: Path, retry: str) -> Path:
    """The config with the step's retry table replaced."""
    text = cfg.read_text(encoding="utf-8")
    cfg.write_text(text.replace('retry = { attempts = 3, interval = "500ms", jitter = false }', f"retry = {retry}"), encoding="utf-8")
    return cfg


def test_values_email_cannot_carry_fail_after_one_attempt_naming_the_field(tmp_path):
    leads = make_leads(6)
    leads[0]["FirstName"] = "=?x-unknown?q?hi?="                   # subject: an unknown charset
    leads[1]["Email"] = "=?x-unknown?q?hi?= <ok@example.invalid>"  # to: the same
    leads[2]["Email"] = "(" * 3000                                 # to: RecursionError in the parser
    leads[3]["Email"] = "a" * 65 + "@example.invalid"              # to: over RFC 5321's local part
    leads[4]["FirstName"] = "Grüße " * 100_000                     # subject: 600 KB, cut
    expected_field = {0: "subject", 1: "to", 2: "to", 3: "to"}
    with SmtpServer() as smtp:
        cfg = write_config(tmp_path, file_source(tmp_path, leads), smtp_connector(smtp), to=f'["{SALES}", "{{{{ record.Email }}}}"]', reply_to="")

        result = agent(cfg, "run", "--once")

        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert (summary(result)["sent"], summary(result)["failed"], summary(result)["waiting"]) == (2, 4, 0)
        failed = {r["key"]: r for r in ledger_rows(cfg, "failed")}
        assert set(failed) == {leads[i]["lastSubmissionID"] for i in expected_field}
        for i, field in expected_field.items():
            row = failed[leads[i]["lastSubmissionID"]]
            assert row["attempts"] == 1 and f"step 0 (mail > message > send): {field}: " in row["last_error"]
            assert len(row["last_error"]) < 400
        subjects = {m.message["Message-ID"]: m.message["Subject"] for m in smtp.messages}
        assert subjects[message_id(leads[4]["lastSubmissionID"])] == ("New lead: " + "Grüße " * 400)[:1999] + "…"


def test_an_idle_connection_the_server_gave_up_is_reopened_without_spending_an_attempt(tmp_path):
    leads = make_leads(3)
    with RecordingSmtpServer() as smtp:
        # Postfix after an idle period: the next command on the old connection gets 421 and the connection closes
        smtp.reply_next(1, "421 4.4.2 smtp.test Error: timeout exceeded", at="MAIL", close=True, after=1)
        cfg = write_config(tmp_path, file_source(tmp_path, leads), smtp_connector(smtp), concurrency=1)
        with_retry(cfg, '{ on = ["timeout"], attempts = 3, interval = "500ms", jitter = false }')  # no 4xx: no retry to hide behind

        result = agent(cfg, "run", "--once")

        assert result.returncode == 0, result.stderr
        assert (summary(result)["sent"], summary(result)["failed"], summary(result)["waiting"]) == (3, 0, 0)
        rows = ledger_rows(cfg)
        assert [r["status"] for r in rows] == ["succeeded"] * 3
        with Ledger(cfg.parent / "var" / "agent.db", hold=False) as ledger:
            assert [[a["outcome"] for a in ledger.attempts_of(r["id"])] for r in rows] == [["succeeded"]] * 3  # one attempt each
        assert Counter(m.message["Message-ID"] for m in smtp.messages) == Counter({message_id(lead["lastSubmissionID"]): 1 for lead in leads})
        assert smtp.connections == 2 and smtp.commands["DATA"] == 3


def test_a_drop_after_the_message_is_retried_by_policy_not_at_once(tmp_path):
    leads = make_leads(3)
    ids = [message_id(lead["lastSubmissionID"]) for lead in leads]
    with RecordingSmtpServer() as smtp:
        smtp.drop_next(1, at="DATA", after=1)  # the second message: its final "." arrives, the connection closes unanswered
        cfg = write_config(tmp_path, file_source(tmp_path, leads), smtp_connector(smtp), concurrency=1)

        first = agent(cfg, "run", "--once")

        assert first.returncode == 0, first.stderr
        assert (summary(first)["sent"], summary(first)["waiting"]) == (2, 1)
        assert [parse(raw)["Message-ID"] for raw in smtp.data] == ids  # each went out once: the second was not re-sent at once
        [waiting] = ledger_rows(cfg, "retrying")
        assert (waiting["key"], waiting["attempts"]) == (leads[1]["lastSubmissionID"], 1)

        time.sleep(max(0.0, waiting["next_at"] - time.time()) + 0.01)
        second = agent(cfg, "run", "--once")

        assert second.returncode == 0, second.stderr
        assert summary(second)["sent"] == 1
        assert [parse(raw)["Message-ID"] for raw in smtp.data] == ids + [ids[1]]  # later, with the same Message-ID
        assert [r["status"] for r in ledger_rows(cfg)] == ["succeeded"] * 3


@pytest.mark.parametrize("on, deprecated", [('on = ["4xx"], ', False), ("", False), ('on = ["5xx"], ', True)])
def test_smtp_temporary_replies_are_retried_as_4xx_and_5xx_still_matches_with_a_deprecation_line(tmp_path, on, deprecated):
    leads = make_leads(1)
    with SmtpServer() as smtp:
        smtp.reply_next(1, "451 4.3.0 mailbox busy, try later")
        cfg = write_config(tmp_path, file_source(tmp_path, leads), smtp_connector(smtp))
        with_retry(cfg, f'{{ {on}attempts = 3, interval = "500ms", jitter = false }}')

        result = agent(cfg, "run", "--once")

        assert result.returncode == 0, result.stderr
        [row] = ledger_rows(cfg)
        assert (row["status"], row["attempts"]) == ("retrying", 1) and "451 4.3.0" in row["last_error"]
        assert ('"5xx" matched an SMTP temporary reply (4xx) by its old name' in result.stderr) is deprecated


def drip_ehlo(talk, stop):
    """A server that answers EHLO with "250-" lines, one every 50 ms, without end."""
    talk.send("220 hostile ESMTP")
    talk.until("EHLO")
    talk.drip(stop, b"250-still here\r\n")


def test_a_dripping_smtp_server_costs_the_timeout_and_the_record_waits(tmp_path):
    leads = make_leads(1)
    with HostileSmtpServer(drip_ehlo, lifetime=20) as smtp:
        cfg = write_config(tmp_path, file_source(tmp_path, leads), smtp_connector(smtp).replace('timeout = "5s"', 'timeout = "1s"'))

        start = time.monotonic()
        result = agent(cfg, "run", "--once")
        elapsed = time.monotonic() - start

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 8, f"{elapsed:.1f}s: the agent waited on the server past its 1s timeout"
    [row] = ledger_rows(cfg)
    assert (row["status"], row["attempts"]) == ("retrying", 1) and "timed out" in row["last_error"]

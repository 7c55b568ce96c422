"""Secrets never leave the process: every configured secret, in every form a server may echo, is masked in
all output and in every ledger row; a secret that cannot be sent safely, or a URL's user-info, is refused
or hidden at config load."""
import base64
import json
import socket
import sys
import threading

import pytest
from loguru import logger

from agent import logs
from agent.secrets import Masker, masked
from sinkserver import SinkServer
from state.base import Admission, Finish
from state.sqlite import SqliteLedger as Ledger
from viewserver import ViewServer, make_leads

VIEW_USER, VIEW_PASS = "integration", "view-pass-Xq7v"
VIEW_TOKEN = "view-token-Lm3w"
CRM_TOKEN = "crm-token-Zp9k"
CRM_USER, CRM_PASS = "crm-user", "crm-pass-Wk2r"
SMTP_USER, SMTP_PASS = "mailer", "smtp-pass-Jd4t"
ENV = {"VIEW_PASS": VIEW_PASS, "VIEW_TOKEN": VIEW_TOKEN, "CRM_TOKEN": CRM_TOKEN, "CRM_PASS": CRM_PASS, "SMTP_PASS": SMTP_PASS}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# every configured secret and the forms in which the servers below echo them
LEAKS = {
    *ENV.values(),
    b64(f"{VIEW_USER}:{VIEW_PASS}"),  # a view's Basic credential
    b64(f"{CRM_USER}:{CRM_PASS}"),  # a sink's Basic credential
    b64(f"\0{SMTP_USER}\0{SMTP_PASS}"),  # SMTP AUTH PLAIN
}


@pytest.fixture
def cli(cli, monkeypatch):
    """The in-process `agent ...` of conftest, with the secrets in its environment."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    return cli


class EchoingSink(SinkServer):
    """An HTTP sink whose error body repeats the request's Authorization header."""

    def __init__(self, status: int):
        super().__init__()
        self.status = status

    def answer(self, request):
        with self._lock:
            self.requests.append(request)
        return self.status, {"error": "rejected", "you_sent": request["headers"].get("Authorization")}, {}


def echo_authorization(handler) -> None:
    """A view fault: 500 with a body that repeats the request's Authorization header."""
    handler.reply(500, json.dumps({"error": "boom", "you_sent": handler.headers.get("Authorization")}).encode())


class EchoingSmtp:
    """An SMTP server that offers AUTH PLAIN and refuses every login with 535, repeating the AUTH line it got.

    Bounded: it serves at most `connections` connections of at most 10 lines each, then its thread ends."""

    def __init__(self, connections: int = 5):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.auth_lines: list[str] = []
        self.thread = threading.Thread(target=self._serve, args=(connections,), daemon=True)

    def __enter__(self) -> "EchoingSmtp":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes a waiting accept(), which close() alone does not
        self.listener.close()
        self.thread.join(5)
        assert not self.thread.is_alive()

    def _serve(self, connections: int) -> None:
        for _ in range(connections):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as stream:
                conn.settimeout(5)
                self._talk(stream)

    def _talk(self, stream) -> None:
        stream.write(b"220 smtp.test ESMTP\r\n")
        stream.flush()
        for _ in range(10):
            line = stream.readline().decode("ascii", "replace").strip()
            verb = line.split(" ", 1)[0].upper()
            if verb in ("", "QUIT"):
                return
            if verb == "EHLO":
                stream.write(b"250-smtp.test\r\n250 AUTH PLAIN\r\n")
            elif verb == "AUTH":
                self.auth_lines.append(line)
                stream.write(f"535 5.7.8 credentials rejected: {line}\r\n".encode())
            else:
                stream.write(b"503 5.5.1 log in first\r\n")
            stream.flush()


def write_config(tmp_path, basic_view: ViewServer, bearer_view: ViewServer, bearer_sink: SinkServer, basic_sink: SinkServer, smtp: EchoingSmtp):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[agent]
ledger = "var/agent.db"

[sources.basic_view]
kind = "rest"
url = "{basic_view.url}"
id = "lastSubmissionID"
first_run = "deliver"
timeout = "5s"
auth = {{ kind = "basic", username = "{VIEW_USER}", password = "${{VIEW_PASS}}" }}

[sources.bearer_view]
kind = "rest"
url = "{bearer_view.url}"
id = "lastSubmissionID"
first_run = "deliver"
timeout = "5s"
auth = {{ kind = "bearer", token = "${{VIEW_TOKEN}}" }}

[connectors.crm_bearer]
kind = "http"
base_url = "{bearer_sink.url}"
timeout = "5s"
auth = {{ kind = "bearer", token = "${{CRM_TOKEN}}" }}
[connectors.crm_bearer.objects.leads]
path = "/leads"

[connectors.crm_basic]
kind = "http"
base_url = "{basic_sink.url}"
timeout = "5s"
auth = {{ kind = "basic", username = "{CRM_USER}", password = "${{CRM_PASS}}" }}
[connectors.crm_basic.objects.leads]
path = "/leads"

[connectors.mail]
kind = "smtp"
host = "127.0.0.1"
port = {smtp.port}
security = "none"
username = "{SMTP_USER}"
password = "${{SMTP_PASS}}"
sender = "agent@example.invalid"
timeout = "5s"

[[flows]]
name = "bearer-sink"
source = "basic_view"
  [[flows.steps]]
  kind = "action"
  action = "crm_bearer > leads > create"
  body = {{ email = "{{{{ record.Email }}}}" }}

[[flows]]
name = "basic-sink"
source = "basic_view"
  [[flows.steps]]
  kind = "action"
  action = "crm_basic > leads > create"
  body = {{ email = "{{{{ record.Email }}}}" }}
  retry = {{ attempts = 1 }}

[[flows]]
name = "mail"
source = "bearer_view"
  [[flows.steps]]
  kind = "action"
  action = "mail > message > send"
  to = "sales@example.invalid"
  subject = "New lead {{{{ record.lastSubmissionID }}}}"
  text = "{{{{ record.Email }}}}"
""")
    return cfg


def test_no_secret_nor_its_base64_forms_leaves_the_process_or_enters_the_ledger(tmp_path, cli):
    with ViewServer(make_leads(1), username=VIEW_USER, password=VIEW_PASS) as basic_view, ViewServer(make_leads(1)) as bearer_view, \
            EchoingSink(400) as bearer_sink, EchoingSink(500) as basic_sink, EchoingSmtp() as smtp:
        cfg = write_config(tmp_path, basic_view, bearer_view, bearer_sink, basic_sink, smtp)
        basic_view.fail_with(echo_authorization, times=1)
        bearer_view.fail_with(echo_authorization, times=1)
        runs = [cli("--config", str(cfg), "run", "--once"), cli("--config", str(cfg), "run", "--once")]
        ids = [row["id"] for row in json.loads(cli("--config", str(cfg), "executions", "--json")[1])]
        reads = [cli("--config", str(cfg), *args) for args in (
            ["status"], ["status", "--json"], ["executions"], ["executions", "--json"], ["executions", "--status", "paused"],
            *(["executions", str(i)] for i in ids), *(["executions", str(i), "--json"] for i in ids))]
    output = "\n".join(out + err for _, out, err in runs + reads)
    ledger = b"".join(p.read_bytes() for p in (tmp_path / "var").iterdir() if p.is_file())

    # the servers did echo the credentials, and each echo reached the operator, masked
    assert [r["headers"]["Authorization"] for r in bearer_sink.requests] == [f"Bearer {CRM_TOKEN}"]
    assert smtp.auth_lines == [f"AUTH PLAIN {b64(chr(0) + SMTP_USER + chr(0) + SMTP_PASS)}"]
    assert runs[0][0] == 1 and "poll basic_view failed" in runs[0][1] and "poll bearer_view failed" in runs[0][1]
    assert '"you_sent": "Basic ***"' in runs[0][1] and '"you_sent": "Bearer ***"' in runs[0][1]
    assert runs[1][0] == 1 and "failed: 2" in runs[1][1] and "paused: 1" in runs[1][1]
    assert output.count('"you_sent": "Bearer ***"') >= 3 and output.count('"you_sent": "Basic ***"') >= 3
    assert "AUTH PLAIN ***" in output and len(ids) == 3
    # ...and no form of any secret appears in any output or in the ledger's files
    assert [leak for leak in LEAKS if leak in output] == []
    assert [leak for leak in LEAKS if leak.encode() in ledger] == []


def test_the_masker_hides_every_form_of_a_secret():
    mask = Masker(["  padded-secret\t", 'quote"and\\slash', "crlf-token\r"], logins=[("ada", "pass-word-1")])
    for form in ("padded-secret", "  padded-secret\t", b64("ada:pass-word-1"), b64("\0ada\0pass-word-1"), b64("pass-word-1"),
                 "pass-word-1", json.dumps('quote"and\\slash')[1:-1], "crlf-token\\r", "crlf-token"):
        assert mask(f"<{form}>") == "<***>", form
    assert mask("nothing to hide") == "nothing to hide"
    assert Masker([])("anything") == "anything" and Masker(["abc"])("abc") == "abc"  # too short to mask without mangling text


def test_masking_a_deeply_nested_value_keeps_its_shape_and_needs_no_recursion():
    deep: list = ["x hunter2-secret", {"hunter2-secret": 1, "b": (2, None)}]
    for _ in range(5000):
        deep = [deep]
    shown = masked(deep, Masker(["hunter2-secret"]))
    for _ in range(5000):
        shown = shown[0]
    assert shown == ["x ***", {"***": 1, "b": [2, None]}]


def test_json_logs_mask_base64_forms_and_stay_valid_json(tmp_path):
    out = tmp_path / "log"
    with out.open("w") as sink:
        logs.setup("INFO", "json", sink=sink, mask=Masker([], logins=[("ada", "pass-word-1")]))
        try:
            logger.bind(record="k\n1").error("login refused: {}", f"AUTH PLAIN {b64(chr(0) + 'ada' + chr(0) + 'pass-word-1')}")
            try:
                raise ValueError(f"Basic {b64('ada:pass-word-1')}")
            except ValueError:
                logger.exception("failed")
        finally:
            logger.remove()
            logger.add(sys.stderr)
    lines = out.read_text().splitlines()
    records = [json.loads(line)["record"] for line in lines]
    assert records[0]["message"] == "login refused: AUTH PLAIN ***" and records[0]["extra"] == {"record": "k\n1"}
    assert "Basic ***" in lines[1] and b64("ada:pass-word-1") not in out.read_text()


def test_the_ledger_masks_every_text_it_writes(tmp_path):
    mask = lambda text: text.replace("SECRET-TOKEN", "***")  # noqa: E731 - a plain callable, as the agent injects
    ledger = Ledger(tmp_path / "agent.db", mask=mask)
    with ledger:
        context = {"record": {"id": "1", "note": "SECRET-TOKEN", "SECRET-TOKEN": ["x SECRET-TOKEN"]}, "cursor": None}
        ledger.admit("view", [Admission("1", "1", "1", "h", "1", context)], [("flow", False)], 1.0)
        [ex] = ledger.claim(2.0, 1, 60)
        attempt = {"step": 0, "started": 2.0, "finished": 2.0, "outcome": "retryable", "error": "HTTP 500: SECRET-TOKEN"}
        ledger.finish(ex, Finish("retrying", 0, {**ex.context, "steps": {"0": "SECRET-TOKEN"}}, 3.0, "HTTP 500: SECRET-TOKEN", attempt), 2.0)
        poll = ledger.start_poll("view", 4.0)
        ledger.end_poll(poll, "view", 5.0, pages=1, fetched=0, new=0, primed=0, quarantined=0, error="HTTP 500: SECRET-TOKEN", cursor=None)
        ledger.quarantine("view", "hash", "bad SECRET-TOKEN", "page 1 SECRET-TOKEN", '{"id": "SECRET-TOKEN"}', 6.0)
        [row] = ledger.executions()
        assert row["last_error"] == "HTTP 500: ***"
        assert ledger.attempts_of(row["id"])[0]["error"] == "HTTP 500: ***"
        assert ledger.sources()["view"]["last_error"] == "HTTP 500: ***"
        assert ledger.quarantined()[0]["excerpt"] == '{"id": "***"}'
        [again] = ledger.claim(10.0, 1, 60)
        assert again.context["record"] == {"id": "1", "note": "***", "***": ["x ***"]} and again.context["steps"] == {"0": "***"}
    assert not any(b"SECRET-TOKEN" in p.read_bytes() for p in tmp_path.iterdir() if p.is_file())


@pytest.mark.parametrize("where, table", [
    ("sources.leads.auth.token", 'auth = { kind = "bearer", token = "${TOKEN}" }'),
    ("sources.leads.auth.password", 'auth = { kind = "basic", username = "u", password = "${TOKEN}" }'),
    ("sources.leads.auth.value", 'auth = { kind = "header", name = "X-Key", value = "${TOKEN}" }'),
])
def test_a_secret_with_a_control_character_is_refused_at_load_naming_the_key_not_the_value(tmp_path, cli, monkeypatch, where, table):
    monkeypatch.setenv("TOKEN", "tok-from-a-crlf-file\r")  # a CRLF env file leaves a \r at the end
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[sources.leads]
kind = "rest"
url = "https://app.example.invalid/api/views/Leads"
id = "lastSubmissionID"
{table}
""")
    status, out, err = cli("--config", str(cfg), "validate", "--offline")
    assert status == 2 and f"{where}: contains a control character" in err
    assert "tok-from-a-crlf-file" not in out + err


def test_a_config_error_never_echoes_a_urls_user_info(tmp_path, cli):
    cfg = tmp_path / "agent.toml"
    cfg.write_text("""
[sources.leads]
kind = "rest"
url = "https://viewer:view-pw-77@app.example.invalid:99999/api"
id = "lastSubmissionID"

[connectors.crm]
kind = "http"
base_url = "ftp://crm-user:crm-pw-88@crm.example.invalid/api?x=1"
[connectors.crm.objects.leads]
path = "/leads"
""")
    status, out, err = cli("--config", str(cfg), "validate", "--offline")
    assert status == 2 and "sources.leads.url" in err and "connectors.crm.base_url" in err
    assert "crm.example.invalid" in err  # the rest of the URL still helps to find it
    assert not [word for word in ("view-pw-77", "crm-pw-88", "viewer", "crm-user") if word in out + err]

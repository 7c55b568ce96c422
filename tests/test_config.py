"""agent/config.py: load() accepts good files and names every problem of a bad one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load
from sinks.base import Action

ROOT = Path(__file__).resolve().parent.parent

# Section 4 of the design, verbatim: the public interface of agent.toml.
DESIGN_EXAMPLE = (Path(__file__).resolve().parent.parent / "examples" / "design.toml").read_text()

# A small valid file that the error tests break one line at a time.
BASE = '''
[agent]
ledger = "var/agent.db"
log_format = "text"

[sources.leads]
kind = "rest"
url = "https://example.invalid/api/views/Leads/All"
id = "lastSubmissionID"

[connectors.crm]
kind = "http"
base_url = "https://crm.example.invalid/api"
[connectors.crm.objects.leads]
path = "/leads"
key = "email"

[connectors.outbox]
kind = "file"
path = "var/outbox.jsonl"

[[flows]]
name = "new-leads"
source = "leads"

  [[flows.steps]]
  kind = "filter"
  when = "record.Status != 'Spam'"

  [[flows.steps]]
  kind = "map"
  fields = { email = "{{ record.Email | lower }}" }

  [[flows.steps]]
  kind = "action"
  action = "crm > leads > upsert"
  body = "mapped"
'''

SECRETS = {"VIEW_PASSWORD": "view-pw-Sx8q2", "SMTP_PASSWORD": "smtp-pw-K7d1z", "CRM_TOKEN": "crm-token-Q4p9w"}


@pytest.fixture
def write(tmp_path):
    """Write a TOML text to tmp_path/agent.toml and return its path."""

    def write(text: str, name: str = "agent.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def fails(write):
    """Load a text that must be rejected; return the ConfigError."""

    def fails(text: str) -> ConfigError:
        path = write(text)
        with pytest.raises(ConfigError) as caught:
            load(path)
        assert caught.value.file == str(path)
        return caught.value

    return fails


def edit(old: str, new: str, text: str = BASE) -> str:
    """BASE with exactly one occurrence of ``old`` replaced."""
    assert text.count(old) == 1, old
    return text.replace(old, new)


def only(error: ConfigError) -> tuple[str, str]:
    """The single problem of an error (and it appears in the message with the file name)."""
    assert len(error.problems) == 1, error.problems
    path, msg = error.problems[0]
    assert f"{error.file}: {path}: {msg}" == str(error)
    return path, msg


# --- files that load ---------------------------------------------------------


def test_the_repository_agent_toml_loads():
    config = load(ROOT / "agent.toml")
    assert list(config.sources) == ["leads"]
    assert config.sources["leads"].kind == "file"
    assert config.sources["leads"].first_run == "deliver"
    assert config.sources["leads"].every == 300.0
    assert list(config.connectors) == ["outbox", "mail"]
    assert [f.name for f in config.flows] == ["new-leads"]
    assert [s.kind for s in config.flows[0].steps] == ["filter", "map", "action", "action"]
    assert config.ledger_path == ROOT / "var" / "agent.db"
    assert config.agent.retention == 30 * 86400.0


def test_the_design_example_loads_with_its_environment(write, monkeypatch):
    pytest.importorskip("sinks.smtp", reason="smtp connector not importable yet")
    pytest.importorskip("sinks.http", reason="http connector not importable yet")
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    config = load(write(DESIGN_EXAMPLE))

    assert config.agent.concurrency == 4 and config.agent.log_format == "text"
    leads, backlog = config.sources["leads"], config.sources["backlog"]
    assert (leads.kind, leads.every, leads.window, leads.timeout) == ("rest", 300.0, 7 * 86400.0, 30.0)
    assert (leads.id, leads.updated, leads.entity, leads.dedupe, leads.first_run) == ("lastSubmissionID", "lastModified", "RecordId", "id", "skip")
    assert leads.params == {"since": "{{ cursor }}"}
    assert (leads.paging.kind, leads.paging.size, leads.paging.start) == ("page", 100, 1)
    assert backlog.kind == "file"
    assert config.connectors["mail"].kind == "smtp" and config.connectors["mail"].port == 587
    assert config.connectors["crm"].objects["leads"].key == "email"
    assert config.auth["sources.leads"].password.get_secret_value() == SECRETS["VIEW_PASSWORD"]
    assert config.auth["connectors.crm"].token.get_secret_value() == SECRETS["CRM_TOKEN"]
    assert sorted(config.secrets) == sorted(SECRETS.values())  # all of them, for the log redactor

    flow = config.flows[0]
    upsert, send = flow.steps[2], flow.steps[3]
    assert upsert.target() == ("crm", Action("leads", "upsert"))
    assert upsert.retry.on == ["timeout", "connection", "5xx", "429"]
    assert (upsert.retry.interval, upsert.retry.max_interval, upsert.retry.window) == (30.0, 3600.0, 23 * 3600.0)
    assert send.inputs == {"to": "sales@example.invalid", "subject": "New lead: {{ record.FirstName }} {{ record.LastName }}",
                           "text": "{{ record | tojson(indent=2) }}"}
    assert send.retry.on == ["timeout", "connection", "5xx", "408", "425", "429"]  # the documented default


def test_the_design_example_names_each_unset_variable(fails, monkeypatch):
    pytest.importorskip("sinks.smtp", reason="smtp connector not importable yet")
    for name in SECRETS:
        monkeypatch.delenv(name, raising=False)
    error = fails(DESIGN_EXAMPLE)
    assert [path for path, _ in error.problems] == ["sources.leads.auth.password", "connectors.mail.password", "connectors.crm.auth.token"]


# --- ${NAME} substitution ----------------------------------------------------


def test_a_variable_is_substituted_anywhere_in_a_string(write, monkeypatch):
    monkeypatch.setenv("VIEW_HOST", "views.example.invalid")
    monkeypatch.setenv("VIEW_APP", "Leads")
    config = load(write(edit('"https://example.invalid/api/views/Leads/All"', '"https://${VIEW_HOST}/api/views/${VIEW_APP}/All"')))
    assert config.sources["leads"].url == "https://views.example.invalid/api/views/Leads/All"


def test_a_default_is_used_when_the_variable_is_unset(write, monkeypatch):
    monkeypatch.delenv("SYNC_LEDGER", raising=False)
    monkeypatch.delenv("SYNC_EMPTY", raising=False)
    config = load(write(edit('ledger = "var/agent.db"', 'ledger = "${SYNC_LEDGER:-var/other.db}${SYNC_EMPTY:-}"')))
    assert config.agent.ledger == "var/other.db"


def test_a_set_variable_wins_over_its_default(write, monkeypatch):
    monkeypatch.setenv("SYNC_LEDGER", "data/ledger.db")
    config = load(write(edit('ledger = "var/agent.db"', 'ledger = "${SYNC_LEDGER:-var/other.db}"')))
    assert config.agent.ledger == "data/ledger.db"


def test_a_substituted_number_is_validated_as_a_number(write, monkeypatch):
    monkeypatch.setenv("SYNC_CONCURRENCY", "7")
    config = load(write(edit('log_format = "text"', 'log_format = "text"\nconcurrency = "${SYNC_CONCURRENCY}"')))
    assert config.agent.concurrency == 7


def test_a_variable_value_is_not_substituted_again(write, monkeypatch):
    monkeypatch.setenv("SYNC_A", "${SYNC_B}")
    monkeypatch.delenv("SYNC_B", raising=False)
    config = load(write(edit('id = "lastSubmissionID"', 'id = "${SYNC_A}"')))
    assert config.sources["leads"].id == "${SYNC_B}"


def test_an_unset_variable_without_default_names_the_key_path(fails, monkeypatch):
    monkeypatch.delenv("SYNC_NOT_SET", raising=False)
    error = fails(edit('"{{ record.Email | lower }}"', '"{{ record.Email | lower }}${SYNC_NOT_SET}"'))
    assert only(error) == ("flows[0].steps[1].fields.email",
                           "environment variable SYNC_NOT_SET is not set (set it, or write ${SYNC_NOT_SET:-default})")


def test_a_default_is_used_when_the_variable_is_empty(write, monkeypatch):
    monkeypatch.setenv("SYNC_LEDGER", "")
    config = load(write(edit('ledger = "var/agent.db"', 'ledger = "${SYNC_LEDGER:-var/other.db}"')))
    assert config.agent.ledger == "var/other.db"


# --- each kind of error: the file, the key path, the bad value, what is allowed


ERRORS = [
    pytest.param(
        BASE + '\n[sinks.x]\nkind = "file"\n',
        "sinks", "unknown key (a typo?); allowed here: agent, connectors, flows, sources",
        id="unknown-top-level-key"),
    pytest.param(
        edit('ledger = "var/agent.db"', 'ledger = "var/agent.db"\nlegder = "x.db"'),
        "agent.legder", "unknown key (a typo?); allowed here: concurrency, lease, ledger, listen, listen_token, log_format, log_level, retention, unreachable_after",
        id="unknown-agent-key"),
    pytest.param(
        edit('log_format = "text"', 'log_format = "xml"'),
        "agent.log_format", "'xml': Input should be 'text' or 'json'",
        id="bad-log-format"),
    pytest.param(
        edit('log_format = "text"', 'log_format = "text"\nretention = "5 minutes"'),
        "agent.retention", "'5 minutes' is not a duration; write a number and a unit: '30s', '5m', '1h', '1d'",
        id="bad-duration-agent"),
    pytest.param(
        edit('id = "lastSubmissionID"', 'id = "lastSubmissionID"\nevery = "5 minutes"'),
        "sources.leads.every", "'5 minutes' is not a duration; write a number and a unit: '30s', '5m', '1h', '1d'",
        id="bad-duration-source"),
    pytest.param(
        edit('kind = "rest"', 'kind = "soap"'),
        "sources.leads.kind", "'soap': unknown kind (known: rest, file)",
        id="unknown-source-kind"),
    pytest.param(
        edit('kind = "rest"\n', ''),
        "sources.leads.kind", "missing: unknown kind (known: rest, file)",
        id="missing-source-kind"),
    pytest.param(
        edit('kind = "http"', 'kind = "ftp"'),
        "connectors.crm.kind", "'ftp': unknown kind (known: http, file, smtp, mailbox)",
        id="unknown-connector-kind"),
    pytest.param(
        edit('id = "lastSubmissionID"', 'id = "lastSubmissionID"\nrecrods = "data"'),
        "sources.leads.recrods",
        "unknown key (a typo?); allowed here: at, dedupe, entity, every, first_run, id, kind, max_page_bytes, max_record_bytes, "
        "max_records_per_page, overlap, paging, params, records, supersede, timeout, timezone, updated, url, window",
        id="typo-in-source"),
    pytest.param(
        edit('source = "leads"', 'source = "laeds"'),
        "flows[0].source", "unknown source 'laeds' (known: leads)",
        id="flow-source-does-not-exist"),
    pytest.param(
        edit('"crm > leads > upsert"', '"crm leads upsert"'),
        "flows[0].steps[2].action", "'crm leads upsert' is not an action path; write 'connector > object > verb', e.g. 'crm > leads > upsert'",
        id="malformed-action-path"),
    pytest.param(
        edit('"crm > leads > upsert"', '"crm > > upsert"'),
        "flows[0].steps[2].action", "'crm > > upsert' is not an action path; write 'connector > object > verb', e.g. 'crm > leads > upsert'",
        id="empty-part-in-action-path"),
    pytest.param(
        edit('"crm > leads > upsert"', '"crn > leads > upsert"'),
        "flows[0].steps[2].action", "unknown connector 'crn' (known: crm, outbox)",
        id="unknown-connector-in-action"),
    pytest.param(
        edit('"crm > leads > upsert"', '"crm > leads > upsrt"'),
        "flows[0].steps[2].action",
        "crm has no action 'leads > upsrt' (known: crm > leads > create, crm > leads > send, crm > leads > update, "
        "crm > leads > replace, crm > leads > patch, crm > leads > delete, crm > leads > get, crm > leads > upsert)",
        id="unknown-verb"),
    pytest.param(
        edit('body = "mapped"', 'body = "mapped"\nsubject = "hello"'),
        "flows[0].steps[2].subject", "unknown key for 'crm > leads > upsert' (allowed: action, body, id, kind, output, proceed_on_failure, retry, wait_for_response)",
        id="unknown-action-input"),
    pytest.param(
        edit('body = "mapped"', 'body = "mapped"\nretry = { on = ["timeout", "sometimes"] }'),
        "flows[0].steps[2].retry.on",
        "['timeout', 'sometimes']: 'sometimes' is not a retry condition; use timeout, connection, 4xx, 5xx or an HTTP status code such as 429",
        id="bad-retry-on-name"),
    pytest.param(
        edit('body = "mapped"', 'body = "mapped"\nretry = { on = [999] }'),
        "flows[0].steps[2].retry.on", "[999]: 999 is not a retry condition; use timeout, connection, 4xx, 5xx or an HTTP status code such as 429",
        id="bad-retry-on-code"),
    pytest.param(
        edit('"{{ record.Email | lower }}"', '"{{ record.Email | lower }"'),
        "flows[0].steps[1].fields.email", "'{{ record.Email | lower }' is not a valid template: unexpected '}'",
        id="template-syntax-in-map"),
    pytest.param(
        edit("when = \"record.Status != 'Spam'\"", 'when = "record.Status !="'),
        "flows[0].steps[0].when", "'record.Status !=' is not a valid template: unexpected 'end of template'",
        id="expression-syntax-in-filter"),
    pytest.param(
        edit('kind = "filter"', 'kind = "transform"'),
        "flows[0].steps[0]", "unknown kind 'transform' (known: filter, map, action)",
        id="unknown-step-kind"),
    pytest.param(
        BASE + '\n[[flows]]\nname = "new-leads"\nsource = "leads"\n  [[flows.steps]]\n  kind = "filter"\n  when = "true"\n',
        "flows[1].name", "'new-leads' is used by two flows; flow names must be unique",
        id="duplicate-flow-name"),
    pytest.param(
        edit('log_format = "text"', 'log_format = "text"\nconcurrency = 0'),
        "agent.concurrency", "0: Input should be greater than or equal to 1",
        id="concurrency-zero"),
    pytest.param(
        BASE + '\n[[flows]]\nname = "empty"\nsource = "leads"\nsteps = []\n',
        "flows[1].steps", "[]: List should have at least 1 item after validation, not 0",
        id="flow-without-steps"),
]


@pytest.mark.parametrize("text, path, message", ERRORS)
def test_each_error_names_the_file_the_key_path_and_the_bad_value(fails, text, path, message):
    assert only(fails(text)) == (path, message)


def test_invalid_toml_names_the_file_and_the_line(fails):
    error = fails(BASE + "\n[[[flows\n")
    assert error.problems == [("", "not valid TOML: Invalid initial character for a key part (at line 39, column 3)")]
    assert str(error) == f"{error.file}: not valid TOML: Invalid initial character for a key part (at line 39, column 3)"


def test_a_missing_file_says_how_to_name_one(tmp_path):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.problems == [("", "no such file (write one, or pass --config PATH / set AGENT_CONFIG)")]
    assert str(caught.value).startswith(f"{path}: no such file")


def test_a_file_that_is_not_utf8_cannot_be_read(write):
    path = write("")
    path.write_bytes(b'[agent]\nledger = "\xff.db"\n')
    with pytest.raises(ConfigError) as caught:
        load(path)
    [(where, msg)] = caught.value.problems
    assert where == "" and msg.startswith("cannot read: 'utf-8' codec can't decode byte 0xff")


def test_every_problem_of_a_table_is_reported_at_once(fails):
    error = fails(edit('log_format = "text"', 'log_format = "xml"\nlog_levl = "INFO"'))
    assert sorted(path for path, _ in error.problems) == ["agent.log_format", "agent.log_levl"]


def test_a_missing_required_action_input_is_named(fails):
    pytest.importorskip("sinks.smtp", reason="smtp connector not importable yet")
    text = BASE + '''
[connectors.mail]
kind = "smtp"
host = "smtp.example.invalid"
sender = "sync-agent@example.invalid"

[[flows]]
name = "mail"
source = "leads"
  [[flows.steps]]
  kind = "action"
  action = "mail > message > send"
  subject = "hello"
  text = "{{ record | tojson }}"
'''
    assert only(fails(text)) == ("flows[1].steps[0].to", "'mail > message > send' needs this key")


@pytest.mark.parametrize("old, new, path, allowed", [
    ('kind = "filter"', 'kind = "filter"\n  wehn = "true"', "flows[0].steps[0].wehn", "id, kind, when"),
    ('body = "mapped"', 'body = "mapped"\nretry = { intervall = "5s" }', "flows[0].steps[2].retry.intervall",
     "attempts, backoff, interval, jitter, max_interval, on, when, window"),
], ids=["filter-step", "retry-table"])
def test_a_typo_inside_a_step_lists_the_keys_of_that_step(fails, old, new, path, allowed):
    assert only(fails(edit(old, new))) == (path, f"unknown key (a typo?); allowed here: {allowed}")


def test_a_typo_inside_paging_names_paging_and_its_keys(fails):
    error = fails(edit('id = "lastSubmissionID"', 'id = "lastSubmissionID"\npaging = { kind = "page", sze = 10 }'))
    assert only(error) == ("sources.leads.paging.sze", "unknown key (a typo?); allowed here: kind, max_pages, param, size, size_param, start, total")


def test_a_typo_inside_auth_names_the_auth_key_path(fails):
    error = fails(edit('id = "lastSubmissionID"', 'id = "lastSubmissionID"\nauth = { kind = "basic", username = "u", pasword = "p" }'))
    assert sorted(error.problems) == [("sources.leads.auth.password", "required key is missing"),
                                      ("sources.leads.auth.pasword", "unknown key (a typo?); allowed here: kind, password, username")]


def test_a_mail_action_without_a_body_is_a_config_error(fails):
    pytest.importorskip("sinks.smtp", reason="smtp connector not importable yet")
    text = BASE + '''
[connectors.mail]
kind = "smtp"
host = "smtp.example.invalid"
sender = "sync-agent@example.invalid"

[[flows]]
name = "mail"
source = "leads"
  [[flows.steps]]
  kind = "action"
  action = "mail > message > send"
  to = "sales@example.invalid"
  subject = "hello"
'''
    path, msg = only(fails(text))
    assert path.startswith("flows[1].steps[0]") and "text" in msg and "html" in msg


# --- secrets never reach a ConfigError ----------------------------------------

SECRET = "pw-Zq81-never-shown"

WRONG_AUTH = [
    pytest.param('{ kind = "basic", username = "u", password = "${SYNC_SECRET}", extra = 1 }', id="basic-extra-key"),
    pytest.param('{ kind = "basic", user = "u", password = "${SYNC_SECRET}" }', id="basic-missing-username"),
    pytest.param('{ kind = "bearr", token = "${SYNC_SECRET}" }', id="unknown-kind"),
    pytest.param('{ kind = "bearer", token = ["${SYNC_SECRET}"] }', id="token-not-a-string"),
    pytest.param('{ kind = "header", name = "X-Key", value = { v = "${SYNC_SECRET}" } }', id="header-value-not-a-string"),
    pytest.param('{ kind = "basic", username = "u", password = "${SYNC_SECRET}", token = "${SYNC_SECRET}" }', id="token-in-basic"),
    pytest.param('{ token = "${SYNC_SECRET}" }', id="kind-forgotten"),
    pytest.param('"${SYNC_SECRET}"', id="token-written-as-auth"),
    pytest.param('["${SYNC_SECRET}"]', id="auth-as-a-list"),
]


@pytest.mark.parametrize("auth", WRONG_AUTH)
@pytest.mark.parametrize("table", ["sources.leads", "connectors.crm"])
def test_a_wrong_auth_table_never_shows_the_secret(fails, monkeypatch, table, auth):
    monkeypatch.setenv("SYNC_SECRET", SECRET)
    anchor = 'id = "lastSubmissionID"' if table == "sources.leads" else 'base_url = "https://crm.example.invalid/api"'
    error = fails(edit(anchor, f"{anchor}\nauth = {auth}"))
    assert error.problems and all(path.startswith(f"{table}.auth") for path, _ in error.problems)
    assert SECRET not in str(error)


def test_an_smtp_table_error_never_shows_the_password(fails, monkeypatch):
    pytest.importorskip("sinks.smtp", reason="smtp connector not importable yet")
    monkeypatch.setenv("SYNC_SECRET", SECRET)
    error = fails(BASE + '\n[connectors.mail]\nkind = "smtp"\nhost = "h.invalid"\npassword = "${SYNC_SECRET}"\nsender = "a@example.invalid"\n')
    assert only(error)[0] == "connectors.mail"
    assert SECRET not in str(error)


def test_a_wrongly_typed_smtp_password_is_not_shown(fails):
    pytest.importorskip("sinks.smtp", reason="smtp connector not importable yet")
    error = fails(BASE + f'\n[connectors.mail]\nkind = "smtp"\nhost = "h.invalid"\nusername = "u"\npassword = ["{SECRET}"]\nsender = "a@example.invalid"\n')
    assert only(error) == ("connectors.mail.password", "(secret): Input should be a valid string")


# --- the command line ---------------------------------------------------------


def test_the_cli_exits_2_on_a_bad_config_without_touching_the_ledger(write, tmp_path):
    path = write(edit('"crm > leads > upsert"', '"crn > leads > upsert"'))
    done = subprocess.run([sys.executable, "-m", "agent", "--config", str(path), "validate"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == f"{path}: flows[0].steps[2].action: unknown connector 'crn' (known: crm, outbox)\n"
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "var").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml"]


def test_the_cli_validates_a_good_config(write, tmp_path):
    path = write(BASE)
    done = subprocess.run([sys.executable, "-m", "agent", "--config", str(path), "validate", "--offline"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    first, *warnings = done.stdout.splitlines()
    assert first == f"{path}: config ok — 1 source(s), 2 connector(s), 1 flow(s)"
    assert len(warnings) == 1 and "action step(s) 2 have no `id`" in warnings[0]  # keys tied to positions: said, not refused


@pytest.mark.parametrize("name", ["rest-to-http.toml", "leads-to-email.toml", "design.toml"])
def test_every_example_config_loads(name, monkeypatch):
    for var in ("VIEW_PASSWORD", "SMTP_PASSWORD", "CRM_TOKEN"):
        monkeypatch.setenv(var, "example-secret")
    config = load(ROOT / "examples" / name)
    assert config.flows and config.sources and config.connectors
    assert "example-secret" in config.secrets


@pytest.mark.parametrize("lines, path, message", [
    ('at = "2am"', "sources.leads.at", "'2am' is not a time of day; write 'HH:MM' such as '02:00'"),
    ('at = "02:00"\ntimezone = "Mars/Base"', "sources.leads.timezone", "'Mars/Base' is not a time zone; write an IANA name such as 'Europe/Berlin'"),
])
def test_daily_times_and_zones_are_checked(fails, lines, path, message):
    error = fails(edit('id = "lastSubmissionID"', 'id = "lastSubmissionID"\n' + lines))
    assert only(error) == (path, message)


def test_a_postgresql_url_picks_the_shared_ledger_and_its_password_is_a_secret(write, monkeypatch):
    monkeypatch.setenv("LEDGER_PASSWORD", "s3cret-Pass-9")
    config = load(write(edit('ledger = "var/agent.db"', 'ledger = "postgresql://agent:${LEDGER_PASSWORD}@db.internal:5432/sync"')))
    assert config.ledger_is_url and config.ledger_location == "postgresql://agent:s3cret-Pass-9@db.internal:5432/sync"
    assert config.ledger_shown == "postgresql://agent:***@db.internal:5432/sync"
    assert "s3cret-Pass-9" in config.secrets  # masked wherever the agent writes
    assert not load(write(BASE)).ledger_is_url


@pytest.mark.parametrize("value, problem", [
    ("mysql://agent:pw-Hidden-1@db/sync", "only postgresql:// URLs are ledgers"),
    ("postgresql://agent:pw-Hidden-1@db:99999/sync", "is not a URL"),
    ("", "write a file path"),
])
def test_a_ledger_that_is_neither_a_path_nor_a_postgresql_url_is_a_config_error(tmp_path, cli, value, problem):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(edit('ledger = "var/agent.db"', f'ledger = "{value}"'))
    status, out, err = cli("--config", str(cfg), "validate", "--offline")
    assert status == 2 and f"{cfg}: agent.ledger: " in err and problem in err, err
    assert "pw-Hidden-1" not in err and not (tmp_path / "var").exists()

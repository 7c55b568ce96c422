"""`agent action run PATH --input FILE [--key K]`: one action by hand, through the real connector, recorded nowhere."""
import email
import email.policy
import json
from pathlib import Path

import pytest

from sinkserver import SinkServer
from test_cli_integration import PASSWORD, write_config
from viewserver import ViewServer

TOKEN = "crm-token-123"
LEAD = {"email": "ada@example.org", "name": "Ada Lovelace"}


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


@pytest.fixture
def cfg(tmp_path, sink):
    with ViewServer([], username="integration", password=PASSWORD) as view:
        path = write_config(tmp_path, view, sink)
        path.write_text(path.read_text() + """
[connectors.mail]
kind = "mailbox"
path = "var/mail"
sender = "agent@example.org"
""")
        yield str(path)


def given(tmp_path: Path, value) -> str:
    path = tmp_path / "input.json"
    path.write_text(json.dumps(value))
    return str(path)


def test_an_action_reaches_the_sink_with_the_given_key_and_prints_its_output(tmp_path, cli, cfg, sink):
    status, out, err = cli("--config", cfg, "action", "run", "crm > leads > create", "--input", given(tmp_path, {"body": LEAD}),
                           "--key", "manual-1")
    assert status == 0, err
    [post] = sink.requests_to("POST", "/leads")
    assert post["headers"]["Idempotency-Key"] == "manual-1" and post["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert post["json"] == LEAD and json.loads(out) == LEAD  # the output: what the sink answered
    assert not (tmp_path / "var" / "agent.db").exists()  # recorded nowhere


def test_without_a_key_a_fresh_one_is_used_and_printed_so_the_call_can_be_repeated_safely(tmp_path, cli, cfg, sink):
    status, out, err = cli("--config", cfg, "action", "run", "crm > leads > send", "--input", given(tmp_path, {"body": LEAD}))
    assert status == 0, err
    [post] = sink.requests_to("POST", "/leads")
    key = post["headers"]["Idempotency-Key"]
    assert len(key) >= 32 and f"--key {key}" in err
    again = cli("--config", cfg, "action", "run", "crm > leads > send", "--input", given(tmp_path, {"body": LEAD}), "--key", key, "--json")
    assert again[0] == 0 and sink.replays == 1  # the sink recognised the repeat by its key
    assert json.loads(again[1]) == {"action": "crm > leads > send", "key": key, "status": "succeeded", "status_code": 201,
                                    "output": LEAD, "error": None}


def test_an_action_records_nothing_in_the_ledger(tmp_path, cli, cfg, sink):
    assert cli("--config", cfg, "run", "--once")[0] == 0  # an empty view: the ledger exists, holding nothing
    assert cli("--config", cfg, "action", "run", "crm > leads > upsert", "--input", given(tmp_path, {"body": LEAD}))[0] == 0
    assert sink.requests_to("POST", "/leads")  # upsert: not found, created
    assert json.loads(cli("--config", cfg, "executions", "--json")[1]) == []


@pytest.mark.parametrize("value, names", [
    ({"body": "not an object"}, "body"),
    ({"bdy": LEAD}, "bdy"),
    (["a list"], "input"),
], ids=["wrong type", "unknown field", "not an object"])
def test_input_that_does_not_fit_the_actions_model_names_the_field_and_sends_nothing(tmp_path, cli, cfg, sink, value, names):
    status, out, err = cli("--config", cfg, "action", "run", "crm > leads > upsert", "--input", given(tmp_path, value))
    assert status == 2 and names in err and "crm > leads > upsert" in err and not sink.requests


def test_a_mail_action_names_the_missing_field_then_sends_with_the_key_as_message_id(tmp_path, cli, cfg):
    status, out, err = cli("--config", cfg, "action", "run", "mail > message > send", "--input", given(tmp_path, {"subject": "Hi", "text": "x"}))
    assert status == 2 and "to: " in err and "Field required" in err
    message = {"to": "sales@example.org", "subject": "Hi", "text": "A lead."}
    status, out, err = cli("--config", cfg, "action", "run", "mail > message > send", "--input", given(tmp_path, message), "--key", "try-1")
    assert status == 0, err
    [sent] = list((tmp_path / "var/mail/new").iterdir())
    assert email.message_from_bytes(sent.read_bytes(), policy=email.policy.default)["Message-ID"] == "<try-1@example.org>"
    assert json.loads(out)["message_id"] == "<try-1@example.org>"


@pytest.mark.parametrize("path, says", [
    ("crm > leads > fly", "crm has no action 'leads > fly' (known: crm > leads > create"),
    ("crn > leads > create", "unknown connector 'crn' (known: crm, mail)"),
    ("crm leads create", "not an action path"),
])
def test_an_unknown_action_lists_the_known_ones(tmp_path, cli, cfg, sink, path, says):
    status, out, err = cli("--config", cfg, "action", "run", path, "--input", given(tmp_path, {"body": LEAD}))
    assert status == 2 and says in err and not sink.requests


def test_an_unreadable_input_file_or_a_bad_key_is_a_usage_error(tmp_path, cli, cfg, sink):
    (tmp_path / "broken.json").write_text("{not json")
    status, out, err = cli("--config", cfg, "action", "run", "crm > leads > create", "--input", str(tmp_path / "broken.json"))
    assert status == 2 and "broken.json" in err
    status, out, err = cli("--config", cfg, "action", "run", "crm > leads > create", "--input", str(tmp_path / "missing.json"))
    assert status == 2 and "missing.json" in err
    status, out, err = cli("--config", cfg, "action", "run", "crm > leads > create", "--input", given(tmp_path, {"body": LEAD}),
                           "--key", "two words")
    assert status == 2 and "--key" in err and not sink.requests


def test_a_failed_call_exits_1_and_says_why(tmp_path, cli, cfg, sink):
    sink.fail_next(1, 422)
    status, out, err = cli("--config", cfg, "action", "run", "crm > leads > create", "--input", given(tmp_path, {"body": LEAD}), "--key", "k-422")
    assert status == 1 and "422" in err and "failed" in err and out == ""
    sink.fail_next(1, 503)
    status, out, err = cli("--config", cfg, "action", "run", "crm > leads > create", "--input", given(tmp_path, {"body": LEAD}),
                           "--key", "k-503", "--json")
    report = json.loads(out)
    assert status == 1 and report["status"] == "retryable" and report["status_code"] == 503 and report["key"] == "k-503"
    assert TOKEN not in out + err

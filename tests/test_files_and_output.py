"""What the agent writes to disk and to the operator's terminal: private files, never through a planted link;
record values that cannot forge a line or drive the terminal; no traceback for deep JSON or an early Ctrl-C."""
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sinks.base import Action
from sinks.file import FileConnector
from sinks.mailbox import MailboxConnector
from sinks.message import SEND
from viewserver import ViewServer, make_leads

WRITE = Action("record", "write")
EVIL = "S1\n2026-01-01 00:00:00 | ERROR   | forged line\x1b]0;pwned\x07\x1b[2J\x9b31m"
MESSAGE = {"to": "sales@example.org", "subject": "New lead", "text": "Ada wants a demo."}


@pytest.fixture
def umask():
    """Set the process umask for one test (given back afterwards, whatever happens)."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def file_connector(base_dir: Path, path: str = "var/outbox.jsonl") -> FileConnector:
    return FileConnector(FileConnector.Config(kind="file", path=path), clock=lambda: 1_700_000_000.0, base_dir=base_dir)


def mailbox_connector(base_dir: Path, path: str = "var/mail") -> MailboxConnector:
    config = MailboxConnector.Config(kind="mailbox", path=path, sender="agent@example.com")
    return MailboxConnector(config, clock=lambda: 1_700_000_000.0, base_dir=base_dir)


def within(seconds: float, work):
    """work()'s result, failing the test (instead of hanging it) when work takes longer than `seconds`."""
    result = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"still waiting after {seconds}s"
    return result[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- planted symlinks (the outbox and the Maildir are never written through a link) ------------------------

def test_a_planted_outbox_link_pauses_the_connector_and_leaves_its_target_as_it_was(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_bytes(b"first line\nlast line without a newline")
    (tmp_path / "var").mkdir(mode=0o700)
    (tmp_path / "var/outbox.jsonl").symlink_to(target)
    outcome = file_connector(tmp_path).run(WRITE, {"body": {"a": 1}}, "k1")
    assert outcome.status == "paused" and "is a symbolic link" in outcome.error and "outbox.jsonl" in outcome.error
    assert target.read_bytes() == b"first line\nlast line without a newline"  # not appended to, its last line not cut

    (tmp_path / "var/outbox.jsonl").unlink()  # the operator removes the link: the next try writes the real file
    assert file_connector(tmp_path).run(WRITE, {"body": {"a": 1}}, "k1").status == "succeeded"
    assert json.loads((tmp_path / "var/outbox.jsonl").read_text())["key"] == "k1"


def test_an_outbox_that_is_not_a_regular_file_pauses_the_connector(tmp_path):
    (tmp_path / "var").mkdir()
    os.mkfifo(tmp_path / "var/outbox.jsonl")  # reading it for keys would wait forever
    outcome = within(5, lambda: file_connector(tmp_path).run(WRITE, {"body": {}}, "k1"))
    assert outcome.status == "paused" and "not a regular file" in outcome.error


@pytest.mark.parametrize("planted", ["var/mail", "var/mail/new", "var/mail/tmp"])
def test_a_planted_maildir_folder_link_pauses_the_connector_and_writes_nothing_there(tmp_path, planted):
    real = tmp_path / "elsewhere"  # a Maildir the link points into
    for sub in ("new", "cur", "tmp"):
        (real / sub).mkdir(parents=True)
        (tmp_path / "var/mail" / sub).mkdir(parents=True, exist_ok=True)
    link = tmp_path / planted
    for sub in ("new", "cur", "tmp") if planted == "var/mail" else ():
        os.rmdir(link / sub)
    os.rmdir(link)
    link.symlink_to(real if planted == "var/mail" else real / link.name)
    outcome = mailbox_connector(tmp_path).run(SEND, MESSAGE, "k1")
    assert outcome.status == "paused" and f"{planted}: is a symbolic link" in outcome.error
    assert [p for p in real.rglob("*") if p.is_file()] == []


def test_a_planted_message_link_is_neither_read_nor_counted_as_a_sent_message(tmp_path):
    first = mailbox_connector(tmp_path).run(SEND, MESSAGE, "k0")  # makes the Maildir
    assert first.status == "succeeded"
    decoy = tmp_path / "decoy.eml"  # claims the key of the next message: read through a link, it would be skipped
    decoy.write_bytes(b"Message-ID: <k1@example.com>\n\nnot ours\n")
    (tmp_path / "var/mail/new/1700000000.planted.host").symlink_to(decoy)
    os.mkfifo(tmp_path / "var/mail/cur/1700000000.fifo.host")  # opening it for reading would wait forever
    outcome = within(5, lambda: mailbox_connector(tmp_path).run(SEND, MESSAGE, "k1"))
    assert outcome.status == "succeeded" and outcome.output.get("duplicate") is None
    assert decoy.read_bytes() == b"Message-ID: <k1@example.com>\n\nnot ours\n"


# -- modes (the agent's folders 0700 and files 0600, whatever the umask) -------------------------------------

def write_file_and_mail_config(tmp_path: Path, source: str) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[agent]
ledger = "var/agent.db"

{source}

[connectors.out]
kind = "file"
path = "var/out/outbox.jsonl"

[connectors.mail]
kind = "mailbox"
path = "var/mail"

[[flows]]
name = "copy"
source = "leads"
  [[flows.steps]]
  kind = "action"
  action = "out > record > write"
  [[flows.steps]]
  kind = "action"
  action = "mail > message > send"
  to = "sales@example.invalid"
  subject = "New lead {{{{ record.lastSubmissionID }}}}"
  text = "{{{{ record.Email }}}}"
""")
    return cfg


FILE_SOURCE = """
[sources.leads]
kind = "file"
path = "leads.json"
id = "lastSubmissionID"
first_run = "deliver"
"""


@pytest.mark.parametrize("mask", [0o000, 0o022])
def test_the_agents_folders_are_0700_and_its_files_0600_whatever_the_umask(tmp_path, cli, umask, mask):
    (tmp_path / "leads.json").write_text(json.dumps({"records": make_leads(2)}))
    cfg = write_file_and_mail_config(tmp_path, FILE_SOURCE)
    umask(mask)
    status, out, err = cli("--config", str(cfg), "run", "--once")
    assert status == 0 and "sent: 4" in out, out + err
    folders = [tmp_path / "var", tmp_path / "var/out", *(tmp_path / "var/mail" / sub for sub in ("", "new", "cur", "tmp"))]
    files = [p for p in (tmp_path / "var").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"agent.db", "outbox.jsonl"} and len(list((tmp_path / "var/mail/new").iterdir())) == 2
    assert {str(p.relative_to(tmp_path)): oct(mode(p)) for p in folders if mode(p) != 0o700} == {}
    assert {str(p.relative_to(tmp_path)): oct(mode(p)) for p in files if mode(p) != 0o600} == {}


# -- record values on the terminal and in text logs -----------------------------------------------------------

def no_terminal_controls(text: str) -> bool:
    return not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", text)


def test_a_record_id_cannot_forge_a_line_or_drive_the_terminal(tmp_path, cli):
    lead = {**make_leads(1)[0], "lastSubmissionID": EVIL}
    with ViewServer([lead]) as view:
        cfg = write_file_and_mail_config(tmp_path, f"""
[sources.leads]
kind = "rest"
url = "{view.url}"
id = "lastSubmissionID"
first_run = "deliver"
timeout = "5s"
""")
        cfg.write_text(cfg.read_text().replace("{{ record.Email }}", "{{ record.Missing }}"))  # the mail step fails, naming the record
        (tmp_path / "record.json").write_text(json.dumps(lead))
        runs = [cli("--config", str(cfg), *args) for args in (
            ["run", "--once"], ["executions"], ["executions", "1"], ["test", "copy", "--record", str(tmp_path / "record.json")])]
        as_json = [cli("--config", str(cfg), *args) for args in (["executions", "--json"], ["executions", "1", "--json"])]
    shown = "".join(out + err for _, out, err in runs)
    assert runs[0][0] == 1 and "failed: 1" in runs[0][1]
    assert no_terminal_controls(shown)
    assert not [line for line in shown.splitlines() if "forged line" in line and not line.count("S1\\n2026-01-01 00:00:00 | ERROR   | forged line")]
    assert shown.count("S1\\n2026-01-01 00:00:00 | ERROR   | forged line\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m") >= 4  # summary, log, detail, dry run
    assert json.loads(as_json[0][1])[0]["key"] == EVIL and json.loads(as_json[1][1])["key"] == EVIL  # JSON keeps the value exactly
    assert no_terminal_controls(as_json[0][1] + as_json[1][1])


def test_json_logs_stay_one_valid_object_a_line_with_a_hostile_record_id(tmp_path, cli):
    lead = {**make_leads(1)[0], "lastSubmissionID": EVIL}
    (tmp_path / "leads.json").write_text(json.dumps({"records": [lead]}))
    cfg = write_file_and_mail_config(tmp_path, FILE_SOURCE)
    cfg.write_text(cfg.read_text().replace('ledger = "var/agent.db"', 'ledger = "var/agent.db"\nlog_format = "json"')
                   .replace("{{ record.Email }}", "{{ record.Missing }}"))
    status, out, err = cli("--config", str(cfg), "run", "--once")
    records = [json.loads(line)["record"] for line in err.splitlines()]
    assert status == 1 and any(r["extra"].get("record") == EVIL and EVIL in r["message"] for r in records)
    assert no_terminal_controls(err)


# -- no traceback -------------------------------------------------------------------------------------------

def test_a_deeply_nested_record_for_a_dry_run_is_a_clear_error(tmp_path, cli):
    (tmp_path / "leads.json").write_text(json.dumps({"records": []}))
    cfg = write_file_and_mail_config(tmp_path, FILE_SOURCE)
    depth = 100_000
    (tmp_path / "deep.json").write_text('{"lastSubmissionID": "S1", "Email": "a@example.org", "deep": ' + "[" * depth + "]" * depth + "}")
    status, out, err = cli("--config", str(cfg), "test", "copy", "--record", str(tmp_path / "deep.json"))
    assert status == 2 and "nested too deeply" in err and "Traceback" not in out + err


SCRIPT = Path(sys.executable).with_name("agent")  # the installed `agent` command


@pytest.mark.parametrize("command", [["-m", "agent"], [str(SCRIPT)]], ids=["python -m agent", "agent"])
def test_ctrl_c_while_the_agent_starts_ends_it_without_a_traceback(tmp_path, command):
    if command[0] != "-m" and not SCRIPT.exists():
        pytest.skip("the agent command is not installed beside this python")
    (tmp_path / "leads.json").write_text(json.dumps({"records": make_leads(3)}))
    cfg = write_file_and_mail_config(tmp_path, FILE_SOURCE)
    for delay in (0, 0.15, 0.5):  # from the imports of the agent's code to a running agent
        agent = subprocess.Popen([sys.executable, "-X", "importtime", *command, "--config", str(cfg), "run"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        guard = threading.Timer(30, agent.kill)  # a test that fails must not hang
        guard.start()
        for line in agent.stderr:  # -X importtime names each module once imported: wait until the agent imports its libraries
            if line.split("|")[-1].strip() == "loguru":
                break
        time.sleep(delay)
        agent.send_signal(signal.SIGINT)
        out, err = agent.communicate(timeout=30)
        guard.cancel()
        assert agent.returncode in (0, 130) and "Traceback" not in err, (delay, agent.returncode, err[-2000:])

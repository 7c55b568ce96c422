"""A fast, clean command line: --version, light start-up (lazy imports), a stop at any moment exits 0,
output into a closed pipe ends quietly, and listings show whole keys or a clear ellipsis.

Start-up time itself is measured in bench/startup.py, not asserted here: what these tests pin down is
what makes it fast (which libraries a command imports)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from fileconfig import REST_HTTP_SMTP
from viewserver import ViewServer, make_leads

HEAVY = ("pydantic", "pydantic_settings", "jinja2", "sqlite_utils", "loguru", "requests", "schedule",
         "agent.config", "agent.process", "state.sqlite")




def write_config(folder: Path, leads: list[dict]) -> Path:
    """A file view of `leads` copied into a JSON-lines outbox: no network, fast."""
    (folder / "leads.json").write_text(json.dumps({"records": leads}))
    cfg = folder / "agent.toml"
    cfg.write_text("""
[agent]
ledger = "var/agent.db"
log_level = "WARNING"

[sources.leads]
kind = "file"
path = "leads.json"
id = "lastSubmissionID"
first_run = "deliver"

[connectors.out]
kind = "file"
path = "var/outbox.jsonl"

[[flows]]
name = "copy"
source = "leads"
  [[flows.steps]]
  kind = "action"
  action = "out > record > write"
""")
    return cfg


def imported_by(*argv: str, cwd: Path) -> set[str]:
    """The heavy modules a fresh interpreter has imported after `agent ARGV` (run in-process there)."""
    code = ("import json, sys\nfrom agent.cli import main\nstatus = main(sys.argv[1:])\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m in {HEAVY!r})), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True, timeout=60)
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


# -- --version and lazy imports ---------------------------------------------------------------------------------

def test_version_prints_the_installed_package_version(cli):
    status, out, err = cli("--version")
    assert status == 0 and out.strip() == f"agent {version('sync-agent')}" and err == ""


def test_help_and_version_import_none_of_the_heavy_libraries(tmp_path):
    assert imported_by("--help", cwd=tmp_path) == set()
    assert imported_by("--version", cwd=tmp_path) == set()


def test_status_imports_no_delivery_machinery(tmp_path, cli):
    cfg = write_config(tmp_path, make_leads(1))
    assert cli("--config", str(cfg), "run", "--once")[0] == 0
    assert not imported_by("--config", str(cfg), "status", cwd=tmp_path) & {"agent.process", "schedule", "requests"}


def test_a_usage_mistake_is_returned_as_status_2_not_raised(cli):
    status, out, err = cli("executions", "--limit", "many")
    assert status == 2 and "invalid int value" in err


def test_an_unknown_status_filter_lists_the_known_ones(tmp_path, cli):
    cfg = write_config(tmp_path, make_leads(1))
    cli("--config", str(cfg), "run", "--once")
    status, out, err = cli("--config", str(cfg), "executions", "--status", "done")
    assert status == 2 and "'done' is not a status" in err and "succeeded" in err and "quarantined" in err


# -- `agent status`, the health check: what it loads, and the garbage collector at start and exit ---------------

ROOT = Path(__file__).resolve().parent.parent
# What `status` on the sample config needs none of: the email parser came with the mailbox connector (it reads a
# Maildir's headers when it first sends, not when the config loads), the flow runner with the health rule.
# loguru (and the asyncio it brings) neither: `status` logs nothing of its own, so its logging is set up only if a library logs.
NOT_FOR_STATUS = ("email.parser", "email.feedparser", "agent.process", "agent.poller", "agent.flows", "requests", "loguru", "asyncio")
# What a real config's plugin modules use to talk, not to describe their config: `status` talks to no one.
NOT_FOR_REAL_STATUS = ("requests", "urllib3", "smtplib", "queue", "agent.flows", "agent.process", "agent.http", "loguru", "asyncio")


def sample(folder: Path) -> Path:
    """The repository's own agent.toml (a file source; file and mailbox connectors) and its view, run once."""
    (folder / "examples").mkdir()
    (folder / "examples" / "leads.json").write_bytes((ROOT / "examples" / "leads.json").read_bytes())
    (folder / "agent.toml").write_bytes((ROOT / "agent.toml").read_bytes())
    done = subprocess.run([sys.executable, "-m", "agent", "run", "--once"], cwd=folder, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder / "agent.toml"


def fresh(code: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter; its last line of output is JSON, given back."""
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_status_on_the_sample_config_loads_neither_the_email_parser_nor_the_agent_loop(tmp_path):
    sample(tmp_path)
    report = fresh("import json, sys\nfrom agent.cli import main\nstatus = main(['status'])\n"
                   "print(json.dumps({'status': status, 'modules': sorted(sys.modules)}))", cwd=tmp_path)
    assert report["status"] == 0
    assert not set(NOT_FOR_STATUS) & set(report["modules"]), set(NOT_FOR_STATUS) & set(report["modules"])
    assert "jinja2" in report["modules"]  # the templates are checked, as before


def test_status_on_a_rest_http_smtp_config_loads_no_http_or_smtp_library(tmp_path):
    """The plugin modules are loaded for their config models; what they send with comes only when they send."""
    with ViewServer(make_leads(25), paging="page", page_size=10) as view:  # the first poll primes the ledger, nothing is sent
        (tmp_path / "agent.toml").write_text(REST_HTTP_SMTP.format(view=view.url))
        done = subprocess.run([sys.executable, "-m", "agent", "run", "--once"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
    report = fresh("import json, sys\nfrom agent.cli import main\nstatus = main(['status'])\n"
                   "print(json.dumps({'status': status, 'modules': sorted(sys.modules)}))", cwd=tmp_path)
    assert report["status"] == 0  # the view is gone: status asks no one
    assert {"sources.rest", "sinks.http", "sinks.smtp"} <= set(report["modules"])  # the config models were loaded and checked
    assert not set(NOT_FOR_REAL_STATUS) & set(report["modules"]), set(NOT_FOR_REAL_STATUS) & set(report["modules"])


def test_a_config_error_is_still_found_by_status_with_file_and_key(tmp_path):
    cfg = sample(tmp_path)
    cfg.write_text(cfg.read_text().replace('subject = "New lead: {{ record.FirstName }}', 'subject = "New lead: {{ record.FirstName }'))
    done = subprocess.run([sys.executable, "-m", "agent", "status"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("agent.toml: flows[0].steps[3].subject: ") and "not a valid template" in done.stderr


def test_the_agent_command_starts_without_collecting_and_leaves_nothing_to_collect_at_exit(tmp_path):
    """Start-up (imports, config) runs with the collector off; the command runs with it on, start-up's objects frozen;
    at the end everything is frozen, so the exit does not walk it all once more."""
    sample(tmp_path)
    code = """import gc, json, sys
from agent import cli
from agent.__main__ import run
seen = {}
command = cli.COMMANDS["status"]
def status(config, args):
    seen.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count(),
                collections=sum(generation["collections"] for generation in gc.get_stats()))
    return command(config, args)
cli.COMMANDS["status"] = status
before = sum(generation["collections"] for generation in gc.get_stats())
sys.argv = ["agent", "status"]
code = run()
print(json.dumps({**seen, "before": before, "code": code, "left": len(gc.get_objects()), "frozen_at_exit": gc.get_freeze_count()}))
"""
    report = fresh(code, cwd=tmp_path)
    assert report["code"] == 0
    assert report["collections"] == report["before"]  # not one collection while the CLI and the config loaded
    assert report["enabled"] and report["frozen"] > 10_000  # the command itself runs with the collector on
    assert report["frozen_at_exit"] > report["frozen"] and report["left"] < 1_000  # nothing left for the exit to walk


# -- a stop at any moment exits 0 -------------------------------------------------------------------------------

SCRIPT = Path(sys.executable).with_name("agent")  # the installed `agent` command


@pytest.mark.parametrize("command", [["-m", "agent"], [str(SCRIPT)]], ids=["python -m agent", "agent"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_at_any_moment_of_the_start_exits_0_without_a_traceback(tmp_path, signum, command):
    if command[0] != "-m" and not SCRIPT.exists():
        pytest.skip("the agent command is not installed beside this python")
    cfg = write_config(tmp_path, make_leads(50))
    for delay in (0, 0.03, 0.1, 0.3, 0.6):  # from the first import of the CLI, through config, ledger and plugins, to a running agent
        agent = subprocess.Popen([sys.executable, "-X", "importtime", *command, "--config", str(cfg), "run"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        guard = threading.Timer(30, agent.kill)  # a test that fails must not hang
        guard.start()
        for line in agent.stderr:  # -X importtime names each module once imported: the CLI module comes right after the handlers
            if line.split("|")[-1].strip() == "agent.cli":
                break
        time.sleep(delay)
        agent.send_signal(signum)
        out, err = agent.communicate(timeout=30)
        guard.cancel()
        assert agent.returncode == 0 and "Traceback" not in err, (delay, agent.returncode, err[-2000:])


# -- output into a closed pipe ----------------------------------------------------------------------------------

def closed_pipe_run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`agent ARGV` writing into a pipe whose reader is already gone (`agent … | head` after head exits)."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run([sys.executable, "-m", "agent", *argv], stdout=writer, stderr=subprocess.PIPE,
                              text=True, cwd=cwd, timeout=60)
    finally:
        os.close(writer)


@pytest.mark.parametrize("leads", [2, 300], ids=["fits the buffer: fails at exit", "fails while printing"])
def test_output_into_a_closed_pipe_ends_quietly_with_status_0(tmp_path, cli, leads):
    cfg = write_config(tmp_path, make_leads(leads))
    assert cli("--config", str(cfg), "run", "--once")[0] == 0
    for argv in (["--config", str(cfg), "executions"], ["--help"]):
        done = closed_pipe_run(argv, tmp_path)
        assert done.returncode == 0 and done.stderr == "", (argv, done.returncode, done.stderr[-2000:])


# -- the record column ------------------------------------------------------------------------------------------

def test_the_record_column_shows_the_whole_key_or_a_clear_ellipsis(tmp_path, cli):
    medium, long = "S" + "1" * 35, "S" + "2" * 70
    leads = make_leads(2)
    leads[0]["lastSubmissionID"], leads[1]["lastSubmissionID"] = medium, long
    cfg = write_config(tmp_path, leads)
    cli("--config", str(cfg), "run", "--once")
    status, out, err = cli("--config", str(cfg), "executions")
    assert status == 0
    [medium_line] = [line for line in out.splitlines() if "S111" in line]
    [long_line] = [line for line in out.splitlines() if "S222" in line]
    assert f" {medium} " in medium_line
    assert long not in long_line and "S" + "2" * 20 in long_line and "…" in long_line


def test_a_stop_landing_where_exceptions_are_swallowed_still_ends_the_command():
    """The early stop handler runs wherever the main thread is: in a __del__ (or a compiled library's callback)
    an exception raised there is swallowed, so the stop must not be an exception."""
    script = """
import os, signal, sys, time
from agent.__main__ import STOPS, _stop_now
for signum in STOPS:
    signal.signal(signum, _stop_now)

class Dropped:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs in here, inside __del__

Dropped()
print("the command went on after its stop")
sys.exit(1)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0 and done.stdout == "" and "Traceback" not in done.stderr, (done.returncode, done.stdout, done.stderr)


def test_a_library_log_line_under_a_deferred_set_up_is_formatted_and_masked_as_ever(tmp_path):
    """`status` defers logging's set-up; a standard-library line (psycopg's pool) still comes out as the agent's own:
    the configured format, the secret masked."""
    code = """import json, logging, sys
from agent import logs
logs.setup("INFO", "json", secrets=["s3cret-pw"], defer=True)
before = "loguru" in sys.modules
logging.getLogger("psycopg.pool").warning("connection to postgresql://agent:s3cret-pw@db/sync failed")
print(json.dumps({"before": before, "after": "loguru" in sys.modules}))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"before": False, "after": True}
    [line] = done.stderr.splitlines()
    record = json.loads(line)["record"]
    assert record["level"]["name"] == "WARNING" and "s3cret-pw" not in line
    assert record["message"].startswith("psycopg.pool: connection to postgresql://agent:") and "failed" in record["message"]

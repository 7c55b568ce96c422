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

from viewserver import make_leads

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

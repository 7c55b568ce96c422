"""Idle CPU of `agent run`: what a process with nothing to do costs while it waits (issue 11: under 0.5% of a core).

    .venv/bin/python bench/idle.py                 # each case for 60 s
    .venv/bin/python bench/idle.py --seconds 20 --only idle

Starts the real command in a fresh process on a config whose source polls
`every = "1h"` and, once its first poll and drain are over, reads the
process's CPU time (user + system, /proc/PID/stat) and its voluntary context
switches (about one per wake-up, /proc/PID/status) over the window. Cases:

- `idle`: an empty view, a file sink: nothing to do until the next poll.
- `blocked`: two versions of one record for an HTTP sink nobody listens on;
  the first waits for its connector's next probe (5 s, doubling to a
  minute), the second is due but waits behind the first. A loop that counts
  the second as due wakes up over and over.

Linux only (/proc). Not a test: the figure depends on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import scratch

TARGET = 0.5  # percent of one core
CASES = ("idle", "blocked")


def write_config(folder: Path, case: str) -> Path:
    records = [{"id": 1, "entity": "a"}, {"id": 2, "entity": "a"}] if case == "blocked" else []
    (folder / "view.json").write_text(json.dumps({"records": records}))
    if case == "blocked":
        with socket.socket() as probe:  # a port nobody listens on: every connection is refused
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        connector = f'[connectors.out]\nkind = "http"\nbase_url = "http://127.0.0.1:{port}"\n[connectors.out.objects.leads]\npath = "/leads"\n'
        action = "out > leads > create"
    else:
        connector, action = '[connectors.out]\nkind = "file"\npath = "out.jsonl"\n', "out > record > write"
    cfg = folder / "agent.toml"
    cfg.write_text(f"""[agent]
ledger = "agent.db"
log_level = "INFO"
[sources.leads]
kind = "file"
path = "view.json"
id = "id"
entity = "entity"
first_run = "deliver"
every = "1h"
{connector}
[[flows]]
name = "f"
source = "leads"
  [[flows.steps]]
  kind = "action"
  action = "{action}"
""")
    return cfg


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15 of stat(5)


def switches(pid: int) -> int:
    """Voluntary context switches of all the process's threads (about one per wake-up)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def measure(case: str, seconds: float) -> tuple[float, float, int]:
    """(CPU seconds, percent of a core, wake-ups) of `agent run` over `seconds` once its start is over."""
    with scratch() as folder:
        cfg = write_config(folder, case)
        log = (folder / "agent.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), "run"], cwd=folder,
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            started = _wait_for(folder / "agent.log", "poll leads:", 30)
            if not started:
                raise SystemExit(f"{case}: `agent run` did not start:\n{(folder / 'agent.log').read_text()}")
            time.sleep(2)  # the first drain (and in `blocked` the first refused connection) is start-up, not idling
            cpu, woke, begun = cpu_seconds(proc.pid), switches(proc.pid), time.monotonic()
            time.sleep(seconds)
            cpu, woke, took = cpu_seconds(proc.pid) - cpu, switches(proc.pid) - woke, time.monotonic() - begun
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
        return cpu, 100.0 * cpu / took, woke


def _wait_for(path: Path, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return True
        time.sleep(0.05)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="the measured window of each case (default: 60)")
    parser.add_argument("--only", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    args = parser.parse_args()
    tick = 1000 / os.sysconf("SC_CLK_TCK")
    print(f"`agent run` with nothing to do, {args.seconds:.0f} s per case; target under {TARGET}% of a core "
          f"(CPU time is counted in {tick:.0f} ms ticks)")
    for case in args.only.split(","):
        cpu, percent, woke = measure(case, args.seconds)
        verdict = "ok" if percent < TARGET else "OVER"
        print(f"{case:8} {cpu * 1000:6.0f} ms CPU  {percent:6.3f}% of a core  {woke:6d} wake-ups  {verdict}", flush=True)


if __name__ == "__main__":
    main()

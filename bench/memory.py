"""Peak memory while polling a large view: bounded by a page, not by the view.

    python bench/memory.py [--quick] [--repeats N]

Each measurement runs in a fresh Python process, which reports how far its peak RSS (VmHWM)
rose above its RSS at the start of the work, after imports and setup. The peak is reset first
(Linux: "5" into /proc/self/clear_refs), so that setup's own peak cannot hide the work's:

agent    Agent.poll("leads") of the whole view (1,000 records a page), first_run = "deliver"
bare     a requests.Session fetching + json-parsing the same pages one after the other

Views of 100k and 1M records (quick: 10k and 100k): with memory bounded by a page, the
growth for the 10x larger view stays about the same, far from 10x. Quick mode measures once.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from common import Row, human, make_agent, scratch, served, table


def _status(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB."""
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) for line in file if line.startswith(field + ":")) / 1024


def reset_peak() -> float:
    """Reset the peak RSS to the current RSS (Linux) and return it, in MiB."""
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
    return _status("VmRSS")


def peak_mb() -> float:
    return _status("VmHWM")  # the peak RSS (getrusage's ru_maxrss may still hold the parent's peak after a vfork + exec)


def child(mode: str, url: str, n: int) -> float:
    """In this process: poll (or bare-fetch) the view; the growth of the peak RSS in MiB."""
    if mode == "bare":
        from poll import bare_fetch

        before = reset_peak()
        assert bare_fetch(url) == n
        return peak_mb() - before
    with scratch() as folder:
        agent = make_agent(folder, url, first_run="deliver")
        try:
            before = reset_peak()
            result = agent.poll("leads")
            grown = peak_mb() - before
            assert result.error is None and result.new == n, result
            return grown
        finally:
            agent.close()


def measure(mode: str, url: str, n: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", mode, url, str(n)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["grown_mb"]


def run(quick: bool, repeats: int) -> list[Row]:
    repeats = 1 if quick else repeats  # a peak varies by well under 1 MB between runs; quick mode keeps to its budget
    rows = []
    for n in (10_000, 100_000) if quick else (100_000, 1_000_000):
        with served("view", n) as url:
            bare = [measure("bare", url, n) for _ in range(repeats)]
            agent = [measure("agent", url, n) for _ in range(repeats)]
        rows.append(Row("peak RSS growth while polling", human(n), bare, agent, unit="MB"))
    small, large = (statistics.median(r.agent) for r in rows)
    rows[1].note = f"{large / small:.2f}x the growth of a 10x smaller view (bounded by a page: ~1x)"
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "URL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, url, n = args.child
        print(json.dumps({"grown_mb": child(mode, url, int(n))}))
    else:
        print(table(run(args.quick, args.repeats)))

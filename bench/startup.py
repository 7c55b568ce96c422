"""Start-up time of the `agent` command against `python -c pass` (the interpreter's own start).

    .venv/bin/python bench/startup.py              # 10 runs of each, medians
    .venv/bin/python bench/startup.py --repeats 20

Each command runs as a fresh process, the way an operator or a health check
starts it: `agent --help`, `agent --version` and `agent status` (on the
repository's own sample config, copied to a scratch folder and run once so a
ledger exists). The target (issue 11) is within 0.15 s of `python -c pass`.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, scratch

TARGET = 0.15  # seconds over `python -c pass`
AGENT = Path(sys.executable).with_name("agent")  # the installed console script beside this python


def _once(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def _median(argv: list[str], cwd: Path, repeats: int) -> float:
    _once(argv, cwd)  # warm the file cache: the figure is the start, not the first read from disk
    return statistics.median(_once(argv, cwd) for _ in range(repeats))


def _prepare(folder: Path) -> None:
    """The sample config and its view in a scratch folder, with a ledger: what `status` reads."""
    shutil.copy(ROOT / "agent.toml", folder / "agent.toml")
    (folder / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "leads.json", folder / "examples" / "leads.json")
    subprocess.run([str(AGENT), "run", "--once"], cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not AGENT.exists():
        sys.exit(f"no `agent` command beside {sys.executable}: install the project first (pip install -e .)")
    with scratch() as folder:
        _prepare(folder)
        bare = _median([sys.executable, "-c", "pass"], folder, args.repeats)
        print(f"python -c pass: {bare * 1000:.0f} ms (median of {args.repeats}); target: within {TARGET * 1000:.0f} ms of it")
        print(f"{'command':<18} {'median':>8} {'over bare':>10} {'ratio':>7}  within target")
        for argv in (["--help"], ["--version"], ["status"]):
            took = _median([str(AGENT), *argv], folder, args.repeats)
            print(f"{'agent ' + ' '.join(argv):<18} {took * 1000:>6.0f}ms {(took - bare) * 1000:>8.0f}ms {took / bare:>6.1f}x  "
                  f"{'yes' if took - bare <= TARGET else 'NO'}")


if __name__ == "__main__":
    main()

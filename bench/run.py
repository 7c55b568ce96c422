"""Run the DESIGN §10 benchmarks and print one table.

    .venv/bin/python bench/run.py --quick        # small sizes, under 2 minutes
    .venv/bin/python bench/run.py                # full sizes, several minutes
    .venv/bin/python bench/run.py --only poll,deliver --repeats 5
    .venv/bin/python bench/run.py --targets      # the targets P1-P9 (bench/targets.py): table + JSON, ~10 minutes
"""
from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import sys
import time

import admit
import deliver
import memory
import poll
from common import table

BENCHMARKS = {"poll": poll, "admit": admit, "deliver": deliver, "memory": memory}


def main() -> None:
    if "--targets" in sys.argv[1:]:  # the targets have options of their own (--json, --only P1,P3)
        import targets

        return targets.main([a for a in sys.argv[1:] if a != "--targets"])
    parser = argparse.ArgumentParser(description="Run the sync-agent benchmarks (DESIGN §10).")
    parser.add_argument("--quick", action="store_true", help="small sizes (10k view, 50k admit, 1k deliver, 10k+100k memory views)")
    parser.add_argument("--repeats", type=int, help="runs per figure, the median is shown (default: 3)")
    parser.add_argument("--targets", action="store_true", help="measure the targets P1-P9 instead (see bench/targets.py --help)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    args = parser.parse_args()
    repeats = args.repeats or 3
    print(f"python {platform.python_version()}, sqlite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, "
          f"{'quick' if args.quick else 'full'} mode, {repeats} runs per figure (medians)", flush=True)
    rows, started = [], time.perf_counter()
    for name in args.only.split(","):
        begun = time.perf_counter()
        found = BENCHMARKS[name].run(args.quick, repeats)
        print(f"\n{name} ({time.perf_counter() - begun:.0f}s)\n{table(found)}", flush=True)
        rows += found
    print(f"\nall ({time.perf_counter() - started:.0f}s); ratio = agent / bare, lower is better\n{table(rows)}")


if __name__ == "__main__":
    main()

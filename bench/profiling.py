"""Profile the agent's side of one benchmark with cProfile (servers run in their own processes).

    python bench/profiling.py poll [--n 100000] [--first-run deliver] [--top 25]
    python bench/profiling.py repoll
    python bench/profiling.py deliver [--n 20000] [--concurrency 1] [--workers]
    python bench/profiling.py admit [--n 1000000]

Prints the top functions by own time and by cumulative time. cProfile sees the calling
thread only: the delivery threads' work shows as waiting, unless --workers profiles them instead.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats

from common import make_agent, scratch, served


def profile(fn, top: int) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    for order in ("tottime", "cumulative"):
        pstats.Stats(profiler).strip_dirs().sort_stats(order).print_stats(top)


def profile_workers(agent, top: int) -> None:
    """Profile FlowRunner.run in the delivery threads (one at a time: use --concurrency 1)."""
    profiler, run = cProfile.Profile(), agent.runner.run
    agent.runner.run = lambda ex: profiler.runcall(run, ex)
    agent.drain()
    for order in ("tottime", "cumulative"):
        pstats.Stats(profiler).strip_dirs().sort_stats(order).print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=["poll", "repoll", "deliver", "admit"])
    parser.add_argument("--n", type=int)
    parser.add_argument("--first-run", default="deliver", choices=["skip", "deliver"])
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--workers", action="store_true", help="deliver: profile the delivery thread, not the main one")
    args = parser.parse_args()
    if args.bench == "admit":
        import admit

        data = admit.build(args.n or 100_000)
        return profile(lambda: admit.agent_admit(data), args.top)
    n = args.n or (20_000 if args.bench == "deliver" else 100_000)
    with served("view", n) as view_url, served("sink") as sink_url, scratch() as folder:
        agent = make_agent(folder, view_url, sink_url, first_run=args.first_run, concurrency=args.concurrency)
        try:
            if args.bench == "poll":
                return profile(lambda: agent.poll("leads"), args.top)
            agent.poll("leads")
            if args.bench == "deliver" and args.workers:
                return profile_workers(agent, args.top)
            profile(lambda: agent.poll("leads") if args.bench == "repoll" else agent.drain(), args.top)
        finally:
            agent.close()


if __name__ == "__main__":
    main()

"""Profile the agent's side of one benchmark with cProfile (servers run in their own processes).

    python bench/profiling.py poll [--n 100000] [--first-run deliver] [--top 25]
    python bench/profiling.py repoll
    python bench/profiling.py poll --cli --first-run skip      # P1: the whole `agent poll` process
    python bench/profiling.py repoll --cli                     # P2: the same, nothing new
    python bench/profiling.py deliver [--n 20000] [--concurrency 1] [--workers]
    python bench/profiling.py once [--n 100000] [--new 4000] [--concurrency 1] [--workers]   # P4, P5
    python bench/profiling.py mail [--n 5000] [--workers]                                    # P6
    python bench/profiling.py admit [--n 1000000]

Prints the top functions by own time and by cumulative time, each with its share of the
profiled total. cProfile sees the calling thread only: the delivery threads' work shows as
waiting, unless --workers profiles them instead (one profiler per thread, merged). --cli runs
the installed `agent` command under `python -m cProfile`: imports, opening the ledger, the poll.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import subprocess
import sys
import threading

from common import make_agent, scratch, served, write_config


def report(stats: pstats.Stats, top: int) -> None:
    """The top functions by own and by cumulative time, with their percent of the total."""
    total = stats.total_tt or 1e-9
    print(f"total {total:.2f} s profiled")
    for order, column in (("tottime", 2), ("cumulative", 3)):
        stats.sort_stats(order)
        print(f"\nby {order}:\n{'own s':>8} {'own %':>6} {'cum s':>8} {'cum %':>6} {'calls':>9}  function")
        for func in stats.fcn_list[:top]:
            calls, _, own, cum, _ = stats.stats[func]
            name = f"{func[0].rsplit('/', 1)[-1]}:{func[1]}({func[2]})"
            print(f"{own:8.3f} {100 * own / total:5.1f}% {cum:8.3f} {100 * cum / total:5.1f}% {calls:9d}  {name}")


def profile(fn, top: int) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    report(pstats.Stats(profiler, stream=io.StringIO()), top)


def profile_workers(agent, top: int, fn=None) -> None:
    """Profile FlowRunner.run in the delivery threads: a profiler per thread, merged at the end."""
    profilers: dict[int, cProfile.Profile] = {}
    run = agent.runner.run

    def profiled(ex):
        profiler = profilers.setdefault(threading.get_ident(), cProfile.Profile())
        return profiler.runcall(run, ex)

    agent.runner.run = profiled
    (fn or agent.drain)()
    stats = pstats.Stats(*profilers.values(), stream=io.StringIO())
    print(f"{len(profilers)} delivery thread(s)")
    report(stats, top)


def profile_cli(folder, argv: list[str], top: int) -> None:
    """The whole `agent` process under cProfile (the console script beside this python)."""
    from targets import AGENT

    out = folder / "agent.prof"
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), str(AGENT), "--config", str(folder / "agent.toml"), *argv],
                   cwd=folder, check=True)
    report(pstats.Stats(str(out), stream=io.StringIO()), top)


def cli(args: argparse.Namespace) -> None:
    n = args.n or 100_000
    with served("view", n) as view_url, scratch() as folder:
        write_config(folder, view_url, first_run=args.first_run)
        if args.bench == "repoll":
            subprocess.run([sys.executable, "-m", "agent", "--config", str(folder / "agent.toml"), "poll", "leads"], cwd=folder,
                           check=True, stdout=subprocess.DEVNULL)
        profile_cli(folder, ["poll", "leads"], args.top)


def once(args: argparse.Namespace) -> None:
    """P4/P5 in one process: a ledger primed on `n` records, then poll_all + drain of `new` more."""
    n, new = args.n or 100_000, args.new
    with served("view", n + new, show=n) as view_url, served("sink", delay=args.delay) as sink_url, scratch() as folder:
        write_config(folder, view_url, first_run="skip")
        subprocess.run([sys.executable, "-m", "agent", "--config", str(folder / "agent.toml"), "poll", "leads"], cwd=folder,
                       check=True, stdout=subprocess.DEVNULL)
        view_url.show(n + new)
        agent = make_agent(folder, view_url, sink_url, first_run="skip", concurrency=args.concurrency)
        try:
            work = lambda: (agent.poll_all(), agent.drain())  # noqa: E731
            profile_workers(agent, args.top, work) if args.workers else profile(work, args.top)
        finally:
            agent.close()


def mail(args: argparse.Namespace) -> None:
    """P6: drain of one email per lead to a local aiosmtpd, concurrency 1 (the poll is not profiled)."""
    from agent import logs
    from agent.config import load
    from agent.process import Agent
    from targets import _mail_config
    from viewserver import make_leads

    leads = make_leads(args.n or 5_000)
    with served("smtp") as smtp, scratch() as folder:
        logs.setup("WARNING")
        agent = Agent(load(_mail_config(folder, smtp, leads)))
        try:
            agent.poll("leads")
            profile_workers(agent, args.top) if args.workers else profile(agent.drain, args.top)
        finally:
            agent.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=["poll", "repoll", "deliver", "once", "mail", "admit"])
    parser.add_argument("--n", type=int)
    parser.add_argument("--new", type=int, default=4_000, help="once: records new since the ledger was primed")
    parser.add_argument("--delay", type=float, default=0.0, help="once: seconds the sink takes per request")
    parser.add_argument("--first-run", default="deliver", choices=["skip", "deliver"])
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--workers", action="store_true", help="deliver, once, mail: profile the delivery threads, not the main one")
    parser.add_argument("--cli", action="store_true", help="poll, repoll: profile the whole `agent poll` process")
    args = parser.parse_args()
    if args.bench == "admit":
        import admit

        data = admit.build(args.n or 100_000)
        return profile(lambda: admit.agent_admit(data), args.top)
    if args.cli and args.bench in ("poll", "repoll"):
        return cli(args)
    if args.bench == "once":
        return once(args)
    if args.bench == "mail":
        return mail(args)
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

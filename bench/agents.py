"""Several `agent run` processes on one PostgreSQL ledger against a sink that answers in 10 ms (issue 10).

    .venv/bin/python bench/agents.py [--quick] [--repeats N] [--json PATH]

work     20k executions due (5k quick), admitted beforehand by the agent's own poller (Agent.poll_all) from a
         file source that is emptied afterwards; every measurement gets a fresh copy of that ledger (a PostgreSQL
         database made from the prepared one as a template, or a copy of the prepared SQLite file) and a fresh sink
agent    1, 2, 4 and 8 `agent run` processes (concurrency = 1 each) on one PostgreSQL ledger (a server run
         with fsync off, as the tests' is), 1 on a second PostgreSQL with its durable defaults (fsync on), and 1 on
         SQLite (WAL, synchronous = FULL): the deliveries per second over a window that opens once every process
         runs (executions that succeeded, counted in the ledger by a reader beside them)
bare     the same number of threads POSTing the same bodies with keep-alive, one request at a time each, to the
         same kind of sink (the physical limit of `concurrency = 1` per process)
claims   p50/p99 of `finish_and_claim` (record the outcome just in and claim the next, one transaction), timed
         inside the agent processes by a wrapper a sitecustomize module installs (the agent's code is untouched);
         only calls made in the window count
commits  ledger transactions committed per delivery in the window, counted by the same wrapper (PostgreSQL: every
         transaction, reads too; SQLite: write transactions, its reads commit nothing); for PostgreSQL also the
         server's own count (pg_stat_database.xact_commit, which includes the reader's two queries)

The sink (tests/sinkserver.py, `delay` = 10 ms) runs in a process of its own; both PostgreSQL servers
(tests/pgserver.py: initdb in a temporary folder) are started by the script. Ratios: `agent / bare` of the throughputs (the
share of the physical limit reached; higher is better here), and N agents against 1 (targets: 2 >= 1.8x, 4 >= 3x).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import requests

from common import Row, human, scratch, table

DELAY = 0.010  # seconds the sink takes to answer
AGENTS = (1, 2, 4, 8)
TARGETS = {2: 1.8, 4: 3.0}  # N agents against 1, on PostgreSQL

CONFIG = """
[agent]
ledger = "{ledger}"
log_level = "INFO"
concurrency = 1
lease = "30s"

[sources.leads]
kind = "file"
path = "view.json"
records = "records"
id = "lastSubmissionID"
updated = "lastModified"
entity = "RecordId"
first_run = "deliver"
every = "1h"

[connectors.crm]
kind = "http"
base_url = "{sink}"
idempotency_header = "Idempotency-Key"
timeout = "10s"
[connectors.crm.objects.leads]
path = "/leads"

[[flows]]
name = "leads-to-crm"
source = "leads"

  [[flows.steps]]
  kind = "map"
  fields = {{ email = "{{{{ record.Email | lower }}}}", name = "{{{{ record.FirstName }}}} {{{{ record.LastName }}}}", version = "{{{{ record.lastSubmissionID }}}}" }}

  [[flows.steps]]
  kind = "action"
  action = "crm > leads > send"
  body = "mapped"
"""

# Loaded by every agent process of a measurement (PYTHONPATH): times finish_and_claim and counts committed
# transactions, and writes them to BENCH_TIMINGS/<pid>.json when the process ends (SIGTERM ends it cleanly).
TIMING = """
import atexit, contextlib, json, os, time

_folder = os.environ.get("BENCH_TIMINGS")
if _folder:
    _claims, _commits = [], []  # (wall time at the call, seconds), wall time of each commit

    def _timed(original):
        def finish_and_claim(self, *args, **kwargs):
            at, started = time.time(), time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                _claims.append((at, time.perf_counter() - started))
        return finish_and_claim

    def _counted(original):
        @contextlib.contextmanager
        def transaction(self, *args, **kwargs):
            with original(self, *args, **kwargs) as handle:
                yield handle
            _commits.append(time.time())  # reached only when it committed
        return transaction

    import state.postgres, state.sqlite
    state.postgres.PostgresLedger.finish_and_claim = _timed(state.postgres.PostgresLedger.finish_and_claim)
    state.postgres.PostgresLedger._transaction = _counted(state.postgres.PostgresLedger._transaction)
    state.sqlite.SqliteLedger.finish_and_claim = _timed(state.sqlite.SqliteLedger.finish_and_claim)
    state.sqlite.SqliteLedger.write = _counted(state.sqlite.SqliteLedger.write)

    @atexit.register
    def _dump():
        with open(os.path.join(_folder, f"{os.getpid()}.json"), "w") as f:
            json.dump({"claims": _claims, "commits": _commits}, f)
"""


# -- the sink, in a process of its own -----------------------------------------------------------------
def _serve_sink(conn) -> None:
    from sinkserver import SinkServer

    server = SinkServer(key_field="sink_id")  # a field no body has: every new POST is a creation
    server.delay = DELAY
    server.start()
    conn.send(server.url)
    conn.recv()
    server.stop()


class Sink:
    """A SinkServer answering in DELAY seconds, in a spawned process; ``url`` while it runs."""

    def __enter__(self) -> "Sink":
        ctx = multiprocessing.get_context("spawn")
        self._conn, theirs = ctx.Pipe()
        self._process = ctx.Process(target=_serve_sink, args=(theirs,), daemon=True)
        self._process.start()
        self.url = self._conn.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.send("stop")
        self._process.join(10)


# -- the work -------------------------------------------------------------------------------------------
def write_config(folder: Path, ledger: str, sink_url: str = "http://127.0.0.1:9", records: list | None = None) -> Path:
    (folder / "view.json").write_text(json.dumps({"records": records or []}))
    cfg = folder / "agent.toml"
    cfg.write_text(CONFIG.format(ledger=ledger, sink=sink_url))
    return cfg


def prepare(folder: Path, ledger: str, n: int) -> None:
    """Admit n records through the agent's poller (nothing sent), then empty the source: n executions are due."""
    from agent import logs
    from agent.config import load
    from agent.process import Agent
    from viewserver import make_leads

    folder.mkdir(parents=True, exist_ok=True)
    logs.setup("WARNING")
    agent = Agent(load(write_config(folder, ledger, records=make_leads(n))))
    try:
        [result] = agent.poll_all()
        assert result.new == n and not result.error, result
    finally:
        agent.close()
    write_config(folder, ledger)


def succeeded(location: str) -> int:
    from state import open_ledger

    ledger = open_ledger(location, reader=True)
    try:
        return sum(flow.get("succeeded", 0) for flow in ledger.counts().values())
    finally:
        ledger.close()


def xact_commits(server, location: str) -> int | None:
    if not location.startswith("postgresql://"):
        return None
    name = location.rsplit("/", 1)[1]
    return server.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (name,))[0][0]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def measure(folder: Path, location: str, agents: int, window: float, server) -> dict:
    """Start `agents` processes on the ledger at `location`; deliveries per second, claim times and commits in the window."""
    folder.mkdir(parents=True, exist_ok=True)
    timings, plant = folder / "timings", folder / "plant"
    timings.mkdir()
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(textwrap.dedent(TIMING))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}, "BENCH_TIMINGS": str(timings),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(plant), os.environ.get("PYTHONPATH")]))}
    with Sink() as sink:
        cfg = write_config(folder, location, sink.url)
        procs, errs = [], []
        for i in range(agents):
            err = folder / f"agent{i}.err"
            with open(folder / f"agent{i}.out", "w") as out, open(err, "w") as errors:
                procs.append(subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), "run"], cwd=folder,
                                              stdout=out, stderr=errors, stdin=subprocess.DEVNULL, env=env))
            errs.append(err)
        try:
            _wait(lambda: all("agent running" in e.read_text() or p.poll() is not None for p, e in zip(procs, errs)), 120, "the agents to start")
            dead = [e.read_text()[-500:] for p, e in zip(procs, errs) if p.poll() is not None]
            if dead:
                raise SystemExit(f"an agent exited at start: {dead[0]}")
            warm = succeeded(location) + 10 * agents
            _wait(lambda: succeeded(location) >= warm, 60, "the first deliveries")
            c0, x0, t0 = succeeded(location), xact_commits(server, location), time.time()
            time.sleep(window)
            c1, x1, t1 = succeeded(location), xact_commits(server, location), time.time()
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    claims, commits = [], 0
    for path in timings.glob("*.json"):
        data = json.loads(path.read_text())
        claims += [seconds for at, seconds in data["claims"] if t0 <= at <= t1]
        commits += sum(t0 <= at <= t1 for at in data["commits"])
    delivered = c1 - c0
    if delivered <= 0 or not claims:
        raise SystemExit(f"nothing delivered in the window ({delivered}); see {folder}")
    claims.sort()
    return {"agents": agents, "delivered": delivered, "seconds": t1 - t0, "per_second": delivered / (t1 - t0),
            "claim_p50_ms": 1000 * claims[len(claims) // 2], "claim_p99_ms": 1000 * claims[min(len(claims) - 1, int(len(claims) * 0.99))],
            "claims": len(claims), "commits_per_delivery": commits / delivered,
            "server_commits_per_delivery": None if x0 is None else (x1 - x0) / delivered}


def durable_server():
    """A second PostgreSQL with its durable defaults (fsync, synchronous_commit, full_page_writes on), for the
    comparison with SQLite at synchronous = FULL. The test server's speed options are a module constant of
    tests/pgserver.py, read when the server starts: left out for this one start."""
    import pgserver

    fast, pgserver.FAST = pgserver.FAST, ()
    try:
        return pgserver.PgServer.start()
    finally:
        pgserver.FAST = fast


# -- the bare operation ------------------------------------------------------------------------------
def bare(threads: int, window: float) -> float:
    """POSTs per second: `threads` threads, a keep-alive session each, one request at a time, for `window` seconds."""
    counts = [0] * threads
    with Sink() as sink:
        stop = time.monotonic() + window

        def post(slot: int) -> None:
            with requests.Session() as session:
                while time.monotonic() < stop:
                    body = {"email": f"lead{slot}@example.invalid", "name": "A Lead", "version": uuid.uuid4().hex}
                    response = session.post(sink.url + "/leads", json=body, headers={"Idempotency-Key": uuid.uuid4().hex}, timeout=30)
                    assert response.status_code == 201, response.text
                    counts[slot] += 1

        started = time.monotonic()
        workers = [threading.Thread(target=post, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(counts) / (time.monotonic() - started)


# -- the run ----------------------------------------------------------------------------------------
def run(quick: bool, repeats: int) -> tuple[list[Row], dict]:
    from pgserver import PgServer

    n, window = (5_000, 2.0) if quick else (20_000, 6.0)
    server, safe = PgServer.start(), durable_server()
    try:
        with scratch() as root:
            templates = {"fast": server.create_database(), "durable": safe.create_database()}
            prepare(root / "prepare-postgresql", templates["fast"], n)
            prepare(root / "prepare-postgresql-durable", templates["durable"], n)
            sqlite_ready = root / "prepare-sqlite" / "agent.db"
            prepare(sqlite_ready.parent, "agent.db", n)
            runs: dict[str, list[dict]] = {f"postgresql-{a}": [] for a in AGENTS} | {"postgresql-durable-1": [], "sqlite-1": []}
            bares: dict[int, list[float]] = {a: [] for a in AGENTS}
            for repeat in range(repeats):
                for a in AGENTS:
                    bares[a].append(bare(a, min(window, 4.0)))
                    runs[f"postgresql-{a}"].append(_on_copy(server, templates["fast"], root / f"r{repeat}-pg{a}", a, window))
                    print(f"  run {repeat + 1}: {a} agent(s) on PostgreSQL: {runs[f'postgresql-{a}'][-1]['per_second']:.0f}/s", flush=True)
                runs["postgresql-durable-1"].append(_on_copy(safe, templates["durable"], root / f"r{repeat}-pgdurable", 1, window))
                print(f"  run {repeat + 1}: 1 agent on PostgreSQL with fsync on: {runs['postgresql-durable-1'][-1]['per_second']:.0f}/s", flush=True)
                folder = root / f"r{repeat}-sqlite1"
                folder.mkdir()
                shutil.copy(sqlite_ready, folder / "agent.db")
                runs["sqlite-1"].append(measure(folder, str(folder / "agent.db"), 1, window, server))
                print(f"  run {repeat + 1}: 1 agent on SQLite: {runs['sqlite-1'][-1]['per_second']:.0f}/s", flush=True)
    finally:
        server.stop()
        safe.stop()
    return _report(runs, bares, n, window, repeats)


def _on_copy(server, template: str, folder: Path, agents: int, window: float) -> dict:
    """`measure` on a fresh database copied from the prepared one."""
    url = server.create_database(template=template.rsplit("/", 1)[1])
    try:
        return measure(folder, url, agents, window, server)
    finally:
        server.drop_database(url)


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _report(runs: dict[str, list[dict]], bares: dict[int, list[float]], n: int, window: float, repeats: int) -> tuple[list[Row], dict]:
    one = _median(runs["postgresql-1"], "per_second")
    rows, figures = [], {"work": n, "sink_delay_ms": DELAY * 1000, "window_seconds": window, "repeats": repeats, "runs": runs,
                         "bare_per_second": bares}
    for name, found in runs.items():
        agents = found[0]["agents"]
        speed = _median(found, "per_second")
        note = (f"{speed / one:.2f}x 1 agent; " if name.startswith("postgresql") and agents > 1 else "") + \
               f"claim p50 {_median(found, 'claim_p50_ms'):.1f} ms p99 {_median(found, 'claim_p99_ms'):.1f} ms; " \
               f"{_median(found, 'commits_per_delivery'):.2f} commits/delivery"
        if found[0]["server_commits_per_delivery"] is not None:
            note += f" (server: {_median(found, 'server_commits_per_delivery'):.2f})"
        kind = "postgresql, fsync on" if "durable" in name else name.split("-")[0]
        rows.append(Row(f"{agents} agent{'s' if agents > 1 else ''}, {kind}", human(n), bares[agents],
                        [r["per_second"] for r in found], unit="/s", note=note))
    scaling = {a: _median(runs[f"postgresql-{a}"], "per_second") / one for a in AGENTS}
    figures["scaling"] = scaling
    figures["targets_met"] = {str(a): scaling[a] >= target for a, target in TARGETS.items()}
    figures["postgresql_vs_sqlite_one_agent"] = one / _median(runs["sqlite-1"], "per_second")
    figures["durable_postgresql_vs_sqlite_one_agent"] = _median(runs["postgresql-durable-1"], "per_second") / _median(runs["sqlite-1"], "per_second")
    return rows, figures


def main() -> None:
    import argparse
    import platform

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5k executions, a 2 s window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures (every run) to this file")
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, sink answers in {DELAY * 1000:.0f} ms, "
          f"concurrency = 1 per agent, {args.repeats} runs per figure (medians)", flush=True)
    rows, figures = run(args.quick, args.repeats)
    print(f"\n{table(rows)}")
    print("ratio = agent / bare throughput (deliveries per second; higher is better here)")
    scaling = figures["scaling"]
    print("PostgreSQL, N agents vs 1: " + ", ".join(
        f"{a}: {scaling[a]:.2f}x" + (f" (target >= {TARGETS[a]:g}x: {'met' if scaling[a] >= TARGETS[a] else 'NOT met'})" if a in TARGETS else "")
        for a in AGENTS[1:]))
    print(f"one agent, PostgreSQL vs SQLite (synchronous = FULL): {figures['postgresql_vs_sqlite_one_agent']:.2f}x the throughput "
          f"with fsync off, {figures['durable_postgresql_vs_sqlite_one_agent']:.2f}x with fsync on")
    print(f"({time.perf_counter() - started:.0f}s)")
    text = json.dumps(figures, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text if not args.json else f"figures written to {args.json}")


if __name__ == "__main__":
    main()

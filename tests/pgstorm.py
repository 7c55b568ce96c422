"""The kill storm on PostgreSQL: three `agent run` processes share one ledger while they are killed, frozen and cut off.

    report = PgStorm(tmp_path, pg_server, pg_url, seed=7).run()
    print(report.text())
    assert not report.problems

Three real ``agent --config X run`` processes ("slots"; forked from a
``storm.Launcher``, or started with ``python -m agent`` when ``STORM_FORK=0``)
run with the same config on one PostgreSQL database, with a short ``lease`` (2 s; the
connector timeout is 1 s). The view is ``storm.py``'s: a ``Mutator`` adds and
updates records all along (new ids, new versions of old ones, deletions, one
record dated 9999-12-31), a ``ChaosView`` fails some requests. The sink is
``storm.py``'s ``ChaosSink`` (503, 429, an accepted write whose answer is
dropped or late), which logs every request with its idempotency key and the
process that sent it (``X-Storm-Generation``: every process started gets a
number of its own, a "generation").

The faults, in this order, at seeded random moments:

1. *kills*: a slot's process is SIGKILLed and a new one started in its place;
   between the kills, a running process's database sessions are ended with
   ``pg_terminate_backend`` (found by the ``application_name`` the ledger
   gives them, which names the agent's pid), inside a transaction when one
   comes within 2 s;
2. *freezes* (``freezes``): "delivery": the sink holds an answer to one
   process (within the connector timeout; never an answer it made slow on
   purpose, which that process gave up on and sent again) and while that request is in
   flight the process is SIGSTOPped, until another process has sent the held
   request again (its claim ran out and was taken over); then SIGCONT: its
   outcome for that request must be refused by the fence (the log line "its
   lease passed to another agent"). "poll": the view holds a page the
   source's lease holder asked for and the poller is SIGSTOPped, until
   another process took the source over and polled it; then SIGCONT: the rest
   of its stale poll must be refused ("this agent writes nothing more for
   it"). A process found inside a transaction when stopped is resumed at once
   and another moment is taken (its row locks would hold the others up).

Then the faults and the Mutator stop, the three processes run until nothing
is left to do and are stopped with SIGTERM.

The judge: every admitted version and every version still in the view was
delivered; none went out under two idempotency keys; every request that
repeated an accepted key is explained: the sink kept the answer to the request
before it (dropped or late), or the process that sent that request was hit
by a fault while the request could still have been in flight (killed,
frozen, or its sessions ended, from when the sink saw the request until
``IN_FLIGHT`` seconds later; for ended sessions also a request that reached
the sink up to ``EARLY`` seconds after them: it was claimed before), or the
repeat came from a frozen process within ``IN_FLIGHT`` seconds of its
SIGCONT (a step it had started before the stop, its claim since taken over), or
the ledger shows a takeover between the two requests (an ``interrupted``
attempt "lost its lease"). The frozen process's log shows a refused outcome.
The replays are no more than the lost answers, plus ``concurrency`` per
fault, plus the takeovers. Every process exits 0 on SIGTERM, no output has a
traceback or the view password, and the cursor moved but never past the
newest time the view had.

``plants`` puts bugs into every agent process from outside (a
``sitecustomize`` module, in force in the Launcher and so in every process
forked from it; see ``PLANTS``): the storm must then report them.
``sink-events.jsonl``, ``faults.json`` and the processes' output in ``logs/``
are left for a post-mortem.
"""
from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psycopg

from storm import (FAR_FUTURE, FORK, LATE, PASSWORD, SINK_TIMEOUT, START, VIEW_TIMEOUT, ChaosSink, ChaosView, Forked, Launcher,
                   Mutator, Report, SinkEvent, agent_env, write_config)
from viewserver import ViewServer, make_leads

LEASE = 2.0  # the agents' lease: at least twice the connector timeout (SINK_TIMEOUT, 1 s)
HOLD_VIEW = 0.3  # how long the view holds the page the frozen poller waits for (less than the source timeout)
HOLD = 0.7  # how long the sink holds the answer the frozen process waits for (less than the connector timeout)
# The longest a healthy process leaves a send's outcome unrecorded after the sink saw the request: the answer can
# take the connector timeout (plus a late answer's delay), then it is recorded at once; a second more for a busy CPU.
IN_FLIGHT = SINK_TIMEOUT + LATE + 1.0
EARLY = 0.5  # a request claimed before its process's sessions were ended may reach the sink this much later
REFUSED = "its lease passed to another agent; this outcome"  # the log line of a finish the fence refused
SOURCE_REFUSED = "this agent writes nothing more for it"  # the log line of a source write the fence refused
ACTIVE = ("pending", "running", "retrying", "paused")

# Bugs planted in every agent process from outside (a sitecustomize module; the agent's code is untouched), for the
# negative control: the storm must report each.
PLANTS = {
    # an outcome is written by execution id alone, as the queues without a fence do: a frozen agent's stale outcome lands
    "unfenced": """
        import state.sql as S
        S.FINISH = S.FINISH.replace("WHERE id = ? AND epoch = ? AND status = 'running'", "WHERE id = ? AND ? >= 0")
        assert "epoch" not in S.FINISH
    """,
    # a step recorded as sent is sometimes scheduled again: the same key goes out again with no fault to explain it
    "resend": """
        import random
        import state.postgres as P
        finish_one = P.PostgresLedger._finish_one
        def finish(self, cur, ex, result, now):
            if result.status == "succeeded" and result.attempt and result.attempt["outcome"] == "succeeded" and random.random() < 0.3:
                result = P.Finish("retrying", result.attempt["step"], result.context, next_at=now, attempt=result.attempt)
            finish_one(self, cur, ex, result, now)
        P.PostgresLedger._finish_one = finish
    """,
}


@dataclass
class Process:
    """One `agent run` process in one slot; its index is its generation (the X-Storm-Generation it sends)."""

    index: int
    slot: int
    proc: subprocess.Popen | Forked
    out: Path
    err: Path
    start: float
    end: float | None = None
    signal: str | None = None  # what the storm sent last: KILL | STOP | TERM
    stop_seconds: float | None = None  # SIGTERM to exit

    def log(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None and "agent running" in self.err.read_text(errors="replace")


@dataclass
class Fault:
    """A fault that hit one process: kill, stop (frozen until `until`) or terminate (its sessions ended)."""

    kind: str
    gen: int
    t: float  # time.monotonic(), the sink events' clock
    wall: float  # time.time(), the ledger's clock
    until: float | None = None  # a stop: when it was SIGCONTed
    detail: str = ""

    def explains(self, event: SinkEvent) -> bool:
        """Could `event`'s request (sent by this fault's process) have been in flight, its outcome unrecorded, at the fault?"""
        if event.gen != self.gen:
            return False
        if self.kind == "terminate":
            return event.t - EARLY <= self.t <= event.t + IN_FLIGHT
        return event.t <= self.t <= event.t + IN_FLIGHT

    def resumed_with(self, event: SinkEvent) -> bool:
        """Is `event` a step the frozen process had started before this stop and carried on with after SIGCONT?"""
        return self.kind == "stop" and event.gen == self.gen and self.until is not None and self.until <= event.t <= self.until + IN_FLIGHT


class HoldingSink(ChaosSink):
    """The ChaosSink; when ``hold_gens`` is set, it holds its answer to the next accepted request of one of those
    processes for HOLD seconds (``held`` is set meanwhile, ``held_key`` and ``held_gen`` name it), so the storm can
    freeze that process while its request is in flight."""

    def __init__(self, rng: random.Random, rates: dict[str, float], slow: float):
        super().__init__(rng, rates, slow)
        self.hold_gens: set[int] = set()
        self.held = threading.Event()
        self.held_key: str | None = None
        self.held_gen: int | None = None

    def answer(self, request: dict[str, Any]):
        answer = super().answer(request)
        gen = int(request["headers"].get("X-Storm-Generation", -1))
        if answer is None or gen not in self.hold_gens or not 200 <= answer[0] < 300:
            return answer
        if getattr(request.get("event"), "delivery", None) == "slow":  # its process stopped waiting already (and sent it again)
            return answer
        with self._storm_lock:
            if self.held.is_set():
                return answer
            self.held_key, self.held_gen = request["headers"].get(self.idempotency_header), gen
            self.held.set()
        time.sleep(HOLD)
        return answer


class HoldingView(ChaosView):
    """The ChaosView; when ``hold`` is set, it answers the next request (a page the source's lease holder asked for)
    well but HOLD_VIEW seconds late (``held`` is set meanwhile), so the storm can freeze the poller in the middle of a poll."""

    def __init__(self, rng: random.Random, rate: float, slow: float):
        super().__init__(rng, rate, slow)
        self.hold = False
        self.held = threading.Event()

    def __call__(self, handler) -> None:
        with self._lock:
            holding, self.hold = self.hold, False
            if holding:
                self.log.append((time.time(), handler.path, "held"))
                self.counts["held"] += 1
        if not holding:
            return super().__call__(handler)
        self.held.set()
        time.sleep(HOLD_VIEW)
        try:
            handler.serve()
        except OSError:
            handler.close_connection = True


def wait_for(predicate: Callable[[], Any], timeout: float, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())


class PgStorm:
    """One storm in ``folder`` on the database ``url`` of ``server`` (a tests/pgserver.py PgServer)."""

    def __init__(self, folder: Path, server: Any, url: str, *, seed: int = 7, slots: int = 3, kills: int = 5,
                 terminates: int = 3, concurrency: int = 3, view_fault_rate: float = 0.08,
                 sink_rates: dict[str, float] | None = None, drain_timeout: float = 30.0, plants: tuple[str, ...] = (),
                 freezes: tuple[str, ...] = ("delivery",), refusal_wait: float = 5.0, fork: bool = FORK):
        self.folder, self.server, self.url = folder, server, url
        self.fork = fork  # the agent processes forked from a storm.Launcher, or each started with `python -m agent`
        self.launcher: Launcher | None = None
        self.plants, self.freezes = plants, freezes
        self.refusal_wait = refusal_wait  # how long a frozen process has, once resumed, to log its refused write
        self.database = url.rsplit("/", 1)[1]
        self.seed, self.slots, self.kills, self.terminates, self.concurrency = seed, slots, kills, terminates, concurrency
        self.drain_timeout = drain_timeout
        self.rng = random.Random(seed)
        self.view_faults = HoldingView(random.Random(seed + 1), view_fault_rate, slow=VIEW_TIMEOUT + LATE)
        self.sink = HoldingSink(random.Random(seed + 2), sink_rates or {"503": 0.05, "429": 0.03, "drop": 0.04, "slow": 0.02},
                                slow=SINK_TIMEOUT + LATE)
        records = make_leads(31, start=START, step=0)
        self.far_future = records[-1] = {**records[-1], "lastModified": FAR_FUTURE}
        self.view = ViewServer(records, paging="page", page_size=10, username="integration", password=PASSWORD)
        self.mutator = Mutator(self.view, random.Random(seed + 3), bursts_per_tick=4,
                               pinned=frozenset({self.far_future["RecordId"]}))
        self.view_faults.before_page = self.mutator.while_paging
        self.logs = folder / "logs"
        self.processes: list[Process] = []
        self.current: dict[int, Process] = {}  # slot -> its live process
        self.faults: list[Fault] = []
        self.frozen: dict[str, Fault] = {}  # "delivery" | "poll" -> the freeze
        self.report = Report()

    # -- processes -------------------------------------------------------------
    def _start(self, slot: int) -> Process:
        index = len(self.processes)
        out, err = self.logs / f"gen{index:03d}-slot{slot}.out", self.logs / f"gen{index:03d}-slot{slot}.err"
        if self.launcher:
            proc = self.launcher.start(["--config", str(self.cfg), "run"], self.folder, out, err, self._env(index))
        else:
            with open(out, "w") as fo, open(err, "w") as fe:
                proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(self.cfg), "run"], cwd=self.folder,
                                        stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=self._env(index))
        process = Process(index, slot, proc, out, err, time.monotonic())
        self.processes.append(process)
        self.current[slot] = process
        return process

    def _env(self, index: int) -> dict[str, str]:
        extra = {"STORM_GENERATION": str(index)}
        if self.plants:
            folder = self.folder / "plant"
            folder.mkdir(exist_ok=True)
            (folder / "sitecustomize.py").write_text("\n".join(textwrap.dedent(PLANTS[name]) for name in self.plants))
            extra["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
        return agent_env(**extra)

    def _fault(self, kind: str, process: Process, detail: str = "") -> Fault:
        fault = Fault(kind, process.index, time.monotonic(), time.time(), detail=detail)
        self.faults.append(fault)
        return fault

    def _kill(self, slot: int) -> None:
        process = self.current[slot]
        process.proc.send_signal(signal.SIGKILL)
        process.signal = "KILL"
        self._fault("kill", process)
        process.proc.wait()
        process.end = time.monotonic()
        self._start(slot)

    def _sessions(self, process: Process, where: str = "") -> list[tuple]:
        """(pid, state) of the database sessions of an agent process (its ledger names them with its pid)."""
        return self.server.execute(
            "SELECT pid, state FROM pg_stat_activity WHERE datname = %s AND application_name LIKE %s" + where,
            (self.database, f"sync-agent %:{process.proc.pid}:%"))

    def _terminate(self, slot: int) -> None:
        """End the sessions of the slot's process, at a moment one of them is in a transaction when that comes within 2 s."""
        process = self.current[slot]
        # once it runs: an agent whose ledger fails while it starts exits 3 (its supervisor restarts it), a fault
        # this storm does not look at
        if not wait_for(process.running, 20, 0.05):
            self.report.problems.append(f"process {process.index} did not start within 20s: {process.log()[-300:]!r}")
            return
        with psycopg.connect(self.server.url_of(self.database), autocommit=True) as conn:
            sql = "FROM pg_stat_activity WHERE datname = %s AND application_name LIKE %s"
            mine = (self.database, f"sync-agent %:{process.proc.pid}:%")
            wait_for(lambda: conn.execute(f"SELECT 1 {sql} AND state <> 'idle'", mine).fetchone(), 2.0, 0.002)
            ended = conn.execute(f"SELECT pg_terminate_backend(pid), state {sql} AND pid <> pg_backend_pid()", mine).fetchall()
        self._fault("terminate", process, detail=f"{sum(1 for ok, _ in ended if ok)} session(s) ended: {sorted(s for _, s in ended)}")

    def _sigterm_all(self) -> None:
        live = [p for p in self.current.values() if p.proc.poll() is None]
        sent = time.monotonic()
        for p in live:
            p.proc.send_signal(signal.SIGTERM)
            p.signal = "TERM"
        for p in live:
            try:
                p.proc.wait(timeout=max(1.0, 20 - (time.monotonic() - sent)))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
            p.end = time.monotonic()
            p.stop_seconds = round(p.end - sent, 2)

    # -- phases -------------------------------------------------------------
    def run(self) -> Report:
        self.logs.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            with self.view, self.sink:
                for server in (self.view._server, self.sink._server):  # clients killed mid-request are expected here
                    server.handle_error = lambda request, address: None
                self.view.fail_with(self.view_faults)
                self.cfg = self._config()
                if self.fork:
                    self.launcher = Launcher(self._env(0), self.folder / "launcher.err")
                self.mutator.start()
                try:
                    for slot in range(self.slots):
                        self._start(slot)
                    self._storm()
                finally:
                    self.mutator.halt.set()
                    self.mutator.join()
                    for p in self.current.values():  # never leave a process stopped
                        if p.proc.poll() is None:
                            p.proc.send_signal(signal.SIGCONT)
                storm_seconds = time.monotonic() - started
                self.view_faults.on = self.sink.on = False
                self.sink.hold_gens = set()
                drained = self._drain()
                if not drained:
                    self.report.problems.append(f"not drained within {self.drain_timeout:.0f}s after the faults stopped")
                self._sigterm_all()
                self.report.figures.update(storm_seconds=round(storm_seconds, 1), drained=drained,
                                           total_seconds=round(time.monotonic() - started, 1))
                self._judge()
        finally:
            for p in self.processes:
                if p.proc.poll() is None:
                    p.proc.kill()
                    p.proc.wait()
            if self.launcher:
                self.launcher.close()
        return self.report

    def _config(self) -> Path:
        cfg = write_config(self.folder, self.view.url, self.sink.url, concurrency=self.concurrency, overlap=5.0)
        text = cfg.read_text()
        assert 'ledger = "var/agent.db"' in text
        cfg.write_text(text.replace('ledger = "var/agent.db"', f'ledger = "{self.url}"\nlease = "{LEASE:g}s"'))
        return cfg

    def _storm(self) -> None:
        problems = self.report.problems
        if not wait_for(lambda: all(p.running() for p in self.current.values()), 30, 0.05):
            problems.append("the agents did not start: " + " | ".join(p.log()[-300:] for p in self.current.values()))
            return
        if not wait_for(lambda: len(self.sink.events) >= 10, 15, 0.05):
            problems.append("nothing reached the sink within 15s of the start")
            return
        plan = ["kill"] * self.kills + ["terminate"] * self.terminates
        self.rng.shuffle(plan)
        for kind in plan:
            time.sleep(self.rng.uniform(0.2, 1.0))  # a random moment: the faults land anywhere in the agents' work
            slot = self.rng.randrange(self.slots)
            if kind == "kill":
                self._kill(slot)
            else:  # the process that sent last is likely busy: its sessions are ended inside a transaction
                last = self.processes[self.sink.events[-1].gen] if self.sink.events else None
                self._terminate(last.slot if last and last.running() else slot)
        if "delivery" in self.freezes:
            self._freeze_delivery()
        if "poll" in self.freezes:
            self._freeze_poll()

    def _freeze_delivery(self) -> None:
        """SIGSTOP a process while a request it sent is in flight; SIGCONT it once another process sent that request again."""
        problems = self.report.problems
        if not self._all_running():
            return
        for _ in range(20):
            self.sink.held.clear()
            self.sink.hold_gens = {p.index for p in self.current.values()}
            if not self.sink.held.wait(15):
                problems.append("no request the sink could hold came within 15s")
                return
            target = self.processes[self.sink.held_gen]
            stop = self._stop(target)
            if stop:
                break
        else:
            problems.append("the process to freeze was in a transaction at every one of 20 tries")
            return
        self.sink.hold_gens = set()
        self.frozen["delivery"], key = stop, self.sink.held_key
        again = wait_for(lambda: any(e.key == key and e.gen != target.index and e.t > stop.t for e in list(self.sink.events)),
                         LEASE + 10, 0.05)
        self._resume(target, stop, f"held key {key}; {'sent again by another process' if again else 'NOT sent again by another process'}")
        if not again:
            try:
                why = self._stuck(target, key)
            except Exception as error:  # the explanation must never hide the problem
                why = f"(could not look: {type(error).__name__}: {error})"
            problems.append(f"no other process sent the frozen process's request again within {LEASE + 10:g}s (key {key}); {why}")
        if not wait_for(lambda: REFUSED in target.err.read_text(errors="replace"), self.refusal_wait, 0.05):
            problems.append(f"the frozen process {target.index} logged no refused outcome within {self.refusal_wait:g}s of SIGCONT")

    def _freeze_poll(self) -> None:
        """SIGSTOP the source's poller while a page it asked for is in flight; SIGCONT it once another process took the
        source over and polled it: the rest of its stale poll (admitting the page, moving the cursor) must be refused."""
        problems = self.report.problems
        if not self._all_running():
            return
        for _ in range(20):
            self.view_faults.held.clear()
            self.view_faults.hold = True
            if not self.view_faults.held.wait(15):
                problems.append("no view request came within 15s")
                return
            owner, epoch = self._lease()
            target = next((p for p in self.current.values() if owner and f":{p.proc.pid}:" in owner), None)
            if target is None:
                problems.append(f"the source's lease holder {owner} is none of the running processes")
                return
            stop = self._stop(target)
            if stop:
                break
        else:
            problems.append("the poller to freeze was in a transaction at every one of 20 tries")
            return
        self.frozen["poll"] = stop
        took = wait_for(lambda: self._lease()[0] != owner and self._polled_since(stop.wall), LEASE + 10, 0.05)
        self._resume(target, stop, f"held a page of the poll under lease epoch {epoch}; "
                                   f"{'another process took the source over and polled' if took else 'NOT taken over'}")
        if not took:
            problems.append(f"no other process took the source over from the frozen poller within {LEASE + 10:g}s")
        if not wait_for(lambda: SOURCE_REFUSED in target.err.read_text(errors="replace"), self.refusal_wait, 0.05):
            after = [line for line in target.err.read_text(errors="replace").splitlines() if "poll leads" in line or "leads:" in line][-3:]
            problems.append(f"the poller frozen past its lease (process {target.index}) went on writing for the source after "
                            f"another process took it over: no refused source write within {self.refusal_wait:g}s of SIGCONT; "
                            f"its last poll lines: {after}")

    def _stuck(self, frozen: Process, key: str) -> str:
        """What held a request up: its entity's executions, its attempts, what the sink saw of it, the sessions in a
        transaction; each live process writes its threads' stacks into its log (SIGUSR1, when forked by the Launcher)."""
        record = next((e.version for e in list(self.sink.events) if e.key == key), None)
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT id, key, status, owner, epoch, attempts, round((lease_until - extract(epoch FROM now()))::numeric, 2),"
                " round((updated - extract(epoch FROM now()))::numeric, 2), version_at, last_error FROM executions"
                " WHERE entity = (SELECT entity FROM executions WHERE key = %s LIMIT 1) ORDER BY id", (record,)).fetchall()
            attempts = conn.execute(
                "SELECT a.n, a.outcome, round(a.started::numeric, 3), round(a.finished::numeric, 3), left(a.error, 60) FROM attempts a"
                " JOIN executions e ON e.id = a.execution WHERE e.key = %s ORDER BY a.id", (record,)).fetchall()
            sessions = conn.execute(
                "SELECT application_name, state, now() - xact_start, left(query, 120) FROM pg_stat_activity"
                " WHERE datname = %s AND state <> 'idle' AND pid <> pg_backend_pid()", (self.database,)).fetchall()
        if self.fork:
            for p in self.current.values():
                if p is not frozen and p.proc.poll() is None:
                    p.proc.send_signal(signal.SIGUSR1)
        sent = [(e.kind, round(e.wall, 3), e.gen) for e in list(self.sink.events) if e.key == key]
        return (f"record {record}: its entity's executions {rows}; its attempts {attempts} (wall clock); the sink saw {sent}; "
                f"sessions not idle {sessions}")

    def _all_running(self) -> bool:
        if wait_for(lambda: sum(p.running() for p in self.current.values()) == self.slots, 20, 0.05):
            return True
        self.report.problems.append("the agents restarted after the kills are not all running")
        return False

    def _stop(self, target: Process) -> Fault | None:
        """SIGSTOP the process; SIGCONT it at once (None) when it was frozen inside a transaction: its row locks would
        hold the others up, a fault this storm does not look at."""
        target.proc.send_signal(signal.SIGSTOP)
        stop = self._fault("stop", target)
        busy = self._sessions(target, " AND state <> 'idle'")
        if not busy:
            target.signal = "STOP"
            return stop
        stop.until, stop.detail = time.monotonic(), f"resumed at once: frozen inside a transaction {busy}"
        target.proc.send_signal(signal.SIGCONT)  # after `until`: a request the process sends once resumed comes later
        return None

    def _resume(self, target: Process, stop: Fault, detail: str) -> None:
        # `until` before the signal: the signal travels through the Launcher, and a step the process carried on with can
        # reach the sink before the answer comes back (it did, 0.02 s after SIGCONT, and was judged a resend)
        stop.until, stop.detail = time.monotonic(), detail
        target.proc.send_signal(signal.SIGCONT)

    def _lease(self) -> tuple[str | None, int | None]:
        """The source's lease: (owner, epoch)."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute("SELECT owner, epoch FROM source_leases WHERE source = 'leads'").fetchone() or (None, None)

    def _polled_since(self, wall: float) -> bool:
        """Whether a poll started after `wall` has ended (well or not: it wrote for the source)."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute("SELECT 1 FROM polls WHERE started > %s AND finished IS NOT NULL", (wall,)).fetchone() is not None

    def _drain(self) -> bool:
        """Faults off: the live processes run until nothing is active and the view's current versions are all admitted."""
        quiet = time.time()
        return wait_for(lambda: self._drained(quiet), self.drain_timeout, 0.2)

    def _drained(self, quiet: float) -> bool:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                active = conn.execute("SELECT COUNT(*) FROM executions WHERE status = ANY(%s)", (list(ACTIVE),)).fetchone()[0]
                keys = {r[0] for r in conn.execute("SELECT key FROM records")}
                good = conn.execute("SELECT COUNT(*) FROM polls WHERE error IS NULL AND finished IS NOT NULL AND started > %s",
                                    (quiet,)).fetchone()[0]
        except psycopg.Error:
            return False
        current = {r["lastSubmissionID"] for r in self.view.records}
        return active == 0 and good >= 1 and (current <= keys or good >= 4)

    # -- judgement -------------------------------------------------------------
    def _read_ledger(self) -> dict[str, Any]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return {
                "records": {r[0] for r in conn.execute("SELECT key FROM records")},
                "executions": conn.execute("SELECT id, key, status, epoch FROM executions ORDER BY id").fetchall(),
                # (record key, when another agent's claim took it over) for every takeover of expired work
                "takeovers": conn.execute(
                    "SELECT e.key, a.started FROM attempts a JOIN executions e ON e.id = a.execution"
                    " WHERE a.outcome = 'interrupted' AND a.error = 'the agent running it lost its lease'").fetchall(),
                "polls": conn.execute("SELECT COUNT(*), COUNT(*) FILTER (WHERE finished IS NOT NULL AND error IS NULL) FROM polls").fetchone(),
                "cursor": (conn.execute("SELECT value FROM cursors WHERE source = 'leads'").fetchone() or (None,))[0],
                "agents": conn.execute("SELECT COUNT(*), COUNT(*) FILTER (WHERE stopped IS NOT NULL) FROM agents").fetchone(),
            }

    def _judge(self) -> None:
        problems, figures = self.report.problems, self.report.figures
        ledger = self._read_ledger()
        events = list(self.sink.events)
        with open(self.folder / "sink-events.jsonl", "w") as f:
            f.writelines(json.dumps(e.__dict__) + "\n" for e in events)
        (self.folder / "faults.json").write_text(json.dumps([f.__dict__ for f in self.faults], indent=1))
        admitted, current = ledger["records"], {r["lastSubmissionID"] for r in self.view.records}
        accepted: dict[str, set[str]] = collections.defaultdict(set)  # version -> keys it was accepted under
        for e in events:
            if e.kind == "accepted":
                accepted[e.version].add(e.key)
        delivered = set(accepted)

        # nothing lost
        for version in sorted(admitted - delivered)[:20]:
            problems.append(f"admitted version {version} was never delivered")
        for version in sorted(current - delivered)[:20]:
            problems.append(f"current version {version} was never delivered")
        for version in sorted(delivered - admitted)[:20]:
            problems.append(f"version {version} was delivered but the ledger has no record of it")
        leftover = collections.Counter(status for _id, _key, status, _epoch in ledger["executions"] if status != "succeeded")
        if leftover:
            problems.append(f"executions not succeeded after draining: {dict(leftover)}")

        # nothing twice
        for version, keys in sorted(accepted.items()):
            if len(keys) > 1:
                problems.append(f"version {version} was accepted under {len(keys)} different idempotency keys")
        if any(not e.key for e in events):
            problems.append(f"{sum(not e.key for e in events)} request(s) carried no idempotency key")
        versions_of_key: dict[str, set] = collections.defaultdict(set)
        for e in events:
            if e.kind != "incomplete":
                versions_of_key[e.key].add(e.version)
        for key, versions in versions_of_key.items():
            if key and len(versions) > 1:
                problems.append(f"key {key} was used for {len(versions)} different versions")
        explained = self._judge_repeats(events, ledger["takeovers"])

        # the fence was exercised, and the processes behaved
        refused = {p.index: p.err.read_text(errors="replace").count(REFUSED) for p in self.processes}
        lost_leases = sum(p.err.read_text(errors="replace").count("are no longer its own (another agent took them over") for p in self.processes)
        source_fenced = sum(p.err.read_text(errors="replace").count("this agent writes nothing more for it") for p in self.processes)
        ledger_errors = {p.index: p.err.read_text(errors="replace").count("the ledger cannot be written") for p in self.processes}
        if "delivery" in self.frozen and not refused.get(self.frozen["delivery"].gen):
            problems.append(f"the frozen process {self.frozen['delivery'].gen} had no outcome refused by the fence")
        for p in self.processes:
            rc = p.proc.returncode
            if p.signal == "TERM" and (rc != 0 or p.stop_seconds is None or p.stop_seconds > 20):
                problems.append(f"process {p.index}: SIGTERM gave exit {rc} after {p.stop_seconds}s (expected 0 within 20s)")
            elif p.signal is None:
                problems.append(f"process {p.index} exited by itself with {rc}: {p.log()[-400:]!r}")
        logs = {p.index: p.log() for p in self.processes}
        for index, text in logs.items():
            if "Traceback" in text:
                problems.append(f"a traceback in the output of process {index}: {text[text.index('Traceback'):][:600]!r}")
                break
        if any(PASSWORD in text for text in logs.values()):
            problems.append("the view password appears in an agent's output")
        cursor = ledger["cursor"]
        newest = max(at for at in self.mutator.modified.values() if at != FAR_FUTURE)
        if cursor is None:
            problems.append("the cursor never moved")
        elif cursor > newest:
            problems.append(f"the cursor is {cursor!r}, past the newest lastModified the view ever had but {FAR_FUTURE} ({newest})")

        replays = [e for e in events if e.kind == "replay"]
        drops, slows = self.sink.counts["drop"], self.sink.counts["slow"]
        bound = drops + slows + self.concurrency * len(self.faults) + len(ledger["takeovers"])
        if len(replays) > bound:
            problems.append(f"{len(replays)} replays > drops {drops} + slow answers {slows} + concurrency {self.concurrency} "
                            f"x faults {len(self.faults)} + takeovers {len(ledger['takeovers'])}")
        figures.update({
            "seed": self.seed,
            "processes (started, SIGKILLed)": (len(self.processes), sum(p.signal == "KILL" for p in self.processes)),
            "faults": dict(collections.Counter(f.kind for f in self.faults)),
            "sessions ended": [f.detail for f in self.faults if f.kind == "terminate"],
            "freezes": {kind: f"process {f.gen} stopped {f.until - f.t:.1f}s; {f.detail}" for kind, f in self.frozen.items() if f.until},
            "outcomes refused by the fence (per process)": {i: n for i, n in refused.items() if n},
            "heartbeats that found claims lost": lost_leases,
            "source writes refused by the fence": source_fenced,
            "ledger errors logged (per process)": {i: n for i, n in ledger_errors.items() if n},
            "view": f"{len(self.view.records)} records, {self.mutator.versions} versions made, {len(self.view.hits)} requests",
            "polls (started, finished well)": tuple(ledger["polls"]),
            "agents in the ledger (rows, stopped)": tuple(ledger["agents"]),
            "versions admitted": len(admitted),
            "versions delivered": len(delivered),
            "current versions delivered": f"{len(current & delivered)}/{len(current)}",
            "sink requests": len(events),
            "sink faults": dict(self.sink.counts),
            "takeovers in the ledger": len(ledger["takeovers"]),
            "replays absorbed by the sink": len(replays),
            "repeats explained by (lost answer, fault, takeover)": explained,
            "cursor at the end": cursor,
        })

    def _judge_repeats(self, events: list[SinkEvent], takeovers: list[tuple[str, float]]) -> tuple[int, int, int]:
        """Every request under an already accepted key is explained by the request before it; the counts of each reason."""
        taken: dict[str, list[float]] = collections.defaultdict(list)
        for key, at in takeovers:
            taken[key].append(at)
        by_key: dict[str, list[SinkEvent]] = collections.defaultdict(list)
        for e in events:
            if e.kind in ("accepted", "replay"):
                by_key[e.key].append(e)
        reasons, unexplained = collections.Counter(), 0
        for key, seq in by_key.items():
            seq.sort(key=lambda e: e.t)
            for before, after in zip(seq, seq[1:]):
                if before.delivery in ("dropped", "slow"):
                    reasons["answer"] += 1
                elif any(f.explains(before) or f.resumed_with(after) for f in self.faults):
                    reasons["fault"] += 1
                elif any(before.wall <= at <= after.wall for at in taken.get(before.version, ())):
                    reasons["takeover"] += 1
                else:
                    unexplained += 1
                    if unexplained <= 5:
                        self.report.problems.append(
                            f"key {key} (version {after.version}) was sent again by process {after.gen} {after.t - before.t:.2f}s "
                            f"after process {before.gen} had it answered, with no fault or takeover to explain it")
        if unexplained > 5:
            self.report.problems.append(f"... {unexplained} unexplained repeats in all")
        return reasons["answer"], reasons["fault"], reasons["takeover"]

"""The kill storm: the real agent process under SIGKILL while its view changes and fails and its sink fails.

    report = Storm(tmp_path, kills=20, seed=4).run()
    print(report.text())
    assert not report.problems

A storm runs ``python -m agent --config X run`` again and again ("generations")
against a ``ViewServer`` that a ``Mutator`` keeps changing, with a ``ChaosView``
fault on every request (5xx, dropped connection, truncated JSON, short body, an
answer slower than the source ``timeout``) and a ``ChaosSink`` (503, 429 with
Retry-After, the connection dropped *after* the write was accepted, an answer
slower than the connector ``timeout``).

The view: its clock starts two days behind the real one and runs about 30x
faster, never past the real clock (the agent ignores an ``updated`` more than
5 minutes ahead of its own clock, so a view dated in the future would never
move the cursor). The Mutator adds and updates records (every update a new
``lastSubmissionID``; many equal ``lastModified`` values); some updates leave
the old version in the view beside the new one (both current, the newer on
page 1, the older further down) for a while or for good; some bursts delete a
few of the newest records, and some requests for a page after the first are
preceded by deleting records of the pages already served (the records next in
line move onto a page the agent has read). One record is dated
``9999-12-31T23:59:59Z`` all storm long: it is served by every poll (the
view compares ``since`` as text) and must never move the cursor. The view's
clock only goes forward, so the source's ``overlap`` is short (5 s, a tick is
30 s): a record a poll skips falls behind the cursor and stays lost, instead
of being read again by the next poll's overlap.

Each generation is SIGKILLed at a random moment, or kills itself at a named
failpoint (``AGENT_FAILPOINTS``): generations alternate between "kill" ones
(low failpoint chances: our SIGKILL usually comes first) and "failpoint" ones
(one point at a high chance, the points taken in turn until each has fired
``min_firings`` times). One generation in the middle is stopped with SIGTERM
instead. Then the faults and the Mutator stop, a clean ``run`` drains
everything (then a few records are updated at the newest time: a tie at the
cursor, drained again) and is stopped with SIGTERM, and ``run --once`` must
find nothing left to do.

The judge: every admitted version and every version still in the view was
delivered; no version that was in the view all through a good poll whose
range held it was skipped when the cursor then passed it (even if it was
replaced or deleted later); none went out under two idempotency keys, none
was replayed without a fault to explain it; versions of one record went out
in the order of their ``lastModified`` (ties: the order admitted) unless the
older one was admitted only after the newer one was sent (counted, with the
records whose last delivery is an older version, but not asserted); the
cursor moved, and never past the newest time the view had (but the
far-future one). ``sink-events.jsonl``, ``view-log.jsonl`` (the view's
changes and requests) and ``generations.json`` are left beside ``logs/`` and
``var/agent.db`` for a post-mortem.

``Report.problems`` lists every broken promise; ``Report.figures`` the counts.
Everything random is drawn from one seeded ``random.Random`` per component
(the agent's own failpoint draws and thread timing are not seeded).

The generations are forked from a ``Launcher``, a parent process that has
imported the agent once, and each runs ``agent/__main__.py`` as ``python -m
agent`` would: a process of its own for the ledger, the sockets and the signals,
without the interpreter start and the imports (some 0.3 s of CPU each, more
than most generations spend on their work). The final ``run`` and ``run
--once`` are started as ``python -m agent``. ``STORM_FORK=0`` starts every
generation that way.

``plant`` runs every agent process with a bug planted from the outside
(a ``sitecustomize`` module on ``PYTHONPATH``; the agent's code is untouched):
the storm must then report problems. See ``PLANTS``.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from sinkserver import SinkServer
from viewserver import ViewServer, drop_connection, make_leads, short_body, truncated_json, update

PASSWORD = "storm-view-pass-Qx81"
TOKEN = "storm-crm-token-7Kd"
POINTS = ("after_fetch", "inside_admit", "after_claim", "after_send", "inside_failure")
FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# The view's clock starts two days behind the real one (whole seconds): the agent ignores an `updated` more than
# 5 minutes ahead of its own clock, so a view dated in the future would never move the cursor and the storm would
# not test it. The Mutator runs the view's clock about 30x faster than real time: two days last over an hour.
START = (datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=2)).strftime(FORMAT)
FAR_FUTURE = "9999-12-31T23:59:59Z"  # one record's lastModified all storm long: it must never move the cursor
ACTIVE = ("pending", "running", "retrying", "paused")
# The agent's timeouts, and how much later a "slow" fault answers. The sink's is the wider one: a replay after an
# answer the agent timed out on is explained only when the storm made that answer slow on purpose.
VIEW_TIMEOUT, SINK_TIMEOUT, LATE = 0.5, 1.0, 0.4
# Whether the storms fork their agent processes from a Launcher (the default) or start each with `python -m agent`.
FORK = os.environ.get("STORM_FORK", "1") != "0"

# Bugs planted from outside the agent, for the negative controls. Each must make the storm fail.
PLANTS = {
    # a fresh idempotency key per attempt: a retry after an accepted-but-unanswered request is a second delivery
    "fresh_key": """
        import uuid
        import agent.flows
        agent.flows.idempotency_key = lambda *args, **kwargs: uuid.uuid4().hex
    """,
    # the execution is marked done when claimed, before the send; the real outcome overwrites it afterwards,
    # so only a stop between the claim and the send loses the record (as it does in such an agent)
    "done_before_send": """
        import state.sqlite as L
        claim, finish_one = L.SqliteLedger.finish_and_claim, L.SqliteLedger._finish_one
        def done_first(self, done, now, limit, lease):
            claimed = claim(self, done, now, limit, lease)
            with self.write() as conn:
                conn.executemany("UPDATE executions SET status = 'succeeded' WHERE id = ?", [(e.id,) for e in claimed])
            return claimed
        def finish(self, conn, ex, result, now):
            conn.execute("UPDATE executions SET status = 'running' WHERE id = ? AND status = 'succeeded'", (ex.id,))
            finish_one(self, conn, ex, result, now)
        L.SqliteLedger.finish_and_claim, L.SqliteLedger._finish_one = done_first, finish
    """,
    # a step recorded as sent is sometimes scheduled again: the same key goes out again from the same process
    "resend_sent": """
        import random
        import state.sqlite as L
        finish_one = L.SqliteLedger._finish_one
        def finish(self, conn, ex, result, now):
            sent = result.attempt and result.attempt["outcome"] == "succeeded"
            if result.status == "succeeded" and sent and random.random() < 0.3:
                result = L.Finish("retrying", result.attempt["step"], result.context, next_at=now, attempt=result.attempt)
            finish_one(self, conn, ex, result, now)
        L.SqliteLedger._finish_one = finish
    """,
    # the cursor is the highest timestamp seen, compared with '>' (no overlap): the view's filter is '>=' on
    # whole seconds, so asking from one second later is asking for strictly newer records
    "cursor_gt": """
        from datetime import datetime, timedelta
        import agent.poller as P
        original = P.cursor_value
        def strictly_after(highest, overlap):
            stamp = P.read_stamp(highest)
            if stamp is not None and stamp.at is not None:
                return (stamp.at + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
            return original(highest, 0)
        P.cursor_value = strictly_after
    """,
    # the old rule: any `updated` that reads as a time moves the cursor, however far in the future; the view's
    # far-future record then puts the cursor at 9999 and nothing after it is ever polled
    "future_cursor": """
        import agent.poller as P
        P.FUTURE_TOLERANCE = float("inf")
    """,
    # a poll trusts its pages: records that move onto a page already read while it pages are skipped, and the
    # cursor moves past them
    "no_reread": """
        import agent.poller as P
        P.Poller._moved = lambda *args: ""
    """,
    # versions of an entity go out in the order they arrived, whatever their `updated`: the view serves newest first,
    # so a newer version shown together with an older one is delivered first
    "arrival_order": """
        import state.sqlite as L
        admit = L.SqliteLedger.admit
        def undated(self, source, items, *args, **kwargs):
            for item in items:
                item.version_at = None
            return admit(self, source, items, *args, **kwargs)
        L.SqliteLedger.admit = undated
    """,
}


# The parent the storm's agent processes are forked from (see Launcher): it imports the agent once, then answers
# requests, one JSON line each on its stdin: {"do": "start", "args", "cwd", "env", "out", "err"} forks a child that
# becomes `python -m agent ARGS` with that environment, folder and output files ({"started": pid}), {"do": "signal",
# "pid", "signal"} signals a child not yet reaped ({"signalled": pid}); it reports each child's end ({"exited": pid,
# "code": Popen's returncode}). Only this parent reaps its children, so a pid it signals is never another process's.
LAUNCHER = r"""
import gc, importlib, json, os, pkgutil, select, signal, sys

def preload():
    for package in ("agent", "sources", "sinks", "state"):
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            if info.name != "__main__":
                importlib.import_module(f"{package}.{info.name}")

def say(message):
    os.write(1, (json.dumps(message) + "\n").encode())

def serve():
    # answers requests until stdin closes (None); in a child just forked, returns its request
    wake, woken = os.pipe()
    os.set_blocking(woken, False)
    signal.set_wakeup_fd(woken)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    children, pending = set(), b""
    say({"ready": os.getpid()})
    while True:
        ready = select.select([0, wake], [], [])[0]
        if wake in ready:
            os.read(wake, 4096)
        for pid in sorted(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                say({"exited": pid, "code": os.waitstatus_to_exitcode(status)})
        if 0 not in ready:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            for pid in children:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            return None
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            if request["do"] == "signal":
                if request["pid"] in children:
                    os.kill(request["pid"], request["signal"])
                say({"signalled": request["pid"]})
                continue
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(wake)
                os.close(woken)
                return request
            children.add(pid)
            say({"started": pid})

def become(request):
    # this child is now `python -m agent ARGS`, run in the request's folder, environment and output files
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    write = os.O_WRONLY | os.O_APPEND  # made empty by the Launcher before the fork
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], write), (2, request["err"], write)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = ["agent", *request["args"]]
    import faulthandler  # SIGUSR1: every thread's stack into its error output (a storm's post-mortem of a stuck agent)
    faulthandler.register(signal.SIGUSR1, all_threads=True)

preload()
gc.freeze()  # what the imports made is shared with every child and never walked again
request = serve()
if request is not None:
    become(request)
    import runpy
    runpy.run_module("agent", run_name="__main__", alter_sys=True)  # exits as `python -m agent` does
"""


class Forked:
    """An agent process started by a Launcher, used as a ``subprocess.Popen`` is (pid, poll, wait, send_signal, kill)."""

    def __init__(self, launcher: "Launcher", pid: int):
        self.launcher, self.pid = launcher, pid
        self.args = ["agent"]
        self.returncode: int | None = None
        self._ended = threading.Event()

    def ended(self, code: int) -> None:
        self.returncode = code
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            self.launcher.signal(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Launcher:
    """Starts agent processes the way ``python -m agent ARGS`` does, but forked from one parent that has imported
    the agent (``LAUNCHER``): a process then costs a fork instead of an interpreter start and some 0.3 s of imports.

    Each is still a process of its own (its pid, ledger connections, threads, sockets; the agent's own signal
    handlers; SIGKILLed or SIGSTOPped like any), run by ``agent/__main__.py`` through the same CLI. What it skips is
    what no ledger or sink sees: the interpreter's start and the imports (a kill in a process's first ~0.05-0.6 s
    lands in opening the ledger, recovery and the first poll instead). Every child has the parent's hash seed.
    ``env`` is the parent's environment: a plant's ``sitecustomize`` on its PYTHONPATH is in force in every child.
    """

    def __init__(self, env: dict[str, str], errors: Path):
        self._asking = threading.Lock()  # one request at a time: the next answer is its answer
        self._lock = threading.Lock()  # the children, shared with the reader (never held while asking)
        self._replies: "queue.Queue[dict[str, Any]]" = queue.Queue()
        self._children: dict[int, Forked] = {}
        self._exits: dict[int, int] = {}  # ends reported before the child was registered
        with open(errors, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, env=env)
        threading.Thread(target=self._read, name="storm-launcher", daemon=True).start()
        try:
            ready = self._replies.get(timeout=60)
        except queue.Empty:
            ready = {}
        if "ready" not in ready:
            self.close()
            raise RuntimeError(f"the agent launcher did not start: {errors.read_text()[-1000:]}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            if "exited" in message:
                with self._lock:
                    child = self._children.pop(message["exited"], None)
                    if child is None:
                        self._exits[message["exited"]] = message["code"]
                if child is not None:
                    child.ended(message["code"])
            else:
                self._replies.put(message)
        self._replies.put({})  # the launcher is gone: nobody waits for an answer forever

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._asking:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            reply = self._replies.get(timeout=30)
        if not reply:
            raise RuntimeError("the agent launcher has ended")
        return reply

    def start(self, args: list[str], cwd: Path, out: Path, err: Path, env: dict[str, str]) -> Forked:
        out.write_text("")
        err.write_text("")
        pid = self._ask({"do": "start", "args": args, "cwd": str(cwd), "env": env, "out": str(out), "err": str(err)})["started"]
        child = Forked(self, pid)
        with self._lock:
            code = self._exits.pop(pid, None)
            if code is None:
                self._children[pid] = child
        if code is not None:
            child.ended(code)
        return child

    def signal(self, pid: int, signum: int) -> None:
        self._ask({"do": "signal", "pid": pid, "signal": int(signum)})

    def close(self) -> None:
        """End the launcher (and any child still running, SIGKILLed)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _stamp(at: datetime) -> str:
    return at.strftime(FORMAT)


class ChaosView:
    """A ViewServer fault that answers most requests normally and fails the others at random.

    ``before_page(path)`` runs before a page is served while the faults are on (the Mutator deletes records there).
    """

    KINDS = ("500", "drop", "truncated", "short", "slow")

    def __init__(self, rng: random.Random, rate: float, slow: float):
        self.rng, self.rate, self.slow = rng, rate, slow
        self.on = True
        self.before_page: Callable[[str], None] = lambda path: None
        self.counts: collections.Counter = collections.Counter()
        self.log: list[tuple[float, str, str]] = []  # (time.time(), path, fault or "ok") of every request
        self._lock = threading.Lock()

    def __call__(self, handler) -> None:
        with self._lock:
            kind = self.rng.choice(self.KINDS) if self.on and self.rng.random() < self.rate else "ok"
            self.counts[kind] += 1
            self.log.append((time.time(), handler.path, kind))
        try:
            if kind in ("ok", "slow") and self.on:
                self.before_page(handler.path)
            if kind == "ok":
                handler.serve()
            elif kind == "500":
                handler.reply(500, b'{"error": "injected 500"}')
            elif kind == "drop":
                drop_connection(handler)
            elif kind == "truncated":
                truncated_json(handler)
            elif kind == "short":
                short_body(handler)
            else:  # slower than the source's timeout: the agent has given up when the page comes
                time.sleep(self.slow)
                handler.serve()
        except OSError:  # the agent went away (killed, or timed out): nobody to answer
            handler.close_connection = True


@dataclass
class SinkEvent:
    """One request to the sink as the storm saw it."""

    t: float  # time.monotonic() when it was handled
    key: str | None
    version: str | None
    kind: str  # accepted | replay | refused-503 | refused-429 | status-N | nokey | incomplete
    delivery: str = "answered"  # answered | dropped (after the write was accepted) | slow (past the timeout)
    gen: int = -1  # the agent process that sent it (its X-Storm-Generation header)
    modified: str | None = None  # the body's lastModified
    wall: float = field(default_factory=time.time)  # the same moment on the agent's clock (the ledger's times)


class ChaosSink(SinkServer):
    """The idempotent SinkServer, failing at random; every POST is logged as a SinkEvent."""

    def __init__(self, rng: random.Random, rates: dict[str, float], slow: float):
        super().__init__(key_field="sink_id")  # a field no body has: every new POST is a creation
        self.rng, self.rates, self.slow = rng, rates, slow
        self.on = True
        self.events: list[SinkEvent] = []
        self.counts: collections.Counter = collections.Counter()
        self._storm_lock = threading.Lock()

    def _pick(self) -> str:
        if not self.on:
            return "ok"
        draw = self.rng.random()
        for kind, rate in self.rates.items():
            if draw < rate:
                return kind
            draw -= rate
        return "ok"

    def answer(self, request: dict[str, Any]):
        key = request["headers"].get(self.idempotency_header)
        body = request["json"] if isinstance(request["json"], dict) else {}
        gen = int(request["headers"].get("X-Storm-Generation", -1))
        if request["json"] is None and int(request["headers"].get("Content-Length") or 0):
            # the agent died between the headers and the body: SinkServer would take the empty body as the
            # request and keep its answer for the key; a real server drops an incomplete request
            with self._storm_lock:
                self.counts["incomplete"] += 1
                self.events.append(SinkEvent(time.monotonic(), key, None, "incomplete", "dropped", gen))
            return None
        with self._storm_lock:  # one at a time, so "already accepted" and the answer agree
            fault = self._pick()
            now = time.monotonic()
            if fault in ("503", "429"):
                self.requests.append(request)
                self.counts[fault] += 1
                self.events.append(SinkEvent(now, key, body.get("version"), f"refused-{fault}", gen=gen, modified=body.get("modified")))
                headers = {"Retry-After": "1"} if fault == "429" else {}
                return int(fault), {"error": f"injected {fault}"}, headers
            replay = key in self._answers
            answer = super().answer(request)
            ok = answer is not None and 200 <= answer[0] < 300
            kind = "nokey" if not key else "replay" if replay else "accepted" if ok else f"status-{answer[0] if answer else 'none'}"
            event = SinkEvent(now, key, body.get("version"), kind, gen=gen, modified=body.get("modified"))
            if ok and fault in ("drop", "slow"):
                event.delivery = "dropped" if fault == "drop" else "slow"
                self.counts[fault] += 1
            self.events.append(event)
        request["event"] = event  # what a subclass may look at: this request's event
        if event.delivery == "slow":
            time.sleep(self.slow)  # accepted, but the answer comes after the agent stopped waiting
        return None if event.delivery == "dropped" else answer


class Mutator(threading.Thread):
    """Adds, updates and deletes view records in bursts; every burst stamps one time, and many bursts share it.

    An update usually replaces the record; sometimes (``keep_chance``) it updates one of the ``recent`` newest
    records and adds the new version beside the old one, which stays in the view (both current: the newer on
    top, the older further down) until a later burst removes it, or for good. Sometimes (``delete_chance``) a
    burst deletes a few of the ``recent`` newest records, so the pages after them shift up under a poll that is
    paging; and ``while_paging`` deletes some of them (``paging_delete_chance``) just before a page after the
    first is served, so the records that were next in line move onto a page the agent has already read. Records
    of a ``pinned`` entity (the far-future one) are never updated or deleted.
    """

    def __init__(self, view: ViewServer, rng: random.Random, *, every: float = 0.25, bursts_per_tick: int = 3,
                 tick: float = 30.0, most: int = 6, add_chance: float = 0.3, keep_chance: float = 0.1,
                 delete_chance: float = 0.04, paging_delete_chance: float = 0.1, recent: int = 30,
                 pinned: frozenset[str] = frozenset()):
        super().__init__(name="storm-mutator", daemon=True)
        self.view, self.rng = view, rng
        self.every, self.bursts_per_tick, self.tick, self.most, self.add_chance = every, bursts_per_tick, tick, most, add_chance
        self.keep_chance, self.delete_chance, self.recent, self.pinned = keep_chance, delete_chance, recent, pinned
        self.paging_delete_chance = paging_delete_chance
        self.paging_rng = random.Random(rng.random())  # while_paging runs in the view's threads, not in this one
        self.now = datetime.strptime(START, FORMAT).replace(tzinfo=timezone.utc)
        self.history: dict[str, list[str]] = {}  # entity -> versions in the order they were made
        self.modified: dict[str, str] = {}  # version -> its lastModified
        self.born: dict[str, int] = {}  # version -> the burst that made it
        self.kept: list[tuple[str, str]] = []  # (older, newer) versions of one entity put in the view side by side
        self.deleted: list[str] = []  # versions deleted from the view (not replaced by an update)
        self.deleted_while_paging = 0
        self.held_back = 0  # ticks cut short so the view's clock stays behind the real one
        self._remove_at: dict[str, int] = {}  # a kept older version -> the burst that removes it
        # (time.time(), made | beside | replaced | deleted | removed, version, lastModified): when versions came and went
        self.log: list[tuple[float, str, str, str]] = []
        self.halt = threading.Event()
        self.bursts = 0
        for record in view.records:
            self._note(record)

    def run(self) -> None:
        while not self.halt.wait(self.every):
            self.burst()

    def burst(self) -> None:
        self.bursts += 1
        if self.bursts % self.bursts_per_tick == 0:
            real = datetime.now(timezone.utc).replace(microsecond=0)
            self.held_back += self.now + timedelta(seconds=self.tick) > real
            self.now = min(self.now + timedelta(seconds=self.tick), real)
        at = _stamp(self.now)
        # under the view's lock: a request that sorts the records half-way through a change caches a stale order
        with self.view._lock:
            for _ in range(self.rng.randint(0, self.most)):
                if self.rng.random() < self.add_chance:
                    record = make_leads(1, start=at)[0]
                    self.view.records.append(record)
                    self._note(record)
                elif self.rng.random() < self.keep_chance:
                    self._update_beside(at)
                else:
                    self._update(at)
            if self.rng.random() < self.delete_chance:
                self._delete_newest(self.rng.randint(1, 3))
            self._remove_due()

    def while_paging(self, path: str) -> None:
        """Sometimes delete a few records of the pages already served before a page after the first is served."""
        query = {name: values[-1] for name, values in parse_qs(urlsplit(path).query).items()}
        page, size = query.get("page", "1"), query.get("pageSize", "0")
        if self.halt.is_set() or not (page.isdigit() and size.isdigit()) or int(page) < 2:
            return
        if self.paging_rng.random() < self.paging_delete_chance:
            with self.view._lock:
                self.deleted_while_paging += self._delete_newest(self.paging_rng.randint(1, 3), self.paging_rng,
                                                                 within=(int(page) - 1) * int(size))

    def tie(self, n: int) -> None:
        """Update n records at the newest usable time in the view: a tie with what the agent has already polled."""
        with self.view._lock:
            movable = self._movable()
            at = max(self.view.records[i]["lastModified"] for i in movable)
            for i in self.rng.sample(movable, min(n, len(movable))):
                self._replace(i, update(self.view.records[i], at=at, Status="Tied"))

    @property
    def versions(self) -> int:
        return sum(len(v) for v in self.history.values())

    def _note(self, record: dict, what: str = "made") -> None:
        self.log.append((time.time(), what, record["lastSubmissionID"], record["lastModified"]))
        self.history.setdefault(record["RecordId"], []).append(record["lastSubmissionID"])
        self.modified[record["lastSubmissionID"]] = record["lastModified"]
        self.born[record["lastSubmissionID"]] = self.bursts

    def _movable(self) -> list[int]:
        """Positions of the records the Mutator may update or delete."""
        return [i for i, r in enumerate(self.view.records) if r["RecordId"] not in self.pinned]

    def _newest(self, within: int | None = None) -> list[int]:
        """Positions of the movable records among the `within` (default `recent`) newest."""
        records = self.view.records
        newest = sorted(range(len(records)), key=lambda i: records[i]["lastModified"], reverse=True)[:within or self.recent]
        return [i for i in newest if records[i]["RecordId"] not in self.pinned]

    def _update(self, at: str) -> None:
        movable = self._movable()
        if movable:
            i = self.rng.choice(movable)
            self._replace(i, update(self.view.records[i], at=at, Status=self.rng.choice(["New", "Contacted", "Qualified"])))

    def _replace(self, i: int, record: dict) -> None:
        old = self.view.records[i]
        self.view.records[i] = record
        self.log.append((time.time(), "replaced", old["lastSubmissionID"], old["lastModified"]))
        self._note(record)

    def _update_beside(self, at: str) -> None:
        """A new version of a recent record on top of the view, the old one left where it was.

        The old one is stamped before this burst (a tie would order the two by arrival, which the view's order
        gets right anyway) and as recent as may be, so that the agent has often not read it yet.
        """
        records = self.view.records
        older = [i for i in self._newest() if records[i]["lastModified"] < at]
        fresh = [i for i in older if self.born[records[i]["lastSubmissionID"]] >= self.bursts - 2]
        if older:
            old = records[self.rng.choice(fresh or older[:12])]
            record = update(old, at=at, Status="Beside")
            self.view.records.append(record)
            self._note(record, "beside")
            self.kept.append((old["lastSubmissionID"], record["lastSubmissionID"]))
            if self.rng.random() < 0.75:  # else it stays for good
                self._remove_at[old["lastSubmissionID"]] = self.bursts + self.rng.randint(2, 40)

    def _delete_newest(self, n: int, rng: random.Random | None = None, within: int | None = None) -> int:
        newest = self._newest(within)
        doomed = sorted((rng or self.rng).sample(newest, min(n, len(newest))), reverse=True)
        for i in doomed:
            gone = self.view.records.pop(i)
            self.deleted.append(gone["lastSubmissionID"])
            self.log.append((time.time(), "deleted", gone["lastSubmissionID"], gone["lastModified"]))
        return len(doomed)

    def _remove_due(self) -> None:
        """Remove the kept older versions whose time has come (unless an update or a deletion took them already)."""
        due = {version for version, burst in self._remove_at.items() if burst <= self.bursts}
        if not due:
            return
        for version in due:
            del self._remove_at[version]
        for i in reversed(range(len(self.view.records))):
            if self.view.records[i]["lastSubmissionID"] in due:
                gone = self.view.records.pop(i)
                self.log.append((time.time(), "removed", gone["lastSubmissionID"], gone["lastModified"]))


@dataclass
class Generation:
    """One agent process."""

    index: int
    kind: str  # kill | failpoint | sigterm | final
    spec: str
    proc: subprocess.Popen | Forked
    out: Path
    err: Path
    start: float
    end: float | None = None
    signal: str | None = None  # what the storm sent: KILL | TERM | None (it died by itself)
    firings: int = 0  # failpoint firings logged during its life
    stop_seconds: float | None = None  # SIGTERM to exit


@dataclass
class Report:
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = ["storm figures:"] + [f"  {k}: {v}" for k, v in self.figures.items()]
        lines += ["problems:" if self.problems else "problems: none"] + [f"  - {p}" for p in self.problems[:40]]
        if len(self.problems) > 40:
            lines.append(f"  ... and {len(self.problems) - 40} more")
        return "\n".join(lines)

    def has(self, text: str) -> bool:
        return any(text in p for p in self.problems)


CONFIG = """
[agent]
ledger = "var/agent.db"
concurrency = @CONCURRENCY@

[sources.leads]
kind = "rest"
url = "@VIEW@"
every = "1s"  # the shortest allowed
id = "lastSubmissionID"
updated = "lastModified"
entity = "RecordId"
first_run = "deliver"
timeout = "@VIEW_TIMEOUT@"
params = { since = "{{ cursor }}" }
overlap = "@OVERLAP@"
auth = { kind = "basic", username = "integration", password = "${VIEW_PASSWORD}" }
paging = { kind = "page", param = "page", size_param = "pageSize", size = 10, start = 1 }

[connectors.crm]
kind = "http"
base_url = "@SINK@"
auth = { kind = "bearer", token = "${CRM_TOKEN}" }
idempotency_header = "Idempotency-Key"
timeout = "@SINK_TIMEOUT@"
headers = { X-Storm-Generation = "${STORM_GENERATION:-0}" }  # which agent process sent a request
[connectors.crm.objects.leads]
path = "/leads"

[[flows]]
name = "storm"
source = "leads"

  [[flows.steps]]
  kind = "map"
  fields = { record = "{{ record.RecordId }}", version = "{{ record.lastSubmissionID }}", modified = "{{ record.lastModified }}", name = "{{ record.FirstName }} {{ record.LastName }}", status = "{{ record.Status }}" }

  [[flows.steps]]
  kind = "action"
  action = "crm > leads > send"
  body = "mapped"
  [flows.steps.retry]
  attempts = 1000000
  interval = "0.05s"
  max_interval = "0.3s"
  window = "1h"
"""


def write_config(folder: Path, view_url: str, sink_url: str, *, concurrency: int = 4, overlap: float = 60.0,
                 view_timeout: float = VIEW_TIMEOUT, sink_timeout: float = SINK_TIMEOUT) -> Path:
    cfg = folder / "agent.toml"
    text = CONFIG
    for name, value in {"@VIEW@": view_url, "@SINK@": sink_url, "@CONCURRENCY@": str(concurrency), "@OVERLAP@": f"{overlap}s",
                        "@VIEW_TIMEOUT@": f"{view_timeout}s", "@SINK_TIMEOUT@": f"{sink_timeout}s"}.items():
        text = text.replace(name, value)
    cfg.write_text(text)
    return cfg


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    return {**env, "VIEW_PASSWORD": PASSWORD, "CRM_TOKEN": TOKEN, **extra}


@dataclass(frozen=True)
class LedgerExecution:
    """An execution as the judge reads it; ``created`` (when it was admitted) is on the agent's clock, epoch seconds."""

    id: int
    key: str
    entity: str
    status: str
    created: float


def read_ledger(path: Path) -> dict[str, Any]:
    """The ledger's records, executions, polls and cursor, read-only (the agent must be stopped or beside it)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        records = conn.execute("SELECT key, id, version FROM records").fetchall()
        executions = [LedgerExecution(*row) for row in conn.execute(
            "SELECT id, key, entity, status, created FROM executions ORDER BY id")]
        polls = conn.execute("SELECT COUNT(*), SUM(finished IS NOT NULL AND error IS NULL), SUM(pages) FROM polls").fetchone()
        good_polls = conn.execute("SELECT id, started, finished FROM polls WHERE finished IS NOT NULL AND error IS NULL ORDER BY id").fetchall()
        cursor = conn.execute("SELECT value FROM cursors WHERE source = 'leads'").fetchone()
    finally:
        conn.close()
    return {"records": records, "executions": executions, "polls": polls, "good_polls": good_polls, "cursor": cursor[0] if cursor else None}


def count_firings(log: Path) -> collections.Counter:
    return collections.Counter(log.read_text().split()) if log.exists() else collections.Counter()


class Storm:
    """One kill storm in ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path, *, kills: int = 20, seed: int = 4, min_firings: int = 2,
                 points: tuple[str, ...] = POINTS, plant: str | None = None, concurrency: int = 4,
                 view_fault_rate: float = 0.1, sink_rates: dict[str, float] | None = None,
                 base_chance: float = 0.01, focus_chance: float = 0.3, initial: int = 30,
                 bursts_per_tick: int = 4, view_changes: dict[str, float] | None = None, overlap: float = 5.0,
                 drain_timeout: float = 60.0, time_limit: float | None = None, fork: bool = FORK):
        self.folder = folder
        self.kills, self.seed, self.min_firings, self.points, self.plant = kills, seed, min_firings, points, plant
        self.fork = fork  # the storm's generations forked from a Launcher; the final ones are always `python -m agent`
        self.launcher: Launcher | None = None
        self.concurrency, self.overlap = concurrency, overlap
        self.base_chance, self.focus_chance = base_chance, focus_chance
        self.initial, self.drain_timeout = initial, drain_timeout
        self.time_limit = time_limit if time_limit is not None else 45.0 + 4.0 * kills
        self.rng = random.Random(seed)
        self.view_faults = ChaosView(random.Random(seed + 1), view_fault_rate, slow=VIEW_TIMEOUT + LATE)
        self.sink = ChaosSink(random.Random(seed + 2), sink_rates or {"503": 0.07, "429": 0.05, "drop": 0.06, "slow": 0.02}, slow=SINK_TIMEOUT + LATE)
        records = make_leads(initial + 1, start=START, step=0)
        self.far_future = records[-1] = {**records[-1], "lastModified": FAR_FUTURE}  # set here, not by update(): its clock stays sane
        self.view = ViewServer(records, paging="page", page_size=10, username="integration", password=PASSWORD)
        self.mutator = Mutator(self.view, random.Random(seed + 3), bursts_per_tick=bursts_per_tick,
                               pinned=frozenset({self.far_future["RecordId"]}), **(view_changes or {}))
        self.view_faults.before_page = self.mutator.while_paging
        self.logs = folder / "logs"
        self.firing_log = folder / "failpoints.log"
        self.generations: list[Generation] = []
        self.report = Report()

    # -- processes -------------------------------------------------------------
    def _env(self, spec: str, index: int) -> dict[str, str]:
        extra = {"AGENT_FAILPOINTS": spec, "AGENT_FAILPOINTS_LOG": str(self.firing_log)} if spec else {}
        extra["STORM_GENERATION"] = str(index)
        if self.plant:
            plant_dir = self.folder / "plant"
            plant_dir.mkdir(exist_ok=True)
            (plant_dir / "sitecustomize.py").write_text(textwrap.dedent(PLANTS[self.plant]))
            extra["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plant_dir), os.environ.get("PYTHONPATH")]))
        return agent_env(**extra)

    def _start(self, kind: str, spec: str = "", *args: str) -> Generation:
        index = len(self.generations)
        out, err = self.logs / f"gen{index:04d}.out", self.logs / f"gen{index:04d}.err"
        command = ["--config", str(self.cfg), "run", *args]
        if self.launcher and kind != "final":
            proc = self.launcher.start(command, self.folder, out, err, self._env(spec, index))
        else:
            with open(out, "w") as fo, open(err, "w") as fe:
                proc = subprocess.Popen([sys.executable, "-m", "agent", *command], cwd=self.folder, stdout=fo, stderr=fe,
                                        stdin=subprocess.DEVNULL, env=self._env(spec, index))
        gen = Generation(index, kind, spec, proc, out, err, time.monotonic())
        self.generations.append(gen)
        return gen

    def _ended(self, gen: Generation, fired_before: int) -> None:
        gen.end = time.monotonic()
        gen.firings = sum(count_firings(self.firing_log).values()) - fired_before

    def _spec(self, focus: str | None) -> str:
        chances = {p: self.focus_chance if p == focus else self.base_chance for p in POINTS}
        return ",".join(f"{p}:{chance}" for p, chance in chances.items() if chance)

    def _kill_delay(self) -> float:
        # a third while it starts (ledger open, recovery, first poll), the rest while it runs, a few after a while
        draw = self.rng.random()
        return self.rng.uniform(0.05, 0.6) if draw < 0.35 else self.rng.uniform(0.6, 2.0) if draw < 0.9 else self.rng.uniform(2.0, 3.5)

    def _lived(self, gen: Generation, delay: float) -> None:
        """Let `gen` run for `delay` seconds, then SIGKILL it unless it died by itself."""
        fired = sum(count_firings(self.firing_log).values())
        try:
            gen.proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            gen.proc.send_signal(signal.SIGKILL)
            gen.signal = "KILL"
            gen.proc.wait()
        self._ended(gen, fired)

    def _sigterm(self, gen: Generation, after: float) -> None:
        """Wait until `gen` runs (its handler is installed), then SIGTERM it and time its exit."""
        fired = sum(count_firings(self.firing_log).values())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and gen.proc.poll() is None and "agent running" not in gen.err.read_text():
            time.sleep(0.02)
        if gen.proc.poll() is None:
            time.sleep(after)
            gen.proc.send_signal(signal.SIGTERM)
            gen.signal = "TERM"
            sent = time.monotonic()
            try:
                gen.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                gen.proc.kill()
                gen.proc.wait()
            gen.stop_seconds = round(time.monotonic() - sent, 2)
        self._ended(gen, fired)

    # -- phases -------------------------------------------------------------
    def run(self) -> Report:
        self.logs.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.view, self.sink:
            for server in (self.view._server, self.sink._server):  # clients killed mid-request are expected here
                server.handle_error = lambda request, address: None
            self.view.fail_with(self.view_faults)
            self.cfg = write_config(self.folder, self.view.url, self.sink.url, concurrency=self.concurrency, overlap=self.overlap)
            if self.fork:
                self.launcher = Launcher(self._env("", 0), self.folder / "launcher.err")
            self.mutator.start()
            try:
                self._storm(started)
            finally:
                self.mutator.halt.set()
                self.mutator.join()
                if self.launcher:
                    self.launcher.close()
            storm_seconds = time.monotonic() - started
            self.view_faults.on = self.sink.on = False
            settled = self._settle()
            self.report.figures.update(storm_seconds=round(storm_seconds, 1), total_seconds=round(time.monotonic() - started, 1))
            self._judge()
            self.report.figures.update(settled)
        return self.report

    def _storm(self, started: float) -> None:
        kills, sigterm_done = 0, False
        while kills < self.kills or self._short_points():
            if time.monotonic() - started > self.time_limit:
                self.report.problems.append(f"the storm hit its time limit ({self.time_limit:.0f}s) after {kills} kills; "
                                            f"failpoints short of {self.min_firings}: {', '.join(self._short_points())}")
                return
            if not sigterm_done and kills >= self.kills // 2:
                self._sigterm(self._start("sigterm"), after=self.rng.uniform(0.1, 0.8))
                sigterm_done = True
                continue
            short = self._short_points()
            if short and len(self.generations) % 2:
                focus = short[(len(self.generations) // 2) % len(short)]
                gen = self._start("failpoint", self._spec(focus))
                self._lived(gen, self.rng.uniform(1.0, 3.0))
            else:
                gen = self._start("kill", self._spec(None))
                self._lived(gen, self._kill_delay())
            kills += gen.signal == "KILL"
        if not sigterm_done:
            self._sigterm(self._start("sigterm"), after=0.2)

    def _short_points(self) -> list[str]:
        counts = count_firings(self.firing_log)
        return [p for p in self.points if counts[p] < self.min_firings]

    def _settle(self) -> dict[str, Any]:
        """Faults off: one clean `run` until nothing is left to do, SIGTERM, then `run --once` must find nothing.

        Once it has drained, a few records get a new version stamped with the newest time it has already
        seen (a tie at the cursor), and it must drain again.
        """
        gen = self._start("final")
        deadline = time.monotonic() + self.drain_timeout
        drained = False
        for phase in ("faults stopped", "ties at the cursor"):
            quiet = time.time()
            drained = False
            while time.monotonic() < deadline and gen.proc.poll() is None:
                if self._drained(quiet):
                    drained = True
                    break
                time.sleep(0.2)
            if not drained:
                break
            if phase == "faults stopped":
                self.mutator.tie(5)
        if not drained:
            self.report.problems.append(f"not drained within {self.drain_timeout:.0f}s after the faults stopped")
        self._sigterm(gen, after=0)
        once = self._start("final", "", "--once")
        try:
            once.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            once.proc.kill()
            once.proc.wait()
        self._ended(once, 0)
        summary = once.out.read_text().strip()
        if once.proc.returncode != 0 or "sent: 0" not in summary or "waiting: 0" not in summary or "new: 0" not in summary:
            self.report.problems.append(f"run --once after draining: exit {once.proc.returncode}, {summary!r} (expected nothing new, sent or waiting)")
        return {"drained after the faults stopped": drained, "then run --once": summary}

    def _drained(self, quiet: float) -> bool:
        """Nothing active in the ledger, and either every current version admitted or three good polls found nothing more."""
        try:
            conn = sqlite3.connect(f"file:{self.folder / 'var' / 'agent.db'}?mode=ro", uri=True, timeout=1)
            try:
                active = conn.execute(f"SELECT COUNT(*) FROM executions WHERE status IN {ACTIVE}").fetchone()[0]
                keys = {r[0] for r in conn.execute("SELECT key FROM records")}
                good_polls = conn.execute("SELECT COUNT(*) FROM polls WHERE error IS NULL AND started > ? AND finished IS NOT NULL", (quiet,)).fetchone()[0]
            finally:
                conn.close()
        except sqlite3.Error:
            return False
        current = {r["lastSubmissionID"] for r in self.view.records}
        return active == 0 and good_polls >= 1 and (current <= keys or good_polls >= 4)

    # -- judgement -------------------------------------------------------------
    def _judge(self) -> None:
        problems, figures = self.report.problems, self.report.figures
        ledger = read_ledger(self.folder / "var" / "agent.db")
        admitted = {key for key, _id, _version in ledger["records"]}
        executions = ledger["executions"]
        current = {r["lastSubmissionID"]: r["RecordId"] for r in self.view.records}
        events = self.sink.events
        with open(self.folder / "sink-events.jsonl", "w") as f:  # for a post-mortem beside logs/ and var/agent.db
            f.writelines(json.dumps(e.__dict__) + "\n" for e in events)
        view_log = [{"at": at, "change": what, "version": version, "modified": modified} for at, what, version, modified in self.mutator.log]
        view_log += [{"at": at, "request": path, "answer": kind} for at, path, kind in self.view_faults.log]
        with open(self.folder / "view-log.jsonl", "w") as f:  # what the view did and was asked, on the agent's clock
            f.writelines(json.dumps(entry) + "\n" for entry in sorted(view_log, key=lambda entry: entry["at"]))
        (self.folder / "generations.json").write_text(json.dumps(
            [{"index": g.index, "kind": g.kind, "spec": g.spec, "start": g.start, "end": g.end, "signal": g.signal,
              "exit": g.proc.returncode, "firings": g.firings} for g in self.generations], indent=1))
        accepted: dict[str, set[str]] = collections.defaultdict(set)  # version -> keys it was accepted under
        for e in events:
            if e.kind == "accepted":
                accepted[e.version].add(e.key)
        delivered = set(accepted)

        # nothing lost
        for version in sorted(admitted - delivered)[:20]:
            problems.append(f"admitted version {version} was never delivered")
        for version in sorted(set(current) - delivered)[:20]:
            problems.append(f"current version {version} of record {current[version]} was never delivered")
        for version in sorted(delivered - admitted)[:20]:
            problems.append(f"version {version} was delivered but the ledger has no record of it")
        leftover = collections.Counter(ex.status for ex in executions if ex.status != "succeeded")
        if leftover:
            problems.append(f"executions not succeeded after draining: {dict(leftover)}")

        # nothing twice
        for version, keys in sorted(accepted.items(), key=lambda item: str(item[0])):
            if len(keys) > 1:
                problems.append(f"version {version} was accepted under {len(keys)} different idempotency keys")
        keyless = sum(not e.key for e in events)
        if keyless:
            problems.append(f"{keyless} request(s) carried no idempotency key")
        versions_of_key: dict[str, set] = collections.defaultdict(set)
        for e in events:
            if e.kind != "incomplete":
                versions_of_key[e.key].add(e.version)
        for key, versions in versions_of_key.items():
            if key and len(versions) > 1:
                problems.append(f"key {key} was used for {len(versions)} different versions: {sorted(map(str, versions))[:4]}")

        # repeated keys are explained by the faults
        replays = [e for e in events if e.kind == "replay"]
        by_key: dict[str, list[SinkEvent]] = collections.defaultdict(list)
        for e in events:
            if e.kind in ("accepted", "replay"):
                by_key[e.key].append(e)
        unexplained = 0
        for key, seq in by_key.items():
            for before, after in zip(seq, seq[1:]):
                lost_answer = before.delivery in ("dropped", "slow")
                if not (lost_answer or before.gen != after.gen):
                    unexplained += 1
                    if unexplained <= 5:
                        problems.append(f"key {key} (version {after.version}) was sent again by the same agent process "
                                        f"(generation {after.gen}) {after.t - before.t:.2f}s after the sink had answered it")
        if unexplained > 5:
            problems.append(f"... {unexplained} unexplained replays in all")
        deaths = sum(g.proc.returncode == -signal.SIGKILL for g in self.generations)
        drops, slows = self.sink.counts["drop"], self.sink.counts["slow"]
        bound = drops + slows + self.concurrency * deaths
        if len(replays) > bound:
            problems.append(f"{len(replays)} replays > drops {drops} + slow answers {slows} + concurrency {self.concurrency} x deaths {deaths}")
        refused = {e.key for e in events if e.kind.startswith("refused")}

        # the processes
        firings = count_firings(self.firing_log)
        for g in self.generations:
            rc = g.proc.returncode
            if g.signal == "TERM":
                if rc != 0 or g.stop_seconds is None or g.stop_seconds > 20:
                    problems.append(f"generation {g.index} ({g.kind}): SIGTERM gave exit {rc} after {g.stop_seconds}s (expected 0 within 20s)")
            elif g.signal is None and g.kind != "final" and not (rc == -signal.SIGKILL and g.firings):
                problems.append(f"generation {g.index} ({g.kind}) exited by itself with {rc}: {g.err.read_text()[-400:]!r}")
            elif g.signal is None and g.kind == "final" and rc != 0:
                problems.append(f"generation {g.index} (run --once) exited {rc}: {g.err.read_text()[-400:]!r}")
        texts = {g.index: g.out.read_text() + g.err.read_text() for g in self.generations}
        tracebacks = [i for i, text in texts.items() if "Traceback" in text]
        if tracebacks:
            problems.append(f"a traceback in the output of generation(s) {tracebacks[:10]}: {texts[tracebacks[0]][texts[tracebacks[0]].index('Traceback'):][:600]!r}")
        if any(PASSWORD in text for text in texts.values()):
            problems.append("the view password appears in the agent's output")
        for name in ("agent.db", "agent.db-wal", "agent.db-shm"):
            path = self.folder / "var" / name
            if path.exists() and PASSWORD.encode() in path.read_bytes():
                problems.append(f"the view password appears in the ledger file {name}")
        short = [p for p in self.points if firings[p] < self.min_firings]
        if short:
            problems.append(f"failpoints fired fewer than {self.min_firings} times: {', '.join(f'{p} {firings[p]}' for p in short)}")

        kinds = collections.Counter(g.kind for g in self.generations)
        figures.update({
            "seed": self.seed,
            "plant": self.plant or "none",
            "generations": dict(kinds),
            "SIGKILLs sent": sum(g.signal == "KILL" for g in self.generations),
            "SIGTERM stops (exit, seconds)": [(g.proc.returncode, g.stop_seconds) for g in self.generations if g.signal == "TERM"],
            "self-kills at failpoints": sum(g.signal is None and g.proc.returncode == -signal.SIGKILL for g in self.generations),
            "failpoint firings": {p: firings[p] for p in POINTS},
            "view": f"{len(self.view.records)} records, {self.mutator.versions} versions made, {len(self.view.hits)} requests, faults {dict(self.view_faults.counts - collections.Counter(ok=self.view_faults.counts['ok']))}",
            "polls (started, finished well, pages read)": tuple(ledger["polls"]),
            "versions admitted": len(admitted),
            "versions delivered": len(delivered),
            "current versions delivered": f"{len(set(current) & delivered)}/{len(current)}",
            "sink requests": len(events),
            "sink faults": dict(self.sink.counts),
            "retries after a refusal (503/429)": len(refused),
            "replays absorbed by the sink": f"{len(replays)} (sink.replays {self.sink.replays})",
            "replay bound (asserted)": f"drops {drops} + slow answers {slows} + concurrency {self.concurrency} x SIGKILLed processes {deaths} = {bound}",
            "replays vs drops + slow + kills + after_send firings (not asserted: one kill can orphan up to `concurrency` sends)":
                f"{len(replays)} vs {drops + slows + sum(g.signal == 'KILL' for g in self.generations) + firings['after_send']}",
            "unexplained replays": unexplained,
        })
        self._judge_skips(ledger, admitted)
        self._judge_order(executions, events)
        self._judge_view(ledger, executions, delivered)

    def _judge_skips(self, ledger: dict[str, Any], admitted: set[str]) -> None:
        """A version that was in the view all through a good poll whose range held it, and that the cursor then passed, was admitted.

        Versions replaced or deleted later are not "current" at the end: without this check, one such poll skipped
        would go unnoticed. The range is the ``since`` of the poll's requests; the cursor it left, the ``since`` of
        the next request (or the ledger's cursor after the last poll).
        """
        requests = [(at, parse_qs(urlsplit(path).query).get("since", [""])[-1]) for at, path, _kind in self.view_faults.log]
        shown: dict[str, tuple[float, float, str]] = {}  # version -> (in the view from, until, lastModified)
        for at, what, version, modified in self.mutator.log:
            if what in ("made", "beside"):
                shown[version] = (at, float("inf"), modified)
            elif version in shown:
                shown[version] = (shown[version][0], at, modified)
        skipped: dict[str, str] = {}
        for poll, started, finished in ledger["good_polls"]:
            during = [since for at, since in requests if started <= at <= finished]
            if not during:
                continue
            since = max(during)
            after = next((cursor for at, cursor in requests if at > finished), ledger["cursor"] or "")
            for version, (came, went, modified) in shown.items():
                if version not in admitted and version not in skipped and came <= started and went >= finished and since <= modified < after:
                    skipped[version] = (f"version {version} ({modified}) was in the view all through poll {poll}, which read from "
                                        f"{since or 'the start'} and moved the cursor past it (to {after}), but was never admitted")
        self.report.problems.extend(list(skipped.values())[:10])
        if len(skipped) > 10:
            self.report.problems.append(f"... {len(skipped)} versions skipped by a poll in all")
        self.report.figures["versions a good poll skipped though the cursor passed them (asserted: 0)"] = len(skipped)

    def _judge_order(self, executions: list[LedgerExecution], events: list[SinkEvent]) -> None:
        """Versions of one entity go out in the order of their lastModified (ties: the order admitted).

        A version the agent admitted only after a newer one was first sent cannot hold that one back (the poll that
        read the newer one failed before the older one's page, say): such pairs are counted, not problems. A page is
        admitted only once no send of its entities is in flight, and a version claimed before an older one was
        admitted goes back unstarted (the agent's entity gate), so "admitted before the newer one's first request
        reached the sink" is "admitted before it was first claimed".
        """
        problems, made = self.report.problems, self.mutator.modified
        first_accept = {e.version: e.t for e in reversed(events) if e.kind == "accepted"}
        first_sent = {e.version: e.wall for e in reversed(events) if e.version is not None}
        for e in events:
            if e.kind == "accepted" and e.version in made and e.modified != made[e.version]:
                problems.append(f"version {e.version} went out with lastModified {e.modified!r}, the view made it {made[e.version]!r}")
        per_entity: dict[str, list[LedgerExecution]] = collections.defaultdict(list)
        for ex in executions:
            if ex.key in first_accept:
                per_entity[ex.entity].append(ex)
        held, unread, stale = [], [], []
        for entity, rows in per_entity.items():
            rows.sort(key=lambda ex: (made.get(ex.key, ""), ex.id))
            if max(rows, key=lambda ex: first_accept[ex.key]) is not rows[-1]:
                stale.append(entity)  # the sink's last write for the record is not its newest version
            for i, older in enumerate(rows):
                for newer in rows[i + 1:]:
                    if first_accept[newer.key] < first_accept[older.key]:
                        known = older.created <= first_sent[newer.key]
                        (held if known else unread).append((entity, older, newer))
        for entity, older, newer in held[:10]:
            problems.append(f"record {entity}: version {newer.key} ({made.get(newer.key)}, execution {newer.id}) was delivered before "
                            f"the older version {older.key} ({made.get(older.key)}, execution {older.id}), which was admitted "
                            f"{first_sent[newer.key] - older.created:.3f}s before the newer one was first sent")
        if len(held) > 10:
            problems.append(f"... {len(held)} versions delivered out of the order of their lastModified in all")
        self.report.figures["versions delivered out of order (asserted: 0)"] = len(held)
        self.report.figures["newer versions sent before an older one was admitted (not asserted)"] = (
            f"{len(unread)}" + "".join(f"; {entity}: {newer.key} sent {older.created - first_sent[newer.key]:.2f}s before "
                                      f"{older.key} was admitted" for entity, older, newer in unread[:3]))
        self.report.figures["records whose last delivery is not their newest version (not asserted)"] = (
            f"{len(stale)}" + (f": {', '.join(stale[:5])}" if stale else ""))

    def _judge_view(self, ledger: dict[str, Any], executions: list[LedgerExecution], delivered: set[str]) -> None:
        """The cursor moved but never past the view's newest usable time; what the far-future, kept and deleted records became."""
        problems, figures, mutator = self.report.problems, self.report.figures, self.mutator
        admitted = {ex.key: ex.id for ex in executions}
        cursor = ledger["cursor"]
        newest = max(at for at in mutator.modified.values() if at != FAR_FUTURE)
        if cursor is None:
            problems.append("the cursor never moved: the storm did not exercise it (is the view dated in the agent's future?)")
        elif cursor > newest:  # ISO text of one format: text order is time order
            problems.append(f"the cursor is {cursor!r}, past the newest lastModified the view ever had but {FAR_FUTURE} ({newest})")
        far = self.far_future["lastSubmissionID"]
        both = [(older, newer) for older, newer in mutator.kept if {older, newer} <= delivered & admitted.keys()]
        reordered = sum(admitted[newer] < admitted[older] for older, newer in both)
        figures.update({
            "view clock": f"{START} .. {_stamp(mutator.now)} ({mutator.held_back} ticks held back behind the real clock)",
            "cursor at the end": cursor,
            f"far-future record ({FAR_FUTURE}) delivered": far in delivered,
            "versions kept beside their successor (both delivered, of which the newer was admitted first)": f"{len(mutator.kept)} ({len(both)}, {reordered})",
            "versions deleted from the view (while a later page was asked for; admitted, delivered)":
                f"{len(mutator.deleted)} ({mutator.deleted_while_paging}; {len(set(mutator.deleted) & set(admitted))}, {len(set(mutator.deleted) & delivered)})",
            "polls that read the view again after it shifted": sum(g.err.read_text().count("reading it again") for g in self.generations),
        })

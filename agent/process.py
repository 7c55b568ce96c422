"""The agent process: composes sources, connectors and the ledger; polls, delivers, runs on schedule.

`agent run` polls on a thread of its own and delivers on the main one, so
neither waits for the other: the work a page of a poll admits is delivered
while the poll reads on, and a long drain never holds back a due poll. Both
turn on the ledger, which serialises its own transactions. Tests drive
either side with a fake clock (`poll_tick(now)`, `delivery_tick(now)`), or
both in turn on one thread (`tick(now)`).

On a stop request the drain claims nothing more and waits for the steps in
flight, STOP_GRACE seconds at most; a step still stuck then is left as it is
(`running` in the ledger, as after a crash): the next start recovers it as
interrupted and sends it again under the same idempotency key. Its worker is
a daemon thread, so it cannot keep the process from ending.
"""
from __future__ import annotations

import inspect
import queue
from collections import deque
from contextlib import contextmanager
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Literal

from loguru import logger
from pydantic import ValidationError

import sinks
import sources
from agent import failpoints, versions
from agent.config import Config, ConfigError
from agent.flows import FlowRunner, unreachable_reason
from agent.http import build_session
from agent.logs import Progress
from agent.poller import Poller, PollResult
from agent.secrets import Masker
from agent.timing import Daily, Every, Job, Timetable
from sinks.base import SinkError
from sources.base import SourceError
from state import open_ledger
from state.base import WAITING, Execution, Finish, Ledger, LedgerError
from agent.timing import utc_text as _when


LEDGER_RETRY = 5.0  # seconds between tries while the ledger cannot be written
STOP_GRACE = 5.0  # seconds a stop request waits for the steps in flight before leaving them to recovery
STOP_CHECK = 0.1  # how often a drain waiting for its steps looks for a stop request
MAX_SLEEP = 60.0  # the longest sleep of the loop: a wall clock stepped or suspended delays a due poll by a minute at most
PRUNE_EVERY = 3600.0  # seconds between applications of the retention
CLAIM_AHEAD = 8  # executions claimed and not yet finished, at least: at concurrency 1, one commit for up to 8 sends
RECORD_WITHIN = 0.25  # seconds an outcome may wait for the commit it shares with others (slow sinks: one commit each)
MAX_RUNS = 100  # runs on demand remembered, waiting or over; the oldest that are over are forgotten first


def build(cls: type, cfg: Any, available: dict[str, Any], where: str, file: str) -> Any:
    """Construct a plugin with the injected dependencies its constructor asks for."""
    wanted = inspect.signature(cls).parameters
    try:
        return cls(cfg, **{name: value for name, value in available.items() if name in wanted})
    except (SinkError, SourceError) as error:  # e.g. an unreadable ca_file: the config's fault, exit 2
        raise ConfigError(file, [(where, str(error))]) from None


def build_plugins(config: Config, *, clock: Callable[[], float] = time.time, session_factory: Callable[..., Any] = build_session,
                  stopping: threading.Event | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Construct every configured source and connector with its session, clock, folder and the agent's stop request."""
    file = str(config.path)
    built_sources = {
        name: build(sources.source_class(cfg.kind), cfg, {"session": session_factory(config.auth.get(f"sources.{name}")),
                                                          "base_dir": config.base_dir, "stopping": stopping}, f"sources.{name}", file)
        for name, cfg in config.sources.items()
    }
    built_connectors = {name: build_connector(config, name, clock=clock, session_factory=session_factory) for name in config.connectors}
    return built_sources, built_connectors


def build_connector(config: Config, name: str, *, clock: Callable[[], float] = time.time,
                    session_factory: Callable[..., Any] = build_session) -> Any:
    """One configured connector with its session (the configured auth, a pool of `concurrency`), clock and folder."""
    cfg = config.connectors[name]
    available = {"session": session_factory(config.auth.get(f"connectors.{name}"), config.agent.concurrency),
                 "clock": clock, "base_dir": config.base_dir, "templates": config.templates}
    return build(sinks.connector_class(cfg.kind), cfg, available, f"connectors.{name}", str(config.path))


class Workers:
    """A fixed set of daemon threads running submitted calls.

    Not a ThreadPoolExecutor: that one joins its threads when the interpreter
    exits, so a call stuck in a socket would keep a stopped agent alive.
    """

    def __init__(self, size: int, name: str = "deliver"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """Let every idle worker end; a busy one ends after its call (or with the process)."""
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # handed to whoever waits on the future, as an executor does
                future.set_exception(error)


class EntityGate:
    """Keeps a poll's admission and the start of sends apart, entity by entity, while polls run on their own thread.

    Versions of one entity go out in version order because the ledger claims no version while an earlier one is
    unfinished. That rule sees only what was admitted before the claim: a version admitted while a newer one of its
    entity was claimed could only go after it. So a page is admitted once no send of its entities is in flight, and
    a claimed version of an entity admitted since its claim is given back unstarted, to be claimed again in order.
    What it holds is bounded by the claims outstanding, whatever the size of the view.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._admitting: list[tuple[str, set[str]]] = []  # (source, entities) of the admission under way
        self._claims = 0  # claim transactions under way: admissions that end meanwhile are kept for them
        self._ended: list[tuple[int, str, set[str]]] = []  # (number, source, entities) of admissions ended during a claim
        self._count = 0  # admissions ended so far
        self._waiting: dict[int, tuple[str, str]] = {}  # claimed, not started: execution id -> (source, entity)
        self._stale: set[int] = set()  # of those, the ones with a version of their entity admitted since their claim
        self._sending: dict[tuple[str, str], int] = {}  # (source, entity) -> sends in flight

    @contextmanager
    def admitting(self, source: str, entities: set[str], stopping: threading.Event) -> Iterator[None]:
        """Held around one page's admission: it begins once no send of its entities is in flight."""
        with self._changed:
            self._admitting.append((source, entities))
            while not stopping.is_set() and any(src == source and entity in entities for src, entity in self._sending):
                self._changed.wait(STOP_CHECK)
        try:
            yield
        finally:
            with self._changed:
                self._admitting.remove((source, entities))
                self._count += 1
                if self._claims:
                    self._ended.append((self._count, source, entities))
                self._stale.update(ex_id for ex_id, (src, entity) in self._waiting.items() if src == source and entity in entities)
                self._changed.notify_all()

    def claiming(self) -> int:
        """Called before a claim transaction; hand what it returns to `claimed` with the executions it claimed."""
        with self._changed:
            self._claims += 1
            return self._count

    def claimed(self, executions: list[Execution], since: int) -> None:
        with self._changed:
            for ex in executions:
                key = (ex.source, ex.entity)
                self._waiting[ex.id] = key
                if any(number > since and src == ex.source and ex.entity in entities for number, src, entities in self._ended):
                    self._stale.add(ex.id)
            self._claims -= 1
            if not self._claims:
                self._ended.clear()

    def start(self, ex: Execution) -> bool:
        """Whether claimed ``ex`` may be sent now; if so, it counts as in flight until `sent`."""
        with self._changed:
            key = self._waiting.pop(ex.id, (ex.source, ex.entity))
            if ex.id in self._stale or any(src == ex.source and ex.entity in entities for src, entities in self._admitting):
                self._stale.discard(ex.id)
                return False
            self._sending[key] = self._sending.get(key, 0) + 1
            return True

    def dropped(self, executions: Any) -> None:
        """Claimed executions given back unstarted (a stop, a poll due): nothing more to watch for them."""
        with self._changed:
            for ex in executions:
                self._waiting.pop(ex.id, None)
                self._stale.discard(ex.id)

    def sent(self, ex: Execution) -> None:
        key = (ex.source, ex.entity)
        with self._changed:
            self._sending[key] -= 1
            if not self._sending[key]:
                del self._sending[key]
                self._changed.notify_all()

    def settle(self, timeout: float) -> None:
        """Wait (``timeout`` at most) for the admission under way to end."""
        with self._changed:
            self._changed.wait_for(lambda: not self._admitting, timeout)


@dataclass
class DrainResult:
    sent: int = 0
    succeeded: int = 0
    filtered: int = 0
    failed: int = 0
    dead: int = 0
    retrying: int = 0
    paused: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: "DrainResult") -> None:
        for name in ("sent", "succeeded", "filtered", "failed", "dead", "retrying", "paused"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.extend(other.errors)


class _Uncounted:
    """The metrics of an agent nobody can scrape (no [agent] listen): nothing counted, prometheus-client not imported."""

    def polled(self, result: Any) -> None:
        pass

    def claimed(self, executions: list[Execution]) -> None:
        pass

    def unclaimed(self, executions: list[Execution]) -> None:
        pass

    def finished(self, execution: Execution, finish: Finish) -> None:
        pass


def _metrics(config: Config) -> Any:
    if not config.agent.listen:
        return _Uncounted()
    from agent.metrics import Metrics  # ~36 ms of import that `run --once` and `poll` need not pay

    return Metrics(config.sources)


class RunQueueFull(RuntimeError):
    """MAX_RUNS runs on demand are waiting already: ask again once some have run."""


@dataclass
class Attempted:
    """What one job of the loop came to: its result, or why it failed (the ledger's failure is retried at the next tick)."""

    result: Any = None
    error: str | None = None
    ledger_down: bool = False


@dataclass
class Run:
    """A poll asked for on demand (`Agent.request_run`) and what came of it."""

    id: str
    source: str
    params: dict[str, str]
    state: Literal["queued", "running", "done", "failed"] = "queued"
    result: dict[str, Any] | None = None
    scheduled: list[str] = field(default_factory=list)  # the keys its poll scheduled work for: its deliveries

    def finish(self, attempted: Attempted, mask: Callable[[str], str]) -> None:
        polled: PollResult | None = attempted.result
        error = attempted.error or (polled.error if polled else None)
        self.state = "failed" if error else "done"
        self.scheduled = list(polled.scheduled) if polled else []
        counts = {name: getattr(polled, name) if polled else 0 for name in ("pages", "fetched", "new", "primed", "quarantined")}
        self.result = {**counts, "error": mask(error) if error else None}

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "params": dict(self.params), "state": self.state,
                "result": None if self.result is None else dict(self.result)}


class Agent:
    """One agent on one ledger. ``clock`` returns epoch seconds."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time, ledger: Ledger | None = None,
                 session_factory: Callable[..., Any] = build_session, stopping: threading.Event | None = None):
        self.config = config
        self.clock = clock
        self.stopping = stopping or threading.Event()
        self._unsettled = False  # a write failed: some steps may have been sent without their outcome recorded
        self._workers: Workers | None = None
        self._stop_by: float | None = None  # monotonic time after which steps still in flight are left to recovery
        self.abandoned = 0  # steps left in flight by a stop
        self._timetable: Timetable | None = None  # the first tick makes it
        self._ledger_down = False  # a delivery write failed in this tick: the next one comes after LEDGER_RETRY
        self._polls_down = False  # a poll's write failed in this tick: the polls are tried again after LEDGER_RETRY
        self._apart = False  # run_forever: polls run on their own thread, so a drain has no poll to make way for
        self._poll_thread: threading.Thread | None = None
        self._overran: set[str] = set()  # jobs that took longer than their interval (said once each)
        self._wake = threading.Event()  # ends the delivery loop's sleep: a stop, new work admitted by a poll
        self._poll_wake = threading.Event()  # ends the poll loop's sleep: a stop, a run request
        self._runs: dict[str, Run] = {}  # runs on demand by id, oldest first
        self._runs_lock = threading.Lock()  # request_run and run_status come from the endpoint's thread
        self._mask = Masker.of(config)  # a run's error is served over HTTP
        templates = config.templates
        self.sources, self.connectors = build_plugins(config, clock=clock, session_factory=session_factory, stopping=self.stopping)
        self.failpoint = failpoints.from_env()
        # after the plugins: a config error touches no ledger
        self.ledger = ledger or open_ledger(config.ledger_location, failpoint=self.failpoint, mask=self._mask)
        self._running: dict[int, Execution] = {}  # claimed and not yet recorded: their leases are renewed by the heartbeat
        self._running_lock = threading.Lock()
        self._beating = threading.Event()  # set: the heartbeat thread ends
        self._heartbeat()  # this agent's row and nothing held yet: `status` lists it from the start
        version = versions.of(config)
        self.version = self.ledger.use_config(version.hash, version.text, version.sections, version.flows, clock())
        self.runner = FlowRunner(config, self.connectors, clock=clock, templates=templates, failpoint=self.failpoint, version=self.version)
        self.progress = Progress()
        self.metrics = _metrics(config)  # counted as the agent works; GET /metrics serves them
        self.gate = EntityGate()
        self.poller = Poller(config, self.ledger, self.sources, clock=clock, templates=templates, failpoint=self.failpoint,
                             progress=self.progress, admitted=self._wake.set,
                             admitting=partial(self.gate.admitting, stopping=self.stopping))
        self.poller.version = self.version
        recovered = self.ledger.recover(clock())
        if recovered:
            logger.warning("{} execution(s) were interrupted by a stop; they are due again now, with the same idempotency keys", recovered)
        self.ledger.wake_paused(clock())  # a restart is often the fix (a new password): probe paused work at once
        self._recorded = self._restore_unreachable()  # connector -> (since, why), as the ledger has it
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()

    def close(self) -> None:
        self._beating.set()
        if self._workers is not None:
            self._workers.shutdown()
        try:
            self.ledger.release(self.clock())  # other agents take this one's sources at once, not after a lease
        except LedgerError as error:
            logger.warning("could not give up this agent's leases ({}); other agents take them over when they run out", error)
        for connector in self.connectors.values() if not self.abandoned else ():  # a stuck call may hold one: the process's end closes it
            try:
                connector.close()
            except Exception:  # closing is best effort; the ledger must still close
                logger.exception("closing a connector failed")
        if self._poll_thread is not None and self._poll_thread.is_alive():
            return  # a poll stuck past the stop grace may be inside a write: the process's end closes the ledger (a cut write rolls back)
        self.ledger.close()

    def _restore_unreachable(self) -> dict[str, tuple[float, str]]:
        """Connectors the last run could not reach stay unreachable since then (for `status`) until a probe gets through."""
        known = self.ledger.unreachable()
        for name in set(known) - set(self.connectors):
            self.ledger.set_unreachable(name, None)  # no longer configured
        known = {name: state for name, state in known.items() if name in self.connectors}
        self.runner.restore_unreachable(known)
        for name, (since, why) in known.items():
            logger.warning("connector {!r}: unreachable since {} when the agent last ran ({}); it is probed first", name, _when(since), why)
        return known

    # -- leases: a heartbeat renews this agent's source and delivery leases every third of `lease` ----------------
    def _beat(self) -> None:
        while not self._beating.wait(self.config.agent.lease / 3):
            try:
                self._heartbeat()
            except LedgerError as error:  # the local deadlines run on: this agent stops polling and starting steps in time
                logger.warning("could not renew this agent's leases: {}", error)
            except Exception:
                logger.exception("the heartbeat failed unexpectedly")

    def _heartbeat(self) -> None:
        with self._running_lock:
            running = list(self._running.values())
        lost = self.ledger.heartbeat(self.clock(), self.config.agent.lease, running)
        with self._running_lock:
            for ex_id in lost.lost_executions:  # said once: their outcomes are fenced out when they come
                self._running.pop(ex_id, None)
        for source in lost.lost_sources:
            logger.warning("source {!r}: another agent took over its lease; this agent polls it no more while that one runs", source)
        if lost.lost_executions:
            logger.warning("{} execution(s) claimed by this agent are no longer its own (another agent took them over, or they were "
                           "re-queued after a failed write); outcomes still to come for them are not recorded", len(lost.lost_executions))

    def poll(self, name: str, run: dict[str, str] | None = None) -> PollResult:
        """Poll one source now (when this agent holds its lease); with ``run`` parameters an extra poll that leaves the cursor where it is."""
        if not self.ledger.take_source(name, self.clock(), self.config.agent.lease):
            logger.bind(source=name).debug("{}: another agent holds its lease and polls it", name)
            return PollResult(name, run=dict(run or {}), elsewhere=True)
        try:
            result = self.poller.poll(name, run=run)
        finally:
            self.progress.done()
        self.metrics.polled(result)
        return result

    def poll_all(self) -> list[PollResult]:
        return [self.poll(name) for name in self.config.sources if not self.stopping.is_set()]

    def drain(self) -> DrainResult:
        """Deliver everything due now; in-flight steps finish even when stopping, within STOP_GRACE."""
        result = DrainResult()
        size = self.config.agent.concurrency
        workers = self._workers = self._workers or Workers(size)
        in_flight: dict[Future, Execution] = {}
        batch: list[tuple[Execution, Finish]] = []
        put_back: set[int] = set()
        unreachable_before = self.runner.unreachable()
        try:
            self._deliver(result, workers, size, in_flight, batch, put_back)
        except BaseException:
            self._let_finish(in_flight)  # a step must never run twice at once: its recovery waits until it ended
            raise
        self.progress.done()
        self._report_unreachable(unreachable_before)
        if result.sent or result.failed or result.dead:
            logger.info("drain: {} sent, {} failed, {} dead, {} retrying, {} paused", result.sent, result.failed, result.dead, result.retrying, result.paused)
        return result

    def once(self, polls: Callable[[], list[PollResult]]) -> tuple[list[PollResult], DrainResult]:
        """`run --once` and `poll`: ``polls`` on a thread of their own and delivery on this one, until the polls ended
        and nothing is due; what the polls came to and what the deliveries did. A page's new work goes out while
        the poll reads on, as in run_forever."""
        self._apart = True
        ended: list[Any] = []

        def poll() -> None:
            try:
                ended.append(polls())
            except BaseException as error:  # handed to this thread below, as if the polls had run here
                ended.append(error)
            finally:
                self._wake.set()

        thread = threading.Thread(target=poll, name="poll", daemon=True)
        thread.start()
        result = DrainResult()
        while True:
            self._wake.clear()  # before the drain: work admitted during it ends the wait after it
            polling = thread.is_alive()
            result.add(self.drain())
            if not polling or self.stopping.is_set():
                break
            self._wake.wait(STOP_CHECK)
        thread.join(STOP_GRACE)
        if not ended:  # stuck past the grace after a stop: what it admitted stays, its cursor has not moved
            self._poll_thread = thread
            return [], result
        if isinstance(ended[0], BaseException):
            raise ended[0]
        return ended[0], result

    def _let_finish(self, in_flight: dict[Future, Execution]) -> None:
        """Wait for the steps in flight when a drain fails (a stop still bounds the wait)."""
        while in_flight:
            done = self._settled(in_flight)
            if done is None:
                self.abandoned = len(in_flight)
                return
            for future in done:
                in_flight.pop(future)

    def _deliver(self, result: DrainResult, workers: Workers, size: int, in_flight: dict[Future, Execution],
                 batch: list[tuple[Execution, Finish]], put_back: set[int]) -> None:
        """The drain's loop: record outcomes and claim more in one transaction, until nothing is due or a stop.

        Up to CLAIM_AHEAD executions are claimed at once (their intent committed before any is sent) and started
        as workers come free; outcomes are recorded with the next claim, so at a low concurrency one commit serves
        several sends instead of one each; an outcome waits RECORD_WITHIN at most (a slow sink: one commit each)."""
        first, ready = True, deque()
        target = max(size, CLAIM_AHEAD)
        waiting_since = 0.0  # monotonic time the oldest unrecorded outcome came in
        while True:
            # a poll or a run fell due: claim no more (after the first round, so polls cannot starve delivery) and give
            # back what was claimed but not started, so the poll waits for the sends in flight only
            hold = self.stopping.is_set() or (not first and self._poll_waits())
            if hold and ready:
                batch.extend((ex, Finish("pending", ex.step, ex.context, next_at=self.clock())) for ex in ready)
                self.gate.dropped(ready)
                self.metrics.unclaimed(ready)
                ready.clear()
            late = bool(batch) and time.monotonic() - waiting_since >= RECORD_WITHIN
            if first or hold or not ready or late or len(batch) >= target:
                free = 0 if hold else max(0, target - len(in_flight) - len(ready))
                # the outcomes just in and the next claims commit together: one fsync, and the intent still precedes the send;
                # when a paused connector answered again, its waiting work becomes due in the same transaction
                wake = self.runner.take_resumed()
                since, claimed = self.gate.claiming(), []
                try:
                    claimed = self.ledger.finish_and_claim(batch, self.clock(), free, self.config.agent.lease, wake=wake)
                finally:
                    self.gate.claimed(claimed, since)
                self._record_unreachable()
                if claimed:
                    self.metrics.claimed(claimed)
                    self.failpoint("after_claim")
                with self._running_lock:
                    for ex, _ in batch:
                        self._running.pop(ex.id, None)
                    self._running.update((ex.id, ex) for ex in claimed)
                batch.clear()
                for ex in claimed:
                    self._know_version(ex.version)
                ready.extend(claimed)
            first = False
            given_back = []
            while ready and len(in_flight) < size:
                ex = ready.popleft()
                if self.gate.start(ex):
                    in_flight[workers.submit(self._send, ex)] = ex
                else:  # a version of its entity was admitted since its claim: back, to be claimed again in version order
                    given_back.append(ex)
            if given_back:
                batch.extend((ex, Finish("pending", ex.step, ex.context, next_at=self.clock())) for ex in given_back)
                self.metrics.unclaimed(given_back)
                self.gate.settle(RECORD_WITHIN)
                continue  # the next round records them and claims again
            if self._put_back(put_back, in_flight, batch) and not self.stopping.is_set():
                continue  # due now: the next round claims them
            if not in_flight:
                break
            done = self._settled(in_flight, waiting_since + RECORD_WITHIN if batch else None)
            if done is None:
                self.abandoned = len(in_flight)
                logger.warning("stopping: {} step(s) still running after {:.0f}s are left as they are; the next start sends them again "
                               "with the same idempotency keys", len(in_flight), STOP_GRACE)
                if ready:  # claimed, never started: back to waiting at once
                    self.gate.dropped(ready)
                    self.ledger.finish_many([(ex, Finish("pending", ex.step, ex.context, next_at=self.clock())) for ex in ready],
                                            self.clock())
                    self.metrics.unclaimed(ready)
                    with self._running_lock:
                        for ex in ready:
                            self._running.pop(ex.id, None)
                break
            finished = [(in_flight.pop(f), f.result()) for f in done]
            for ex, finish in finished:
                self._tally(result, ex, finish)
            if not batch:
                waiting_since = time.monotonic()
            batch.extend(finished)
            self.progress(f"delivering: {result.sent} sent, {result.failed + result.dead} failed, {len(in_flight)} in flight")

    def _know_version(self, number: int | None) -> None:
        """Give the runner the flows of the config version an execution is pinned to (read here, in the loop's thread)."""
        if self.runner.knows(number):
            return
        row = self.ledger.config_version(number)
        flows = {}
        for name, definition in (row["flows"] if row else {}).items():
            try:
                flows[name] = versions.flow_of(definition)
            except ValidationError:  # written by an older agent in a shape this one no longer reads: that work fails, named
                logger.error("config version {}: flow {!r} cannot be read back; its waiting work fails", number, name)
        self.runner.add_version(number, flows)

    def _settled(self, in_flight: dict[Future, Execution], until: float | None = None) -> set[Future] | None:
        """The calls done next (none when ``until``, a monotonic time, passes first); None when a stop came and
        STOP_GRACE passed with calls still running."""
        while True:
            left = STOP_CHECK
            if until is not None:
                left = min(left, until - time.monotonic())
                if left <= 0:
                    return set()
            if self.stopping.is_set():
                self._stop_by = self._stop_by or time.monotonic() + STOP_GRACE
                left = min(left, self._stop_by - time.monotonic())
                if left <= 0:
                    return None
            done, _ = wait(in_flight, timeout=left, return_when=FIRST_COMPLETED)
            if done:
                return done

    def _put_back(self, put_back: set[int], in_flight: dict[Future, Execution], unrecorded: list[tuple[Execution, Finish]]) -> bool:
        """Re-queue the executions the runner puts back, once their own outcome is recorded; whether any was."""
        put_back.update(self.runner.take_put_back())
        running = {ex.id for ex in in_flight.values()} | {ex.id for ex, _ in unrecorded}
        ready = [ex_id for ex_id in put_back if ex_id not in running]
        if not ready:
            return False
        put_back.difference_update(ready)
        return bool(self.ledger.requeue(ready, self.clock()))

    def _record_unreachable(self) -> None:
        """Write each change of a connector's reachability to the ledger, where `status` reads it."""
        now = self.runner.unreachable()
        for name in set(now) | set(self._recorded):
            if now.get(name) != self._recorded.get(name):
                since, why = now.get(name, (None, None))
                self.ledger.set_unreachable(name, since, why)
        self._recorded = now

    def _report_unreachable(self, before: dict[str, tuple[float, str]]) -> None:
        """One log line per change of a connector's reachability during a drain."""
        after = self.runner.unreachable()
        for name in sorted(set(before) | set(after)):
            if before.get(name) == after.get(name):
                continue
            if name in before:
                logger.warning("connector {!r}: reachable again after {:.0f}s", name, max(0.0, self.clock() - before[name][0]))
            if name in after:
                since, why = after[name]
                waiting = self.ledger.count_paused(unreachable_reason(name))
                logger.warning("connector {!r}: unreachable since {} ({}), {} waiting; they spend no attempts, one probe at a time tries it",
                               name, _when(since), why, waiting)

    def _send(self, ex: Execution) -> Finish:
        """`_run` on a worker, in flight for the gate until it ends."""
        try:
            return self._run(ex)
        finally:
            self.gate.sent(ex)

    def _run(self, ex: Execution) -> Finish:
        """One execution's run; a bug in a step fails that execution (re-queueable), never the agent."""
        try:
            return self.runner.run(ex)
        except Exception as error:
            logger.exception("execution {} ({}, record {}) hit an internal error", ex.id, ex.flow, ex.key)
            return Finish("failed", ex.step, ex.context, error=f"internal error: {type(error).__name__}: {error}")

    def _tally(self, result: DrainResult, ex: Execution, finish: Finish) -> None:
        self.metrics.finished(ex, finish)
        if finish.attempt and finish.attempt["outcome"] == "succeeded":
            result.sent += 1
        if finish.status in ("succeeded", "filtered", "failed", "dead", "retrying", "paused"):
            setattr(result, finish.status, getattr(result, finish.status) + 1)
        if finish.status in ("failed", "dead") and finish.error:
            result.errors.append(f"execution {ex.id} ({ex.flow}, record {ex.key}): {finish.error}")

    def prune(self) -> dict[str, int]:
        """Apply retention: finished work older than it goes; seen keys go only when older than their source's window."""
        now = self.clock()
        removed = self.ledger.prune(now - self.config.agent.retention, self.config.windows(), now)
        if any(removed.values()):
            logger.info("pruned: {}", ", ".join(f"{v} {k}" for k, v in removed.items()))
        return removed

    def waiting(self) -> tuple[int, int]:
        """(executions waiting for their time, of which paused)."""
        counts = self.ledger.counts()
        waiting = sum(n for flow in counts.values() for status, n in flow.items() if status in WAITING)
        return waiting, sum(flow.get("paused", 0) for flow in counts.values())

    def run_forever(self) -> None:
        """Poll at start and on each source's schedule (on a thread of its own) and deliver continuously (on this one),
        until ``stopping`` is set; then wait STOP_GRACE at most for a poll still running."""
        logger.info("agent running: {} source(s), {} flow(s), ledger {}, agent id {}", len(self.sources), len(self.config.flows),
                    self.config.ledger_shown, self.ledger.worker)
        self._apart = True
        # each loop sleeps on its event, which a stop sets too; this thread passes a stop on to them (costing nothing meanwhile)
        threading.Thread(target=self._wake_on_stop, name="stop-watch", daemon=True).start()
        self._poll_thread = threading.Thread(target=self._poll_loop, name="poll", daemon=True)
        self._poll_thread.start()
        while not self.stopping.is_set():
            self._wake.clear()  # before the tick: work admitted during it ends the sleep after it
            wake = self.delivery_tick(self.clock())
            self._wake.wait(min(MAX_SLEEP, max(0.0, wake - self.clock())))
        self._poll_thread.join(STOP_GRACE)  # a page being read is given up at once on a stop: this is quick
        if self._poll_thread.is_alive():
            logger.warning("stopping: a poll still running after {:.0f}s is left as it is; what it admitted stays and its cursor "
                           "has not moved, so the next start reads the rest again", STOP_GRACE)
        logger.info("agent stopped")

    def _poll_loop(self) -> None:
        """run_forever's poll thread: the polls and runs due, then a sleep until the next one or a run request."""
        while not self.stopping.is_set():
            self._poll_wake.clear()  # before the tick: a run requested during it ends the sleep after it
            try:
                wake = self.poll_tick(self.clock())
            except Exception:  # a schedule that silently stops firing is the worst failure: log it and go on
                logger.exception("the poll loop failed unexpectedly; it goes on in {:.0f}s", LEDGER_RETRY)
                wake = self.clock() + LEDGER_RETRY
            self._poll_wake.wait(min(MAX_SLEEP, max(0.0, wake - self.clock())))

    def _wake_on_stop(self) -> None:
        self.stopping.wait()
        self._wake.set()
        self._poll_wake.set()

    def tick(self, now: float) -> float:
        """One turn of both loops at ``now`` on the caller's thread: the polls and runs due, then delivery; when to
        turn again (epoch seconds).

        A drain here claims no more once a poll or a run is due, so a poll waits for one delivery round at most; a
        drain always gets its first round, so polls cannot starve delivery. (run_forever needs neither rule: it
        turns `poll_tick` and `delivery_tick` on two threads.)
        """
        self._ledger_down = False
        if not self._run_polls(now):
            return now
        drain_started = self.clock()
        if not self.stopping.is_set():
            self._guarded(self.drain)
        return self._next_wake(drain_started)

    def poll_tick(self, now: float) -> float:
        """The polls and runs due at ``now``; when the next one is due (epoch seconds)."""
        self._run_polls(now)
        now = self.clock()
        if self._polls_down:
            return now + LEDGER_RETRY
        if self.stopping.is_set() or self._runs_queued():
            return now
        return self._timetable.next_wake(now)

    def delivery_tick(self, now: float) -> float:
        """Deliver what is due at ``now``; when work is due next (epoch seconds), or MAX_SLEEP from now (a poll's new
        work wakes the loop sooner)."""
        self._ledger_down = False
        if not self.stopping.is_set():
            self._guarded(self.drain)
        later = self.clock()
        if self._ledger_down:
            return later + LEDGER_RETRY
        if self.stopping.is_set():
            return later
        try:
            due = self.ledger.next_due(after=now)
        except LedgerError:
            return later + LEDGER_RETRY
        return later + MAX_SLEEP if due is None else due

    def _run_polls(self, now: float) -> bool:
        """The jobs of the timetable due at ``now``, then the runs on demand queued; False when a stop cut it short."""
        self._polls_down = False
        table = self._timetable = self._timetable or self._plan(now)
        for job in table.due(now):
            if self.stopping.is_set():
                return False
            self._job(job)
        self._serve_runs()
        return True

    def _plan(self, now: float) -> Timetable:
        """Every source polls at `now` (once, however long the agent was down), then by its `every` or `at`; prune hourly."""
        table = Timetable()
        for name, cfg in self.config.sources.items():
            rule = Daily.of(cfg.at, cfg.timezone) if cfg.at else Every(cfg.every)
            table.add(f"poll of {name}", rule, now, partial(self._scheduled_poll, name))
        table.add("prune", Every(PRUNE_EVERY), now + PRUNE_EVERY, self.prune)
        return table

    def _job(self, job: Job) -> None:
        """Run one job of the timetable: due again at its next slot, or (the ledger failed) at the next tick."""
        started = self.clock()
        if self._attempt(job.name, job.work).ledger_down:
            return  # nothing was lost: it runs once the ledger can be written again
        if self._timetable.done(job, started, self.clock()) and job.name not in self._overran:
            self._overran.add(job.name)  # said once: a view always slower than its interval would say it every time
            logger.warning("{} took longer than its interval; the polls it overlapped are skipped, not queued (said once)", job.name)

    def _scheduled_poll(self, name: str) -> None:
        if not self.stopping.is_set():
            self.poll(name)

    def _attempt(self, what: str, work: Callable[[], Any]) -> Attempted:
        """Run one poll job; a ledger that cannot be written and a bug in the job are both survived.

        Never `_settle` here: a poll's failed write leaves no send unrecorded, and recovery while the delivery
        thread has sends in flight would start them a second time."""
        try:
            return Attempted(work())
        except LedgerError as error:
            self._polls_down = True
            logger.error("the ledger cannot be written: {} — polls wait until it can; trying again in {:.0f}s", error, LEDGER_RETRY)
            return Attempted(error=f"the ledger cannot be written: {error}", ledger_down=True)
        except Exception as error:  # a bug in one job must not stop the agent (the `schedule` package let it escape)
            logger.exception("{} failed unexpectedly", what)
            return Attempted(error=f"internal error: {type(error).__name__}: {error}")

    def _guarded(self, work: Callable[[], Any]) -> Any:
        """Run delivery work; a ledger that cannot be written (disk full, locked) is survived (False): nothing is sent meanwhile."""
        try:
            self._settle()
            return work()
        except LedgerError as error:
            self._ledger_failed(error)
            return False

    def _settle(self) -> None:
        if self._unsettled:
            self.ledger.recover(self.clock())  # steps whose outcome could not be recorded run again, same keys
            with self._running_lock:
                self._running.clear()  # recovered: no lease of this agent's to renew any more
            self._unsettled = False

    def _ledger_failed(self, error: LedgerError) -> None:
        self._unsettled = self._ledger_down = True
        logger.error("the ledger cannot be written: {} — nothing is sent until it can; trying again in {:.0f}s", error, LEDGER_RETRY)

    def _next_wake(self, drain_started: float) -> float:
        """The next poll, run or retry. Work due before the drain that it left waits behind an earlier version: not counted."""
        now = self.clock()
        if self._ledger_down or self._polls_down:
            return now + LEDGER_RETRY
        if self.stopping.is_set() or self._poll_waits():
            return now
        wakes = [self._timetable.next_wake(now)]
        try:
            wakes.append(self.ledger.next_due(after=drain_started))
        except LedgerError:
            pass  # tried again at the next wake
        return min(wake for wake in wakes if wake is not None)

    def _poll_waits(self) -> bool:
        """A poll or a run on demand is due and waits for this thread (`tick`): the drain claims no more, so it
        waits one delivery round at most. Polls on their own thread (run_forever) wait for nothing."""
        if self._apart:
            return False
        if self._runs_queued():
            return True
        if self._timetable is None:  # `run --once` and `poll` drain without a timetable
            return False
        now = self.clock()
        return self._timetable.next_wake(now) <= now

    # -- runs on demand (the HTTP endpoint's POST /flows/{name}/run) -----------------------------

    def _runs_queued(self) -> bool:
        with self._runs_lock:
            return any(run.state == "queued" for run in self._runs.values())

    def request_run(self, source: str, params: dict[str, str]) -> str:
        """Queue a poll of ``source`` with ``params`` (its `run` in templates) for the loop; the run's id. Thread-safe.

        An unknown source raises ValueError naming the known ones; with MAX_RUNS runs waiting already, RunQueueFull."""
        if source not in self.config.sources:
            raise ValueError(f"unknown source {source!r} (known: {', '.join(self.config.sources) or 'none'})")
        if not all(isinstance(name, str) and isinstance(value, str) for name, value in params.items()):
            raise TypeError("run parameters are names and values, both strings")
        run = Run(uuid.uuid4().hex, source, dict(params))
        with self._runs_lock:
            finished = [old.id for old in self._runs.values() if old.state in ("done", "failed")]
            for old in finished[:max(0, len(self._runs) + 1 - MAX_RUNS)]:  # the oldest finished make room
                del self._runs[old]
            if len(self._runs) >= MAX_RUNS:
                raise RunQueueFull(f"{MAX_RUNS} runs are waiting already; ask again once some have run")
            self._runs[run.id] = run
        self._poll_wake.set()
        return run.id

    def run_status(self, run_id: str) -> dict[str, Any] | None:
        """A run's id, source, params, state (queued, running, done, failed) and, once over, its result and the keys
        it scheduled work for (``scheduled``: its deliveries); None if unknown."""
        with self._runs_lock:
            run = self._runs.get(run_id)
            return None if run is None else {**run.view(), "scheduled": list(run.scheduled)}

    def _serve_runs(self) -> None:
        """Poll for the runs queued when the tick began, oldest first, on the polls' thread."""
        with self._runs_lock:
            queued = [run for run in self._runs.values() if run.state == "queued"]
        for run in queued:
            if self.stopping.is_set():
                return
            with self._runs_lock:
                run.state = "running"
            attempted = self._attempt(f"run {run.id} of {run.source}", partial(self.poll, run.source, run=run.params))
            with self._runs_lock:
                run.finish(attempted, self._mask)



"""The agent process: composes sources, connectors and the ledger; polls, delivers, runs on schedule."""
from __future__ import annotations

import inspect
import sqlite3
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable

import schedule
from loguru import logger

import sinks
import sources
from agent import failpoints
from agent.config import Config, ConfigError
from agent.flows import FlowRunner
from agent.http import build_session
from agent.logs import Progress
from agent.poller import Poller, PollResult
from sinks.base import SinkError
from sources.base import SourceError
from state.base import LedgerError
from state.ledger import WAITING, Execution, Finish, Ledger


LEDGER_RETRY = 5.0  # seconds between tries while the ledger cannot be written


def build(cls: type, cfg: Any, available: dict[str, Any], where: str, file: str) -> Any:
    """Construct a plugin with the injected dependencies its constructor asks for."""
    wanted = inspect.signature(cls).parameters
    try:
        return cls(cfg, **{name: value for name, value in available.items() if name in wanted})
    except (SinkError, SourceError) as error:  # e.g. an unreadable ca_file: the config's fault, exit 2
        raise ConfigError(file, [(where, str(error))]) from None


def build_plugins(config: Config, *, clock: Callable[[], float] = time.time,
                  session_factory: Callable[..., Any] = build_session) -> tuple[dict[str, Any], dict[str, Any]]:
    """Construct every configured source and connector with its session, clock and folder."""
    file, pool = str(config.path), config.agent.concurrency
    built_sources = {
        name: build(sources.source_class(cfg.kind), cfg, {"session": session_factory(config.auth.get(f"sources.{name}")),
                                                          "base_dir": config.base_dir}, f"sources.{name}", file)
        for name, cfg in config.sources.items()
    }
    built_connectors = {
        name: build(sinks.connector_class(cfg.kind), cfg, {"session": session_factory(config.auth.get(f"connectors.{name}"), pool),
                                                           "clock": clock, "base_dir": config.base_dir}, f"connectors.{name}", file)
        for name, cfg in config.connectors.items()
    }
    return built_sources, built_connectors


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


class Agent:
    """One agent on one ledger. ``clock`` returns epoch seconds."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time, ledger: Ledger | None = None,
                 session_factory: Callable[..., Any] = build_session, stopping: threading.Event | None = None):
        self.config = config
        self.clock = clock
        self.stopping = stopping or threading.Event()
        self._unsettled = False  # a write failed: some steps may have been sent without their outcome recorded
        templates = config.templates
        self.sources, self.connectors = build_plugins(config, clock=clock, session_factory=session_factory)
        self.failpoint = failpoints.from_env()
        self.ledger = ledger or Ledger(config.ledger_path, failpoint=self.failpoint)  # after the plugins: a config error touches no ledger
        self.runner = FlowRunner(config, self.connectors, clock=clock, templates=templates, failpoint=self.failpoint)
        self.progress = Progress()
        self.poller = Poller(config, self.ledger, self.sources, clock=clock, templates=templates, failpoint=self.failpoint,
                             progress=self.progress)
        recovered = self.ledger.recover(clock())
        if recovered:
            logger.warning("{} execution(s) were interrupted by a stop; they are due again now, with the same idempotency keys", recovered)
        self.ledger.wake_paused(clock())  # a restart is often the fix (a new password): probe paused work at once

    def close(self) -> None:
        for connector in self.connectors.values():
            try:
                connector.close()
            except Exception:  # closing is best effort; the ledger must still close
                logger.exception("closing a connector failed")
        self.ledger.close()

    def poll(self, name: str) -> PollResult:
        try:
            return self.poller.poll(name)
        finally:
            self.progress.done()

    def poll_all(self) -> list[PollResult]:
        return [self.poll(name) for name in self.config.sources if not self.stopping.is_set()]

    def drain(self) -> DrainResult:
        """Deliver everything due now; in-flight steps finish even when stopping."""
        result = DrainResult()
        size = self.config.agent.concurrency
        in_flight: dict[Future, Execution] = {}
        with ThreadPoolExecutor(max_workers=size, thread_name_prefix="deliver") as pool:
            batch: list[tuple[Execution, Finish]] = []
            while True:
                free = 0 if self.stopping.is_set() else size - len(in_flight)
                # the outcomes just in and the next claims commit together: one fsync, and the intent still precedes the send;
                # when a paused connector answered again, its waiting work becomes due in the same transaction
                wake = self.runner.take_resumed()
                claimed = self.ledger.finish_and_claim(batch, self.clock(), free, self.config.agent.lease, wake=wake)
                if claimed:
                    self.failpoint("after_claim")
                for ex in claimed:
                    in_flight[pool.submit(self._run, ex)] = ex
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                batch = [(in_flight.pop(f), f.result()) for f in done]
                for ex, finish in batch:
                    self._tally(result, ex, finish)
                self.progress(f"delivering: {result.sent} sent, {result.failed + result.dead} failed, {len(in_flight)} in flight")
        self.progress.done()
        if result.sent or result.failed or result.dead:
            logger.info("drain: {} sent, {} failed, {} dead, {} retrying, {} paused", result.sent, result.failed, result.dead, result.retrying, result.paused)
        return result

    def _run(self, ex: Execution) -> Finish:
        """One execution's run; a bug in a step fails that execution (re-queueable), never the agent."""
        try:
            return self.runner.run(ex)
        except Exception as error:
            logger.exception("execution {} ({}, record {}) hit an internal error", ex.id, ex.flow, ex.key)
            return Finish("failed", ex.step, ex.context, error=f"internal error: {type(error).__name__}: {error}")

    @staticmethod
    def _tally(result: DrainResult, ex: Execution, finish: Finish) -> None:
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

    def run_forever(self, idle: float = 5.0) -> None:
        """Poll at start and on each source's schedule; deliver continuously until ``stopping`` is set."""
        scheduler = schedule.Scheduler()
        for name, cfg in self.config.sources.items():
            job = scheduler.every().day.at(cfg.at, cfg.timezone) if cfg.at else scheduler.every(cfg.every).seconds
            job.do(self._scheduled_poll, name)
        scheduler.every(1).hours.do(self.prune)
        logger.info("agent running: {} source(s), {} flow(s), ledger {}", len(self.sources), len(self.config.flows), self.config.ledger_path)
        self._guarded(self.poll_all)
        while not self.stopping.is_set():
            self._guarded(scheduler.run_pending)
            if self._guarded(self.drain) is False:
                self.stopping.wait(LEDGER_RETRY)
                continue
            self.stopping.wait(self._sleep_for(scheduler, idle))
        logger.info("agent stopped")

    def _guarded(self, work: Callable[[], Any]) -> Any:
        """Run work; a ledger that cannot be written (disk full, locked) is survived: nothing is sent meanwhile."""
        try:
            if self._unsettled:
                self.ledger.recover(self.clock())  # steps whose outcome could not be recorded run again, same keys
                self._unsettled = False
            return work()
        except LedgerError as error:
            self._unsettled = True
            logger.error("the ledger cannot be written: {} — nothing is sent until it can; trying again in {:.0f}s", error, LEDGER_RETRY)
            return False

    def _scheduled_poll(self, name: str) -> None:
        if self.stopping.is_set():
            return
        try:
            self.poll(name)
        except LedgerError:
            raise  # the run loop survives it and says so
        except Exception:  # schedule lets a job's exception escape run_pending(); one bad poll must not stop the agent
            logger.exception("poll of {} failed unexpectedly", name)

    def _sleep_for(self, scheduler: schedule.Scheduler, idle: float) -> float:
        waits = [idle]
        if scheduler.idle_seconds is not None:
            waits.append(scheduler.idle_seconds)
        try:
            due = self.ledger.next_due()
        except sqlite3.Error:
            due = None
        if due is not None:
            waits.append(due - self.clock())
        return max(0.05, min(waits))

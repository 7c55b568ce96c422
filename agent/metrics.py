"""The agent's Prometheus metrics (prometheus-client), served at GET /metrics.

Counted as the agent works (its own registry, so several agents in one process
do not mix):

    sync_agent_polls_total{source,outcome}           outcome: ok | failed
    sync_agent_records_total{source,kind}            kind: new | duplicate | primed | quarantined
    sync_agent_attempts_total{flow,step,outcome}     outcome: succeeded | failed | retryable | paused | queued
    sync_agent_delivery_seconds{flow}                from an execution's claim to its outcome

Read from the ledger at scrape time (through the endpoint's own connection):

    sync_agent_executions{flow,status}
    sync_agent_last_success_timestamp_seconds{source}
    sync_agent_ledger_bytes                          the ledger file and its write-ahead log

Labels carry configured names only, never a URL or an error text.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from state.base import FLOW_STATUSES, Execution, Finish, Ledger

POLL_OUTCOMES = ("ok", "failed")
RECORD_KINDS = ("new", "duplicate", "primed", "quarantined")
DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, float("inf"))


class Metrics:
    """The agent's counters and the scrape that adds the ledger's gauges."""

    def __init__(self, sources: Iterable[str], clock: Callable[[], float] = time.monotonic):
        self.registry = CollectorRegistry()
        self.clock = clock
        self.polls = Counter("sync_agent_polls", "Polls of a source, by outcome.", ["source", "outcome"], registry=self.registry)
        self.records = Counter("sync_agent_records", "Records polls read, by what the ledger made of them.", ["source", "kind"],
                               registry=self.registry)
        self.attempts = Counter("sync_agent_attempts", "Attempts of an action step, by outcome.", ["flow", "step", "outcome"],
                                registry=self.registry)
        self.delivery = Histogram("sync_agent_delivery_seconds", "Seconds from an execution's claim to its outcome.", ["flow"],
                                  buckets=DELIVERY_BUCKETS, registry=self.registry)
        for source in sources:  # every series exists from the start: a rate over a counter that appears later misses its first count
            for outcome in POLL_OUTCOMES:
                self.polls.labels(source, outcome)
            for kind in RECORD_KINDS:
                self.records.labels(source, kind)
        self._claimed: dict[int, float] = {}
        self._lock = threading.Lock()

    def polled(self, result: Any) -> None:
        """Count one poll (a PollResult) and what it read."""
        self.polls.labels(result.source, "failed" if result.error else "ok").inc()
        for kind, count in (("new", result.new), ("duplicate", result.duplicates), ("primed", result.primed),
                            ("quarantined", result.quarantined)):
            if count:
                self.records.labels(result.source, kind).inc(count)

    def claimed(self, executions: Iterable[Execution]) -> None:
        """Note when these executions were claimed (their delivery time starts)."""
        now = self.clock()
        with self._lock:
            self._claimed.update((ex.id, now) for ex in executions)

    def unclaimed(self, executions: Iterable[Execution]) -> None:
        """Claimed, then given back unstarted (a stop, a poll due): no delivery time to observe."""
        with self._lock:
            for ex in executions:
                self._claimed.pop(ex.id, None)

    def finished(self, ex: Execution, finish: Finish) -> None:
        """Count an execution's attempt and observe its delivery time."""
        if finish.attempt:
            self.attempts.labels(ex.flow, str(finish.attempt.get("step", ex.step)), str(finish.attempt.get("outcome"))).inc()
        with self._lock:
            since = self._claimed.pop(ex.id, None)
        if since is not None:
            self.delivery.labels(ex.flow).observe(max(0.0, self.clock() - since))

    def watch(self, ledger: Ledger, config: Any, lock: threading.Lock) -> None:
        """Add the gauges read from ``ledger`` at scrape time (the endpoint's connection, used under ``lock``)."""
        self.registry.register(_LedgerGauges(ledger, config, lock))

    def scrape(self, accept: str | None) -> tuple[bytes, str]:
        """(body, content type) in the format the scraper asks for."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _LedgerGauges:
    """A collector reading executions by status, last good polls and the ledger's size at each scrape."""

    def __init__(self, ledger: Ledger, config: Any, lock: threading.Lock):
        self.ledger, self.config, self.lock = ledger, config, lock

    def collect(self):
        with self.lock:
            counts = self.ledger.counts()
            cursors = {name: self.ledger.cursor(name) for name in self.config.sources}
        executions = GaugeMetricFamily("sync_agent_executions", "Executions in the ledger, by flow and status.", labels=["flow", "status"])
        flows = [flow.name for flow in self.config.flows] + sorted(set(counts) - {flow.name for flow in self.config.flows})
        for flow in flows:
            for status in FLOW_STATUSES:  # quarantined records have no flow: sync_agent_records_total counts them
                executions.add_metric([flow, status], counts.get(flow, {}).get(status, 0))
        yield executions
        last = GaugeMetricFamily("sync_agent_last_success_timestamp_seconds", "When a source's last good scheduled poll ended (epoch seconds).",
                                 labels=["source"])
        for name, row in cursors.items():
            if row and row.get("last_success") is not None:
                last.add_metric([name], row["last_success"])
        yield last
        yield GaugeMetricFamily("sync_agent_ledger_bytes", "Bytes of the ledger file and its write-ahead log.", value=self.ledger.size() or 0)

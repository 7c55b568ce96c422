"""What the agent needs of a ledger: the operations, the shared types and the errors.

Two siblings implement it: ``state/sqlite.py`` (the embedded default, one agent
per file) and ``state/postgres.py`` (several agents on several machines sharing
one database). ``state.open_ledger`` picks one by the ``[agent] ledger`` value.
One contract suite (``tests/test_ledger_contract.py``) runs against both.

Leases carry an epoch (a fencing token). A source is polled by the one agent
holding its lease; every write for it (admit, quarantine, poll, cursor) first
checks that the lease is still this agent's, with the epoch it took. A claim of
an execution bumps its epoch; its outcome and lease renewals are written
``WHERE id = … AND epoch = …``, so an agent that froze past its lease cannot
commit stale work: the write is rejected, logged and counted (``fenced``).

Errors, named by what the caller does next::

    LedgerError              base; the ledger cannot be used (exit status 3)
    ├── LedgerBusy           another agent holds it: stop, try later
    ├── LedgerDamaged        quick_check failed: stop; restore or inspect, never recreate
    └── LedgerUnwritable     cannot create, open or write it (permissions, full disk, database down)
    LeaseLost                another agent holds the source now: end this poll, write nothing more for it

Execution statuses::

    pending ─► running ─► succeeded | filtered | failed | dead
                  │  ▲
                  ▼  │
           retrying / paused          superseded (retired before it started)

Times are epoch seconds (floats) given by the caller: the ledger never reads
the wall clock itself (local lease deadlines use the monotonic clock).
"""
from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Callable, Iterable, Protocol


class LedgerError(Exception):
    """The ledger cannot be used."""


class LedgerBusy(LedgerError):
    """Another agent process holds the ledger."""


class LedgerDamaged(LedgerError):
    """The ledger file failed its integrity check."""


class LedgerUnwritable(LedgerError):
    """The ledger cannot be created, opened or written."""


class LeaseLost(Exception):
    """This agent no longer holds the source's lease: another agent polls it now."""


class Status(StrEnum):
    """An execution's status (a str: it compares equal to its name and is stored as it)."""

    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FILTERED = "filtered"
    SUPERSEDED = "superseded"
    FAILED = "failed"
    DEAD = "dead"


WAITING = (Status.PENDING, Status.RETRYING, Status.PAUSED)
ACTIVE = WAITING + (Status.RUNNING,)
FINISHED = (Status.SUCCEEDED, Status.FILTERED, Status.SUPERSEDED)
STOPPED = (Status.FAILED, Status.DEAD)  # needs an operator: `retry` brings them back
MOVABLE = WAITING + STOPPED  # work that may move to another config version
FLOW_STATUSES = tuple(Status)  # as listings show them
STATUSES = FLOW_STATUSES + ("quarantined",)  # what `executions --status` takes (quarantined: records, not executions)

TOUCH_EVERY = 3600.0  # a re-shown key's last_seen is refreshed at most this often (a write per page, not per poll)
SCHEMA_VERSION = 9
# One list of schema versions for both backends; each backend brings its ledger from any of them to the last.
SCHEMA_VERSIONS = {
    1: "records, executions, attempts, cursors, polls, quarantine, meta",
    2: "version order (executions.version_at), records.last_seen, cursors.prime_started",
    3: "config versions, executions.version, cursors.identity",
    4: "executions (flow, status) index",
    5: "fenced leases: executions.epoch and owner, source_leases, agents",
    6: "claim indexes: unfinished work by (next_at, id) and by (flow, entity)",
    7: "compact seen records: records.hash as HASH_BYTES raw bytes; records.id and last_seen kept only where they differ",
    8: "running work by the end of its lease: an agent wakes when another agent's lease on work runs out",
    9: "no standing index of seen records by content hash: re-keying builds it for its poll (it cost most of an admission)",
}
# A seen record's content hash as the ledger keeps it: the first 128 bits of the SHA-256 of its canonical JSON
# (raw bytes; shown as hex). Seen records stay for as long as their view can show them, so their rows are most of a
# ledger: 16 bytes instead of 64 hex digits, in the row and in the (source, hash) index that re-keying reads.
HASH_BYTES = 16


@dataclass
class Admission:
    """One good record of a page, identified by the agent."""

    key: str
    id: str
    version: str
    hash: bytes  # the content hash, HASH_BYTES long (re-keying recognises a version by it)
    entity: str
    context: dict  # what the flow starts from: {"record": ..., "cursor": ...}
    version_at: float | None = None  # the version's `updated` as a number (None: order by arrival)
    prime: bool = False  # mark seen without scheduling (the source's first run, `first_run = "skip"`)
    rekeyed: bool = False  # known under the source's previous identity: mark seen under the new key, schedule nothing


@dataclass
class Admitted:
    new: int = 0
    primed: int = 0
    duplicates: int = 0
    superseded: int = 0
    rekeyed: int = 0
    scheduled: list[str] = field(default_factory=list)  # the keys executions were created for, in page order


@dataclass
class Execution:
    id: int
    flow: str
    source: str
    key: str
    entity: str
    step: int
    attempts: int
    first_attempt: float | None
    context: dict
    replay: int = 0
    single: bool = False
    version: int | None = None  # the config version it was admitted under (its flow definition)
    epoch: int = 0  # the claim's fencing token: every write for this run names it
    lease_deadline: float = float("inf")  # monotonic time the lease runs out locally (renewals push it on)


@dataclass
class Finish:
    """What one claimed execution's run came to; written in one transaction."""

    status: str  # pending (more steps) | succeeded | filtered | retrying | paused | failed | dead
    step: int
    context: dict
    next_at: float | None = None
    error: str | None = None
    attempt: dict | None = None  # step, started, finished, outcome, status_code, error
    spawn: list[dict] = field(default_factory=list)  # single-step executions for wait_for_response = false
    chain: list[dict] = field(default_factory=list)  # {"flow", "context"}: flows chained after a success, started with it


@dataclass
class Renewed:
    """What a heartbeat came to: the sources and running executions whose leases this agent lost."""

    lost_sources: list[str] = field(default_factory=list)
    lost_executions: list[int] = field(default_factory=list)


def new_worker_id() -> str:
    """An id never used before by any agent: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Ledger(Protocol):
    """The operations the agent and the operator commands use. Every write is one transaction."""

    worker: str  # this agent's id (leases and claims name it)
    fenced: int  # writes rejected because a lease had passed to another agent
    location: str  # the ledger as the operator wrote it (a path, or a URL without its password)

    def close(self) -> None: ...

    # -- leases and agents
    def take_source(self, source: str, now: float, lease: float) -> bool:
        """Hold (or keep holding) the source's lease; False while another agent holds it."""
    def release(self, now: float) -> None:
        """A clean stop: give up every lease held, so other agents take over at once."""
    def heartbeat(self, now: float, lease: float, running: list[Execution]) -> Renewed:
        """Renew this agent's row, its source leases and the leases of its running executions."""
    def agents(self, now: float) -> list[dict]:
        """Every agent seen recently: id, host, pid, started, heartbeat, sources held, executions running."""

    # -- admission
    def admit(self, source: str, items: list[Admission], flows: list[tuple[str, bool]], now: float, *,
              shown: dict[str, float] | None = None, version: int | None = None) -> Admitted: ...
    def seen(self, source: str, keys: set[str]) -> dict[str, float]: ...
    def known_content(self, source: str, hashes: set[bytes]) -> set[bytes]:
        """The content hashes of ``hashes`` the ledger holds for this source (under any key)."""
    def content_index(self, build: bool) -> None:
        """Build (or drop) the index of seen records by content hash that ``known_content`` reads. Only a re-key poll
        reads it, and kept standing it would cost every admission most of its time (random keys: a write to a page of
        it per record), so a re-key poll builds it first and drops it once it succeeded."""
    def quarantine(self, source: str, hash: str, reason: str, page: str, excerpt: str, now: float) -> bool: ...

    # -- polls and cursors
    def cursor(self, source: str) -> dict | None: ...
    def start_poll(self, source: str, now: float) -> int: ...
    def end_poll(self, poll: int, source: str, now: float, *, pages: int, fetched: int, new: int, primed: int,
                 quarantined: int, error: str | None, cursor: str | None, identity: str | None = None) -> None: ...
    def new_view(self, source: str) -> None: ...
    def start_priming(self, source: str, now: float) -> float: ...

    # -- delivery
    def recover(self, now: float) -> int: ...
    def claim(self, now: float, limit: int, lease: float) -> list[Execution]: ...
    def finish_and_claim(self, done: list[tuple[Execution, Finish]], now: float, limit: int, lease: float,
                         *, wake: bool = False) -> list[Execution]: ...
    def finish(self, execution: Execution, result: Finish, now: float) -> None: ...
    def finish_many(self, done: list[tuple[Execution, Finish]], now: float) -> None: ...
    def wake_paused(self, now: float) -> int: ...
    def next_due(self, after: float | None = None) -> float | None: ...

    # -- config versions
    def use_config(self, hash: str, text: str, sections: dict, flows: dict, now: float) -> int: ...
    def config_versions(self) -> list[dict]: ...
    def config_version(self, number: int) -> dict | None: ...
    def waiting_work(self, ids: list[int] | None = None, flow: str | None = None) -> list[dict]: ...
    def move_to_version(self, moves: list[tuple[int, int, int, dict]], now: float) -> int: ...

    # -- operator views and actions
    def executions(self, *, status: str | None = None, flow: str | None = None, limit: int = 1000,
                   ids: list[int] | None = None) -> list[dict]: ...
    def execution_list(self, *, status: str | None = None, flow: str | None = None, key: str | None = None,
                       entity: str | None = None, since: float | None = None, limit: int = 200) -> list[dict]: ...
    def attempts_of(self, execution: int) -> list[dict]: ...
    def executions_of(self, source: str, key: str) -> list[dict]: ...
    def quarantined(self, source: str | None = None) -> list[dict]: ...
    def fail_by_hand(self, ids: list[int], now: float, why: str) -> list[int]: ...
    def requeue(self, ids: list[int] | None, now: float, *, dead: bool = False) -> list[int]: ...
    def requeue_matching(self, statuses: tuple[str, ...], now: float, *, flow: str | None = None,
                         since: float | None = None) -> list[int]: ...
    def replayable(self, flow: str, since: float | None = None, entity: str | None = None) -> list[int]: ...
    def replay(self, ids: list[int], now: float, version: int | None = None) -> int: ...
    def pause_reasons(self) -> dict[str, str]: ...
    def counts(self) -> dict[str, dict[str, int]]: ...
    def sources(self) -> dict[str, dict]: ...
    def prune(self, before: float, windows: dict[str, float], now: float) -> dict[str, int]: ...
    def set_unreachable(self, connector: str, since: float | None, why: str | None = None) -> None: ...
    def unreachable(self) -> dict[str, tuple[float, str]]: ...
    def count_paused(self, reason: str) -> int: ...
    def record(self, source: str, key: str) -> dict | None:
        """A seen record: source, key, id, version, hash (hex), first_seen, last_seen; None when not (or no longer) seen."""
    def keys_of_id(self, id: str, limit: int = 20) -> list[tuple[str, str]]: ...
    def poll_at(self, source: str, when: float) -> dict | None: ...
    def size(self) -> int | None:
        """Bytes the ledger takes (file and write-ahead log; the database's size), None when unknown."""


def to_json(value: Any) -> str:
    """A JSON value as the ledger stores it: ASCII escapes keep a lone surrogate ("\\ud800") from breaking an insert."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"), default=str)


def masked(value: Any, mask: Callable[[str], str]) -> Any:
    """A JSON-like value with every string in it (keys too) passed through ``mask``: the same shape, still JSON.

    Iterative: a value nested as deep as JSON can be read costs no recursion."""
    root: list = [None]
    todo = [(value, root, 0)]
    while todo:
        item, parent, slot = todo.pop()
        if isinstance(item, str):
            parent[slot] = mask(item)
        elif isinstance(item, dict):
            parent[slot] = copy = {}
            for k, v in item.items():
                key = mask(k) if isinstance(k, str) else k
                copy[key] = None  # the keys keep their order; values are filled in later
                todo.append((v, copy, key))
        elif isinstance(item, (list, tuple)):
            parent[slot] = copy = [None] * len(item)
            todo.extend((v, copy, i) for i, v in enumerate(item))
        else:
            parent[slot] = item
    return root[0]


def chunks(values: Iterable[Any], size: int = 500):
    """Pieces of at most ``size`` values, for `IN (…)` lists (SQLite caps the parameters of one statement)."""
    ordered = list(values)
    for start in range(0, len(ordered), size):
        yield ordered[start:start + size]

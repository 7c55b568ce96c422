"""The ledger contract: one suite, run against SQLite and PostgreSQL (the ``ledger_factory`` parameter).

What every backend must do the same way: admission, per-entity order, exclusive
claims, fenced writes after a lease passed on, takeover of expired work, source
leases, heartbeats, cursors, and the operator queries' shapes. Another agent is
played, where a backend holds one agent only (SQLite), by writing its rows by hand.
The tests at the end need two agents on one database and run on PostgreSQL only.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sqlite3
import threading
import time
from contextlib import closing
from typing import Any, Callable

import psycopg
import pytest

from state.base import HASH_BYTES, TOUCH_EVERY, Admission, Execution, Finish, LeaseLost, Renewed

NOW = 1_800_000_000.0
LEASE = 30.0
OTHER = "elsewhere:1:0000"  # a worker id that is not this ledger's


class Store:
    """One backend's store: ledgers opened on it, and its tables reached directly (to play another agent)."""

    def __init__(self, kind: str, opener: Callable[[], Any], connect: Callable[[], Any]):
        self.kind = kind
        self._opener = opener
        self._connect = connect
        self.opened: list[Any] = []

    def open(self):
        ledger = self._opener()
        self.opened.append(ledger)
        return ledger

    def sql(self, statement: str, *params: Any) -> list[tuple]:
        """One statement in its own committed transaction (``?`` marks parameters on both backends)."""
        if self.kind == "postgresql":
            statement = statement.replace("?", "%s")
        with closing(self._connect()) as conn:
            cursor = conn.execute(statement, params)
            rows = cursor.fetchall() if cursor.description else []
            conn.commit()
            return rows

    def close(self) -> None:
        for ledger in self.opened:
            ledger.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_factory(request, tmp_path):
    """Opens ledgers on one fresh store of the backend under test; closes them after."""
    if request.param == "sqlite":
        from state.sqlite import SqliteLedger

        path = tmp_path / "l.db"
        store = Store("sqlite", lambda: SqliteLedger(path), lambda: sqlite3.connect(path))
    else:
        url = request.getfixturevalue("pg_url")
        store = pg_store(url)
    yield store
    store.close()


def pg_store(url: str) -> Store:
    from state.postgres import PostgresLedger

    return Store("postgresql", lambda: PostgresLedger(url), lambda: psycopg.connect(url))


@pytest.fixture
def ledger(ledger_factory):
    return ledger_factory.open()


def item(key: str, entity: str | None = None, at: float | None = None) -> Admission:
    return Admission(key=key, id=key, version="", hash=b"h" + key.encode(), entity=entity or key,
                     context={"record": {"id": key}}, version_at=at)


def done(ex: Execution, at: float = NOW, status: str = "succeeded") -> Finish:
    attempt = {"step": ex.step, "started": at, "finished": at, "outcome": status, "status_code": 200, "error": None}
    return Finish(status, ex.step + 1, {**ex.context, "steps": {str(ex.step): {"ok": True}}}, attempt=attempt)


def row_of(store: Store, ex_id: int) -> dict:
    [(status, epoch, owner, attempts, lease_until)] = store.sql(
        "SELECT status, epoch, owner, attempts, lease_until FROM executions WHERE id = ?", ex_id)
    return {"status": status, "epoch": epoch, "owner": owner, "attempts": attempts, "lease_until": lease_until}


def another_agent_takes(store: Store, source: str) -> None:
    """What a second agent's take_source writes, played by hand."""
    store.sql("UPDATE source_leases SET owner = ?, epoch = epoch + 1, lease_until = ? WHERE source = ?", OTHER, NOW + 1000, source)


# -- admission and order --------------------------------------------------------------------------
def test_admit_is_idempotent_one_execution_per_flow(ledger):
    page = [item("1"), item("2"), item("1")]
    first = ledger.admit("s", page, [("a", False), ("b", False)], NOW)
    again = ledger.admit("s", page, [("a", False), ("b", False)], NOW + 1)
    assert (first.new, first.duplicates) == (2, 1)
    assert (again.new, again.duplicates) == (0, 3)
    assert ledger.counts() == {"a": {"pending": 2}, "b": {"pending": 2}}
    assert ledger.seen("s", {"1", "2", "3"}).keys() == {"1", "2"}
    assert ledger.known_content("s", {b"h1", b"h9"}) == {b"h1"}


def test_a_seen_record_is_kept_compact_and_read_back_whole(ledger_factory, ledger):
    """The hash as 16 raw bytes (shown as hex); the id only where it is not the key; last_seen only once a later poll moved it."""
    digest = bytes(range(HASH_BYTES))
    by_id = Admission(key="S1", id="S1", version="2026-01-01T00:00:00Z", hash=digest, entity="R1", context={"record": {}})
    by_version = Admission(key="S1@v2", id="S1", version="v2", hash=digest[::-1], entity="R1", context={"record": {}})
    ledger.admit("s", [by_id, by_version], [], NOW)
    assert sorted((key, id, bytes(hash), last_seen) for key, id, hash, last_seen in ledger_factory.sql(
        "SELECT key, id, hash, last_seen FROM records")) == [("S1", None, digest, None), ("S1@v2", "S1", digest[::-1], None)]
    assert ledger.record("s", "S1") == {"source": "s", "key": "S1", "id": "S1", "version": "2026-01-01T00:00:00Z",
                                        "hash": digest.hex(), "first_seen": NOW, "last_seen": NOW}
    assert sorted(ledger.keys_of_id("S1")) == [("s", "S1"), ("s", "S1@v2")]  # the id read back where only the key holds it
    assert ledger.known_content("s", {digest, digest[::-1], bytes(HASH_BYTES)}) == {digest, digest[::-1]}
    later = NOW + TOUCH_EVERY + 1
    ledger.admit("s", [], [], later, shown=ledger.seen("s", {"S1"}))
    assert ledger.seen("s", {"S1", "S1@v2"}) == {"S1": later, "S1@v2": NOW}
    assert ledger.record("s", "S1")["last_seen"] == later


def content_indexes(store: Store) -> list[str]:
    if store.kind == "sqlite":
        return [r[0] for r in store.sql("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'records' AND sql LIKE '%hash%'")]
    return [r[0] for r in store.sql("SELECT indexname FROM pg_indexes WHERE tablename = 'records' AND indexdef LIKE '%%hash%%'")]


def test_seen_records_are_indexed_by_content_only_while_a_re_key_poll_asks(ledger_factory, ledger):
    """An admission writes a seen record's key index alone: the content hash (random) is indexed only for re-keying."""
    ledger.admit("s", [item("1"), item("2")], [], NOW)
    assert content_indexes(ledger_factory) == []
    assert ledger.known_content("s", {b"h1", b"h9"}) == {b"h1"}  # found without it, only slower
    ledger.content_index(True)
    ledger.content_index(True)  # a re-key poll that failed and runs again
    assert len(content_indexes(ledger_factory)) == 1
    ledger.admit("s", [item("3")], [], NOW)
    assert ledger.known_content("s", {b"h1", b"h3", b"h9"}) == {b"h1", b"h3"}
    ledger.content_index(False)
    assert content_indexes(ledger_factory) == []


def test_priming_marks_seen_without_work(ledger):
    primed = item("p")
    primed.prime = True
    result = ledger.admit("s", [primed, item("n")], [("f", False)], NOW)
    assert (result.new, result.primed) == (1, 1)
    assert [r["key"] for r in ledger.executions()] == ["n"]


def test_a_newer_version_supersedes_waiting_older_ones(ledger):
    ledger.admit("s", [item("v1", "E", at=100.0)], [("f", True)], NOW)
    ledger.admit("s", [item("v2", "E", at=200.0)], [("f", True)], NOW)
    result = ledger.admit("s", [item("v3", "E", at=300.0)], [("f", True)], NOW)
    assert result.superseded == 1  # v1 went with v2's admission
    assert {r["key"]: r["status"] for r in ledger.executions()} == {"v1": "superseded", "v2": "superseded", "v3": "pending"}


def test_an_older_version_admitted_late_does_not_supersede_a_newer_one(ledger):
    ledger.admit("s", [item("new", "E", at=200.0)], [("f", True)], NOW)
    assert ledger.admit("s", [item("old", "E", at=100.0)], [("f", True)], NOW).superseded == 1
    assert {r["key"]: r["status"] for r in ledger.executions()} == {"new": "pending", "old": "superseded"}


def test_versions_of_one_entity_are_claimed_in_version_order_one_at_a_time(ledger):
    ledger.admit("s", [item("late", "E", at=300.0), item("x", "X")], [("f", False)], NOW)
    ledger.admit("s", [item("early", "E", at=100.0), item("mid", "E", at=200.0)], [("f", False)], NOW)
    order = []
    for tick in range(4):
        claimed = ledger.claim(NOW + tick, 10, LEASE)
        order.append(sorted(ex.key for ex in claimed))
        ledger.finish_many([(ex, done(ex)) for ex in claimed], NOW + tick)
    assert order == [["early", "x"], ["mid"], ["late"], []]


def test_a_retrying_version_holds_back_the_later_ones(ledger):
    ledger.admit("s", [item("v1", "E", at=1.0), item("v2", "E", at=2.0)], [("f", False)], NOW)
    [v1] = ledger.claim(NOW, 10, LEASE)
    ledger.finish(v1, Finish("retrying", 0, v1.context, next_at=NOW + 60, error="503"), NOW)
    assert ledger.claim(NOW + 1, 10, LEASE) == []
    [again] = ledger.claim(NOW + 60, 10, LEASE)
    assert (again.key, again.attempts) == ("v1", 2)


# -- claims and fences ----------------------------------------------------------------------------
def test_a_claim_holds_a_lease_names_its_owner_and_bumps_the_epoch(ledger_factory, ledger):
    ledger.admit("s", [item("1"), item("2"), item("3")], [("f", False)], NOW)
    before = time.monotonic()
    claimed = ledger.claim(NOW, 2, LEASE)
    assert [ex.key for ex in claimed] == ["1", "2"]
    ex = claimed[0]
    assert (ex.attempts, ex.first_attempt, ex.epoch) == (1, NOW, 1)
    assert before + LEASE <= ex.lease_deadline <= time.monotonic() + LEASE
    assert row_of(ledger_factory, ex.id) == {"status": "running", "epoch": 1, "owner": ledger.worker, "attempts": 1, "lease_until": NOW + LEASE}


def test_two_claims_never_return_the_same_execution(ledger):
    ledger.admit("s", [item(str(n)) for n in range(10)], [("f", False)], NOW)
    first = {ex.id for ex in ledger.claim(NOW, 6, LEASE)}
    second = {ex.id for ex in ledger.claim(NOW, 6, LEASE)}
    assert len(first) == 6 and len(second) == 4 and not first & second
    assert ledger.claim(NOW, 6, LEASE) == []


def test_a_stale_epoch_finish_is_rejected_and_counted(ledger_factory, ledger, caplog):
    ledger.admit("s", [item("1")], [("f", False)], NOW)
    [ex] = ledger.claim(NOW, 1, LEASE)
    before = row_of(ledger_factory, ex.id)
    stale = dataclasses.replace(ex, epoch=ex.epoch - 1)
    ledger.finish(stale, done(stale), NOW + 1)
    assert row_of(ledger_factory, ex.id) == before
    assert ledger.attempts_of(ex.id) == []
    assert ledger.fenced == 1
    assert "lease passed to another agent" in caplog.text
    ledger.finish(ex, done(ex), NOW + 2)  # the holder of the current epoch still finishes it
    assert row_of(ledger_factory, ex.id)["status"] == "succeeded"
    assert len(ledger.attempts_of(ex.id)) == 1 and ledger.fenced == 1


def test_a_rejected_finish_spawns_nothing(ledger):
    ledger.admit("s", [item("1")], [("f", False)], NOW)
    [ex] = ledger.claim(NOW, 1, LEASE)
    stale = dataclasses.replace(ex, epoch=ex.epoch - 1)
    result = done(stale)
    result.spawn = [{"step": 1, "context": {"spawned": True}}]
    ledger.finish(stale, result, NOW + 1)
    assert [r["id"] for r in ledger.executions()] == [ex.id]


def test_expired_work_of_another_agent_is_taken_over_and_the_old_finish_rejected(ledger_factory, ledger):
    store = ledger_factory
    ledger.admit("s", [item("v1", "E", at=1.0), item("v2", "E", at=2.0)], [("f", False)], NOW)
    [old] = ledger.claim(NOW, 10, LEASE)
    assert ledger.claim(NOW + LEASE + 1, 10, LEASE) == []  # its own expired work is not taken by itself
    taker = store.open() if store.kind == "postgresql" else ledger
    if taker is ledger:  # one agent per SQLite file: the holder is played by another worker id
        store.sql("UPDATE executions SET owner = ? WHERE id = ?", OTHER, old.id)
    assert taker.claim(NOW + LEASE - 1, 10, LEASE) == []  # not expired yet
    [new] = taker.claim(NOW + LEASE + 1, 10, LEASE)  # v1 again: the expired row still holds v2 back
    assert (new.id, new.key, new.epoch, new.attempts) == (old.id, "v1", old.epoch + 1, 2)
    assert row_of(store, old.id) == {"status": "running", "epoch": old.epoch + 1, "owner": taker.worker, "attempts": 2,
                                     "lease_until": NOW + 2 * LEASE + 1}
    [interrupted] = taker.attempts_of(old.id)
    assert (interrupted["outcome"], interrupted["n"], interrupted["started"]) == ("interrupted", 1, NOW + LEASE + 1)
    fenced = ledger.fenced
    ledger.finish(old, done(old), NOW + LEASE + 2)  # the first holder comes back too late
    assert row_of(store, old.id)["status"] == "running"
    assert ledger.fenced == fenced + 1
    taker.finish(new, done(new), NOW + LEASE + 3)
    assert row_of(store, old.id)["status"] == "succeeded"
    assert [a["outcome"] for a in taker.attempts_of(old.id)] == ["interrupted", "succeeded"]


def test_next_due_names_the_moment_another_agents_lease_on_running_work_runs_out(ledger_factory, ledger):
    """An agent with nothing else due must wake when a lapsed lease makes work claimable, not at its next poll."""
    ledger.admit("s", [item("1"), item("2"), item("3")], [("f", False)], NOW)
    [held] = ledger.claim(NOW, 1, LEASE)
    ledger_factory.sql("UPDATE executions SET owner = ?, lease_until = ? WHERE id = ?", OTHER, NOW + 20, held.id)
    ledger.claim(NOW, 10, LEASE)  # this agent's own running work: its lease is renewed by itself, never waited for
    assert ledger.next_due(after=NOW) == NOW + 20
    assert ledger.next_due(after=NOW + 20) is None  # lapsed already: the claim at that moment took it or will
    assert ledger.claim(NOW + 21, 10, LEASE)[0].id == held.id


def test_expired_work_is_taken_over_even_when_an_earlier_version_was_admitted_while_it_ran(ledger_factory, ledger):
    """v2 is running on an agent that froze; v1 (an earlier version) arrives meanwhile. v1 waits for v2 (running), so
    v2 must not wait for v1: it is taken over once its lease runs out, then v1 goes. Waiting both ways held both for good."""
    store = ledger_factory
    ledger.admit("s", [item("v2", "E", at=2.0)], [("f", False)], NOW)
    [v2] = ledger.claim(NOW, 10, LEASE)
    store.sql("UPDATE executions SET owner = ? WHERE id = ?", OTHER, v2.id)  # another agent's claim, played
    ledger.admit("s", [item("v1", "E", at=1.0)], [("f", False)], NOW + 1)
    assert ledger.claim(NOW + 2, 10, LEASE) == []  # v2 runs: nothing of E goes beside it
    [again] = ledger.claim(NOW + LEASE + 1, 10, LEASE)
    assert (again.id, again.key) == (v2.id, "v2")
    ledger.finish(again, done(again), NOW + LEASE + 2)
    assert [ex.key for ex in ledger.claim(NOW + LEASE + 3, 10, LEASE)] == ["v1"]


def test_recover_makes_this_agents_running_work_due_at_once(ledger):
    ledger.admit("s", [item("1"), item("2")], [("f", False)], NOW)
    [ex] = ledger.claim(NOW, 1, LEASE)
    assert ledger.recover(NOW + 5) == 1
    [row] = [r for r in ledger.executions() if r["id"] == ex.id]
    assert (row["status"], row["next_at"]) == ("retrying", NOW + 5)
    assert [a["outcome"] for a in ledger.attempts_of(ex.id)] == ["interrupted"]
    assert ex.id in [again.id for again in ledger.claim(NOW + 5, 10, LEASE)]


# -- source leases --------------------------------------------------------------------------------
def test_take_source_holds_renews_and_takes_over_what_was_left(ledger_factory, ledger):
    store = ledger_factory
    assert ledger.take_source("s", NOW, LEASE) is True
    assert store.sql("SELECT owner, epoch, lease_until FROM source_leases WHERE source = 's'") == [(ledger.worker, 1, NOW + LEASE)]
    assert ledger.take_source("s", NOW + 10, LEASE) is True  # its own: renewed, same epoch
    assert store.sql("SELECT owner, epoch, lease_until FROM source_leases WHERE source = 's'") == [(ledger.worker, 1, NOW + 10 + LEASE)]
    store.sql("UPDATE source_leases SET owner = ?, lease_until = ? WHERE source = 's'", OTHER, NOW + 20)  # another's, now expired
    assert ledger.take_source("s", NOW + 21, LEASE) is True
    assert store.sql("SELECT owner, epoch FROM source_leases WHERE source = 's'") == [(ledger.worker, 2)]


def test_writes_for_a_source_whose_lease_passed_on_are_refused(ledger_factory, ledger):
    store = ledger_factory
    for source in ("s1", "s2", "s3"):
        assert ledger.take_source(source, NOW, LEASE)
    poll = ledger.start_poll("s2", NOW)
    ledger.end_poll(poll, "s2", NOW, pages=1, fetched=1, new=0, primed=0, quarantined=0, error=None, cursor="c1")
    poll = ledger.start_poll("s2", NOW + 1)
    for source in ("s1", "s2", "s3"):
        another_agent_takes(store, source)
    with pytest.raises(LeaseLost):
        ledger.admit("s1", [item("1")], [("f", False)], NOW + 2)
    with pytest.raises(LeaseLost):
        ledger.end_poll(poll, "s2", NOW + 2, pages=1, fetched=1, new=0, primed=0, quarantined=0, error=None, cursor="c2")
    with pytest.raises(LeaseLost):
        ledger.quarantine("s3", "h", "no id", "page 1", "{}", NOW + 2)
    assert ledger.fenced == 3
    assert ledger.counts() == {} and ledger.seen("s1", {"1"}) == {}
    assert ledger.cursor("s2")["value"] == "c1"
    assert ledger.quarantined() == []
    with pytest.raises(LeaseLost):  # a lost source stays refused, not written unfenced, until it is taken again
        ledger.admit("s1", [item("1")], [("f", False)], NOW + 3)
    store.sql("UPDATE source_leases SET lease_until = ? WHERE source = 's1'", NOW + 3)  # the other agent's lease runs out
    assert ledger.take_source("s1", NOW + 4, LEASE)
    assert ledger.admit("s1", [item("1")], [("f", False)], NOW + 4).new == 1


def test_a_source_is_dropped_when_its_local_lease_deadline_passes(ledger_factory, ledger):
    assert ledger.take_source("s", NOW, 0.002)
    time.sleep(0.004)  # the monotonic clock passes the lease; the ledger's row still names this agent
    with pytest.raises(LeaseLost):
        ledger.admit("s", [item("1")], [("f", False)], NOW)
    assert ledger.fenced == 1 and ledger.counts() == {}


def test_writes_for_a_source_not_held_are_not_fenced(ledger):
    ledger.admit("s", [item("1")], [("f", False)], NOW)  # operator commands and one-off polls hold no lease
    poll = ledger.start_poll("s", NOW)
    ledger.end_poll(poll, "s", NOW, pages=1, fetched=1, new=1, primed=0, quarantined=0, error=None, cursor="c")
    assert ledger.cursor("s")["value"] == "c" and ledger.fenced == 0


def test_heartbeat_renews_sources_and_running_work(ledger_factory, ledger):
    store = ledger_factory
    ledger.admit("s", [item("1")], [("f", False)], NOW)
    ledger.take_source("s", NOW, LEASE)
    [ex] = ledger.claim(NOW, 1, LEASE)
    before = time.monotonic()
    assert ledger.heartbeat(NOW + 20, LEASE, [ex]) == Renewed([], [])
    assert ex.lease_deadline >= before + LEASE
    assert store.sql("SELECT lease_until FROM source_leases WHERE source = 's'") == [(NOW + 20 + LEASE,)]
    assert row_of(store, ex.id)["lease_until"] == NOW + 20 + LEASE
    store.sql("UPDATE executions SET owner = ? WHERE id = ?", OTHER, ex.id)  # as another agent would see it
    assert ledger.claim(NOW + LEASE + 1, 1, LEASE) == []  # renewed: not expired at the first deadline
    assert [taken.id for taken in ledger.claim(NOW + 20 + LEASE + 1, 1, LEASE)] == [ex.id]


def test_heartbeat_reports_the_sources_and_executions_lost(ledger_factory, ledger):
    store = ledger_factory
    ledger.admit("s", [item("1"), item("2")], [("f", False)], NOW)
    ledger.take_source("s", NOW, LEASE)
    ledger.take_source("t", NOW, LEASE)
    kept, lost = ledger.claim(NOW, 2, LEASE)
    another_agent_takes(store, "s")
    store.sql("UPDATE executions SET owner = ?, epoch = epoch + 1 WHERE id = ?", OTHER, lost.id)
    renewed = ledger.heartbeat(NOW + 10, LEASE, [kept, lost])
    assert renewed == Renewed(lost_sources=["s"], lost_executions=[lost.id])
    assert ledger.fenced == 2  # each renewal refused counts
    assert row_of(store, lost.id)["lease_until"] == NOW + LEASE  # the other agent's lease is left alone
    assert row_of(store, kept.id)["lease_until"] == NOW + 10 + LEASE
    assert ledger.heartbeat(NOW + 20, LEASE, [kept]) == Renewed([], [])  # a lost source is not held any more
    with pytest.raises(LeaseLost):  # and nothing more is written for it
        ledger.admit("s", [item("3")], [("f", False)], NOW + 20)
    assert ledger.seen("s", {"3"}) == {}


def test_release_gives_up_every_lease_and_marks_the_agent_stopped(ledger_factory, ledger):
    store = ledger_factory
    ledger.heartbeat(NOW, LEASE, [])
    ledger.take_source("s", NOW, LEASE)
    ledger.release(NOW + 1)
    assert store.sql("SELECT owner, lease_until FROM source_leases") == [(None, None)]
    [me] = ledger.agents(NOW + 2)
    assert (me["id"], me["stopped"], me["sources"]) == (ledger.worker, NOW + 1, [])


def test_agents_lists_each_agent_with_its_sources_and_running_work(ledger_factory, ledger):
    store = ledger_factory
    ledger.heartbeat(NOW, LEASE, [])
    ledger.admit("s", [item("1"), item("2")], [("f", False)], NOW)
    for source in ("zeta", "alpha"):
        ledger.take_source(source, NOW, LEASE)
    store.sql("INSERT INTO source_leases (source, owner, epoch, lease_until) VALUES ('old', ?, 1, ?)", ledger.worker, NOW - 1)
    running = ledger.claim(NOW, 1, LEASE)
    ledger.heartbeat(NOW + 10, LEASE, running)
    store.sql("INSERT INTO agents (id, host, pid, started, heartbeat, stopped) VALUES (?, 'h2', 7, ?, ?, ?)",
              "recent", NOW - 500, NOW - 400, NOW - 300)
    store.sql("INSERT INTO agents (id, host, pid, started, heartbeat, stopped) VALUES (?, 'h3', 8, ?, ?, ?)",
              "long-gone", NOW - 200000, NOW - 100000, NOW - 90000)
    assert ledger.agents(NOW + 11) == [
        {"id": ledger.worker, "host": socket.gethostname(), "pid": os.getpid(), "started": NOW, "heartbeat": NOW + 10,
         "stopped": None, "sources": ["alpha", "zeta"], "running": 1},
        {"id": "recent", "host": "h2", "pid": 7, "started": NOW - 500, "heartbeat": NOW - 400, "stopped": NOW - 300,
         "sources": [], "running": 0},
    ]


# -- polls and cursors ----------------------------------------------------------------------------
def test_a_cursor_moves_on_success_and_never_back_on_a_failed_poll(ledger):
    assert ledger.cursor("s") is None
    poll = ledger.start_poll("s", NOW)
    ledger.end_poll(poll, "s", NOW + 1, pages=2, fetched=3, new=3, primed=0, quarantined=0, error=None, cursor="c1", identity="id")
    poll = ledger.start_poll("s", NOW + 10)
    ledger.end_poll(poll, "s", NOW + 11, pages=1, fetched=0, new=0, primed=0, quarantined=0, error="502 from the view", cursor="c0")
    cursor = ledger.cursor("s")
    assert (cursor["value"], cursor["last_success"], cursor["last_poll"], cursor["last_error"]) == ("c1", NOW + 1, NOW + 11, "502 from the view")
    poll = ledger.start_poll("s", NOW + 20)
    ledger.end_poll(poll, "s", NOW + 21, pages=1, fetched=0, new=0, primed=0, quarantined=0, error=None, cursor=None)
    assert (ledger.cursor("s")["value"], ledger.cursor("s")["last_error"]) == ("c1", None)  # a poll without a cursor keeps it
    poll = ledger.start_poll("s", NOW + 30)
    ledger.end_poll(poll, "s", NOW + 31, pages=1, fetched=1, new=1, primed=0, quarantined=0, error=None, cursor="c2")
    assert (ledger.cursor("s")["value"], ledger.cursor("s")["identity"]) == ("c2", "id")


def test_priming_start_is_kept_and_new_view_forgets_the_cursor(ledger):
    assert ledger.start_priming("s", NOW) == NOW
    assert ledger.start_priming("s", NOW + 5) == NOW
    poll = ledger.start_poll("s", NOW + 6)
    ledger.end_poll(poll, "s", NOW + 7, pages=1, fetched=0, new=0, primed=0, quarantined=0, error=None, cursor="c1")
    ledger.new_view("s")
    cursor = ledger.cursor("s")
    assert (cursor["value"], cursor["last_success"], cursor["prime_started"]) == (None, None, None)


# -- operator queries: the same answers, shapes and types on every backend -------------------------
def scenario(ledger) -> dict[str, Any]:
    """The same history on any backend; every operator query's answer to it."""
    flows = [("f", False), ("g", True)]
    number = ledger.use_config("hash1", "[agent]\n", {"agent": {"x": 1}}, {"f": {"steps": 1}}, NOW)
    ledger.admit("s", [item("1"), item("2"), item("3"), item("4", at=5.0)], flows, NOW, version=number)
    ledger.quarantine("s", "bad", "no id", "page 1 record 2", '{"name": "x"}', NOW)
    ledger.quarantine("s", "bad", "no id", "page 1 record 2", '{"name": "x"}', NOW + 1)
    poll = ledger.start_poll("s", NOW)
    ledger.end_poll(poll, "s", NOW + 1, pages=1, fetched=5, new=4, primed=0, quarantined=1, error=None, cursor="c1")
    claimed = ledger.claim(NOW + 2, 4, LEASE)
    by_key = {(ex.flow, ex.key): ex for ex in claimed}
    a, b, c = by_key[("f", "1")], by_key[("f", "2")], by_key[("f", "3")]
    paused = by_key[("f", "4")]
    ledger.finish_many([(a, done(a, NOW + 3)), (b, done(b, NOW + 3, "dead")),
                        (c, Finish("failed", 0, c.context, error="400 bad request", attempt={
                            "step": 0, "started": NOW + 3, "finished": NOW + 3, "outcome": "failed", "status_code": 400, "error": "400"}))], NOW + 3)
    ledger.finish(paused, Finish("paused", 0, paused.context, next_at=NOW + 600, error="unreachable: crm"), NOW + 3)
    answers: dict[str, Any] = {
        "counts": ledger.counts(),
        "sources": ledger.sources(),
        "executions": ledger.executions(),
        "execution_list": ledger.execution_list(flow="f", since=NOW),
        "executions_of": ledger.executions_of("s", "1"),
        "quarantined": ledger.quarantined("s"),
        "config_versions": ledger.config_versions(),
        "config_version": ledger.config_version(number),
        "waiting_work": ledger.waiting_work(flow="g"),
        "pause_reasons": ledger.pause_reasons(),
        "count_paused": ledger.count_paused("unreachable"),
        "record": ledger.record("s", "1"),
        "keys_of_id": ledger.keys_of_id("1"),
        "poll_at": ledger.poll_at("s", NOW + 0.5),
        "next_due": ledger.next_due(),
        "replayable": ledger.replayable("f"),
    }
    ledger.set_unreachable("crm", NOW, "connection refused")
    answers["unreachable"] = ledger.unreachable()
    answers["fail_by_hand"] = sorted(ledger.fail_by_hand([r["id"] for r in answers["waiting_work"]][:1] + [a.id], NOW + 4, "by hand"))
    answers["requeue"] = sorted(ledger.requeue([b.id, c.id, a.id], NOW + 5))  # in no particular order
    answers["requeue_matching"] = ledger.requeue_matching(("failed",), NOW + 5, flow="g")
    answers["replay"] = ledger.replay([a.id], NOW + 6, version=number)
    answers["wake_paused"] = ledger.wake_paused(NOW + 7)
    answers["moved"] = ledger.move_to_version([(r["id"], number, 0, {"moved": True}) for r in ledger.waiting_work(flow="g")], NOW + 8)
    answers["after"] = ledger.executions()
    answers["prune"] = ledger.prune(NOW + 100, {"s": 1.0}, NOW + 100 + 7200)
    answers["pruned"] = ledger.execution_list(limit=100)
    return answers


def shape(value: Any) -> Any:
    """Keys and value types, all the way down."""
    if isinstance(value, dict):
        return {key: shape(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [shape(v) for v in value]
    return type(value).__name__


def test_operator_queries_answer_in_the_documented_shapes(ledger):
    answers = scenario(ledger)
    assert answers["counts"] == {"f": {"succeeded": 1, "dead": 1, "failed": 1, "paused": 1}, "g": {"pending": 4}}
    assert shape(answers["executions"][-1]).items() >= {
        "id": "int", "flow": "str", "source": "str", "key": "str", "entity": "str", "step": "int", "status": "str",
        "attempts": "int", "next_at": "float", "last_error": "NoneType", "created": "float", "updated": "float", "version": "int",
    }.items()
    assert shape(answers["executions_of"][0]["attempts_made"]) == [
        {"step": "int", "n": "int", "started": "float", "finished": "float", "outcome": "str", "status_code": "int", "error": "NoneType"}]
    assert shape(answers["quarantined"]) == [{"source": "str", "hash": "str", "reason": "str", "page": "str", "excerpt": "str",
                                             "first_seen": "float", "last_seen": "float", "count": "int"}]
    assert answers["quarantined"][0]["count"] == 2
    source = answers["sources"]["s"]
    assert (source["value"], source["seen"], source["quarantined"], source["last"]["fetched"]) == ("c1", 4, 1, 5)
    assert shape(answers["config_versions"]) == [{"number": "int", "hash": "str", "first_used": "float", "last_used": "float",
                                                 "sections": {"agent": {"x": "int"}}}]
    assert answers["config_version"]["flows"] == {"f": {"steps": 1}}
    assert answers["pause_reasons"] == {"f": "unreachable: crm"} and answers["count_paused"] == 1
    assert answers["unreachable"] == {"crm": (NOW, "connection refused")}
    assert answers["keys_of_id"] == [("s", "1")]
    assert answers["next_due"] == NOW
    assert len(answers["fail_by_hand"]) == 1  # the succeeded one is not failed by hand
    assert len(answers["requeue"]) == 2  # dead and failed, not succeeded
    assert len(answers["requeue_matching"]) == 1 and answers["replay"] == 1 and answers["wake_paused"] == 1
    assert answers["moved"] == 4
    assert answers["prune"] == {"executions": 1, "attempts": 1, "polls": 1, "records": 0}


def test_both_backends_give_the_same_answers(tmp_path, pg_url):
    """The whole scenario, answer by answer: equal values, equal types."""
    from state.sqlite import SqliteLedger

    sqlite_store = Store("sqlite", lambda: SqliteLedger(tmp_path / "l.db"), lambda: None)
    postgres_store = pg_store(pg_url)
    try:
        on_sqlite, on_postgres = scenario(sqlite_store.open()), scenario(postgres_store.open())
    finally:
        sqlite_store.close()
        postgres_store.close()
    for name in on_sqlite:
        assert shape(on_postgres[name]) == shape(on_sqlite[name]), name
        assert on_postgres[name] == on_sqlite[name], name


# -- two agents on one PostgreSQL database ---------------------------------------------------------
def race(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads released together; their results in order."""
    start = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            start.wait()
            results[n] = calls[n]()
        except BaseException as error:  # reported by the test, in the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    return results


def test_two_agents_claiming_at_once_never_claim_the_same_execution(pg_url):
    store = pg_store(pg_url)
    try:
        first, second = store.open(), store.open()
        first.admit("s", [item(str(n)) for n in range(120)], [("f", False)], NOW)

        def drain(ledger) -> list[int]:
            taken: list[int] = []
            while batch := ledger.claim(NOW, 4, LEASE):
                taken += [ex.id for ex in batch]
            return taken

        mine, theirs = race(lambda: drain(first), lambda: drain(second))
        assert not set(mine) & set(theirs)
        assert sorted(mine + theirs) == sorted(r["id"] for r in first.executions())
        assert mine and theirs  # both claimed: they did run side by side
        owners = dict(store.sql("SELECT owner, COUNT(*) FROM executions GROUP BY owner"))
        assert owners == {first.worker: len(mine), second.worker: len(theirs)}
    finally:
        store.close()


def test_two_agents_racing_for_sources_each_source_gets_one_holder(pg_url):
    store = pg_store(pg_url)
    try:
        first, second = store.open(), store.open()
        names = [f"s{n}" for n in range(20)]
        won = race(lambda: [first.take_source(s, NOW, LEASE) for s in names],
                   lambda: [second.take_source(s, NOW, LEASE) for s in names])
        assert all(a != b for a, b in zip(*won))  # exactly one of the two holds each source
        holders = dict(store.sql("SELECT source, owner FROM source_leases"))
        assert holders == {s: (first.worker if a else second.worker) for s, a in zip(names, won[0])}
    finally:
        store.close()


def test_a_second_agent_takes_a_source_only_once_its_lease_expired(pg_url):
    store = pg_store(pg_url)
    try:
        first, second = store.open(), store.open()
        assert first.take_source("s", NOW, LEASE) and first.take_source("t", NOW, LEASE)
        poll = first.start_poll("t", NOW)
        assert second.take_source("s", NOW + LEASE - 1, LEASE) is False
        assert second.take_source("s", NOW + LEASE + 1, LEASE) and second.take_source("t", NOW + LEASE + 1, LEASE)
        assert store.sql("SELECT source, owner, epoch FROM source_leases ORDER BY source") == [
            ("s", second.worker, 2), ("t", second.worker, 2)]
        with pytest.raises(LeaseLost):
            first.admit("s", [item("1")], [("f", False)], NOW + LEASE + 2)
        with pytest.raises(LeaseLost):
            first.end_poll(poll, "t", NOW + LEASE + 2, pages=1, fetched=0, new=0, primed=0, quarantined=0, error=None, cursor="c")
        assert first.fenced == 2
        assert first.take_source("s", NOW + LEASE + 3, LEASE) is False  # the new holder's lease runs
        assert second.admit("s", [item("1")], [("f", False)], NOW + LEASE + 3).new == 1
        assert second.cursor("t") is None
    finally:
        store.close()


def test_a_takeover_waits_for_a_write_under_the_old_lease_to_commit(pg_url):
    """The fence's FOR SHARE: a page admitted under the old lease is in before the new holder starts, never after."""
    from state.postgres import PostgresLedger

    store = pg_store(pg_url)
    taking: dict[str, Any] = {}

    def meanwhile(name: str) -> None:  # inside the first agent's admit transaction, after its fence
        if name == "inside_admit" and not taking:
            thread = taking["thread"] = threading.Thread(target=lambda: taking.update(won=second.take_source("s", NOW + LEASE + 1, LEASE)))
            thread.start()
            thread.join(0.05)  # a takeover that does not wait for this transaction is done by now
            taking["waited"] = thread.is_alive()

    try:
        second = store.open()
        first = PostgresLedger(pg_url, failpoint=meanwhile)
        store.opened.append(first)
        assert first.take_source("s", NOW, LEASE)
        assert first.admit("s", [item("1")], [("f", False)], NOW + LEASE + 1).new == 1
        taking["thread"].join(10)
        assert (taking["waited"], taking["won"]) == (True, True)
        assert store.sql("SELECT owner, epoch FROM source_leases") == [(second.worker, 2)]
        with pytest.raises(LeaseLost):
            first.admit("s", [item("2")], [("f", False)], NOW + LEASE + 2)
        assert [r["key"] for r in second.executions()] == ["1"]
    finally:
        store.close()


def test_a_released_source_is_taken_by_another_agent_at_once(pg_url):
    store = pg_store(pg_url)
    try:
        first, second = store.open(), store.open()
        first.take_source("s", NOW, LEASE)
        first.release(NOW + 1)
        assert second.take_source("s", NOW + 2, LEASE) is True
        assert store.sql("SELECT owner, epoch FROM source_leases") == [(second.worker, 2)]
    finally:
        store.close()


def test_recover_leaves_the_running_work_of_other_agents_alone(pg_url):
    store = pg_store(pg_url)
    try:
        first, second = store.open(), store.open()
        first.admit("s", [item("1"), item("2")], [("f", False)], NOW)
        [mine] = first.claim(NOW, 1, LEASE)
        [theirs] = second.claim(NOW, 1, LEASE)
        assert first.recover(NOW + 1) == 1
        assert row_of(store, mine.id)["status"] == "retrying"
        assert row_of(store, theirs.id)["status"] == "running"
    finally:
        store.close()


# -- the test server itself (tests/pgserver.py) ---------------------------------------------------
def test_each_test_gets_an_empty_database_on_a_server_built_for_speed(pg_server, pg_url):
    settings = {name: pg_server.execute(f"SHOW {name}")[0][0] for name in ("fsync", "synchronous_commit", "full_page_writes", "listen_addresses")}
    assert settings == {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "listen_addresses": "127.0.0.1"}
    database = pg_url.rsplit("/", 1)[1]
    assert pg_server.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", database=database) == [(0,)]
    other = pg_server.create_database()
    assert other != pg_url
    pg_server.drop_database(other)
    assert pg_server.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (other.rsplit("/", 1)[1],)) == [(0,)]


def test_a_postgresql_that_cannot_start_says_why(tmp_path):
    from pgserver import PgServer, PgServerError

    with pytest.raises(PgServerError, match="initdb"):
        PgServer.start(bindir=tmp_path)  # no binaries there


# -- flow chaining: chained executions are written with the upstream's success, and fenced with it -----------------
def chained(ex: Execution, *flows: str) -> Finish:
    """A success of ``ex`` that starts ``flows`` (chained after its flow) for the same record."""
    result = done(ex)
    start = {"record": ex.context["record"], "cursor": "c", "upstream": {"flow": ex.flow, "steps": {"0": {"ok": True}}, "ids": {"x": 0}}}
    result.chain = [{"flow": flow, "context": start} for flow in flows]
    return result


def test_a_finish_with_chain_entries_starts_each_chained_flow_for_the_same_record(ledger_factory, ledger):
    ledger.admit("s", [item("1", "E", at=5.0), item("2")], [("a", False)], NOW, version=3)
    [ex] = ledger.claim(NOW, 1, LEASE)
    ledger.finish(ex, chained(ex, "b", "c"), NOW + 1)
    started = sorted(ledger.claim(NOW + 1, 10, LEASE), key=lambda e: e.flow)
    assert [(e.flow, e.source, e.key, e.entity, e.step, e.replay, e.single, e.version) for e in started] == [
        ("a", "s", "2", "2", 0, 0, False, 3), ("b", "s", "1", "E", 0, 0, False, 3), ("c", "s", "1", "E", 0, 0, False, 3)]
    assert started[1].context == {"record": {"id": "1"}, "cursor": "c", "upstream": {"flow": "a", "steps": {"0": {"ok": True}}, "ids": {"x": 0}}}
    assert ledger_factory.sql("SELECT flow, version_at, created FROM executions WHERE key = '1' ORDER BY flow") == [
        ("a", 5.0, NOW), ("b", 5.0, NOW + 1), ("c", 5.0, NOW + 1)]  # the upstream's version order, so versions stay in order


def test_a_rejected_finish_starts_no_chained_flow(ledger):
    ledger.admit("s", [item("1")], [("a", False)], NOW)
    [ex] = ledger.claim(NOW, 1, LEASE)
    stale = dataclasses.replace(ex, epoch=ex.epoch - 1)
    ledger.finish(stale, chained(stale, "b"), NOW + 1)
    assert [(r["flow"], r["status"]) for r in ledger.executions()] == [("a", "running")]
    ledger.finish(ex, chained(ex, "b"), NOW + 2)  # the holder of the current epoch starts it, once
    assert sorted((r["flow"], r["status"]) for r in ledger.executions()) == [("a", "succeeded"), ("b", "pending")]


def test_a_replayed_upstream_starts_its_chained_flow_under_a_replay_number_not_used_before(ledger):
    ledger.admit("s", [item("1")], [("a", False)], NOW)
    [a] = ledger.claim(NOW, 10, LEASE)
    ledger.finish(a, chained(a, "b"), NOW)
    [b] = ledger.claim(NOW, 10, LEASE)
    ledger.finish(b, done(b), NOW)
    ledger.replay([a.id], NOW + 1)  # the upstream sent again on purpose: replay 1
    [again] = ledger.claim(NOW + 1, 10, LEASE)
    ledger.finish(again, chained(again, "b"), NOW + 1)
    [b1] = ledger.claim(NOW + 1, 10, LEASE)
    assert (b.replay, again.replay, b1.flow, b1.replay) == (0, 1, "b", 1)  # a new key: the first replay of b
    ledger.finish(b1, done(b1), NOW + 1)
    ledger.replay([b1.id], NOW + 2)  # the chained flow replayed by hand takes replay 2, and keeps its upstream's outputs
    [b2] = ledger.claim(NOW + 2, 10, LEASE)
    assert (b2.flow, b2.replay, b2.context["upstream"]["flow"]) == ("b", 2, "a")
    ledger.finish(b2, done(b2), NOW + 2)
    ledger.replay([a.id], NOW + 3)  # the upstream's replay 2: its chained execution must not reuse b's replay 2
    [a2] = ledger.claim(NOW + 3, 10, LEASE)
    ledger.finish(a2, chained(a2, "b"), NOW + 3)
    [b3] = ledger.claim(NOW + 3, 10, LEASE)
    assert (a2.replay, b3.flow, b3.replay) == (2, "b", 3)


def test_work_given_back_unstarted_spends_no_attempt(ledger_factory):
    """Claimed ahead, then given back before its send (a stop, a poll due, a lease too short): its attempt count is as before."""
    led = ledger_factory.open()
    led.admit("s", [Admission(key="k", id="k", version="", hash=b"h", entity="k", context={"record": {}})], [("f", False)], NOW)
    [ex] = led.claim(NOW, 1, 300)
    led.finish(ex, Finish("pending", ex.step, ex.context, next_at=NOW), NOW)
    [again] = led.claim(NOW + 1, 1, 300)
    assert again.attempts == 1 and led.executions(ids=[ex.id])[0]["attempts"] == 1

"""What the two ledgers share: the operations whose SQL is the same on SQLite and PostgreSQL.

``SqlLedger`` holds them, written once with ``?`` placeholders; ``SqliteLedger``
and ``PostgresLedger`` subclass it and keep only what differs (opening, locking,
pooling, migrations, admission, the claim, leases, the fence, error classes).
A sibling gives it four things:

- ``_atomic(source)``: one write transaction (fenced for a held ``source``)
  yielding ``Statements``;
- ``_reading()``: ``Statements`` for reads that take no write lock;
- ``_in(column, values)``: ``column IN (…)`` as that database takes a list;
- ``_update_ids(tx, assignments, values, where, params)``: update the matching
  executions and return their ids, exactly as that database's isolation allows.

PostgreSQL's ``Statements`` rewrite ``?`` to ``%s`` (and a literal ``%`` to ``%%``).
"""
from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any, Callable, Iterable, Protocol, Sequence

from state.base import ACTIVE, FINISHED, HASH_BYTES, MOVABLE, TOUCH_EVERY, WAITING, Admission, Execution, Finish, masked, to_json


def _sql_list(values: Iterable[str]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


IN_WAITING = "IN " + _sql_list(WAITING)
IN_ACTIVE = "IN " + _sql_list(ACTIVE)
IN_MOVABLE = "IN " + _sql_list(MOVABLE)
IN_FINISHED = "IN " + _sql_list(FINISHED)
CONTENT_INDEX = "records_by_content"  # built by a re-key poll for itself: Ledger.content_index
# when the first lease another agent holds on running work runs out (an index holds running rows only)
NEXT_LAPSE = ("SELECT MIN(lease_until) FROM executions WHERE status = 'running' AND lease_until > ?"
              " AND (owner IS NULL OR owner <> ?)")
# when work next becomes claimable: a waiting execution's next attempt or another agent's lapsed lease (one round trip)
NEXT_DUE = (f"SELECT MIN(t) FROM (SELECT MIN(next_at) AS t FROM executions WHERE status {IN_WAITING} AND next_at > ?"
            f" UNION ALL {NEXT_LAPSE}) AS due")
EXECUTION_COLUMNS = "id, flow, source, key, entity, step, status, attempts, next_at, last_error, created, updated, version"

# A seen record keeps its id only where it is not its key (under dedupe = "id" it is) and its last_seen only once a
# later poll refreshed it: most rows hold neither. Readers take them so.
RECORD_ID = "COALESCE(id, key)"
LAST_SEEN = "COALESCE(last_seen, first_seen)"


def kept_id(item: Admission) -> str | None:
    """The id as a seen record's row keeps it: NULL where it is the key."""
    return None if item.id == item.key else item.id


def shown_hash(stored: bytes | str | None) -> str | None:
    """A seen record's content hash as people and JSON see it: hex. A ledger read before its migration to schema 7
    (beside an agent that has not migrated it yet) holds 64 hex digits: shown as the migration will keep them."""
    if stored is None:
        return None
    return stored[:2 * HASH_BYTES] if isinstance(stored, str) else bytes(stored).hex()


class Cursor(Protocol):
    """What a statement answers with (a sqlite3 or psycopg cursor)."""

    rowcount: int
    description: Any

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Statements(Protocol):
    """Runs ``?``-placeholder SQL inside the transaction that yielded it."""

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Cursor: ...
    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> Any: ...


FINISH = ("UPDATE executions SET status = ?, step = ?, context = ?, next_at = ?, lease_until = NULL, last_error = ?,"
          " attempts = ?, first_attempt = ?, updated = ? WHERE id = ? AND epoch = ? AND status = 'running'")
SPAWN = ("INSERT INTO executions (flow, source, key, entity, step, status, attempts, next_at, context, created, updated, replay, single,"
         " version) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?, ?, 1, ?)")
# A flow chained after a finished execution's flow, started for the same record (its version order and config version
# too); a replayed upstream starts it under a replay number no execution of that flow and record has had (a new key).
_NEXT_REPLAY = "(SELECT COALESCE(MAX(c.replay), 0) + 1 FROM executions c WHERE c.flow = ? AND c.source = u.source AND c.key = u.key)"
CHAIN = ("INSERT INTO executions (flow, source, key, entity, step, status, attempts, next_at, context, created, updated, replay,"
         " version_at, version)"
         " SELECT CAST(? AS TEXT), source, key, entity, 0, 'pending', 0, CAST(? AS DOUBLE PRECISION), CAST(? AS TEXT),"
         " CAST(? AS DOUBLE PRECISION), CAST(? AS DOUBLE PRECISION),"
         f" CASE WHEN replay = 0 THEN 0 WHEN replay >= {_NEXT_REPLAY} THEN replay ELSE {_NEXT_REPLAY} END,"
         " version_at, version FROM executions u WHERE id = ?")


def dicts(cursor: Cursor) -> list[dict]:
    """The rows of an answered statement as column -> value."""
    names = [c[0] for c in cursor.description or ()]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


class SqlLedger(ABC):
    """The ledger operations both databases run with the same SQL; a sibling supplies the transactions."""

    mask: Callable[[str], str]
    worker: str
    _held: dict[str, tuple[int, float]]
    _lost: set[str]

    # -- what a sibling supplies -----------------------------------------------------------------
    @abstractmethod
    def _atomic(self, source: str | None = None) -> AbstractContextManager[Statements]:
        """One write transaction (fenced by the lease of a held ``source``)."""

    @abstractmethod
    def _reading(self) -> AbstractContextManager[Statements]:
        """Statements for reading."""

    @abstractmethod
    def _in(self, column: str, values: Sequence[Any]) -> tuple[str, list]:
        """``column IN (…)`` for ``values`` in the database's own form, and its parameters."""

    @abstractmethod
    def finish_and_claim(self, done: list[tuple[Execution, Finish]], now: float, limit: int, lease: float,
                         *, wake: bool = False) -> list[Execution]:
        """Record finished runs, make paused work due (``wake``), claim up to ``limit``: one transaction."""

    @abstractmethod
    def close(self) -> None:
        """Give the database back."""

    def finish(self, execution: Execution, result: Finish, now: float) -> None:
        """Record the attempt, save the step output and move the execution on, in one transaction."""
        self.finish_and_claim([(execution, result)], now, 0, 0)

    def finish_many(self, done: list[tuple[Execution, Finish]], now: float) -> None:
        """``finish`` for several executions in one transaction (one commit for a batch)."""
        self.finish_and_claim(done, now, 0, 0)

    def _fenced(self, n: int) -> None:
        self.fenced += n

    def _finish_one(self, tx: Statements, ex: Execution, result: Finish, now: float) -> None:
        """The outcome of one claim, written only while the claim's epoch is still the execution's (else fenced out):
        the attempt, the spawned calls (wait_for_response = false) and the flows chained after this one come with it."""
        attempts, first = standing(ex, result)
        if not tx.execute(FINISH, (result.status, result.step, self._dump(result.context), result.next_at, self._text(result.error),
                                   attempts, first, now, ex.id, ex.epoch)).rowcount:
            self._fenced(1)
            from loguru import logger  # here, not at the top: `agent status` loads this module and logs nothing
            logger.warning("execution {} ({}, record {}): its lease passed to another agent; this outcome ({}) is not recorded",
                           ex.id, ex.flow, ex.key, result.status)
            return
        if a := result.attempt:
            tx.execute("INSERT INTO attempts (execution, step, n, started, finished, outcome, status_code, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (ex.id, a["step"], a.get("n", ex.attempts), a["started"], a["finished"], a["outcome"], a.get("status_code"),
                        self._text(a.get("error"))))
        if result.status in ("retrying", "paused", "failed", "dead"):
            self.failpoint("inside_failure")
        if result.spawn:
            tx.executemany(SPAWN, [(ex.flow, ex.source, ex.key, ex.entity, spawn["step"], now, self._dump(spawn["context"]), now, now,
                                    ex.replay, ex.version) for spawn in result.spawn])
        for chained in result.chain:
            tx.execute(CHAIN, (chained["flow"], now, self._dump(chained["context"]), now, now, chained["flow"], chained["flow"], ex.id))

    def _update_ids(self, tx: Statements, assignments: str, values: Sequence[Any], where: str, params: Sequence[Any]) -> list[int]:
        """``UPDATE executions SET {assignments} WHERE {where}`` (``values`` then ``params`` fill it); the ids it changed, ascending.
        Reading first holds where one writer runs at a time (SQLite); PostgreSQL updates and returns in one statement."""
        found = [r[0] for r in tx.execute(f"SELECT id FROM executions WHERE {where} ORDER BY id", tuple(params)).fetchall()]
        tx.execute(f"UPDATE executions SET {assignments} WHERE {where}", (*values, *params))
        return found

    # -- reading and writing -----------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _rows(self, sql: str, params: Iterable = ()) -> list[dict]:
        with self._reading() as tx:
            return dicts(tx.execute(sql, tuple(params)))

    def _tuples(self, sql: str, params: Iterable = ()) -> list[tuple]:
        with self._reading() as tx:
            return [tuple(r) for r in tx.execute(sql, tuple(params)).fetchall()]

    def _text(self, text: str | None) -> str | None:
        """A text as the ledger keeps it: masked."""
        return None if text is None else self.mask(text)

    def _dump(self, value: Any) -> str:
        """A JSON value as the ledger keeps it: masked string by string, so it stays valid JSON."""
        text = to_json(value)
        return text if self.mask(text) == text else to_json(masked(value, self.mask))

    # -- polls and cursors -----------------------------------------------------------------
    def cursor(self, source: str) -> dict | None:
        rows = self._rows("SELECT * FROM cursors WHERE source = ?", (source,))
        return rows[0] if rows else None

    def new_view(self, source: str) -> None:
        """The source now reads another view: forget its cursor and its good polls, so `first_run` decides again."""
        with self._atomic(source) as tx:
            tx.execute("UPDATE cursors SET value = NULL, last_success = NULL, prime_started = NULL, identity = NULL WHERE source = ?", (source,))

    def start_priming(self, source: str, now: float) -> float:
        """When priming of this source began: ``now`` the first time, then kept until a poll succeeds."""
        with self._atomic(source) as tx:
            tx.execute("INSERT INTO cursors (source) VALUES (?) ON CONFLICT (source) DO NOTHING", (source,))
            tx.execute("UPDATE cursors SET prime_started = COALESCE(prime_started, ?) WHERE source = ?", (now, source))
            return tx.execute("SELECT prime_started FROM cursors WHERE source = ?", (source,)).fetchone()[0]

    def end_poll(self, poll: int, source: str, now: float, *, pages: int, fetched: int, new: int, primed: int,
                 quarantined: int, error: str | None, cursor: str | None, identity: str | None = None) -> None:
        """Record a poll's outcome; the cursor (and the source's identity) move only when the poll succeeded."""
        error = self._text(error)
        with self._atomic(source) as tx:
            tx.execute("UPDATE polls SET finished = ?, pages = ?, fetched = ?, new = ?, primed = ?, quarantined = ?, error = ? WHERE id = ?",
                       (now, pages, fetched, new, primed, quarantined, error, poll))
            tx.execute("INSERT INTO cursors (source) VALUES (?) ON CONFLICT (source) DO NOTHING", (source,))
            if error is None:
                tx.execute("UPDATE cursors SET value = COALESCE(?, value), last_poll = ?, last_success = ?, last_error = NULL,"
                           " identity = COALESCE(?, identity) WHERE source = ?", (cursor, now, now, identity, source))
            else:
                tx.execute("UPDATE cursors SET last_poll = ?, last_error = ? WHERE source = ?", (now, error, source))

    # -- leases -----------------------------------------------------------------
    def release(self, now: float) -> None:
        """Give up the leases held (a clean stop: others take them at once) and mark this agent stopped."""
        with self._atomic() as tx:
            tx.execute("UPDATE source_leases SET owner = NULL, lease_until = NULL WHERE owner = ?", (self.worker,))
            tx.execute("UPDATE agents SET stopped = ? WHERE id = ?", (now, self.worker))
        self._lost.update(self._held)
        self._held.clear()

    # -- re-keying ----------------------------------------------------------------
    def content_index(self, build: bool) -> None:
        """Build (or drop) the index of seen records by content hash that only a re-key poll reads (see Ledger)."""
        with self._atomic() as tx:
            self._lock_schema(tx)
            tx.execute(f"CREATE INDEX IF NOT EXISTS {CONTENT_INDEX} ON records (source, hash)" if build
                       else f"DROP INDEX IF EXISTS {CONTENT_INDEX}")

    def _lock_schema(self, tx: Statements) -> None:
        """Agents changing the schema together do it one at a time (one file's writer lock does this on SQLite)."""

    # -- delivery -----------------------------------------------------------------
    def next_due(self, after: float | None = None) -> float | None:
        """The earliest time work becomes claimable (later than ``after`` when given), or None: a waiting execution's
        next attempt, or the end of another agent's lease on running work (it froze or died: this agent takes it over
        then, not at its next poll). This agent's own running work is not waited for: its heartbeat renews it."""
        after = -math.inf if after is None else after
        return self._tuples(NEXT_DUE, (after, after, self.worker))[0][0]

    # -- config versions -----------------------------------------------------------------
    def config_versions(self) -> list[dict]:
        """Every recorded config version, oldest first (number, hash, first_used, last_used, sections)."""
        rows = self._rows("SELECT number, hash, first_used, last_used, sections FROM config_versions ORDER BY number")
        for row in rows:
            row["sections"] = json.loads(row["sections"])
        return rows

    def config_version(self, number: int) -> dict | None:
        """One version with its (masked) text and pinned flow definitions."""
        rows = self._rows("SELECT * FROM config_versions WHERE number = ?", (number,))
        for row in rows:
            row["sections"], row["flows"] = json.loads(row["sections"]), json.loads(row["flows"])
        return rows[0] if rows else None

    def waiting_work(self, ids: list[int] | None = None, flow: str | None = None) -> list[dict]:
        """Executions that can move to another flow version: waiting, failed or dead (not running, not finished)."""
        where, params = self._where(flow=flow, ids=ids)
        return self._rows(f"SELECT id, flow, step, attempts, status, version, single, context FROM executions"
                          f" WHERE status {IN_MOVABLE} AND {where} ORDER BY id", params)

    def move_to_version(self, moves: list[tuple[int, int, int, dict]], now: float) -> int:
        """(execution, version, step, context): re-pin waiting work; only rows still waiting move."""
        with self._atomic() as tx:
            return sum(tx.execute(f"UPDATE executions SET version = ?, step = ?, context = ?, updated = ? WHERE id = ? AND status {IN_MOVABLE}",
                                  (version, step, to_json(context), now, ex_id)).rowcount for ex_id, version, step, context in moves)

    # -- operator views and actions -----------------------------------------------------------------
    def executions(self, *, status: str | None = None, flow: str | None = None, limit: int = 1000, ids: list[int] | None = None) -> list[dict]:
        """Executions oldest first; asked for by id, each with its context too (its record and step outputs, for a close look)."""
        where, params = self._where(status=status, flow=flow, ids=ids)
        columns = f"{EXECUTION_COLUMNS}, context" if ids else EXECUTION_COLUMNS  # a listing does not read every record
        return self._rows(f"SELECT {columns} FROM executions WHERE {where} ORDER BY id LIMIT ?", (*params, limit))

    def attempts_of(self, execution: int) -> list[dict]:
        return self._rows("SELECT step, n, started, finished, outcome, status_code, error FROM attempts WHERE execution = ? ORDER BY id", (execution,))

    def quarantined(self, source: str | None = None) -> list[dict]:
        where, params = matching(source=source)
        return self._rows("SELECT source, hash, reason, page, excerpt, first_seen, last_seen, count FROM quarantine"
                          f" WHERE {where} ORDER BY first_seen", params)

    def fail_by_hand(self, ids: list[int], now: float, why: str) -> list[int]:
        """Fail waiting executions (pending, retrying, paused) on an operator's word; `retry` can bring them back."""
        which, params = self._in("id", ids)
        with self._atomic() as tx:
            return self._update_ids(tx, "status = 'failed', next_at = NULL, last_error = ?, updated = ?", (self._text(why), now),
                                    f"status {IN_WAITING} AND {which}", params)

    def requeue(self, ids: list[int] | None, now: float, *, dead: bool = False) -> list[int]:
        """Make failed, dead or paused executions due again with the same idempotency key."""
        which, params = ("status = 'dead'", []) if dead else self._in("id", ids or [])
        if not dead:
            which = f"status IN ('failed', 'dead', 'paused') AND {which}"
        with self._atomic() as tx:
            return self._update_ids(tx, _REQUEUE, (now, now), which, params)

    def requeue_matching(self, statuses: tuple[str, ...], now: float, *, flow: str | None = None, since: float | None = None) -> list[int]:
        """``requeue`` for every execution in ``statuses`` (of a flow; failed or dead since a time: ``updated``), in one transaction."""
        where, params = matching(flow=flow, updated=since)
        which, more = self._in("status", statuses)
        with self._atomic() as tx:
            return self._update_ids(tx, _REQUEUE, (now, now), f"{where} AND {which}", params + more)

    def replayable(self, flow: str, since: float | None = None, entity: str | None = None) -> list[int]:
        """Succeeded executions of a flow (optionally created since a time, of one entity)."""
        where, params = matching(flow=flow, created=since, entity=entity)
        return [r[0] for r in self._tuples(f"SELECT id FROM executions WHERE {where} AND status = 'succeeded' AND single = 0 ORDER BY id", params)]

    def replay(self, ids: list[int], now: float, version: int | None = None) -> int:
        """Schedule finished executions again from their first step, each under a new replay number (a new key),
        on config ``version`` (the current one: a replay is sent now, by today's flow)."""
        which, params = self._in("id", ids)
        with self._atomic() as tx:
            rows = dicts(tx.execute(f"SELECT * FROM executions WHERE {which} ORDER BY id", params)) if ids else []
            for row in rows:
                generation = tx.execute("SELECT COALESCE(MAX(replay), 0) + 1 FROM executions WHERE flow = ? AND source = ? AND key = ?",
                                        (row["flow"], row["source"], row["key"])).fetchone()[0]
                tx.execute(
                    "INSERT INTO executions (flow, source, key, entity, step, status, attempts, next_at, context, created, updated, replay, version_at, version)"
                    " VALUES (?, ?, ?, ?, 0, 'pending', 0, ?, ?, ?, ?, ?, ?, ?)",
                    (row["flow"], row["source"], row["key"], row["entity"], now,
                     self._dump(start_of(json.loads(row["context"]))), now, now, generation, row["version_at"], version),
                )
        return len(rows)

    def pause_reasons(self) -> dict[str, str]:
        """flow -> the latest error of its paused executions (why a connector waits)."""
        return dict(self._tuples("SELECT flow, last_error FROM executions WHERE status = 'paused' ORDER BY updated, id"))

    def counts(self) -> dict[str, dict[str, int]]:
        """flow -> status -> number of executions."""
        out: dict[str, dict[str, int]] = {}
        for flow, status, n in self._tuples("SELECT flow, status, COUNT(*) FROM executions GROUP BY flow, status"):
            out.setdefault(flow, {})[status] = n
        return out

    def sources(self) -> dict[str, dict]:
        """source -> cursor row plus records seen and quarantined counts and the last poll."""
        with self._reading() as tx:
            cursors = dicts(tx.execute("SELECT * FROM cursors", ()))
            seen = tx.execute("SELECT source, COUNT(*) FROM records GROUP BY source", ()).fetchall()
            quarantined = tx.execute("SELECT source, COUNT(*) FROM quarantine GROUP BY source", ()).fetchall()
            last = dicts(tx.execute("SELECT p.* FROM polls p JOIN (SELECT source, MAX(id) AS id FROM polls WHERE finished IS NOT NULL"
                                    " GROUP BY source) l ON p.id = l.id", ()))
        out: dict[str, dict] = {row["source"]: row for row in cursors}
        for rows, name in ((seen, "seen"), (quarantined, "quarantined")):
            for source, n in rows:
                out.setdefault(source, {"source": source})[name] = n
        for row in last:
            out.setdefault(row["source"], {"source": row["source"]})["last"] = row
        return out

    def prune(self, before: float, windows: dict[str, float], now: float) -> dict[str, int]:
        """Delete finished executions (and their attempts) older than ``before``; seen keys no poll has shown for their source's window.

        A key's last_seen may lag by up to TOUCH_EVERY, so a key goes only when it
        is older than the window by that much: never while the view can show it."""
        old = f"status {IN_FINISHED} AND updated < ?"
        with self._atomic() as tx:
            attempts = tx.execute(f"DELETE FROM attempts WHERE execution IN (SELECT id FROM executions WHERE {old})", (before,)).rowcount
            executions = tx.execute(f"DELETE FROM executions WHERE {old}", (before,)).rowcount
            polls = tx.execute("DELETE FROM polls WHERE finished < ?", (before,)).rowcount
            records = 0
            for source, window in windows.items():
                records += tx.execute(
                    f"DELETE FROM records WHERE source = ? AND {LAST_SEEN} < ?"
                    " AND NOT EXISTS (SELECT 1 FROM executions e WHERE e.source = records.source AND e.key = records.key)",
                    (source, now - window - TOUCH_EVERY),
                ).rowcount
        return {"executions": executions, "attempts": attempts, "polls": polls, "records": records}

    # -- connectors the agent cannot reach (written by the agent, read by `status`) -----------------------
    def set_unreachable(self, connector: str, since: float | None, why: str | None = None) -> None:
        """Record since when a connector cannot be reached and why; ``since=None``: it is reachable again."""
        name = f"unreachable:{connector}"
        with self._atomic() as tx:
            if since is None:
                tx.execute("DELETE FROM meta WHERE name = ?", (name,))
            else:
                tx.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                           (name, to_json({"since": since, "why": self._text(why)})))

    def unreachable(self) -> dict[str, tuple[float, str]]:
        """connector -> (unreachable since, why), as the agent last recorded it."""
        rows = self._tuples("SELECT name, value FROM meta WHERE substr(name, 1, 12) = 'unreachable:'")
        return {name[12:]: (value["since"], value["why"] or "") for name, value in ((n, json.loads(v)) for n, v in rows)}

    def count_paused(self, reason: str) -> int:
        """How many paused executions wait for this reason: their last error begins with it."""
        sql = "SELECT COUNT(*) FROM executions WHERE status = 'paused' AND substr(last_error, 1, ?) = ?"
        return self._tuples(sql, (len(reason), reason))[0][0]

    # -- an operator's questions: listings, one record's story -----------------------------------------------
    def execution_list(self, *, status: str | None = None, flow: str | None = None, key: str | None = None,
                       entity: str | None = None, since: float | None = None, limit: int = 200) -> list[dict]:
        """Executions newest first; each filter narrows (``since``: created at or after)."""
        where, params = matching(status=status, flow=flow, key=key, entity=entity, created=since)
        return self._rows(f"SELECT {EXECUTION_COLUMNS} FROM executions WHERE {where} ORDER BY id DESC LIMIT ?", (*params, limit))

    def record(self, source: str, key: str) -> dict | None:
        """A seen record: its id, version, content hash (hex) and when polls first and last showed it
        (last_seen lags by up to TOUCH_EVERY)."""
        rows = self._rows(f"SELECT source, key, {RECORD_ID} AS id, version, hash, first_seen, {LAST_SEEN} AS last_seen FROM records"
                          " WHERE source = ? AND key = ?", (source, key))
        for row in rows:
            row["hash"] = shown_hash(row["hash"])
        return rows[0] if rows else None

    def keys_of_id(self, id: str, limit: int = 20) -> list[tuple[str, str]]:
        """(source, key) of the seen records whose id is ``id`` (several under `dedupe = "id+updated"`), oldest first."""
        return [tuple(r) for r in self._tuples(f"SELECT source, key FROM records WHERE {RECORD_ID} = ? ORDER BY first_seen LIMIT ?", (id, limit))]

    def executions_of(self, source: str, key: str) -> list[dict]:
        """Every execution of one record, oldest first, with its attempts."""
        with self._reading() as tx:
            rows = dicts(tx.execute(f"SELECT {EXECUTION_COLUMNS}, replay, single FROM executions WHERE source = ? AND key = ? ORDER BY id",
                                    (source, key)))
            for row in rows:
                row["attempts_made"] = dicts(tx.execute("SELECT step, n, started, finished, outcome, status_code, error FROM attempts"
                                                        " WHERE execution = ? ORDER BY id", (row["id"],)))
        return rows

    def poll_at(self, source: str, when: float) -> dict | None:
        """The poll of a source that was running at ``when`` (the last one started by then), if it is still kept."""
        rows = self._rows("SELECT * FROM polls WHERE source = ? AND started <= ? ORDER BY id DESC LIMIT 1", (source, when))
        return rows[0] if rows else None

    def _where(self, *, ids: list[int] | None = None, **filters: Any) -> tuple[str, list]:
        """``matching(**filters)``, narrowed to ``ids`` when given."""
        where, params = matching(**filters)
        if ids:
            which, more = self._in("id", ids)
            where, params = f"{where} AND {which}", params + more
        return where, params


_REQUEUE = "status = 'retrying', attempts = 0, first_attempt = NULL, next_at = ?, updated = ?"


def matching(**filters: Any) -> tuple[str, list]:
    """A WHERE clause (and its parameters) for the filters given: ``created``/``updated`` are lower bounds, the rest equalities."""
    where, params = ["1 = 1"], []
    for column, value in filters.items():
        if value is not None:
            where.append(f"{column} >= ?" if column in ("created", "updated") else f"{column} = ?")
            params.append(value)
    return " AND ".join(where), params


def start_of(context: dict) -> dict:
    """What a replay starts from: the record and cursor, and for a chained flow the upstream's outputs it was started with."""
    start = {"record": context.get("record"), "cursor": context.get("cursor")}
    if "upstream" in context:
        start["upstream"] = context["upstream"]
    return start


def standing(ex: Execution, result: Finish) -> tuple[int, float | None]:
    """``attempts`` and ``first_attempt`` of the step a finished run leaves the execution at.

    A pause, or an action not started (its lease was short, or it was claimed ahead and given back), spent no attempt."""
    a = result.attempt
    if a and a["step"] == result.step:
        return a.get("n", ex.attempts) - (result.status == "paused"), a.get("first", ex.first_attempt)
    if result.step == ex.step:
        return ex.attempts - (result.status in ("paused", "pending")), ex.first_attempt
    return 0, None

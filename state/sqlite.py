"""The SQLite ledger: the embedded default, one agent per file.

One agent holds a ledger at a time (an exclusive ``flock`` on ``<ledger>.lock``).
Every write is one ``BEGIN IMMEDIATE`` transaction; WAL with
``synchronous=FULL``; files are created 0600; ``PRAGMA quick_check`` at open;
the schema migrates forward (sqlite-utils ``Migrations``) and an old ledger is
never dropped. The interface, its types and the statuses: ``state/base.py``; the
operations whose SQL is the same on PostgreSQL: ``state/sql.py``.

Leases and epochs are kept as on PostgreSQL (one contract suite runs against
both), but the flock makes this agent the only one: a lease left by a dead
process is taken at once, and every running execution found at start is an orphan.
"""
from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence


from state.base import (
    SCHEMA_VERSION, TOUCH_EVERY, Admission, Admitted, Execution, Finish, LeaseLost,
    LedgerBusy, LedgerDamaged, LedgerError, LedgerUnwritable, Renewed, chunks, new_worker_id,
)
from state.sql import IN_ACTIVE, LAST_SEEN, SqlLedger, Statements, kept_id

_UNKNOWN = -1e308  # a version without a usable `updated` sorts before every dated one (a total order: no cycles)


def _private_folder(folder: Path) -> None:
    """Create a missing folder and its missing parents 0700, whatever the umask (mkdir's parents ignore the mode)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(mode=0o700, exist_ok=True)
        os.chmod(created, 0o700)


def _chunks(values: Iterable[Any], size: int = 500):
    """(chunk, "?,?,…") pieces of ``values`` for `IN (…)`."""
    for chunk in chunks(values, size):
        yield chunk, ",".join("?" * len(chunk))


class SqliteLedger(SqlLedger):
    """The SQLite ledger file, held exclusively by this process while open."""

    def __init__(self, path: Path | str, *, hold: bool = True, busy_timeout: float = 5.0,
                 failpoint: Callable[[str], None] = lambda name: None, mask: Callable[[str], str] = lambda text: text):
        """Open (creating and migrating) the ledger as its one agent; ``hold=False`` opens an
        existing ledger beside a running agent (operator commands). Every text the ledger
        writes (errors, excerpts, contexts) passes through ``mask`` first: the agent hides secrets with it."""
        self.path = Path(path)
        self.location = str(path)
        self.mask = mask
        self.worker = new_worker_id()
        self.fenced = 0  # writes rejected because a lease had passed on
        self._held: dict[str, tuple[int, float]] = {}  # source -> (epoch, monotonic deadline) of the leases this agent holds
        self._lost: set[str] = set()  # sources whose lease this agent lost: refused until it takes them again
        self._guard = threading.RLock()  # the loop and the heartbeat thread share one connection: one transaction at a time
        self.real = self.path.resolve()  # a symlinked ledger is the same ledger: one lock, one file
        self.failpoint = failpoint  # fault tests crash the process inside transactions through this
        self.hold = hold
        self._lock_fd: int | None = None
        if self.hold:
            self._lock()
        try:
            if self.hold and not os.path.lexists(self.real):
                self._create()
            self.conn = self._connect(busy_timeout)
            if self.hold:
                self._migrate()
        except BaseException:
            self.close()
            raise

    # -- opening -----------------------------------------------------------------
    def _lock(self) -> None:
        """flock a lock file beside the real ledger file (not a planted symlink: O_NOFOLLOW)."""
        lock_path = self.real.with_name(self.real.name + ".lock")
        try:
            _private_folder(self.real.parent)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as error:
            raise LedgerUnwritable(f"{self.path}: cannot create the ledger's folder or lock file {lock_path.name}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LedgerBusy(f"{self.path}: another agent is running on this ledger (pid {holder}); stop it first, or use a different [agent] ledger") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _create(self) -> None:
        """Build a new ledger under a temporary name and rename it into place.

        So a file at the ledger's path always holds a whole ledger: one that is
        empty or holds no ledger tables was not made by the agent, and is refused.
        """
        building = self.real.with_name(self.real.name + ".creating")
        old_umask = os.umask(0o177)
        try:
            for leftover in (building, building.with_name(building.name + "-journal")):
                leftover.unlink(missing_ok=True)
            conn = sqlite3.connect(building, isolation_level=None)
            try:
                from state.sqlite_schema import Database, migrations

                db = Database(conn)
                migrations.apply(db)
                with db.atomic():
                    db["meta"].upsert({"name": "schema_version", "value": str(SCHEMA_VERSION)}, pk="name")
            finally:
                conn.close()
            os.replace(building, self.real)
            folder = os.open(self.real.parent, os.O_RDONLY)
            try:
                os.fsync(folder)  # the rename itself survives a power cut
            finally:
                os.close(folder)
        except sqlite3.DatabaseError as error:
            raise self._classify(error) from None
        except OSError as error:
            raise LedgerUnwritable(f"{self.path}: cannot create the ledger: {error.strerror}") from None
        finally:
            os.umask(old_umask)

    def _connect(self, busy_timeout: float) -> sqlite3.Connection:
        if not self.hold and not self.real.exists():
            raise LedgerUnwritable(f"{self.path}: no ledger yet (run the agent once to create it)")
        old_umask = os.umask(0o177)  # the ledger and its -wal/-shm are created 0600
        try:
            conn = sqlite3.connect(self.real, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
                self._check(conn)  # before any pragma that writes: a file that is not a ledger is left as it was
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
            except BaseException:
                conn.close()
                raise
            return conn
        except sqlite3.DatabaseError as error:
            raise self._classify(error) from None
        finally:
            os.umask(old_umask)

    def _classify(self, error: sqlite3.Error) -> LedgerError:
        text = str(error)
        if self._disk_full():
            return LedgerUnwritable(f"{self.path}: the disk holding the ledger is full ({text}); free some space — nothing is sent meanwhile")
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return LedgerDamaged(f"{self.path}: the ledger is damaged ({text}); restore it from a backup or move it aside to inspect it — the agent will not start a fresh one over it")
        if "locked" in text or "busy" in text:
            return LedgerBusy(f"{self.path}: the ledger is busy ({text})")
        return LedgerUnwritable(f"{self.path}: cannot use the ledger ({text})")

    def _disk_full(self) -> bool:
        try:
            return os.statvfs(self.real.parent).f_bavail == 0
        except OSError:
            return False

    def _check(self, conn: sqlite3.Connection) -> None:
        """quick_check, then the ledger's own tables: a file that has neither is refused, never reused."""
        rows = conn.execute("PRAGMA quick_check").fetchall()
        if [r[0] for r in rows] != ["ok"]:
            detail = "; ".join(str(r[0]) for r in rows[:3])
            raise LedgerDamaged(f"{self.path}: the ledger is damaged (quick_check: {detail}); restore it from a backup or move it aside to inspect it — the agent will not start a fresh one over it")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"_sqlite_migrations", "records", "executions"} <= tables:
            what = "it is empty (0 bytes)" if self.real.stat().st_size == 0 else "it has no ledger tables"
            raise LedgerDamaged(
                f"{self.path}: this file exists but holds no ledger ({what}); the agent creates a ledger only where there is no file. "
                "Restore the ledger from a backup, or, to start fresh on purpose (every source is primed again), move this file away")

    def _migrate(self) -> None:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("COMMIT")  # fail early and clearly if the file cannot be written
            row = self.conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            written = int(row[0]) if row and str(row[0]).isdigit() else 0
            if written > SCHEMA_VERSION:
                raise LedgerUnwritable(f"{self.path}: this ledger was written by a newer agent (schema version {written}; this agent "
                                       f"knows {SCHEMA_VERSION}); run the newer agent")
            if written == SCHEMA_VERSION:
                return  # current: sqlite-utils and the migrations are not even imported (a quicker start)
            from state.sqlite_schema import migrations

            migrations.apply(self.db)
            with self.write():
                self.db["meta"].upsert({"name": "schema_version", "value": str(SCHEMA_VERSION)}, pk="name")
        except sqlite3.DatabaseError as error:
            raise self._classify(error) from None

    def close(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()
            self.conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def db(self) -> Any:
        """The connection as a sqlite-utils Database (migrations, tests): imported only when asked for."""
        from sqlite_utils import Database

        return Database(self.conn)

    @contextmanager
    def write(self, source: str | None = None) -> Iterator[sqlite3.Connection]:
        """One BEGIN IMMEDIATE transaction: all of it or none of it; for a held ``source``, fenced by its lease first."""
        with self._guard:
            self._still_held(source)
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise self._classify(error) from None
            try:
                self._fence(source)
                yield self.conn
                self.conn.execute("COMMIT")
            except sqlite3.Error as error:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise self._classify(error) from None
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise

    def _atomic(self, source: str | None = None) -> AbstractContextManager[Statements]:
        return self.write(source)

    @contextmanager
    def _reading(self) -> Iterator[Statements]:
        """Reads on the shared connection, one statement at a time (a read beside a running agent can find the file busy)."""
        with self._guard:
            try:
                yield self.conn
            except sqlite3.Error as error:
                raise self._classify(error) from None

    @staticmethod
    def _in(column: str, values: Sequence[Any]) -> tuple[str, list]:
        return f"{column} IN ({','.join('?' * len(values))})", list(values)

    def _still_held(self, source: str | None) -> None:
        """A source lease past its local deadline, or found lost by a heartbeat, is lost without asking the database."""
        if source in self._lost:
            self._lose(source, "another agent holds its lease now")
        if source in self._held and time.monotonic() > self._held[source][1]:
            self._lose(source, "its lease ran out before it could be renewed")

    def _fence(self, source: str | None) -> None:
        """The first statement of a source's write: is the lease still this agent's, at the epoch it took?"""
        if source not in self._held:
            return
        row = self.conn.execute("SELECT 1 FROM source_leases WHERE source = ? AND owner = ? AND epoch = ?",
                                (source, self.worker, self._held[source][0])).fetchone()
        if row is None:
            self._lose(source, "another agent holds its lease now")

    def _lose(self, source: str, why: str) -> None:
        self._held.pop(source, None)
        self._lost.add(source)
        self._fenced(1)
        raise LeaseLost(f"source {source!r}: {why}; this agent writes nothing more for it")

    def size(self) -> int | None:
        """Bytes of the ledger file and its write-ahead log."""
        return sum(os.path.getsize(p) for p in (self.real, Path(f"{self.real}-wal")) if os.path.exists(p))

    # -- admission -----------------------------------------------------------------
    def admit(self, source: str, items: list[Admission], flows: list[tuple[str, bool]], now: float, *,
              shown: dict[str, float] | None = None, version: int | None = None) -> Admitted:
        """Mark a page's records seen and create their executions, in one transaction.

        ``flows`` are (flow name, supersede) of the flows subscribed to the source.
        Items marked ``prime`` are marked seen and
        nothing is scheduled. ``shown`` are keys the page showed again (key -> last
        seen, from ``seen``); their last_seen is refreshed when it is old.
        """
        result = Admitted()
        with self.write(source) as conn:
            fresh, again = self._unseen(source, items)
            result.duplicates = len(items) - len(fresh)
            self._touch(conn, source, {**again, **(shown or {})}, now)
            conn.executemany(
                "INSERT INTO records (source, key, id, version, hash, first_seen) VALUES (?, ?, ?, ?, ?, ?)",
                [(source, a.key, kept_id(a), a.version, a.hash, now) for a in fresh],
            )
            self.failpoint("inside_admit")
            scheduled = [a for a in fresh if not (a.prime or a.rekeyed)]
            result.rekeyed = sum(a.rekeyed for a in fresh)
            result.primed = len(fresh) - len(scheduled) - result.rekeyed
            result.new = len(scheduled)
            result.scheduled = [a.key for a in scheduled]
            for flow, supersede in flows:
                conn.executemany(
                    "INSERT INTO executions (flow, source, key, entity, step, status, attempts, next_at, context, created, updated, version_at, version)"
                    " VALUES (?, ?, ?, ?, 0, 'pending', 0, ?, ?, ?, ?, ?, ?)",
                    [(flow, source, a.key, a.entity, now, self._dump(a.context), now, now, a.version_at, version) for a in scheduled],
                )
                if supersede and scheduled:
                    result.superseded += self._supersede(conn, flow, {a.entity for a in scheduled}, now)
        return result

    def seen(self, source: str, keys: set[str]) -> dict[str, float]:
        """The keys of ``keys`` already in the ledger for this source, with when a poll last showed each."""
        found: dict[str, float] = {}
        for chunk, marks in _chunks(keys):
            found.update(self._tuples(
                f"SELECT key, {LAST_SEEN} FROM records WHERE source = ? AND key IN ({marks})", (source, *chunk)))
        return found

    def _unseen(self, source: str, items: list[Admission]) -> tuple[list[Admission], dict[str, float]]:
        """The items whose key is neither in the ledger nor earlier in the same page; and the keys seen before."""
        seen = self.seen(source, {a.key for a in items})
        fresh, taken = [], set(seen)
        for item in items:
            if item.key not in taken:
                taken.add(item.key)
                fresh.append(item)
        return fresh, seen

    @staticmethod
    def _touch(conn: sqlite3.Connection, source: str, shown: dict[str, float], now: float) -> None:
        """Refresh last_seen of re-shown keys whose mark is older than TOUCH_EVERY (most polls write nothing)."""
        stale = [(now, source, key) for key, last in shown.items() if last is None or last < now - TOUCH_EVERY]
        if stale:
            conn.executemany("UPDATE records SET last_seen = ? WHERE source = ? AND key = ?", stale)

    # `a` comes before `b` among versions of one entity: by `updated` where known, then by arrival
    _BEFORE = ("(COALESCE({a}.version_at, %r) < COALESCE({b}.version_at, %r) OR (COALESCE({a}.version_at, %r) ="
               " COALESCE({b}.version_at, %r) AND {a}.id < {b}.id))") % ((_UNKNOWN,) * 4)

    def _supersede(self, conn: sqlite3.Connection, flow: str, entities: set[str], now: float) -> int:
        """Retire waiting versions that have not started when a newer version of their entity was admitted."""
        newer = self._BEFORE.format(a="executions", b="n")
        count = 0
        for chunk, marks in _chunks(entities):
            count += conn.execute(
                "UPDATE executions SET status = 'superseded', updated = ?, last_error = 'a newer version of this entity was admitted'"
                f" WHERE flow = ? AND entity IN ({marks}) AND status = 'pending' AND step = 0 AND attempts = 0"
                " AND single = 0 AND replay = 0 AND EXISTS (SELECT 1 FROM executions n WHERE n.flow = executions.flow"
                " AND n.entity = executions.entity AND n.id != executions.id AND n.single = 0 AND n.replay = 0"
                f" AND n.status != 'superseded' AND {newer})",
                (now, flow, *chunk),
            ).rowcount
        return count

    def quarantine(self, source: str, hash: str, reason: str, page: str, excerpt: str, now: float) -> bool:
        """Keep a record that cannot be admitted; True the first time this content is seen."""
        with self.write(source) as conn:
            updated = conn.execute(
                "UPDATE quarantine SET last_seen = ?, count = count + 1 WHERE source = ? AND hash = ?", (now, source, hash)
            ).rowcount
            if not updated:
                conn.execute(
                    "INSERT INTO quarantine (source, hash, reason, page, excerpt, first_seen, last_seen, count) VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                    (source, hash, self._text(reason), self._text(page), self._text(excerpt), now, now),
                )
        return not updated

    # -- polls and cursors -----------------------------------------------------------------
    def start_poll(self, source: str, now: float) -> int:
        with self.write(source) as conn:
            return conn.execute("INSERT INTO polls (source, started, pages, fetched, new, primed, quarantined) VALUES (?, ?, 0, 0, 0, 0, 0)", (source, now)).lastrowid

    def known_content(self, source: str, hashes: set[bytes]) -> set[bytes]:
        """The content hashes of ``hashes`` the ledger holds for this source (under any key)."""
        found: set[bytes] = set()
        for chunk, marks in _chunks(hashes):
            found.update(r[0] for r in self._tuples(
                f"SELECT hash FROM records WHERE source = ? AND hash IN ({marks})", (source, *chunk)))
        return found

    # -- leases and agents -----------------------------------------------------------------
    def take_source(self, source: str, now: float, lease: float) -> bool:
        """Hold the source's lease (always: the flock makes this the only agent; a lease left by a dead one is taken)."""
        with self.write() as conn:
            row = conn.execute("SELECT owner, epoch FROM source_leases WHERE source = ?", (source,)).fetchone()
            epoch = row[1] if row and row[0] == self.worker else (row[1] if row else 0) + 1
            conn.execute("INSERT OR REPLACE INTO source_leases (source, owner, epoch, lease_until) VALUES (?, ?, ?, ?)",
                         (source, self.worker, epoch, now + lease))
        self._held[source] = (epoch, time.monotonic() + lease)
        self._lost.discard(source)
        return True

    def heartbeat(self, now: float, lease: float, running: list[Execution]) -> Renewed:
        """Renew this agent's row, its source leases and the leases of its running executions, in one transaction."""
        renewed, deadline = Renewed(), time.monotonic() + lease
        with self.write() as conn:
            host, pid = self.worker.rsplit(":", 2)[0], os.getpid()
            conn.execute("INSERT INTO agents (id, host, pid, started, heartbeat) VALUES (?, ?, ?, ?, ?)"
                         " ON CONFLICT (id) DO UPDATE SET heartbeat = excluded.heartbeat", (self.worker, host, pid, now, now))
            for source, (epoch, _) in list(self._held.items()):
                if conn.execute("UPDATE source_leases SET lease_until = ? WHERE source = ? AND owner = ? AND epoch = ?",
                                (now + lease, source, self.worker, epoch)).rowcount:
                    self._held[source] = (epoch, deadline)
                else:
                    renewed.lost_sources.append(source)
            for ex in running:
                if conn.execute("UPDATE executions SET lease_until = ? WHERE id = ? AND epoch = ? AND status = 'running'",
                                (now + lease, ex.id, ex.epoch)).rowcount:
                    ex.lease_deadline = deadline
                else:
                    renewed.lost_executions.append(ex.id)
        for source in renewed.lost_sources:
            self._held.pop(source, None)
            self._lost.add(source)
        self.fenced += len(renewed.lost_sources) + len(renewed.lost_executions)
        return renewed

    def agents(self, now: float) -> list[dict]:
        """Agents seen in the last day (this file has one at a time): sources held, executions running."""
        rows = self._rows("SELECT id, host, pid, started, heartbeat, stopped FROM agents WHERE stopped IS NULL OR stopped > ?"
                          " ORDER BY heartbeat DESC", (now - 86400,))
        for row in rows:
            row["sources"] = [r[0] for r in self._tuples(
                "SELECT source FROM source_leases WHERE owner = ? AND lease_until >= ? ORDER BY source", (row["id"], now))]
            row["running"] = self._tuples("SELECT COUNT(*) FROM executions WHERE status = 'running' AND owner = ?", (row["id"],))[0][0]
        return rows

    # -- delivery -----------------------------------------------------------------
    def recover(self, now: float) -> int:
        """Make every `running` execution due at once (only one agent holds the file, so they are orphans)."""
        with self.write() as conn:
            orphans = conn.execute("SELECT id, step, attempts FROM executions WHERE status = 'running'").fetchall()
            conn.executemany(
                "INSERT INTO attempts (execution, step, n, started, finished, outcome, error) VALUES (?, ?, ?, ?, ?, 'interrupted', 'the agent stopped during this attempt')",
                [(ex_id, step, attempts, now, now) for ex_id, step, attempts in orphans],
            )
            conn.execute(
                "UPDATE executions SET status = 'retrying', next_at = ?, lease_until = NULL, updated = ?,"
                " last_error = 'interrupted: the agent stopped during this attempt' WHERE status = 'running'",
                (now, now),
            )
        return len(orphans)

    def claim(self, now: float, limit: int, lease: float) -> list[Execution]:
        """Move up to ``limit`` due executions to `running` (attempts + 1, lease, epoch + 1) and return them.

        An execution waits while an earlier one of the same flow and entity is unfinished.
        """
        return self.finish_and_claim([], now, limit, lease)

    def finish_and_claim(self, done: list[tuple[Execution, "Finish"]], now: float, limit: int, lease: float,
                         *, wake: bool = False) -> list[Execution]:
        """Record finished runs, then (``wake``) make paused work due, then claim up to ``limit``, in one transaction."""
        if not done and limit <= 0 and not wake:
            return []
        with self.write() as conn:
            for execution, result in done:
                self._finish_one(conn, execution, result, now)
            if wake:
                self._wake(conn, now)
            rows = self._due(conn, now, limit) if limit > 0 else []
            conn.executemany(
                "INSERT INTO attempts (execution, step, n, started, finished, outcome, error)"
                " VALUES (?, ?, ?, ?, ?, 'interrupted', 'the agent running it lost its lease')",
                [(r["id"], r["step"], r["attempts"], now, now) for r in rows if r["status"] == "running"],
            )
            conn.executemany(
                "UPDATE executions SET status = 'running', attempts = attempts + 1, first_attempt = COALESCE(first_attempt, ?),"
                " lease_until = ?, owner = ?, epoch = epoch + 1, updated = ? WHERE id = ?",
                [(now, now + lease, self.worker, now, r["id"]) for r in rows],
            )
        deadline = time.monotonic() + lease
        return [
            Execution(r["id"], r["flow"], r["source"], r["key"], r["entity"], r["step"], r["attempts"] + 1,
                      r["first_attempt"] if r["first_attempt"] is not None else now, json.loads(r["context"]), r["replay"], bool(r["single"]),
                      r["version"], r["epoch"] + 1, deadline)
            for r in rows
        ]

    def _due(self, conn: sqlite3.Connection, now: float, limit: int) -> list[dict]:
        """Due waiting work and running work whose lease ran out (another agent's);
        a version waits while its entity has one running or an earlier one unfinished (running work whose lease ran
        out waits for no earlier version: one admitted while it ran waits for it, and waiting both ways held both)."""
        earlier = self._BEFORE.format(a="o", b="e")
        # one walk of the executions_due index in (next_at, id) order that stops at the limit: a running row is
        # in it too (its lease always ends after its next_at), claimable once its lease ran out
        cursor = conn.execute(
            f"SELECT e.* FROM executions e INDEXED BY executions_due WHERE e.status {IN_ACTIVE} AND e.next_at <= ?"
            " AND (e.status != 'running' OR (e.lease_until < ? AND (e.owner IS NULL OR e.owner != ?)))"
            " AND NOT EXISTS (SELECT 1 FROM executions o INDEXED BY executions_unfinished WHERE o.flow = e.flow"
            f" AND o.entity = e.entity AND o.id != e.id AND o.single = 0 AND e.single = 0 AND o.status {IN_ACTIVE}"
            f" AND (o.status = 'running' OR (e.status != 'running' AND {earlier})))"
            " ORDER BY e.next_at, e.id LIMIT ?",
            (now, now, self.worker, limit),
        )
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def wake_paused(self, now: float) -> int:
        """Make paused executions due now (their connector answers again)."""
        with self.write() as conn:
            return self._wake(conn, now)

    @staticmethod
    def _wake(conn: sqlite3.Connection, now: float) -> int:
        return conn.execute("UPDATE executions SET next_at = ?, updated = ? WHERE status = 'paused'", (now, now)).rowcount

    # -- config versions -----------------------------------------------------------------
    def use_config(self, hash: str, text: str, sections: dict, flows: dict, now: float) -> int:
        """Record the config the agent runs with (once per distinct content) and pin unpinned work to it; its number.

        Executions from before versions were kept (a migrated ledger) are pinned to the first version recorded."""
        with self.write() as conn:
            row = conn.execute("SELECT number FROM config_versions WHERE hash = ?", (hash,)).fetchone()
            if row:
                number = row[0]
                conn.execute("UPDATE config_versions SET last_used = ? WHERE number = ?", (now, number))
            else:
                number = conn.execute(
                    "INSERT INTO config_versions (hash, text, sections, flows, first_used, last_used) VALUES (?, ?, ?, ?, ?, ?)",
                    (hash, self._text(text), self._dump(sections), self._dump(flows), now, now)).lastrowid
            conn.execute("UPDATE executions SET version = ? WHERE version IS NULL", (number,))
        return number

"""The SQLite ledger's schema as a list of migrations (sqlite-utils ``Migrations``), one per version of
``state.base.SCHEMA_VERSIONS``. Imported only by an agent opening its ledger: operator commands read without it."""
from __future__ import annotations

import re

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from state.base import HASH_BYTES

migrations = Migrations("sync-agent-ledger")


@migrations()
def m001_initial(db: Database) -> None:
    db["records"].create({"source": str, "key": str, "id": str, "version": str, "hash": str, "first_seen": float}, pk=("source", "key"))
    db["executions"].create(
        {
            "id": int, "flow": str, "source": str, "key": str, "entity": str, "step": int, "status": str,
            "attempts": int, "first_attempt": float, "next_at": float, "lease_until": float, "context": str,
            "last_error": str, "created": float, "updated": float, "replay": int, "single": int,
        },
        pk="id",
        not_null={"flow", "source", "key", "step", "status", "attempts", "created", "updated"},
        defaults={"attempts": 0, "step": 0, "replay": 0, "single": 0},
    )
    db["executions"].create_index(["status", "next_at"])
    db["executions"].create_index(["flow", "entity", "id"])
    db["executions"].create_index(["source", "key"])
    db["attempts"].create(
        {"id": int, "execution": int, "step": int, "n": int, "started": float, "finished": float,
         "outcome": str, "status_code": int, "error": str},
        pk="id",
    )
    db["attempts"].create_index(["execution"])
    db["cursors"].create({"source": str, "value": str, "last_poll": float, "last_success": float, "last_error": str}, pk="source")
    db["polls"].create(
        {"id": int, "source": str, "started": float, "finished": float, "pages": int, "fetched": int,
         "new": int, "primed": int, "quarantined": int, "error": str},
        pk="id",
    )
    db["polls"].create_index(["source", "id"])
    db["quarantine"].create(
        {"source": str, "hash": str, "reason": str, "page": str, "excerpt": str, "first_seen": float, "last_seen": float, "count": int},
        pk=("source", "hash"),
    )
    db["meta"].create({"name": str, "value": str}, pk="name")


@migrations()
def m002_version_order_last_seen_priming(db: Database) -> None:
    db["records"].add_column("last_seen", float)  # the last poll that showed the key: `window` forgets by this
    db["executions"].add_column("version_at", float)  # the version's `updated` as a number: versions of an entity run in this order
    db["cursors"].add_column("prime_started", float)  # when priming began: versions updated after it are delivered


@migrations()
def m003_config_versions(db: Database) -> None:
    db["config_versions"].create(
        {"number": int, "hash": str, "text": str, "sections": str, "flows": str, "first_used": float, "last_used": float},
        pk="number",
    )
    db["config_versions"].create_index(["hash"], unique=True)
    db["executions"].add_column("version", int)  # the config version whose flow definition the execution runs
    db["cursors"].add_column("identity", str)  # how the source identified records at its last good poll
    db["records"].create_index(["source", "hash"])  # re-keying: a version known under the previous identity


@migrations()
def m004_counts_by_flow(db: Database) -> None:
    db["executions"].create_index(["flow", "status"])  # status, /healthz and /metrics count by flow and status


@migrations()
def m005_fenced_leases(db: Database) -> None:
    db["executions"].add_column("epoch", int, not_null_default=0)  # the claim's fencing token
    db["executions"].add_column("owner", str)  # the worker that claimed it
    db["source_leases"].create({"source": str, "owner": str, "epoch": int, "lease_until": float}, pk="source")
    db["agents"].create({"id": str, "host": str, "pid": int, "started": float, "heartbeat": float, "stopped": float}, pk="id")


@migrations()
def m006_claim_indexes(db: Database) -> None:
    # the claim walks unfinished work in (next_at, id) order and stops at its limit; an entity's unfinished versions
    # are found without touching finished rows: millions of those cost the claim nothing (PostgreSQL has the same two)
    db.execute("CREATE INDEX executions_due ON executions (next_at, id) WHERE status IN ('pending', 'retrying', 'paused', 'running')")
    db.execute("CREATE INDEX executions_unfinished ON executions (flow, entity) WHERE status IN ('pending', 'retrying', 'paused', 'running')")


_HEX_HASH = re.compile(r"[0-9a-fA-F]{%d}" % (2 * HASH_BYTES))


def short_hash(value: object) -> bytes | None:
    """A content hash kept as 64 hex digits before version 7, as the ledger keeps it since: the bytes of its first
    HASH_BYTES; a value no agent wrote (not hex) becomes NULL: it never matched a record's content anyway."""
    if isinstance(value, str) and _HEX_HASH.match(value):
        return bytes.fromhex(value[:2 * HASH_BYTES])
    return None


@migrations()
def m007_compact_records(db: Database) -> None:
    # A seen record stays for as long as its view can show it, so these rows are most of a ledger. The content hash
    # becomes HASH_BYTES raw bytes (in the row and in the re-keying index), the id is kept only where it is not the key,
    # last_seen only where a later poll moved it. SQLite cannot change a column's type in place: the table is copied,
    # in key order, so its pages and its key index come out full. One transaction, like every migration.
    db.conn.create_function("short_hash", 1, short_hash, deterministic=True)
    db.execute("ALTER TABLE records RENAME TO records_6")
    db["records"].create(
        {"source": str, "key": str, "id": str, "version": str, "hash": bytes, "first_seen": float, "last_seen": float},
        pk=("source", "key"),
    )
    db.execute("INSERT INTO records (source, key, id, version, hash, first_seen, last_seen)"
               " SELECT source, key, NULLIF(id, key), version, short_hash(hash), first_seen, NULLIF(last_seen, first_seen)"
               " FROM records_6 ORDER BY source, key")
    db.execute("DROP TABLE records_6")
    db["records"].create_index(["source", "hash"])  # re-keying: a version known under the previous identity


@migrations()
def m008_running_by_lease(db: Database) -> None:
    # an agent with nothing due sleeps until the first lease on running work held by another agent runs out: this
    # index holds running rows only (a few per agent), so finding that moment costs nothing however much work waits
    db.execute("CREATE INDEX executions_leased ON executions (lease_until) WHERE status = 'running'")


@migrations()
def m009_no_standing_content_index(db: Database) -> None:
    # re-keying alone reads seen records by content hash; the index cost every admission most of its time (a random
    # 16-byte key: a leaf page of it written per record). A re-key poll builds it for itself (content_index).
    db.execute("DROP INDEX IF EXISTS idx_records_source_hash")

"""Schema 7 (compact seen records) on both ledgers: a ledger written before it migrates without loss.

``tests/data/ledger-schema6.db`` was written by the agent at schema 6 from the views in
``tests/data/ledger-schema6-views.json`` and ``CONFIG`` below, its clock at ``NOW``: each source polled once
(``leads`` deduped by id and delivered, ``versions`` by id+updated and primed, ``blobs`` by content and
delivered), two sends of the flow ``sync`` finished, a third claimed and left running (the agent killed
during it). On PostgreSQL a schema-6 ledger is laid out as that version had it and filled with the same rows.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import textwrap
from contextlib import closing
from pathlib import Path

import psycopg
import pytest

import state.sqlite_schema
from agent.config import load
from agent.poller import Poller, identify
from sources.file import FileSource
from state.base import HASH_BYTES, SCHEMA_VERSION, SCHEMA_VERSIONS, LedgerError
from state.postgres import PostgresLedger
from state.sqlite import SqliteLedger

DATA = Path(__file__).parent / "data"
NOW = 1_790_000_000.0
LATER = NOW + 600
CONFIG_OF = textwrap.dedent("""
    [agent]
    ledger = "var/agent.db"
    log_level = "WARNING"

    [sources.leads]
    kind = "file"
    path = "leads.json"
    id = "sid"
    updated = "modified"
    entity = "rid"
    dedupe = "{leads}"
    first_run = "deliver"

    [sources.versions]
    kind = "file"
    path = "versions.json"
    id = "sid"
    updated = "modified"
    dedupe = "{versions}"
    first_run = "skip"

    [sources.blobs]
    kind = "file"
    path = "blobs.json"
    id = "sid"
    dedupe = "{blobs}"
    first_run = "deliver"

    [connectors.out]
    kind = "file"
    path = "out.jsonl"

    [[flows]]
    name = "sync"
    source = "leads"
      [[flows.steps]]
      kind = "action"
      action = "out > record > write"

    [[flows]]
    name = "versions"
    source = "versions"
      [[flows.steps]]
      kind = "action"
      action = "out > record > write"

    [[flows]]
    name = "blobs"
    source = "blobs"
      [[flows.steps]]
      kind = "action"
      action = "out > record > write"
""").format
CONFIG = CONFIG_OF(leads="id", versions="id+updated", blobs="content")  # as the ledger was written
# records as schema 6 laid them out on PostgreSQL
V6_RECORDS = ("CREATE TABLE records (source TEXT NOT NULL, key TEXT NOT NULL, id TEXT, version TEXT, hash TEXT,"
              " first_seen DOUBLE PRECISION, last_seen DOUBLE PRECISION, PRIMARY KEY (source, key))",
              "CREATE INDEX records_source_hash ON records (source, hash)")
COLUMNS = "source, key, id, version, hash, first_seen, last_seen"


def views() -> dict[str, list[dict]]:
    return json.loads((DATA / "ledger-schema6-views.json").read_text())


def fixture_rows(table: str, columns: str) -> list[tuple]:
    """Rows of the schema-6 fixture, by their first two columns."""
    with closing(sqlite3.connect(f"file:{DATA / 'ledger-schema6.db'}?immutable=1", uri=True)) as conn:
        return conn.execute(f"SELECT {columns} FROM {table} ORDER BY 1, 2").fetchall()


class OldLedger:
    """A schema-6 ledger on one backend: opened (and so migrated) by this agent, its tables read directly."""

    def __init__(self, kind: str, folder: Path, pg_url: str | None = None):
        self.kind, self.folder, self.url = kind, folder, pg_url
        self.path = folder / "var" / "agent.db"
        self.opened: list = []

    def open(self):
        ledger = SqliteLedger(self.path) if self.kind == "sqlite" else PostgresLedger(self.url)
        self.opened.append(ledger)
        return ledger

    def sql(self, statement: str, *params) -> list[tuple]:
        if self.kind == "sqlite":
            with closing(sqlite3.connect(self.path)) as conn, conn:
                return conn.execute(statement, params).fetchall()
        with psycopg.connect(self.url) as conn:
            cursor = conn.execute(statement.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []

    def close(self) -> None:
        for ledger in self.opened:
            ledger.close()


def _postgres_at_schema_6(url: str) -> None:
    """Schema 6 on PostgreSQL: records with the hash as hex text; the fixture's seen records and cursors in it."""
    PostgresLedger(url).close()
    with psycopg.connect(url) as conn:
        conn.execute("DROP TABLE records")
        for statement in V6_RECORDS:
            conn.execute(statement)
        conn.execute("UPDATE meta SET value = '6' WHERE name = 'schema_version'")
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO records ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)", fixture_rows("records", COLUMNS))
            columns = "source, value, last_poll, last_success, last_error, prime_started, identity"
            cur.executemany(f"INSERT INTO cursors ({columns}) VALUES (%s, %s, %s, %s, %s, %s, %s)", fixture_rows("cursors", columns))


@pytest.fixture(params=["sqlite", "postgresql"])
def old(request, tmp_path):
    """A schema-6 ledger beside the views and config that wrote it."""
    (tmp_path / "agent.toml").write_text(CONFIG)
    for name, records in views().items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"records": records}))
    (tmp_path / "var").mkdir()
    shutil.copy(DATA / "ledger-schema6.db", tmp_path / "var" / "agent.db")
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        _postgres_at_schema_6(url)
    store = OldLedger(request.param, tmp_path, url)
    yield store
    store.close()


def poller(folder: Path, ledger, config_text: str = CONFIG, at: float = LATER) -> Poller:
    (folder / "agent.toml").write_text(config_text)
    cfg = load(folder / "agent.toml")
    sources = {name: FileSource(c, base_dir=folder) for name, c in cfg.sources.items()}
    return Poller(cfg, ledger, sources, clock=lambda: at)


def show(folder: Path, source: str, records: list[dict]) -> None:
    (folder / f"{source}.json").write_text(json.dumps({"records": records}))


def test_schema_9_is_the_last_step_of_the_sqlite_migrations_and_is_described():
    from sqlite_utils import Database

    names = [m.name for m in state.sqlite_schema.migrations.pending(Database(memory=True))]
    assert (SCHEMA_VERSION, len(names), names[-1]) == (9, 9, "m009_no_standing_content_index")
    assert sorted(SCHEMA_VERSIONS) == list(range(1, SCHEMA_VERSION + 1))


# -- what the migration keeps ------------------------------------------------------------------------
def test_every_seen_record_is_kept_with_its_hash_as_16_bytes(old):
    before = fixture_rows("records", COLUMNS)
    assert len(before) == 8 and all(len(row[4]) == 64 for row in before)  # hex text, as schema 6 wrote it
    ledger = old.open()
    assert old.sql("SELECT value FROM meta WHERE name = 'schema_version'") == [("9",)]
    for source, key, id, version, hash, first_seen, last_seen in before:
        assert ledger.record(source, key) == {"source": source, "key": key, "id": id, "version": version, "hash": hash[:2 * HASH_BYTES],
                                              "first_seen": first_seen, "last_seen": last_seen}
    stored = {(source, key): bytes(hash) for source, key, hash in old.sql("SELECT source, key, hash FROM records")}
    assert {len(hash) for hash in stored.values()} == {HASH_BYTES}
    # what this agent computes for the same records is what the migration kept: re-keying still recognises them
    cfg = load(old.folder / "agent.toml")
    for source, records in views().items():
        for record in records:
            item = identify(record, cfg.sources[source])
            assert stored[(source, item.key)] == item.hash
    # an id that is the key and a last_seen no later poll moved are not kept twice
    assert sorted(old.sql("SELECT source, COUNT(*) FROM records WHERE id IS NULL GROUP BY source")) == [("leads", 4)]
    assert old.sql("SELECT COUNT(*) FROM records WHERE last_seen IS NOT NULL") == [(0,)]
    assert ledger.keys_of_id("S3") == [("leads", "S3")] and ledger.keys_of_id("V1") == [("versions", "V1@2026-09-01T08:00:00Z")]
    assert ledger.seen("leads", {"S4", "S9"}) == {"S4": NOW}
    assert ledger.cursor("leads")["value"] == "2026-09-01T10:02:00Z"
    assert ledger.sources()["versions"]["seen"] == 2


def test_a_re_poll_admits_nothing_new_and_a_changed_record_once(old):
    ledger = old.open()
    polls = poller(old.folder, ledger)
    for source, records in views().items():
        result = polls.poll(source)
        assert (result.error, result.new, result.primed, result.duplicates) == (None, 0, 0, len(records)), source
    shown = views()
    shown["leads"].insert(0, {"sid": "S5", "rid": "R1", "modified": "2026-09-01T10:05:00Z", "name": "Ana Lopes-Reis"})  # R1 updated
    shown["versions"][1] = {**shown["versions"][1], "modified": "2026-09-01T10:00:00Z", "qty": 3}  # V1 updated
    shown["blobs"][1] = {**shown["blobs"][1], "text": "one, edited"}  # B1 edited
    for source, records in shown.items():
        show(old.folder, source, records)
        assert polls.poll(source).new == 1, source
        assert polls.poll(source).new == 0, source
    assert ledger.keys_of_id("V1") == [("versions", "V1@2026-09-01T08:00:00Z"), ("versions", "V1@2026-09-01T10:00:00Z")]
    assert ledger.record("leads", "S5")["id"] == "S5" and len(ledger.record("blobs", ledger.keys_of_id("B1")[-1][1])["hash"]) == 32


@pytest.mark.parametrize("source, dedupe", [("leads", "id+updated"), ("blobs", "id"), ("versions", "id")])
def test_re_keying_recognises_every_version_seen_before_the_migration(old, source, dedupe):
    """A source keyed differently finds its records by their content hash: the migrated hashes are the ones the agent computes."""
    ledger = old.open()
    result = poller(old.folder, ledger, CONFIG_OF(**{"leads": "id", "versions": "id+updated", "blobs": "content", source: dedupe})).poll(source)
    assert (result.error, result.rekeyed, result.new) == (None, len(views()[source]), 0)


def test_an_operator_reading_a_ledger_not_yet_migrated_sees_the_same_record(tmp_path):
    """`agent why` beside an agent that has not migrated its ledger yet: readers migrate nothing and show the same answer."""
    path = tmp_path / "agent.db"
    shutil.copy(DATA / "ledger-schema6.db", path)
    reader = SqliteLedger(path, hold=False)
    try:
        before = reader.record("versions", "V1@2026-09-01T08:00:00Z")
    finally:
        reader.close()
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() == ("6",)
    with SqliteLedger(path) as ledger:
        assert ledger.record("versions", "V1@2026-09-01T08:00:00Z") == before
    assert len(before["hash"]) == 2 * HASH_BYTES and before["id"] == "V1"


def test_the_send_interrupted_before_the_migration_goes_again_under_its_key(tmp_path):
    path = tmp_path / "agent.db"
    shutil.copy(DATA / "ledger-schema6.db", path)
    with SqliteLedger(path) as ledger:
        assert ledger.counts() == {"sync": {"succeeded": 2, "running": 1, "pending": 1}, "blobs": {"pending": 2}}
        assert ledger.recover(LATER) == 1
        claimed = {ex.key: ex for ex in ledger.claim(LATER, 10, 300) if ex.flow == "sync"}
        assert sorted(claimed) == ["1", "S2"]
        again = claimed["S2"]  # the same execution: its step's idempotency key is the one the killed send used
        assert (again.id, again.attempts) == (3, 2)
        assert ledger.attempts_of(again.id)[-1]["outcome"] == "interrupted"


# -- a migration that fails leaves the old ledger as it was ----------------------------------------------
def test_a_migration_cut_short_leaves_the_schema_6_ledger_whole_and_runs_again(tmp_path, monkeypatch):
    path = tmp_path / "agent.db"
    shutil.copy(DATA / "ledger-schema6.db", path)
    converted = []

    def failing(value):
        if len(converted) == 5:
            raise OSError("disk full")
        converted.append(value)
        return None

    monkeypatch.setattr(state.sqlite_schema, "short_hash", failing)
    with pytest.raises(LedgerError):
        SqliteLedger(path)
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute(f"SELECT {COLUMNS} FROM records ORDER BY source, key").fetchall() == fixture_rows("records", COLUMNS)
        assert conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() == ("6",)
        assert conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'records%'").fetchall() == [("records",)]
    monkeypatch.undo()
    with SqliteLedger(path) as ledger:
        assert ledger.record("leads", "S4")["hash"] == dict(fixture_rows("records", "key, hash"))["S4"][:2 * HASH_BYTES]


def test_a_hash_no_agent_wrote_becomes_null_and_matches_nothing():
    assert state.sqlite_schema.short_hash("ab" * 32) == bytes([0xAB] * HASH_BYTES)
    assert state.sqlite_schema.short_hash("AB" * 16 + "zz") == bytes([0xAB] * HASH_BYTES)
    for value in ("h1", "", None, "xy" * 32, b"\x01" * 16):
        assert state.sqlite_schema.short_hash(value) is None

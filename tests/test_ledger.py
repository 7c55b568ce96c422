"""The ledger on a real SQLite file: admission, claims, finishing, recovery, locking, damage."""
import hashlib
import os
import stat
from pathlib import Path

import pytest

from state.base import LedgerBusy, LedgerDamaged, LedgerUnwritable
from state.base import HASH_BYTES, TOUCH_EVERY, Admission, Finish
from state.sqlite import SqliteLedger as Ledger

NOW = 1_800_000_000.0


def item(key: str, entity: str | None = None, record: dict | None = None) -> Admission:
    return Admission(key=key, id=key, version="", hash=b"h" + key.encode(), entity=entity or key, context={"record": record or {"id": key}})


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "var" / "agent.db") as led:
        yield led


def test_fresh_file_is_created_migrated_and_private(tmp_path):
    path = tmp_path / "var" / "agent.db"
    with Ledger(path) as led:
        assert set(led.db.table_names()) >= {"records", "executions", "attempts", "cursors", "polls", "meta", "quarantine"}
        assert led.db["meta"].get("schema_version")["value"] == "9"
        assert led.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert led.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    for name in ("agent.db", "agent.db-wal", "agent.db-shm"):
        if (path.parent / name).exists():
            assert stat.S_IMODE(os.stat(path.parent / name).st_mode) == 0o600


def test_reopening_keeps_everything_and_migrates_nothing_twice(tmp_path):
    path = tmp_path / "agent.db"
    with Ledger(path) as led:
        led.admit("s", [item("1")], [("f", False)], NOW)
    with Ledger(path) as led:
        assert led.counts() == {"f": {"pending": 1}}
        assert led.admit("s", [item("1")], [("f", False)], NOW).new == 0


def test_admit_marks_seen_and_schedules_one_execution_per_flow(ledger):
    result = ledger.admit("s", [item("1"), item("2"), item("1")], [("a", False), ("b", False)], NOW)
    assert (result.new, result.duplicates) == (2, 1)
    assert ledger.counts() == {"a": {"pending": 2}, "b": {"pending": 2}}
    again = ledger.admit("s", [item("2"), item("3")], [("a", False), ("b", False)], NOW)
    assert (again.new, again.duplicates) == (1, 1)


def test_keys_are_per_source(ledger):
    ledger.admit("s1", [item("1")], [("f", False)], NOW)
    assert ledger.admit("s2", [item("1")], [("g", False)], NOW).new == 1


def test_priming_marks_seen_without_scheduling(ledger):
    items = [item("1"), item("2")]
    for each in items:
        each.prime = True
    result = ledger.admit("s", items, [("f", False)], NOW)
    assert (result.primed, result.new) == (2, 0)
    assert ledger.counts() == {}
    assert ledger.admit("s", [item("1")], [("f", False)], NOW).new == 0


def test_admission_is_all_or_nothing(ledger):
    """A failure inside the transaction leaves neither seen keys nor executions behind."""
    ledger.conn.execute("CREATE TRIGGER boom BEFORE INSERT ON executions BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(Exception):
        ledger.admit("s", [item("1")], [("f", False)], NOW)
    ledger.conn.execute("DROP TRIGGER boom")
    assert ledger.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 0
    assert ledger.admit("s", [item("1")], [("f", False)], NOW).new == 1


def test_lone_surrogate_in_a_record_does_not_break_the_insert(ledger):
    ledger.admit("s", [item("1", record={"name": "\ud800"})], [("f", False)], NOW)
    [ex] = ledger.claim(NOW, 10, 300)
    assert ex.context["record"]["name"] == "\ud800"


def test_cursor_moves_only_after_a_successful_poll(ledger):
    poll = ledger.start_poll("s", NOW)
    ledger.end_poll(poll, "s", NOW + 1, pages=2, fetched=5, new=5, primed=0, quarantined=0, error=None, cursor="2026-01-01T00:00:00Z")
    assert ledger.cursor("s")["value"] == "2026-01-01T00:00:00Z"
    assert ledger.cursor("s")["last_success"] == NOW + 1
    poll = ledger.start_poll("s", NOW + 10)
    ledger.end_poll(poll, "s", NOW + 11, pages=1, fetched=1, new=1, primed=0, quarantined=0, error="page 2: HTTP 500", cursor="2027-01-01T00:00:00Z")
    row = ledger.cursor("s")
    assert (row["value"], row["last_success"], row["last_error"]) == ("2026-01-01T00:00:00Z", NOW + 1, "page 2: HTTP 500")


def test_a_source_is_not_primed_until_a_poll_succeeds(ledger):
    poll = ledger.start_poll("s", NOW)
    ledger.end_poll(poll, "s", NOW, pages=0, fetched=0, new=0, primed=0, quarantined=0, error="HTTP 401", cursor=None)
    assert ledger.cursor("s")["last_success"] is None


def test_claim_takes_due_work_in_order_and_holds_a_lease(ledger):
    ledger.admit("s", [item("1"), item("2"), item("3")], [("f", False)], NOW)
    claimed = ledger.claim(NOW, 2, 300)
    assert [e.key for e in claimed] == ["1", "2"]
    assert all(e.attempts == 1 for e in claimed)
    rows = {r["key"]: r for r in ledger.executions()}
    assert rows["1"]["status"] == "running"
    assert ledger.conn.execute("SELECT lease_until FROM executions WHERE key = '1'").fetchone()[0] == NOW + 300
    assert [e.key for e in ledger.claim(NOW, 10, 300)] == ["3"]
    assert ledger.claim(NOW, 10, 300) == []


def test_versions_of_one_entity_run_in_the_order_seen(ledger):
    ledger.admit("s", [item("v1", "E"), item("x", "X")], [("f", False)], NOW)
    ledger.admit("s", [item("v2", "E")], [("f", False)], NOW)
    first = ledger.claim(NOW, 10, 300)
    assert sorted(e.key for e in first) == ["v1", "x"]
    v1 = next(e for e in first if e.key == "v1")
    ledger.finish(v1, Finish("retrying", 0, v1.context, next_at=NOW + 60, error="503"), NOW)
    assert ledger.claim(NOW + 1, 10, 300) == []  # v2 waits behind the retrying v1
    [again] = ledger.claim(NOW + 60, 10, 300)
    ledger.finish(again, Finish("succeeded", 1, again.context), NOW + 60)
    assert [e.key for e in ledger.claim(NOW + 60, 10, 300)] == ["v2"]


def test_supersede_retires_an_older_version_that_has_not_started(ledger):
    ledger.admit("s", [item("v1", "E")], [("f", True)], NOW)
    result = ledger.admit("s", [item("v2", "E")], [("f", True)], NOW)
    assert result.superseded == 1
    assert {r["key"]: r["status"] for r in ledger.executions()} == {"v1": "superseded", "v2": "pending"}


def test_finish_commits_output_step_and_attempt_together(ledger):
    ledger.admit("s", [item("1")], [("f", False)], NOW)
    [ex] = ledger.claim(NOW, 1, 300)
    attempt = {"step": 0, "started": NOW, "finished": NOW + 1, "outcome": "succeeded", "status_code": 201, "error": None}
    ledger.finish(ex, Finish("pending", 1, {**ex.context, "steps": {"0": {"id": 7}}}, next_at=NOW, attempt=attempt), NOW + 1)
    [row] = ledger.executions()
    assert (row["status"], row["step"], row["attempts"]) == ("pending", 1, 0)
    assert ledger.attempts_of(row["id"]) == [{"step": 0, "n": 1, "started": NOW, "finished": NOW + 1, "outcome": "succeeded", "status_code": 201, "error": None}]
    [ex2] = ledger.claim(NOW + 1, 1, 300)
    assert ex2.step == 1 and ex2.context["steps"]["0"] == {"id": 7}


def test_paused_spends_no_attempt(ledger):
    ledger.admit("s", [item("1")], [("f", False)], NOW)
    [ex] = ledger.claim(NOW, 1, 300)
    ledger.finish(ex, Finish("paused", 0, ex.context, next_at=NOW + 60, error="401"), NOW)
    assert ledger.executions()[0]["attempts"] == 0


def test_recover_makes_orphans_due_at_once_and_records_the_interruption(ledger):
    ledger.admit("s", [item("1"), item("2")], [("f", False)], NOW)
    ledger.claim(NOW, 1, 300)
    assert ledger.recover(NOW + 5) == 1
    rows = {r["key"]: r for r in ledger.executions()}
    assert rows["1"]["status"] == "retrying" and rows["1"]["next_at"] == NOW + 5
    assert ledger.attempts_of(rows["1"]["id"])[0]["outcome"] == "interrupted"
    [again] = [e for e in ledger.claim(NOW + 5, 10, 300) if e.key == "1"]
    assert again.attempts == 2


def test_requeue_failed_and_dead(ledger):
    ledger.admit("s", [item("1"), item("2"), item("3")], [("f", False)], NOW)
    a, b, c = ledger.claim(NOW, 3, 300)
    ledger.finish_many([(a, Finish("dead", 0, a.context, error="gave up")), (b, Finish("failed", 0, b.context, error="400")),
                        (c, Finish("succeeded", 1, c.context))], NOW)
    assert ledger.requeue([b.id, c.id], NOW + 1) == [b.id]
    assert ledger.requeue(None, NOW + 1, dead=True) == [a.id]
    statuses = {r["key"]: r["status"] for r in ledger.executions()}
    assert statuses == {"1": "retrying", "2": "retrying", "3": "succeeded"}


def test_quarantine_reports_the_same_content_once(ledger):
    assert ledger.quarantine("s", "abc", "no id", "page 1 record 3", "{}", NOW) is True
    assert ledger.quarantine("s", "abc", "no id", "page 1 record 3", "{}", NOW + 60) is False
    [row] = ledger.quarantined()
    assert (row["count"], row["reason"]) == (2, "no id")


def test_prune_keeps_waiting_failed_and_dead_work(ledger):
    ledger.admit("s", [item("1"), item("2"), item("3")], [("f", False)], NOW)
    a, b, _ = ledger.claim(NOW, 3, 300)
    ledger.finish_many([(a, Finish("succeeded", 1, a.context)), (b, Finish("dead", 0, b.context))], NOW)
    removed = ledger.prune(NOW + 10, {"s": 5.0}, NOW + 10 + TOUCH_EVERY)
    assert removed["executions"] == 1
    assert sorted(r["key"] for r in ledger.executions()) == ["2", "3"]
    assert removed["records"] == 1  # the seen key of the pruned execution, older than the window


def test_second_holder_is_refused(tmp_path):
    path = tmp_path / "agent.db"
    with Ledger(path):
        with pytest.raises(LedgerBusy, match="another agent is running"):
            Ledger(path)
        with Ledger(path, hold=False) as reader:  # operator commands still work beside the agent
            assert reader.counts() == {}


def test_damaged_file_is_refused_never_recreated(tmp_path):
    path = tmp_path / "agent.db"
    with Ledger(path) as led:
        led.admit("s", [item(str(i)) for i in range(2000)], [("f", False)], NOW)
        led.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[0:16] = b"garbage garbage!"
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerDamaged, match="damaged"):
        Ledger(path)
    assert path.read_bytes()[:16] == b"garbage garbage!"


def test_damaged_interior_page_is_detected(tmp_path):
    path = tmp_path / "agent.db"
    with Ledger(path) as led:
        led.admit("s", [item(str(i), record={"pad": "x" * 200}) for i in range(3000)], [("f", False)], NOW)
        led.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = led.conn.execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(path.read_bytes())
    for offset in range(page_size * 5, page_size * 9):
        data[offset] = 0xA5
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerDamaged):
        Ledger(path)


def dated(key: str, entity: str, at: float | None) -> Admission:
    return Admission(key=key, id=key, version="", hash="h" + key, entity=entity, context={"record": {"id": key}}, version_at=at)


def test_versions_of_one_entity_run_in_the_order_of_their_updated_time_not_arrival(ledger):
    ledger.admit("s", [dated("new", "E", NOW + 20), dated("mid", "E", NOW + 10)], [("f", False)], NOW)  # newest-first page
    ledger.admit("s", [dated("old", "E", NOW)], [("f", False)], NOW)  # a later page
    order = []
    for _ in range(3):
        [ex] = ledger.claim(NOW, 10, 300)
        order.append(ex.key)
        ledger.finish(ex, Finish("succeeded", 1, ex.context), NOW)
    assert order == ["old", "mid", "new"]


def test_a_version_waits_while_a_later_one_of_its_entity_is_running(ledger):
    ledger.admit("s", [dated("v2", "E", NOW + 10)], [("f", False)], NOW)
    [running] = ledger.claim(NOW, 10, 300)
    ledger.admit("s", [dated("v1", "E", NOW)], [("f", False)], NOW)  # older, arrives while v2 is being sent
    assert ledger.claim(NOW, 10, 300) == []
    ledger.finish(running, Finish("succeeded", 1, running.context), NOW)
    assert [e.key for e in ledger.claim(NOW, 10, 300)] == ["v1"]


def test_versions_without_a_usable_time_sort_first_and_never_deadlock(ledger):
    ledger.admit("s", [dated("x", "E", NOW + 7), dated("y", "E", None), dated("z", "E", NOW + 3)], [("f", False)], NOW)
    order = []
    while claimed := ledger.claim(NOW, 10, 300):
        [ex] = claimed
        order.append(ex.key)
        ledger.finish(ex, Finish("succeeded", 1, ex.context), NOW)
    assert order == ["y", "z", "x"]


def test_supersede_retires_only_older_versions(ledger):
    ledger.admit("s", [dated("new", "E", NOW + 20)], [("f", True)], NOW)
    result = ledger.admit("s", [dated("old", "E", NOW)], [("f", True)], NOW)  # stale, from a later page
    assert result.superseded == 1
    assert {r["key"]: r["status"] for r in ledger.executions()} == {"new": "pending", "old": "superseded"}
    both = ledger.admit("s", [dated("b2", "B", NOW + 5), dated("b1", "B", NOW)], [("f", True)], NOW)  # one page, newest first
    assert both.superseded == 1
    assert {r["key"]: r["status"] for r in ledger.executions() if r["entity"] == "B"} == {"b2": "pending", "b1": "superseded"}


def test_a_started_version_is_never_superseded(ledger):
    ledger.admit("s", [dated("v1", "E", NOW)], [("f", True)], NOW)
    [running] = ledger.claim(NOW, 1, 300)
    assert ledger.admit("s", [dated("v2", "E", NOW + 1)], [("f", True)], NOW).superseded == 0
    assert {r["key"]: r["status"] for r in ledger.executions()} == {"v1": "running", "v2": "pending"}


def test_items_marked_prime_are_seen_without_work(ledger):
    items = [item("a"), item("b")]
    items[0].prime = True
    result = ledger.admit("s", items, [("f", False)], NOW)
    assert (result.primed, result.new) == (1, 1)
    assert [r["key"] for r in ledger.executions()] == ["b"]


def test_priming_start_is_kept_until_a_poll_succeeds(ledger):
    assert ledger.start_priming("s", NOW) == NOW
    assert ledger.start_priming("s", NOW + 60) == NOW  # the second try covers the same view as the first
    ledger.end_poll(ledger.start_poll("s", NOW + 61), "s", NOW + 62, pages=1, fetched=0, new=0, primed=0, quarantined=0, error=None, cursor=None)
    assert ledger.cursor("s")["prime_started"] == NOW


def test_a_key_shown_again_is_remembered_by_when_it_was_last_shown(ledger):
    ledger.admit("s", [item("1"), item("2")], [], NOW)
    later = NOW + 10 * 86400
    ledger.admit("s", [], [], later, shown=ledger.seen("s", {"1"}))  # a poll shows "1" again (a known key)
    ledger.admit("s", [item("2")], [], later + 1)  # ... or as a duplicate on a page
    assert ledger.seen("s", {"1", "2"}) == {"1": later, "2": later + 1}
    assert ledger.prune(later, {"s": 86400.0}, later + 86400 + TOUCH_EVERY)["records"] == 0
    assert ledger.prune(later, {"s": 86400.0}, later + 86400 + TOUCH_EVERY + 2)["records"] == 2


def test_a_fresh_mark_is_not_rewritten_on_every_poll(ledger):
    ledger.admit("s", [item("1")], [], NOW)
    ledger.admit("s", [], [], NOW + TOUCH_EVERY / 2, shown=ledger.seen("s", {"1"}))
    assert ledger.seen("s", {"1"}) == {"1": NOW}


def test_an_old_ledger_migrates_forward_and_keeps_its_records(tmp_path):
    import sqlite3
    from sqlite_utils import Database
    from state.sqlite_schema import m001_initial
    path = tmp_path / "old.db"
    db = Database(path)
    m001_initial(db)
    db.execute("CREATE TABLE _sqlite_migrations (migration_set TEXT, name TEXT, applied_at TEXT)")
    db.execute("INSERT INTO _sqlite_migrations VALUES ('sync-agent-ledger', 'm001_initial', '2026-11-01')")
    db["records"].insert({"source": "s", "key": "k", "id": "k", "version": "", "hash": "h", "first_seen": NOW})
    db.conn.commit()
    db.conn.close()
    with Ledger(path) as led:
        assert led.seen("s", {"k"}) == {"k": NOW}
        assert led.db["meta"].get("schema_version")["value"] == "9"
    assert sqlite3.connect(path).execute("SELECT last_seen FROM records").fetchone() == (None,)


def test_a_seen_record_takes_little_of_the_ledger(tmp_path):
    """Seen records stay as long as their view can show them: a row and two index entries of about 150 bytes in all.
    The same records took about 270 with the hash as 64 hex digits (in the row and its index), 165 with an id
    repeating the key and a last_seen repeating first_seen."""
    with Ledger(tmp_path / "agent.db") as led:
        def used() -> int:
            return led.conn.execute("SELECT (SELECT page_count FROM pragma_page_count) - (SELECT freelist_count FROM pragma_freelist_count)"
                                    ).fetchone()[0] * led.conn.execute("PRAGMA page_size").fetchone()[0]

        empty, pages, size = used(), 20, 1000
        for page in range(pages):  # newest first, a page per transaction, as a view is polled
            numbers = range((pages - page) * size, (pages - page - 1) * size, -1)
            led.admit("leads", [Admission(key=f"S{n:09d}", id=f"S{n:09d}", version=f"2026-11-{n % 28 + 1:02d}T10:00:00Z",
                                          hash=hashlib.sha256(str(n).encode()).digest()[:HASH_BYTES], entity=f"R{n:07d}", context={},
                                          prime=True) for n in numbers], [("f", False)], NOW)
        assert (used() - empty) / (pages * size) < 160


def test_a_symlinked_path_locks_the_real_file(tmp_path):
    real = tmp_path / "var" / "agent.db"
    with Ledger(real):
        os.symlink(real, tmp_path / "alias.db")
        with pytest.raises(LedgerBusy):
            Ledger(tmp_path / "alias.db")


def test_an_empty_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "agent.db"
    path.write_bytes(b"")
    with pytest.raises(LedgerDamaged, match="holds no ledger"):
        Ledger(path)
    assert path.read_bytes() == b""


def test_missing_parent_folders_are_created_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        with Ledger(tmp_path / "data" / "var" / "agent.db"):
            pass
    finally:
        os.umask(old)
    for folder in (tmp_path / "data", tmp_path / "data" / "var"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700


def test_a_ledger_of_schema_4_migrates_to_fenced_leases_without_loss(tmp_path):
    """A ledger written by the agent before leases had epochs: its records, cursor and work all carry over."""
    import shutil
    path = tmp_path / "agent.db"
    shutil.copy(Path(__file__).parent / "data" / "ledger-schema4.db", path)
    with Ledger(path) as led:
        assert led.db["meta"].get("schema_version")["value"] == "9"
        assert set(led.seen("s", {"0", "1", "2", "3"})) == {"0", "1", "2", "3"}
        assert led.cursor("s")["value"] == "2026-01-01T00:00:00Z"
        assert led.record("s", "2") == {"source": "s", "key": "2", "id": "2", "version": "", "hash": None,  # "h2": not a hash an agent wrote
                                        "first_seen": 1780000000.0, "last_seen": 1780000000.0}
        assert led.counts() == {"f": {"pending": 2, "running": 1, "succeeded": 1}}
        assert led.recover(NOW + 10) == 1  # the send the old agent was killed in goes again, same key
        claimed = led.claim(NOW + 10, 10, 300)
        assert sorted(ex.key for ex in claimed) == ["1", "2", "3"]
        assert all(ex.epoch == 1 for ex in claimed)
        led.finish(claimed[0], Finish("succeeded", 1, claimed[0].context), NOW + 11)
        assert led.counts()["f"]["succeeded"] == 2


def test_a_ledger_written_by_a_newer_agent_is_refused_and_left_as_it_is(tmp_path):
    path = tmp_path / "agent.db"
    Ledger(path).close()
    import sqlite3
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(LedgerUnwritable, match="written by a newer agent"):
        Ledger(path)
    assert sqlite3.connect(path).execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() == ("99",)


def test_opening_a_current_ledger_does_not_import_the_migrations(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "agent.db"
    Ledger(path).close()
    script = f"import sys; from state.sqlite import SqliteLedger; SqliteLedger({str(path)!r}).close(); print('sqlite_utils' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parent.parent, check=True)
    assert done.stdout.strip() == "False"

"""The PostgreSQL ledger where it differs from SQLite: several agents on one database, connections that die,
messages without the password, the reader that changes nothing, the claim's plan at a million finished rows."""
from __future__ import annotations

import threading

import psycopg
import pytest

from state.base import SCHEMA_VERSION, Admission, Finish, LeaseLost, LedgerError, LedgerUnwritable
from state.postgres import _CLAIM, PostgresLedger
from state.sql import NEXT_DUE

NOW = 1_800_000_000.0
LEASE = 30.0


def item(key: str, entity: str | None = None) -> Admission:
    return Admission(key=key, id=key, version="", hash="h" + key, entity=entity or key, context={"record": {"id": key}})


def done(ex, status: str = "succeeded") -> Finish:
    return Finish(status=status, step=ex.step + 1, context=ex.context,
                  attempt={"step": ex.step, "started": NOW, "finished": NOW, "outcome": "ok" if status == "succeeded" else "error"})


def sql(url: str, statement: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
def ledgers(pg_url):
    """Opens PostgresLedgers on one fresh database (each a separate agent); closes them after."""
    opened: list[PostgresLedger] = []

    def open_one(**options) -> PostgresLedger:
        opened.append(PostgresLedger(pg_url, **options))
        return opened[-1]

    yield open_one
    for ledger in opened:
        ledger.close()


def race(*work):
    """Run each callable in its own thread, started together; their results in order."""
    start, results, errors = threading.Barrier(len(work)), [None] * len(work), []

    def run(i, fn):
        try:
            start.wait()
            results[i] = fn()
        except BaseException as error:  # surfaced below: a thread's failure fails the test
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(work)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


# -- several agents on one database ------------------------------------------------------------
def test_agents_claiming_in_threads_share_the_work_and_never_claim_one_execution_twice(ledgers):
    first, second = ledgers(), ledgers()
    first.admit("s", [item(str(n)) for n in range(300)], [("f", False)], NOW)

    def drain(ledger):
        mine, claimed = [], ledger.claim(NOW, 7, LEASE)
        while claimed:
            mine += [ex.id for ex in claimed]
            claimed = ledger.finish_and_claim([(ex, done(ex)) for ex in claimed], NOW, 7, LEASE)
        return mine

    a, b = race(lambda: drain(first), lambda: drain(second))
    assert not set(a) & set(b)
    assert len(a) + len(b) == 300 and a and b  # both took part
    assert first.counts() == {"f": {"succeeded": 300}}
    assert first.fenced == second.fenced == 0


def test_versions_of_one_entity_stay_in_order_while_two_agents_claim(ledgers):
    first, second = ledgers(), ledgers()
    first.admit("s", [item(f"{n}", entity="e") for n in range(20)], [("f", False)], NOW)
    order = []

    def drain(ledger):
        for _ in range(200):
            claimed = ledger.claim(NOW, 5, LEASE)
            assert len(claimed) <= 1  # one version of the entity at a time, whoever claims
            for ex in claimed:
                order.append(int(ex.key))
                ledger.finish(ex, done(ex), NOW)

    race(lambda: drain(first), lambda: drain(second))
    assert order == list(range(20))


def test_agents_racing_for_sources_each_source_gets_exactly_one_holder(ledgers, pg_url):
    agents = [ledgers() for _ in range(4)]
    sources = [f"s{n}" for n in range(25)]
    won = race(*[lambda ledger=ledger: [s for s in sources if ledger.take_source(s, NOW, LEASE)] for ledger in agents])
    assert sorted(s for held in won for s in held) == sorted(sources)
    epochs = sql(pg_url, "SELECT DISTINCT epoch FROM source_leases")
    assert epochs == [(1,)]


def test_a_stale_epoch_finish_is_rejected_counted_and_leaves_no_trace(ledgers, caplog):
    frozen, other = ledgers(), ledgers()
    frozen.admit("s", [item("1")], [("f", False)], NOW)
    [stale] = frozen.claim(NOW, 1, LEASE)
    [taken] = other.claim(NOW + LEASE + 1, 1, LEASE)  # the lease ran out while the first agent was frozen
    assert (taken.id, taken.epoch, taken.attempts) == (stale.id, stale.epoch + 1, 2)

    frozen.finish(stale, done(stale, "dead"), NOW + LEASE + 2)
    assert frozen.fenced == 1
    assert "its lease passed to another agent" in caplog.text
    [row] = frozen.executions(ids=[stale.id])
    assert row["status"] == "running"
    assert [a["outcome"] for a in frozen.attempts_of(stale.id)] == ["interrupted"]  # the takeover's, not the stale outcome
    assert frozen.heartbeat(NOW + LEASE + 2, LEASE, [stale]).lost_executions == [stale.id]
    assert frozen.fenced == 2

    other.finish(taken, done(taken), NOW + LEASE + 3)
    assert other.fenced == 0
    assert other.counts() == {"f": {"succeeded": 1}}


def test_a_source_taken_over_fences_the_old_holders_next_write(ledgers):
    old, new = ledgers(), ledgers()
    assert old.take_source("s", NOW, LEASE)
    poll = old.start_poll("s", NOW)
    assert not new.take_source("s", NOW + 1, LEASE)
    assert new.take_source("s", NOW + LEASE + 1, LEASE)  # expired: taken at epoch 2
    with pytest.raises(LeaseLost):
        old.end_poll(poll, "s", NOW + LEASE + 2, pages=1, fetched=1, new=1, primed=0, quarantined=0, error=None, cursor="late")
    assert old.fenced == 1
    assert new.cursor("s") is None  # the cursor did not move
    new.end_poll(new.start_poll("s", NOW + LEASE + 2), "s", NOW + LEASE + 3, pages=1, fetched=0, new=0, primed=0,
                 quarantined=0, error=None, cursor="c2")
    assert new.cursor("s")["value"] == "c2"


# -- connections that die ------------------------------------------------------------------------
def terminate_others(url: str) -> int:
    """End every other session on the ledger's database and wait until each is gone."""
    database = url.rsplit("/", 1)[1]
    rows = sql(url, "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
               (database,))
    return sum(1 for (ended,) in rows if ended)


def test_a_connection_terminated_inside_a_transaction_is_a_ledger_error_and_the_next_call_works(pg_url):
    armed = []
    ledger = PostgresLedger(pg_url, failpoint=lambda name: armed and name == "inside_admit" and terminate_others(pg_url))
    try:
        armed.append(True)
        with pytest.raises(LedgerError) as caught:
            ledger.admit("s", [item("1")], [("f", False)], NOW)
        assert "terminating connection" in str(caught.value) or "closed" in str(caught.value)
        armed.clear()
        assert ledger.admit("s", [item("1")], [("f", False)], NOW).new == 1  # nothing of the broken transaction was kept
        assert ledger.counts() == {"f": {"pending": 1}}
    finally:
        ledger.close()


def test_every_pooled_connection_terminated_while_idle_is_replaced_without_an_error(pg_url):
    ledger = PostgresLedger(pg_url)
    try:
        ledger.admit("s", [item(str(n)) for n in range(3)], [("f", False)], NOW)
        race(*[lambda: ledger.claim(NOW, 1, LEASE) for _ in range(4)])  # the pool grows to its four connections
        with ledger.pool.connection(), ledger.pool.connection():  # ... or to two at least, on a CPU that ran them in turn
            pass
        assert terminate_others(pg_url) >= 2
        assert ledger.counts() == {"f": {"running": 3}}
    finally:
        ledger.close()


# -- reader mode, passwords ------------------------------------------------------------------------
def test_a_reader_creates_nothing_in_an_empty_database(pg_url):
    with pytest.raises(LedgerUnwritable, match="no ledger in this database yet"):
        PostgresLedger(pg_url, reader=True)
    assert sql(pg_url, "SELECT to_regclass('meta'), to_regclass('executions')") == [(None, None)]


def test_a_reader_does_not_migrate_nor_register_as_an_agent(pg_url):
    PostgresLedger(pg_url).close()
    sql(pg_url, "UPDATE meta SET value = '4' WHERE name = 'schema_version'")  # as if written by an older agent
    reader = PostgresLedger(pg_url, reader=True)
    try:
        assert reader.counts() == {}
        assert sql(pg_url, "SELECT value FROM meta WHERE name = 'schema_version'") == [("4",)]
        assert sql(pg_url, "SELECT COUNT(*) FROM agents") == [(0,)]
    finally:
        reader.close()
    PostgresLedger(pg_url).close()
    assert sql(pg_url, "SELECT value FROM meta WHERE name = 'schema_version'") == [(str(SCHEMA_VERSION),)]


def test_a_ledger_newer_than_the_agent_is_refused(pg_url):
    PostgresLedger(pg_url).close()
    sql(pg_url, "UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(LedgerUnwritable, match="schema version 99, newer"):
        PostgresLedger(pg_url)


def test_tables_that_are_not_a_ledger_are_refused_not_reused(pg_url):
    sql(pg_url, "CREATE TABLE executions (id int)")
    with pytest.raises(LedgerUnwritable, match="no ledger"):
        PostgresLedger(pg_url)


@pytest.mark.parametrize("where", ["closed port", "missing database", "password in the query"])
def test_the_password_never_appears_in_an_error_or_the_location(pg_server, monkeypatch, where):
    monkeypatch.setenv("PGPASSWORD", "env-Secret-42")
    with socket_closed() as port:
        url = {
            "closed port": f"postgresql://agent:url-Secret-17@127.0.0.1:{port}/ledger",
            "missing database": pg_server.url_of("nowhere").replace("postgres@", "postgres:url-Secret-17@"),
            "password in the query": pg_server.url_of("nowhere") + "?password=url-Secret-17&sslmode=disable",
        }[where]
        with pytest.raises(LedgerUnwritable) as caught:
            PostgresLedger(url, timeout=2)
    message = str(caught.value)
    assert "Secret" not in message
    assert message.startswith("postgresql://") and "@127.0.0.1:" in message  # where it tried, without the password
    assert ("refused" in message) if where == "closed port" else ('"nowhere" does not exist' in message)


def socket_closed():
    """A loopback port nothing listens on (bound, never listening, for the test's length)."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def held():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            yield sock.getsockname()[1]

    return held()


def test_texts_with_nul_are_kept_without_it(ledgers):
    ledger = ledgers()
    ledger.admit("s", [item("1")], [("f", False)], NOW)
    [ex] = ledger.claim(NOW, 1, LEASE)
    ledger.finish(ex, Finish(status="dead", step=0, context=ex.context, error="bad\x00byte",
                             attempt={"step": 0, "started": NOW, "finished": NOW, "outcome": "error", "error": "bad\x00byte"}), NOW)
    assert ledger.executions(ids=[ex.id])[0]["last_error"] == "bad\ufffdbyte"


# -- the claim at a million finished rows ------------------------------------------------------------
def test_the_claim_walks_the_partial_indexes_not_the_finished_rows(ledgers, pg_url):
    """A million finished rows and a backlog of 20,000 due: the claim reads due work in order and stops at its limit."""
    ledger = ledgers()
    # keys numbered with a fixed width, as submission ids are: each row lands at the end of the indexes on them,
    # which loads the million rows in two thirds of the time random-looking keys take
    insert = ("INSERT INTO executions (flow, source, key, entity, status, next_at, context, created, updated)"
              " SELECT 'f', 's', %s || {n}, %s || {n}, %s, %s, '{{}}', %s, %s FROM generate_series(1, %s) n")
    sql(pg_url, insert.format(n="lpad(n::text, 7, '0')"), ("old", "old", "succeeded", NOW - 86400, NOW - 86400, NOW - 86400, 1_000_000))
    sql(pg_url, insert.format(n="n"), ("new", "new", "pending", NOW, NOW, NOW, 20_000))
    sql(pg_url, "ANALYZE executions")
    params = {"now": NOW, "me": ledger.worker, "until": NOW + LEASE, "limit": 10}
    with psycopg.connect(pg_url) as conn:
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + _CLAIM, params))
    assert "Index Scan using executions_due" in plan and "Index Scan using executions_unfinished" in plan, plan
    assert "Seq Scan" not in plan and "Sort" not in plan, plan  # no pass over the finished rows, no sort of the backlog
    with psycopg.connect(pg_url) as conn:  # when work is next due: no pass over the finished rows, the lapsed leases read from the running rows alone
        due = "\n".join(row[0] for row in conn.execute("EXPLAIN " + NEXT_DUE.replace("?", "%s"), (NOW, NOW, ledger.worker)))
    assert "executions_leased" in due and "Seq Scan" not in due, due
    assert [ex.key for ex in ledger.claim(NOW, 10, LEASE)] == [f"new{n}" for n in range(1, 11)]


def test_a_broken_url_is_refused_without_showing_it():
    with pytest.raises(LedgerUnwritable) as caught:
        PostgresLedger("postgresql://agent:url-Secret-17@[db/sync")
    assert "Secret" not in str(caught.value) and "not a valid postgresql:// URL" in str(caught.value)


def test_the_location_keeps_everything_but_the_password(pg_server):
    url = pg_server.url_of("sync").replace("postgres@", "postgres:p%40ss-Secret@") + "?application_name=x&password=Secret2"
    sql(pg_server.url, "CREATE DATABASE sync")
    ledger = PostgresLedger(url)
    try:
        assert ledger.location == pg_server.url_of("sync") + "?application_name=x"
    finally:
        ledger.close()
        pg_server.drop_database(pg_server.url_of("sync"))


def test_a_page_is_scheduled_in_its_order_with_or_without_version_times(ledgers):
    ledger = ledgers()
    page = [item("b"), item("a"), item("c")]
    page[1].version_at = NOW - 5
    ledger.admit("s", page, [("f", False), ("g", False)], NOW)
    for flow in ("f", "g"):
        assert [row["key"] for row in ledger.executions(flow=flow)] == ["b", "a", "c"]  # ids in arrival order
    assert ledger.admit("s", [item("d"), item("e")], [("f", False)], NOW).new == 2  # no version time in the whole page


def test_a_source_a_heartbeat_found_lost_stays_refused_until_taken_again(ledgers):
    """The heartbeat thread may learn of the takeover before the poller writes again: that write is still refused."""
    old, new = ledgers(), ledgers()
    assert old.take_source("s", NOW, LEASE)
    assert new.take_source("s", NOW + LEASE + 1, LEASE)
    assert old.heartbeat(NOW + LEASE + 2, LEASE, []).lost_sources == ["s"]
    with pytest.raises(LeaseLost):
        old.admit("s", [item("1")], [("f", False)], NOW + LEASE + 2)
    assert new.counts() == {} and new.seen("s", {"1"}) == {}
    assert not old.take_source("s", NOW + LEASE + 3, LEASE)
    with pytest.raises(LeaseLost):
        old.admit("s", [item("1")], [("f", False)], NOW + LEASE + 3)
    new.release(NOW + LEASE + 4)
    assert old.take_source("s", NOW + LEASE + 5, LEASE)  # taken again: its writes go through, fenced by the new epoch
    assert old.admit("s", [item("1")], [("f", False)], NOW + LEASE + 5).new == 1


def test_shared_sql_is_turned_into_psycopg_placeholders_with_literal_percents_kept():
    from state.postgres import _pyformat

    assert _pyformat("SELECT 1 FROM t WHERE a LIKE '5%' AND b = ? AND c IN (?, ?)") == \
        "SELECT 1 FROM t WHERE a LIKE '5%%' AND b = %s AND c IN (%s, %s)"

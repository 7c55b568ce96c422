"""Admit records into the ledger, against bare sqlite3 inserts of the same rows.

    python bench/admit.py [--quick] [--repeats N]

agent    Ledger.admit(source, page, one flow) for pages of 1,000 Admission items
         (one BEGIN IMMEDIATE transaction per page: key lookup, records + executions inserts)
bare     executemany of the same records and executions rows into the same schema, in ONE transaction,
         WAL + synchronous=FULL; also with default pragmas (rollback journal) and with one transaction
         per page (where the per-page commits' fsyncs cost shows)

The pages and the bare rows (JSON contexts included) are built once, before anything is timed.
"""
from __future__ import annotations

import gc
import hashlib
import json
import sqlite3
import time
from typing import Iterator

from common import PAGE, Row, human, main, scratch, timed
from state.base import HASH_BYTES, Admission
from state.sqlite import SqliteLedger as Ledger
from viewserver import make_leads

SOURCE, FLOWS, NOW = "leads", [("leads-to-crm", False)], 1.8e9
RECORDS_SQL = "INSERT INTO records (source, key, id, version, hash, first_seen) VALUES (?, ?, ?, ?, ?, ?)"
EXECUTIONS_SQL = ("INSERT INTO executions (flow, source, key, entity, step, status, attempts, next_at, context, created, updated)"
                  " VALUES (?, ?, ?, ?, 0, 'pending', 0, ?, ?, ?, ?)")


def pages(n: int) -> Iterator[list[Admission]]:
    """`n` distinct lead records as Admission pages, the way the poller identifies them."""
    template = make_leads(PAGE)
    for p in range(n // PAGE):
        items = []
        for i, lead in enumerate(template):
            key = f"S{p:06d}{i:04d}"
            record = {**lead, "lastSubmissionID": key, "RecordId": f"R{p:06d}{i:04d}"}
            items.append(Admission(key=key, id=key, version=record["lastModified"], hash=hashlib.sha256(key.encode()).digest()[:HASH_BYTES],
                                   entity=record["RecordId"], context={"record": record, "cursor": None}))
        yield items


def _rows(items: list[Admission]) -> tuple[list[tuple], list[tuple]]:
    """The records and executions rows the ledger writes for a page."""
    flow = FLOWS[0][0]
    records = [(SOURCE, a.key, None, a.version, a.hash, NOW) for a in items]  # as the ledger keeps them (id is the key)
    executions = [(flow, SOURCE, a.key, a.entity, NOW, json.dumps(a.context, ensure_ascii=True, separators=(",", ":")), NOW, NOW)
                  for a in items]
    return records, executions


Page = tuple[list[Admission], list[tuple], list[tuple]]  # the items and the bare rows they make


def build(n: int) -> list[Page]:
    return [(items, *_rows(items)) for items in pages(n)]


def agent_admit(data: list[Page]) -> float:
    with scratch() as folder, Ledger(folder / "agent.db") as ledger:
        total = 0.0
        for items, _, _ in data:
            seconds, result = timed(lambda: ledger.admit(SOURCE, items, FLOWS, NOW))
            assert result.new == len(items)
            total += seconds
        return total


def bare_admit(data: list[Page], journal: str = "WAL", synchronous: str | None = "FULL", per_page: bool = False) -> float:
    """executemany of the same rows into a fresh file with the ledger's schema; one transaction unless `per_page`."""
    with scratch() as folder:
        path = folder / "bare.db"
        Ledger(path).close()
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute(f"PRAGMA journal_mode = {journal}")  # WAL persists in the file: set it back for "default"
        if synchronous:
            conn.execute(f"PRAGMA synchronous = {synchronous}")
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        for _, records, executions in data:
            conn.executemany(RECORDS_SQL, records)
            conn.executemany(EXECUTIONS_SQL, executions)
            if per_page:
                conn.execute("COMMIT")
                conn.execute("BEGIN IMMEDIATE")
        conn.execute("COMMIT")
        total = time.perf_counter() - start
        assert conn.execute("SELECT COUNT(*) FROM executions").fetchone()[0] == len(data) * PAGE
        conn.close()
        return total


def run(quick: bool, repeats: int) -> list[Row]:
    n = 50_000 if quick else 1_000_000
    data = build(n)
    gc.freeze()  # the prebuilt pages are not the collector's work during the measurements
    try:
        bare, default, per_page, agent = [], [], [], []
        for _ in range(repeats):
            bare.append(bare_admit(data))
            default.append(bare_admit(data, journal="DELETE", synchronous=None))
            per_page.append(bare_admit(data, per_page=True))
            agent.append(agent_admit(data))
    finally:
        gc.unfreeze()
    size = human(n)
    return [
        Row("admit (ledger, 1 flow)", size, bare, agent, note="bare: 1 txn, WAL + synchronous=FULL"),
        Row("  context: bare, default pragmas", size, bare, default, note="ratio vs bare: rollback journal, 1 txn"),
        Row("  context: bare, 1 txn per page", size, bare, per_page, note="ratio vs bare: WAL + FULL, a commit per page"),
    ]


if __name__ == "__main__":
    main(run, __doc__)

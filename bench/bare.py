"""The bare operations as whole processes: what a user's own short script would do, nothing of the agent imported.

    python bench/bare.py fetch VIEW_URL
    python bench/bare.py post VIEW_URL SINK_URL NEW THREADS

fetch    GET every page (?pageSize=1000&page=N until a short page) with one requests.Session and
         json-parse it
post     the same fetch, then POST the NEW newest records (the view is newest first), mapped the way
         the benchmark flow maps them, each with its Idempotency-Key, keep-alive: one session
         sequentially (THREADS = 1), or THREADS threads with a session each

Prints one JSON line: the records fetched, the POSTs made, and the seconds spent after imports.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time

import requests

PAGE = 1000


def fetch(session: requests.Session, url: str, keep: int = 0) -> tuple[int, list[dict]]:
    """Every page fetched and parsed; how many records, and the first `keep` of them (the rest are let go)."""
    count, kept, page = 0, [], 1
    while True:
        response = session.get(url, params={"pageSize": PAGE, "page": page}, timeout=30)
        response.raise_for_status()
        found = json.loads(response.content)["records"]
        count += len(found)
        kept += found[:max(0, keep - len(kept))]
        if len(found) < PAGE:
            return count, kept
        page += 1


def work(records: list[dict]) -> list[tuple[dict, str]]:
    """(body, idempotency key) per record: the flow's map step and the agent's key, written out by hand."""
    out = []
    for r in records:
        key = hashlib.sha256("\x1f".join(("leads-to-crm", "1", "leads", r["lastSubmissionID"])).encode()).hexdigest()[:40]
        out.append(({"email": r["Email"].lower(), "name": f"{r['FirstName']} {r['LastName']}", "version": r["lastSubmissionID"]}, key))
    return out


def post_all(sink_url: str, items: list[tuple[dict, str]]) -> None:
    with requests.Session() as session:
        for body, key in items:
            response = session.post(sink_url + "/leads", json=body, headers={"Idempotency-Key": key}, timeout=30)
            if response.status_code != 201:
                raise SystemExit(f"sink answered {response.status_code}: {response.text[:200]}")


def post(sink_url: str, items: list[tuple[dict, str]], threads: int) -> None:
    if threads == 1:
        return post_all(sink_url, items)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(post_all, sink_url, items[i::threads]) for i in range(threads)]:
            future.result()


def main(argv: list[str]) -> None:
    start = time.perf_counter()
    with requests.Session() as session:
        count, records = fetch(session, argv[1], int(argv[3]) if argv[0] == "post" else 0)
    posted = 0
    if argv[0] == "post":
        items = work(records)
        post(argv[2], items, int(argv[4]))
        posted = len(items)
    print(json.dumps({"fetched": count, "posted": posted, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main(sys.argv[1:])

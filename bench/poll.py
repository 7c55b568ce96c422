"""Poll + dedupe of a paged view, and the re-poll of the unchanged view, against a bare fetch + parse.

    python bench/poll.py [--quick] [--repeats N]

bare     a requests.Session GETs the same pages (?pageSize=1000&page=N until a short page) and json-parses them
prime    Agent.poll("leads") on a fresh ledger, first_run = "skip": records marked seen, nothing scheduled
deliver  the same with first_run = "deliver": records seen + one execution each (context stored)
re-poll  a second poll of the unchanged view on the delivered ledger: every record a duplicate
"""
from __future__ import annotations

import json

import requests

from common import PAGE, Row, human, main, make_agent, scratch, served, timed


def bare_fetch(url: str) -> int:
    """Fetch and parse every page the agent will fetch; the number of records."""
    count, page = 0, 1
    with requests.Session() as session:
        while True:
            response = session.get(url, params={"pageSize": PAGE, "page": page}, timeout=30)
            response.raise_for_status()
            records = json.loads(response.content)["records"]
            count += len(records)
            if len(records) < PAGE:
                return count
            page += 1


def agent_poll(url: str, n: int, first_run: str, repoll: bool = False) -> tuple[float, float | None]:
    """Seconds for one poll on a fresh ledger (and for the re-poll after it)."""
    with scratch() as folder:
        agent = make_agent(folder, url, first_run=first_run)
        try:
            seconds, result = timed(lambda: agent.poll("leads"))
            assert result.error is None and result.fetched == n and result.new + result.primed == n, result
            if not repoll:
                return seconds, None
            again, result = timed(lambda: agent.poll("leads"))
            assert result.error is None and result.duplicates == n and result.new == 0, result
            return seconds, again
        finally:
            agent.close()


def run(quick: bool, repeats: int) -> list[Row]:
    n = 10_000 if quick else 100_000
    bare, prime, deliver, repoll = [], [], [], []
    with served("view", n) as url:
        bare_fetch(url)  # warm up: imports, connection, server caches
        for _ in range(repeats):
            seconds, count = timed(lambda: bare_fetch(url))
            assert count == n
            bare.append(seconds)
            prime.append(agent_poll(url, n, "skip")[0])
            first, again = agent_poll(url, n, "deliver", repoll=True)
            deliver.append(first)
            repoll.append(again)
    size = human(n)
    return [
        Row("poll + dedupe (prime, skip)", size, bare, prime, note="records seen, nothing scheduled"),
        Row("poll + dedupe (deliver)", size, bare, deliver, note="records seen + 1 execution each"),
        Row("re-poll, nothing changed", size, bare, repoll, note="every record a duplicate"),
    ]


if __name__ == "__main__":
    main(run, __doc__)

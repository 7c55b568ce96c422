"""Deliver records to a local HTTP sink through the agent, against bare keep-alive POSTs.

    python bench/deliver.py [--quick] [--repeats N]

agent    `agent run --once` in-process: Agent.poll_all() then Agent.drain(), first_run = "deliver",
         a map step and `crm > leads > send` (one POST each, Idempotency-Key header), concurrency 1 and 8;
         "drain" times Agent.drain() alone, "once" both
bare     the same bodies and headers POSTed with requests.Session keep-alive: sequentially, and from
         8 threads (a session each)

The view and the sink (tests/viewserver.py, tests/sinkserver.py) each run in their own process; a
fresh sink per measurement.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import requests

from agent.flows import idempotency_key
from common import PAGE, Row, human, main, make_agent, scratch, served, timed


def bodies(view_url: str) -> list[tuple[dict, str]]:
    """What the flow sends for each record of the view: (mapped body, idempotency key)."""
    out, page = [], 1
    with requests.Session() as session:
        while True:
            records = json.loads(session.get(view_url, params={"pageSize": PAGE, "page": page}).content)["records"]
            out += [({"email": r["Email"].lower(), "name": f"{r['FirstName']} {r['LastName']}", "version": r["lastSubmissionID"]},
                     idempotency_key("leads-to-crm", 1, "leads", r["lastSubmissionID"])) for r in records]
            if len(records) < PAGE:
                return out
            page += 1


def _post_all(sink_url: str, work: list[tuple[dict, str]]) -> None:
    with requests.Session() as session:
        for body, key in work:
            response = session.post(sink_url + "/leads", json=body, headers={"Idempotency-Key": key}, timeout=30)
            assert response.status_code == 201, response.text


def _post_parallel(sink_url: str, work: list[tuple[dict, str]], threads: int) -> None:
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(_post_all, sink_url, work[i::threads]) for i in range(threads)]:
            future.result()


def bare_post(work: list[tuple[dict, str]], threads: int) -> float:
    with served("sink") as sink_url:
        return timed(lambda: _post_all(sink_url, work) if threads == 1 else _post_parallel(sink_url, work, threads))[0]


def agent_once(view_url: str, n: int, concurrency: int) -> tuple[float, float]:
    """Seconds for poll_all + drain, and for drain alone."""
    with served("sink") as sink_url, scratch() as folder:
        agent = make_agent(folder, view_url, sink_url, first_run="deliver", concurrency=concurrency)
        try:
            polling, polls = timed(agent.poll_all)
            draining, result = timed(agent.drain)
            assert polls[0].new == n and result.sent == n and not result.errors, (polls, result)
            return polling + draining, draining
        finally:
            agent.close()


def run(quick: bool, repeats: int) -> list[Row]:
    n = 1_000 if quick else 20_000
    seq, par, once1, drain1, once8, drain8 = [], [], [], [], [], []
    with served("view", n) as view_url:
        work = bodies(view_url)
        assert len(work) == n
        for _ in range(repeats):
            seq.append(bare_post(work, 1))
            par.append(bare_post(work, 8))
            for once, drain, concurrency in ((once1, drain1, 1), (once8, drain8, 8)):
                total, draining = agent_once(view_url, n, concurrency)
                once.append(total)
                drain.append(draining)
    size = human(n)
    return [
        Row("deliver, concurrency 1 (drain)", size, seq, drain1, note="bare: sequential keep-alive POSTs"),
        Row("deliver, concurrency 1 (once)", size, seq, once1, note="poll_all + drain"),
        Row("deliver, concurrency 8 (drain)", size, par, drain8, note="bare: 8 threads, a session each"),
        Row("deliver, concurrency 8 (once)", size, par, once8, note="poll_all + drain"),
    ]


if __name__ == "__main__":
    main(run, __doc__)

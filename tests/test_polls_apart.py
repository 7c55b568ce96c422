"""`agent run` polls on a thread of its own: delivery goes on while a poll reads, and neither waits for the other."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from agent.config import load
from agent.process import Agent
from sinkserver import SinkServer
from test_cli_integration import PASSWORD, write_config
from test_scheduler import wait_until
from viewserver import ViewServer, make_leads


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("VIEW_PASSWORD", PASSWORD)
    monkeypatch.setenv("CRM_TOKEN", "crm-token-123")


class Gate:
    """Holds every request for a page but the first until opened: a view that is slow from its second page on."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.waiting = threading.Event()

    def __call__(self, handler) -> None:
        if "page=1&" not in handler.path and not handler.path.endswith("page=1"):
            self.waiting.set()
            self.open.wait(20)
        handler.serve()


@pytest.fixture
def sink():
    with SinkServer() as server:
        yield server


def running(agent: Agent) -> threading.Thread:
    loop = threading.Thread(target=agent.run_forever, name="test-run")
    loop.start()
    return loop


def test_the_first_page_of_a_poll_is_delivered_while_the_view_is_still_being_read(tmp_path: Path, sink):
    with ViewServer(make_leads(250), paging="page", page_size=100, username="integration", password=PASSWORD) as view:
        gate = Gate()
        view.fail_with(gate)
        agent = Agent(load(write_config(tmp_path, view, sink)))
        loop = running(agent)
        try:
            assert gate.waiting.wait(10)  # the poll is inside its second page
            delivered_meanwhile = wait_until(lambda: len(sink.requests_to("POST", "/leads")) == 100, 10)
            gate_was_closed = not gate.open.is_set()
            gate.open.set()
            assert delivered_meanwhile and gate_was_closed  # page 1's leads went out while page 2 was still being read
            assert wait_until(lambda: len(sink.requests_to("POST", "/leads")) == 250, 15)
        finally:
            gate.open.set()
            agent.stopping.set()
            loop.join(15)
            agent.close()
        assert not loop.is_alive()
        keys = [r["headers"]["Idempotency-Key"] for r in sink.requests_to("POST", "/leads")]
        assert len(keys) == len(set(keys)) == 250  # each once


def test_a_poll_whose_ledger_write_fails_leaves_the_sends_in_flight_alone(tmp_path: Path, sink, monkeypatch):
    """A poll's failed write must not start the recovery of this agent's running work: a send still in flight on the
    delivery thread would be claimed and sent a second time."""
    with ViewServer(make_leads(2), username="integration", password=PASSWORD) as view:
        agent = Agent(load(write_config(tmp_path, view, sink)))
        releases = [threading.Event(), threading.Event()]
        try:
            agent.poll("leads")
            calls, lock = [], threading.Lock()
            connector = agent.connectors["crm"]
            real = connector.run

            def held(*args, **kwargs):  # the first two sends wait for their own release; any later one goes at once
                with lock:
                    calls.append(args)
                    n = len(calls)
                if n <= 2:
                    releases[n - 1].wait(10)
                return real(*args, **kwargs)

            monkeypatch.setattr(connector, "run", held)
            delivery = threading.Thread(target=agent.delivery_tick, args=(agent.clock(),))
            delivery.start()
            assert wait_until(lambda: len(calls) == 2, 10)  # both sends are in flight
            conn = agent.ledger.conn
            conn.execute("CREATE TRIGGER full BEFORE INSERT ON polls BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
            agent.poll_tick(agent.clock())  # its write fails
            conn.execute("DROP TRIGGER full")
            agent.poll_tick(agent.clock())  # the poll is still due and works now, with both sends still in flight
            releases[1].set()  # one send ends; its outcome's round may claim more work
            time.sleep(0.5)  # longer than an outcome waits for its round
            releases[0].set()
            delivery.join(10)
            agent.delivery_tick(agent.clock())
            assert agent.ledger.counts() == {"leads-to-crm": {"succeeded": 2}}
        finally:
            for release in releases:
                release.set()
            agent.close()
        assert len(calls) == 2  # each lead sent once
        keys = [r["headers"]["Idempotency-Key"] for r in sink.requests_to("POST", "/leads")]
        assert len(keys) == len(set(keys)) == 2


# -- versions of one entity stay in order while a poll admits beside the delivery ----------------------------------

VERSIONED = """
[agent]
ledger = "agent.db"
concurrency = 1

[sources.leads]
kind = "file"
path = "view.json"
id = "version"
entity = "entity"
updated = "updated"
first_run = "deliver"

[connectors.out]
kind = "file"
path = "out.jsonl"

[[flows]]
name = "to-out"
source = "leads"
  [[flows.steps]]
  kind = "action"
  action = "out > record > write"
"""


def versioned(tmp_path: Path, *versions: tuple[str, str]) -> None:
    """The view shows these (version, updated) records, all of entity E."""
    (tmp_path / "view.json").write_text(json.dumps({"records": [{"version": v, "entity": "E", "updated": at} for v, at in versions]}))


def written(tmp_path: Path) -> list[str]:
    return [json.loads(line)["body"]["version"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]


def test_an_older_version_admitted_after_a_newer_one_was_claimed_still_goes_first(tmp_path: Path, monkeypatch):
    (tmp_path / "agent.toml").write_text(VERSIONED)
    versioned(tmp_path, ("v2", "2026-01-01T10:02:00Z"))
    agent = Agent(load(tmp_path / "agent.toml"))
    try:
        agent.poll("leads")
        versioned(tmp_path, ("v1", "2026-01-01T10:01:00Z"))  # the older version turns up in the view only now
        real, polled = agent.failpoint, []

        def poll_between_claim_and_send(name):  # the poll thread admits v1 after v2 was claimed, before it was sent
            if name == "after_claim" and not polled:
                poll = threading.Thread(target=lambda: polled.append(agent.poll("leads")))
                poll.start()
                poll.join(10)
            real(name)

        monkeypatch.setattr(agent, "failpoint", poll_between_claim_and_send)
        agent.delivery_tick(agent.clock())
        assert polled and polled[0].new == 1
        agent.delivery_tick(agent.clock())
        assert written(tmp_path) == ["v1", "v2"]
        assert agent.ledger.counts() == {"to-out": {"succeeded": 2}}
    finally:
        agent.close()


def test_a_page_waits_to_be_admitted_while_a_send_of_its_entity_is_in_flight(tmp_path: Path, monkeypatch):
    (tmp_path / "agent.toml").write_text(VERSIONED)
    versioned(tmp_path, ("v2", "2026-01-01T10:02:00Z"))
    agent = Agent(load(tmp_path / "agent.toml"))
    try:
        agent.poll("leads")
        versioned(tmp_path, ("v1", "2026-01-01T10:01:00Z"))
        connector, release, inside, ended = agent.connectors["out"], threading.Event(), threading.Event(), []
        real = connector.run

        def held(*args, **kwargs):
            inside.set()
            release.wait(10)
            try:
                return real(*args, **kwargs)
            finally:
                ended.append(time.monotonic())

        monkeypatch.setattr(connector, "run", held)
        delivery = threading.Thread(target=agent.delivery_tick, args=(agent.clock(),))
        delivery.start()
        assert inside.wait(10)  # v2 is in flight
        admitted = []
        poll = threading.Thread(target=lambda: admitted.append((agent.poll("leads"), time.monotonic())))
        poll.start()
        poll.join(0.3)
        assert poll.is_alive() and not admitted  # v1's page waits for v2's send
        release.set()
        poll.join(10)
        delivery.join(10)
        [(result, at)] = admitted
        assert result.new == 1 and at >= ended[0]
        agent.delivery_tick(agent.clock())
        assert written(tmp_path) == ["v2", "v1"]  # v1 was read only after v2 went out: it can only follow
    finally:
        release.set()
        agent.close()


def test_run_once_delivers_the_first_page_while_the_poll_reads_on_and_reports_both(tmp_path: Path, sink):
    with ViewServer(make_leads(250), paging="page", page_size=100, username="integration", password=PASSWORD) as view:
        gate = Gate()
        view.fail_with(gate)
        agent = Agent(load(write_config(tmp_path, view, sink)))
        outcome = []
        once = threading.Thread(target=lambda: outcome.append(agent.once(agent.poll_all)))
        try:
            once.start()
            assert gate.waiting.wait(10)
            delivered_meanwhile = wait_until(lambda: len(sink.requests_to("POST", "/leads")) == 100, 10)
            gate_was_closed = not gate.open.is_set()
            gate.open.set()
            once.join(20)
            assert delivered_meanwhile and gate_was_closed
        finally:
            gate.open.set()
            once.join(20)
            agent.close()
        [(polls, drained)] = outcome
        assert [p.new for p in polls] == [250] and drained.sent == 250  # one run: everything polled is delivered
        assert len(sink.requests_to("POST", "/leads")) == 250

"""The agent process in-process: a ledger that cannot be written is survived, and nothing is lost."""
import json
import textwrap
import threading
import time

import pytest

from agent import process
from agent.config import load
from agent.process import Agent


def make_agent(tmp_path, records):
    (tmp_path / "view.json").write_text(json.dumps({"records": records}))
    (tmp_path / "agent.toml").write_text(textwrap.dedent("""
        [agent]
        ledger = "agent.db"
        [sources.leads]
        kind = "file"
        path = "view.json"
        id = "id"
        first_run = "deliver"
        [connectors.out]
        kind = "file"
        path = "out.jsonl"
        [[flows]]
        name = "f"
        source = "leads"
        [[flows.steps]]
        kind = "action"
        action = "out > record > write"
    """))
    return Agent(load(tmp_path / "agent.toml"))


def test_a_failed_outcome_write_is_survived_and_the_step_runs_again_with_its_key(tmp_path, caplog):
    agent = make_agent(tmp_path, [{"id": 1}, {"id": 2}])
    try:
        agent.poll_all()
        agent.ledger.conn.execute("CREATE TRIGGER full BEFORE INSERT ON attempts BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        assert agent._guarded(agent.drain) is False  # sent, but the outcome could not be recorded
        assert "the ledger cannot be written" in caplog.text
        written = [json.loads(line)["key"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert len(written) == 2
        agent.ledger.conn.execute("DROP TRIGGER full")  # space returns
        result = agent._guarded(agent.drain)
        assert result.sent == 2  # sent again under the same keys: the file sink absorbs the repeats
        assert agent.ledger.counts() == {"f": {"succeeded": 2}}
        assert [json.loads(line)["key"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == written
    finally:
        agent.close()


def test_a_failed_admission_admits_nothing_and_the_next_poll_does(tmp_path):
    agent = make_agent(tmp_path, [{"id": 1}])
    try:
        agent.ledger.conn.execute("CREATE TRIGGER full BEFORE INSERT ON executions BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        assert agent._guarded(agent.poll_all) is False
        assert agent.ledger.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 0
        agent.ledger.conn.execute("DROP TRIGGER full")
        [result] = agent._guarded(agent.poll_all)
        assert result.new == 1
    finally:
        agent.close()


def test_a_bug_in_a_step_fails_that_execution_not_the_agent(tmp_path, monkeypatch):
    agent = make_agent(tmp_path, [{"id": 1}, {"id": 2}])
    try:
        agent.poll_all()
        real = agent.runner.run
        monkeypatch.setattr(agent.runner, "run", lambda ex: real(ex) if ex.key == "2" else {}["boom"])
        result = agent.drain()
        assert (result.failed, result.sent) == (1, 1)
        [row] = agent.ledger.executions(status="failed")
        assert row["key"] == "1" and "internal error: KeyError" in row["last_error"]
    finally:
        agent.close()


def test_a_stop_leaves_a_stuck_step_running_after_the_grace_and_the_next_start_recovers_it(tmp_path, monkeypatch):
    monkeypatch.setattr(process, "STOP_GRACE", 0.2)
    agent = make_agent(tmp_path, [{"id": 1}])
    release = threading.Event()
    try:
        agent.poll_all()
        real = agent.connectors["out"].run

        def stuck(action, data, key):
            agent.stopping.set()  # the stop request comes while the call hangs
            release.wait(10)
            return real(action, data, key)

        monkeypatch.setattr(agent.connectors["out"], "run", stuck)
        started = time.monotonic()
        result = agent.drain()
        assert time.monotonic() - started < 2 and result.sent == 0 and agent.abandoned == 1
        [row] = agent.ledger.executions()
        assert row["status"] == "running"  # nothing recorded for it: as after a crash
    finally:
        agent.close()
        release.set()
    again = Agent(load(tmp_path / "agent.toml"))
    try:
        assert again.drain().sent == 1
        [row] = again.ledger.executions()
        assert [a["outcome"] for a in again.ledger.attempts_of(row["id"])] == ["interrupted", "succeeded"]
    finally:
        again.close()


def test_workers_are_daemon_threads_and_hand_back_results_and_errors():
    workers = process.Workers(2)
    try:
        assert all(thread.daemon for thread in workers._threads)
        assert workers.submit(lambda x: x * 2, 21).result(5) == 42
        with pytest.raises(ZeroDivisionError):
            workers.submit(lambda: 1 / 0).result(5)
    finally:
        workers.shutdown()

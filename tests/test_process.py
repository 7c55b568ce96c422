"""The agent process in-process: a ledger that cannot be written is survived, and nothing is lost."""
import json
import textwrap

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

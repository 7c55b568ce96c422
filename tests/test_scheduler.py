"""The run loop as `tick(now) -> next_wake`, driven by a fake clock: schedules, DST, idling, yielding, runs on demand."""
from __future__ import annotations

import json
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent.config import load
from agent.flows import UNREACHABLE_PROBE
from agent.process import LEDGER_RETRY, MAX_RUNS, Agent, RunQueueFull
from agent.timing import Daily, Every, Timetable

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


T0 = utc("2026-01-05T10:00:00")


class Clock:
    """A fake clock the test moves by hand (deliveries on worker threads move it too)."""

    def __init__(self, t: float = T0):
        self.t = t
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.t += seconds


FILE_SINK = """
[connectors.out]
kind = "file"
path = "out.jsonl"
"""


def write_config(folder: Path, records: list[dict] | None = None, *, sources: dict[str, str] | None = None,
                 connector: str = FILE_SINK, action: str = "out > record > write", concurrency: int = 4) -> Path:
    """File sources (`view.json` unless named) delivering to `connector`; `sources` maps a name to its schedule lines."""
    (folder / "view.json").write_text(json.dumps({"records": records or []}))
    blocks = "".join(f"""
[sources.{name}]
kind = "file"
path = "view.json"
id = "id"
entity = "entity"
first_run = "deliver"
{lines}
""" for name, lines in (sources or {"leads": 'every = "5m"'}).items())
    flows = "".join(f"""
[[flows]]
name = "to-{name}"
source = "{name}"
  [[flows.steps]]
  kind = "action"
  action = "{action}"
""" for name in (sources or {"leads": ""}))
    cfg = folder / "agent.toml"
    cfg.write_text(f'[agent]\nledger = "agent.db"\nconcurrency = {concurrency}\n{blocks}{connector}{flows}')
    return cfg


@pytest.fixture
def make(tmp_path):
    made = []

    def build(*args, clock: Clock | None = None, **kwargs) -> Agent:
        agent = Agent(load(write_config(tmp_path, *args, **kwargs)), clock=clock or Clock())
        made.append(agent)
        return agent

    yield build
    for agent in made:
        agent.close()


def count_polls(agent: Agent, monkeypatch) -> list[tuple[str, float]]:
    """Every poll the loop makes, as (source, time)."""
    polls, real = [], agent.poll

    def counted(name, **kwargs):
        polls.append((name, agent.clock()))
        return real(name, **kwargs)

    monkeypatch.setattr(agent, "poll", counted)
    return polls


# -- the timetable, pure ----------------------------------------------------------------

def runs_of(rule, start: float, end: float, step: float = MINUTE, takes: float = 1.0) -> list[float]:
    """The times a job of `rule`, first due at `start`, runs when a loop looks at it every `step` until `end`."""
    table, ran = Timetable(), []
    table.add("job", rule, start, lambda: None)
    now = start
    while now < end:
        for due in table.due(now):
            ran.append(now)
            table.done(due, now, now + takes)
        now += step
    return ran


@pytest.mark.parametrize("zone, at, start, expected", [
    # spring forward: 02:30 does not exist in Berlin on 31 March 2024; it runs an hour later by the clock (03:30 CEST)
    ("Europe/Berlin", "02:30", "2024-03-30T12:00:00", ["2024-03-31T01:30:00", "2024-04-01T00:30:00"]),
    # fall back: 02:30 happens twice on 27 October 2024; it runs at the first only
    ("Europe/Berlin", "02:30", "2024-10-26T12:00:00", ["2024-10-27T00:30:00", "2024-10-28T01:30:00"]),
    ("America/New_York", "09:00", "2024-03-09T12:00:00", ["2024-03-09T14:00:00", "2024-03-10T13:00:00"]),
    ("America/New_York", "09:00", "2024-11-02T12:00:00", ["2024-11-02T13:00:00", "2024-11-03T14:00:00"]),
])
def test_a_daily_time_in_a_zone_runs_once_a_day_at_that_wall_clock_time_across_dst(zone, at, start, expected):
    ran = runs_of(Daily.of(at, zone), utc(start), utc(start) + 2 * DAY)
    assert ran == [utc(start)] + [utc(t) for t in expected]  # the first at start, as the agent does


def test_every_keeps_its_grid_and_an_overrunning_run_is_not_stacked():
    table = Timetable()
    job = table.add("poll", Every(5 * MINUTE), T0, lambda: None)
    assert table.due(T0) == [job]
    assert table.done(job, T0, T0 + 20) is False  # a poll of 20 s: the next slot stays on the grid, no drift
    assert job.at == T0 + 5 * MINUTE
    assert table.done(job, T0 + 5 * MINUTE, T0 + 17 * MINUTE) is True  # a poll of 12 minutes: the slots it overran are skipped
    assert job.at == T0 + 20 * MINUTE
    assert table.due(T0 + 20 * MINUTE) == [job] and table.due(T0 + 19 * MINUTE) == []


def test_after_a_long_gap_a_job_runs_once_not_once_per_missed_slot():
    ran = runs_of(Every(5 * MINUTE), T0, T0 + 3 * HOUR, step=HOUR)  # the loop looks once an hour (a suspended machine)
    assert ran == [T0, T0 + HOUR, T0 + 2 * HOUR]


def test_a_clock_stepped_back_delays_a_job_by_one_interval_at_most():
    table = Timetable()
    job = table.add("poll", Every(5 * MINUTE), T0, lambda: None)
    table.done(job, T0, T0 + 1)
    stepped_back = T0 - HOUR  # NTP corrects a clock that ran an hour ahead
    assert table.next_wake(stepped_back) == stepped_back + 5 * MINUTE
    daily = table.add("daily", Daily.of("02:00", "UTC"), utc("2026-01-06T02:00:00"), lambda: None)
    table.done(daily, utc("2026-01-06T02:00:00"), utc("2026-01-06T02:00:01"))
    assert daily.at == utc("2026-01-07T02:00:00")
    table.due(utc("2026-01-05T23:00:00"))  # the clock went back a day
    assert daily.at == utc("2026-01-06T02:00:00")


# -- the agent's tick --------------------------------------------------------------------

def test_the_first_tick_polls_every_source_once_then_each_on_its_own_schedule(make, monkeypatch):
    clock = Clock(utc("2024-03-30T12:00:00"))
    agent = make([{"id": 1, "entity": "a"}], clock=clock, sources={
        "often": 'every = "5m"', "nightly": 'at = "02:30"\ntimezone = "Europe/Berlin"'})
    polls = count_polls(agent, monkeypatch)
    wake = agent.tick(clock())
    assert polls == [("often", clock.t), ("nightly", clock.t)]
    assert wake == clock.t + 5 * MINUTE
    while clock.t < utc("2024-03-31T06:00:00"):  # through the night the clocks go forward
        clock.t = agent.tick(clock.t)
    nightly = [t for name, t in polls if name == "nightly"]
    assert nightly == [utc("2024-03-30T12:00:00"), utc("2024-03-31T01:30:00")]  # 03:30 CEST: 02:30 did not exist
    often = [t for name, t in polls if name == "often"]
    assert len(often) == len(set(often)) and all(b - a == 5 * MINUTE for a, b in zip(often, often[1:]))


def test_a_five_minute_poll_keeps_its_pace_the_night_the_local_clocks_go_back(make, monkeypatch):
    monkeypatch.setenv("TZ", "Europe/Berlin")  # the machine's own zone has DST (the `schedule` package stalled here for 65 min)
    time.tzset()
    try:
        clock = Clock(utc("2024-10-27T00:00:00"))
        agent = make(clock=clock, sources={"leads": 'every = "5m"', "nightly": 'at = "02:30"'})  # no timezone: the machine's
        polls = count_polls(agent, monkeypatch)
        while clock.t < utc("2024-10-28T03:00:00"):
            agent.tick(clock.t)
            clock.advance(MINUTE)
    finally:
        monkeypatch.undo()
        time.tzset()
    often = [t for name, t in polls if name == "leads"]
    assert len(often) == 27 * 12 and {b - a for a, b in zip(often, often[1:])} == {5 * MINUTE}
    nightly = [t for name, t in polls if name == "nightly"]
    assert nightly == [utc("2024-10-27T00:00:00"), utc("2024-10-27T00:30:00"), utc("2024-10-28T01:30:00")]  # the first 02:30 only


def test_after_downtime_the_loop_polls_once_not_a_burst(make, monkeypatch):
    clock = Clock()
    agent = make(clock=clock)
    polls = count_polls(agent, monkeypatch)
    agent.tick(clock())
    clock.advance(10 * HOUR + 1)  # the machine was suspended
    wake = agent.tick(clock())
    assert [t for _, t in polls] == [T0, T0 + 10 * HOUR + 1]
    assert wake == T0 + 10 * HOUR + 5 * MINUTE  # back on its grid
    assert agent.tick(clock()) == wake and len(polls) == 2


def test_an_idle_agent_sleeps_until_its_next_poll(make):
    clock = Clock()
    agent = make([{"id": 1, "entity": "a"}], clock=clock, sources={"leads": 'every = "1h"'})
    agent.tick(clock())
    assert agent.ledger.counts() == {"to-leads": {"succeeded": 1}}
    clock.advance(1)
    assert agent.tick(clock()) == T0 + HOUR


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_work_due_but_waiting_behind_a_paused_version_does_not_wake_the_loop(make):
    """Version 2 of an entity is due but waits for version 1, which waits for its connector's probe: wake at the probe."""
    clock = Clock()
    http = f"""
[connectors.crm]
kind = "http"
base_url = "http://127.0.0.1:{closed_port()}"
timeout = "5s"
[connectors.crm.objects.leads]
path = "/leads"
"""
    agent = make([{"id": 1, "entity": "a"}, {"id": 2, "entity": "a"}], clock=clock, connector=http, action="crm > leads > create")
    wake = agent.tick(clock())
    assert {row["key"]: row["status"] for row in agent.ledger.executions()} == {"1": "paused", "2": "pending"}
    assert wake == T0 + UNREACHABLE_PROBE  # before: 0.05 s, a drain 20 times a second until the probe


def test_a_long_drain_yields_to_a_due_poll_within_one_delivery_round(make, monkeypatch):
    clock = Clock()
    agent = make([{"id": i, "entity": str(i)} for i in range(20)], clock=clock, concurrency=1)
    polls = count_polls(agent, monkeypatch)
    real = agent.connectors["out"].run

    def slow(action, data, key):  # every delivery takes a minute of the fake clock
        clock.advance(MINUTE)
        return real(action, data, key)

    monkeypatch.setattr(agent.connectors["out"], "run", slow)
    wake = agent.tick(clock())
    delivered = agent.ledger.counts()["to-leads"]["succeeded"]
    assert clock.t == T0 + 5 * MINUTE and delivered == 5  # the poll fell due during the fifth delivery: no sixth was started
    assert wake == clock.t
    agent.tick(clock())
    assert [t for _, t in polls] == [T0, T0 + 5 * MINUTE]  # polled before the drain went on
    while agent.ledger.counts()["to-leads"].get("succeeded", 0) < 20:
        agent.tick(clock())
    assert all(b - a <= 5 * MINUTE + MINUTE for (_, a), (_, b) in zip(polls, polls[1:]))


def test_polls_slower_than_their_interval_still_leave_a_delivery_round_each_tick(make, monkeypatch, caplog):
    clock = Clock()
    agent = make([{"id": i, "entity": str(i)} for i in range(6)], clock=clock, concurrency=1,
                 sources={"a": 'every = "1m"', "b": 'every = "1m"'})
    real = agent.poll

    def slow(name, **kwargs):  # every poll takes 70 s, longer than the interval
        clock.advance(70)
        return real(name, **kwargs)

    monkeypatch.setattr(agent, "poll", slow)
    delivered = []
    for _ in range(4):
        agent.tick(clock())
        delivered.append(sum(flow.get("succeeded", 0) for flow in agent.ledger.counts().values()))
    assert delivered == [1, 2, 3, 4]  # one round a tick although a poll is always due
    assert "poll of a took longer than its interval" in caplog.text


def test_a_poll_that_raises_is_logged_and_the_loop_goes_on(make, monkeypatch, caplog):
    clock = Clock()
    agent = make([{"id": 1, "entity": "a"}], clock=clock, sources={"broken": 'every = "5m"', "fine": 'every = "5m"'})
    real = agent.poller.poll
    monkeypatch.setattr(agent.poller, "poll", lambda name, **kw: {}["boom"] if name == "broken" else real(name, **kw))
    polls = count_polls(agent, monkeypatch)
    wake = agent.tick(clock())
    assert [name for name, _ in polls] == ["broken", "fine"]
    assert "poll of broken failed unexpectedly" in caplog.text
    assert agent.ledger.counts() == {"to-fine": {"succeeded": 1}}
    assert wake == T0 + 5 * MINUTE  # tried again at its next time, not at once


def test_a_ledger_that_cannot_be_written_is_tried_again_after_the_retry_delay(make, monkeypatch):
    clock = Clock()
    agent = make([{"id": 1, "entity": "a"}], clock=clock)
    polls = count_polls(agent, monkeypatch)
    agent.ledger.conn.execute("CREATE TRIGGER full BEFORE INSERT ON executions BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    assert agent.tick(clock()) == T0 + LEDGER_RETRY
    agent.ledger.conn.execute("DROP TRIGGER full")
    clock.advance(LEDGER_RETRY)
    agent.tick(clock())
    assert len(polls) == 2 and agent.ledger.counts() == {"to-leads": {"succeeded": 1}}  # the poll stayed due; nothing lost


# -- runs on demand ----------------------------------------------------------------------

def test_a_requested_run_is_polled_by_the_next_tick_and_reported(make):
    clock = Clock()
    agent = make([{"id": 1, "entity": "a"}, {"id": 2, "entity": "b"}], clock=clock)
    agent.tick(clock())
    ids = []
    caller = threading.Thread(target=lambda: ids.append(agent.request_run("leads", {"sku": "123"})))  # the endpoint's thread
    caller.start()
    caller.join(5)
    [run_id] = ids
    assert agent.run_status(run_id) == {"id": run_id, "source": "leads", "params": {"sku": "123"}, "state": "queued", "result": None,
                                        "scheduled": []}
    assert agent.tick(clock()) == T0 + 5 * MINUTE
    status = agent.run_status(run_id)
    assert status["state"] == "done"
    assert status["result"] == {"pages": 1, "fetched": 2, "new": 0, "primed": 0, "quarantined": 0, "error": None}
    assert agent.run_status("nope") is None


def test_a_requested_run_hands_its_params_to_the_poll(make, monkeypatch):
    agent = make()
    seen = []
    real = agent.poll
    monkeypatch.setattr(agent, "poll", lambda name, run=None: seen.append((name, run)) or real(name))
    agent.tick(agent.clock())
    run_id = agent.request_run("leads", {"sku": "123"})
    agent.tick(agent.clock())
    assert seen == [("leads", None), ("leads", {"sku": "123"})]
    assert agent.run_status(run_id)["state"] == "done"


def test_a_run_whose_poll_fails_is_reported_failed_with_the_error(make, tmp_path):
    agent = make()
    (tmp_path / "view.json").write_text("{not json")
    run_id = agent.request_run("leads", {})
    agent.tick(agent.clock())
    status = agent.run_status(run_id)
    assert status["state"] == "failed" and "not JSON" in status["result"]["error"]


def test_a_run_for_an_unknown_source_is_refused_with_the_known_names(make):
    agent = make(sources={"leads": 'every = "5m"', "orders": 'every = "5m"'})
    with pytest.raises(ValueError, match="unknown source 'lead' .known: leads, orders."):
        agent.request_run("lead", {})
    with pytest.raises(TypeError):
        agent.request_run("leads", {"sku": 123})


def test_runs_are_remembered_up_to_a_bound_and_a_full_queue_is_refused(make):
    agent = make()
    first = [agent.request_run("leads", {"n": str(i)}) for i in range(MAX_RUNS)]
    with pytest.raises(RunQueueFull):
        agent.request_run("leads", {})
    agent.tick(agent.clock())
    assert all(agent.run_status(run_id)["state"] == "done" for run_id in first)
    later = [agent.request_run("leads", {}) for _ in range(10)]  # the oldest finished runs make room
    assert agent.run_status(first[0]) is None and agent.run_status(first[10])["state"] == "done"
    assert all(agent.run_status(run_id)["state"] == "queued" for run_id in later)


def test_a_run_requested_during_a_poll_of_its_source_waits_for_it(make, monkeypatch):
    agent = make()
    busy, most, real = [0], [0], agent.poll
    requested = []

    def poll(name, **kwargs):
        busy[0] += 1
        most[0] = max(most[0], busy[0])
        if not requested:  # another thread asks for a run of this very source while it is being polled
            caller = threading.Thread(target=lambda: requested.append(agent.request_run(name, {})))
            caller.start()
            caller.join(5)
            assert agent.run_status(requested[0])["state"] == "queued"
        try:
            return real(name, **kwargs)
        finally:
            busy[0] -= 1

    monkeypatch.setattr(agent, "poll", poll)
    agent.tick(agent.clock())
    assert most[0] == 1 and agent.run_status(requested[0])["state"] == "done"


def test_run_forever_wakes_for_a_requested_run_and_ends_on_stop(tmp_path):
    agent = Agent(load(write_config(tmp_path, sources={"leads": 'every = "1h"'})))
    loop = threading.Thread(target=agent.run_forever)
    try:
        loop.start()
        run_id = agent.request_run("leads", {})
        assert wait_until(lambda: agent.run_status(run_id)["state"] == "done", 10)  # not after a sleep of the hour (or a minute)
        agent.stopping.set()
        loop.join(10)
        assert not loop.is_alive()
    finally:
        agent.stopping.set()
        loop.join(10)
        agent.close()


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_at_concurrency_1_one_commit_records_several_sends(make, monkeypatch):
    """Up to CLAIM_AHEAD executions are claimed at once (each intent committed before its send) and their outcomes
    recorded together: 16 sends cost a few commits, not one each."""
    from agent.process import CLAIM_AHEAD

    agent = make([{"id": i, "entity": str(i)} for i in range(16)], concurrency=1)
    commits, real = [], agent.ledger.finish_and_claim

    def counted(done, now, limit, lease, **kwargs):
        claimed = real(done, now, limit, lease, **kwargs)
        if done or claimed:
            commits.append((len(done), len(claimed)))
        return claimed

    monkeypatch.setattr(agent.ledger, "finish_and_claim", counted)
    agent.tick(agent.clock())
    assert agent.ledger.counts()["to-leads"]["succeeded"] == 16
    assert commits[0] == (0, CLAIM_AHEAD)  # the intent of the first eight, before any is sent
    assert len(commits) <= 16 // (CLAIM_AHEAD - 1) + 2, commits
    assert sum(done for done, _ in commits) == 16


def test_a_slow_sinks_outcomes_are_not_held_back_behind_the_sends_claimed_ahead(make, monkeypatch):
    """Outcomes share a commit only while they are fresh: behind a sink slower than RECORD_WITHIN each is recorded
    while the next send is in flight, not held back behind every send claimed ahead."""
    from agent.process import RECORD_WITHIN

    agent = make([{"id": i, "entity": str(i)} for i in range(3)], concurrency=1)
    real = agent.connectors["out"].run

    def slow(action, data, key):
        time.sleep(RECORD_WITHIN + 0.05)
        return real(action, data, key)

    monkeypatch.setattr(agent.connectors["out"], "run", slow)
    recorded, finish_and_claim = [], agent.ledger.finish_and_claim

    def counted(done, now, limit, lease, **kwargs):
        recorded.append(len(done))
        return finish_and_claim(done, now, limit, lease, **kwargs)

    monkeypatch.setattr(agent.ledger, "finish_and_claim", counted)
    agent.tick(agent.clock())
    assert agent.ledger.counts()["to-leads"]["succeeded"] == 3
    assert [n for n in recorded if n] == [1, 1, 1], recorded

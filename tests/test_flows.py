"""FlowRunner with a real ledger: steps, outcomes, retries, pauses, queued calls, idempotency keys."""
import json
import textwrap
import threading

import pytest

from agent.config import load
from agent.flows import OUTPUT_EXCERPT, UNREACHABLE_PROBE, FlowRunner, idempotency_key, reads_steps, unreachable_reason
from sinks.base import ActionError, Outcome
from state.base import Admission
from state.sqlite import SqliteLedger as Ledger

NOW = 1_800_000_000.0


class Clock:
    def __init__(self, t: float = NOW):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Scripted:
    """A connector that answers from a script and records every call (the plugin boundary, not HTTP)."""

    def __init__(self, *outcomes: Outcome):
        self.outcomes = list(outcomes)
        self.calls: list[tuple] = []

    def run(self, action, data, key):
        self.calls.append((str(action), data, key))
        return self.outcomes.pop(0) if self.outcomes else Outcome.ok({"id": len(self.calls)})

    def close(self):
        pass


def config(tmp_path, steps: str):
    (tmp_path / "leads.json").write_text('{"records": []}')
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent("""
        [sources.leads]
        kind = "file"
        path = "leads.json"
        id = "id"
        [connectors.out]
        kind = "file"
        path = "out.jsonl"
        [connectors.out2]
        kind = "file"
        path = "out2.jsonl"
        [[flows]]
        name = "f"
        source = "leads"
    """) + textwrap.dedent(steps))
    return load(path)


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "agent.db") as led:
        yield led


def admit(ledger, *records):
    items = [Admission(str(r["id"]), str(r["id"]), "", "h", str(r["id"]), {"record": r}) for r in records]
    ledger.admit("leads", items, [("f", False)], NOW)


def drive(ledger, runner, clock, rounds: int = 10):
    """Claim and run due work like the agent's drain does, without threads."""
    for _ in range(rounds):
        claimed = ledger.claim(clock(), 10, 300)
        if not claimed:
            return
        ledger.finish_many([(ex, runner.run(ex)) for ex in claimed], clock())


ACTION = """
    [[flows.steps]]
    kind = "map"
    fields = { name = "{{ record.name }}", n = "{{ record.n }}" }
    [[flows.steps]]
    kind = "action"
    action = "out > record > write"
    body = "mapped"
    retry = { attempts = 3, interval = "10s", max_interval = "1m", jitter = false }
"""


def test_map_then_action_sends_native_types_with_a_stable_key(tmp_path, ledger):
    clock, sink = Clock(), Scripted()
    runner = FlowRunner(config(tmp_path, ACTION), {"out": sink}, clock=clock)
    admit(ledger, {"id": 1, "name": "Zoë", "n": 7})
    drive(ledger, runner, clock)
    [(action, data, key)] = sink.calls
    assert action == "record > write" and data == {"body": {"name": "Zoë", "n": 7}}
    assert key == idempotency_key("f", 1, "leads", "1")
    assert ledger.counts() == {"f": {"succeeded": 1}}


def test_filter_false_ends_as_filtered_and_sends_nothing(tmp_path, ledger):
    clock, sink = Clock(), Scripted()
    steps = '[[flows.steps]]\nkind = "filter"\nwhen = "record.status != \'Spam\'"\n' + ACTION
    runner = FlowRunner(config(tmp_path, steps), {"out": sink}, clock=clock)
    admit(ledger, {"id": 1, "name": "a", "n": 1, "status": "Spam"}, {"id": 2, "name": "b", "n": 2, "status": "New"})
    drive(ledger, runner, clock)
    assert [c[1]["body"]["name"] for c in sink.calls] == ["b"]
    assert ledger.counts() == {"f": {"filtered": 1, "succeeded": 1}}


def test_retryable_then_success_keeps_the_key_and_counts_attempts(tmp_path, ledger):
    clock = Clock()
    sink = Scripted(Outcome("retryable", error="HTTP 503", status_code=503, condition="5xx"))
    runner = FlowRunner(config(tmp_path, ACTION), {"out": sink}, clock=clock)
    admit(ledger, {"id": 1, "name": "a", "n": 1})
    drive(ledger, runner, clock)
    [row] = ledger.executions()
    assert row["status"] == "retrying" and row["next_at"] == NOW + 10 and "503" in row["last_error"]
    clock.t += 10
    drive(ledger, runner, clock)
    assert ledger.counts() == {"f": {"succeeded": 1}}
    assert sink.calls[0][2] == sink.calls[1][2]
    assert [a["outcome"] for a in ledger.attempts_of(row["id"])] == ["retryable", "succeeded"]


def test_retries_give_up_as_dead_after_the_attempts(tmp_path, ledger):
    clock = Clock()
    sink = Scripted(*[Outcome("retryable", error="timed out", condition="timeout")] * 3)
    runner = FlowRunner(config(tmp_path, ACTION), {"out": sink}, clock=clock)
    admit(ledger, {"id": 1, "name": "a", "n": 1})
    for _ in range(4):
        drive(ledger, runner, clock)
        clock.t += 60
    [row] = ledger.executions()
    assert row["status"] == "dead" and "gave up after 3 attempts" in row["last_error"]
    assert len(sink.calls) == 3


def test_retry_after_is_honoured(tmp_path, ledger):
    clock = Clock()
    sink = Scripted(Outcome("retryable", error="429", status_code=429, condition="429", retry_after=42))
    runner = FlowRunner(config(tmp_path, ACTION), {"out": sink}, clock=clock)
    admit(ledger, {"id": 1, "name": "a", "n": 1})
    drive(ledger, runner, clock)
    assert ledger.executions()[0]["next_at"] == NOW + 42


@pytest.mark.parametrize("outcome", [Outcome("failed", error="HTTP 422", status_code=422, condition="422"),
                                     Outcome("retryable", error="HTTP 503", status_code=503, condition="5xx")])
def test_permanent_or_uncovered_failures_are_not_retried(tmp_path, ledger, outcome):
    clock, sink = Clock(), Scripted(outcome)
    steps = ACTION.replace('retry = { attempts = 3, interval = "10s", max_interval = "1m", jitter = false }', 'retry = { on = ["timeout"] }')
    runner = FlowRunner(config(tmp_path, steps), {"out": sink}, clock=clock)
    admit(ledger, {"id": 1, "name": "a", "n": 1})
    drive(ledger, runner, clock)
    assert ledger.executions()[0]["status"] == "failed"
    assert len(sink.calls) == 1


def test_paused_spends_no_attempt_and_sends_again_later(tmp_path, ledger):
    clock = Clock()
    sink = Scripted(Outcome("paused", error="HTTP 401", status_code=401), Outcome("paused", error="HTTP 401", status_code=401))
    runner = FlowRunner(config(tmp_path, ACTION), {"out": sink}, clock=clock)
    admit(ledger, {"id": 1, "name": "a", "n": 1})
    drive(ledger, runner, clock)
    clock.t += 60
    drive(ledger, runner, clock)
    [row] = ledger.executions()
    assert row["status"] == "paused" and row["attempts"] == 0
    clock.t += 60
    drive(ledger, runner, clock)
    assert ledger.counts() == {"f": {"succeeded": 1}}


def test_missing_field_fails_the_record_with_a_clear_message(tmp_path, ledger):
    clock, sink = Clock(), Scripted()
    runner = FlowRunner(config(tmp_path, ACTION), {"out": sink}, clock=clock)
    admit(ledger, {"id": 1, "n": 1})
    drive(ledger, runner, clock)
    [row] = ledger.executions()
    assert row["status"] == "failed" and "name" in row["last_error"] and "step 0" in row["last_error"]
    assert sink.calls == []


def test_two_actions_each_get_their_own_intent_and_key(tmp_path, ledger):
    clock = Clock()
    first, second = Scripted(), Scripted(Outcome("retryable", error="503", status_code=503, condition="5xx"))
    steps = ACTION + '\n[[flows.steps]]\nkind = "action"\naction = "out2 > record > write"\nbody = "{{ steps[1] }}"\n'
    runner = FlowRunner(config(tmp_path, steps), {"out": first, "out2": second}, clock=clock)
    admit(ledger, {"id": 1, "name": "a", "n": 1})
    drive(ledger, runner, clock)
    [row] = ledger.executions()
    assert (row["status"], row["step"]) == ("retrying", 2)
    assert len(first.calls) == 1  # the finished first action is never sent again
    assert second.calls[0][1] == {"body": {"id": 1}} and second.calls[0][2] != first.calls[0][2]
    clock.t += 3600
    drive(ledger, runner, clock)
    assert len(first.calls) == 1 and len(second.calls) == 2
    assert ledger.counts() == {"f": {"succeeded": 1}}


def test_wait_for_response_false_queues_the_call_and_goes_on(tmp_path, ledger):
    clock = Clock()
    slow = Scripted(Outcome("retryable", error="503", status_code=503, condition="5xx"))
    steps = ACTION.replace('body = "mapped"', 'body = "mapped"\nwait_for_response = false')
    runner = FlowRunner(config(tmp_path, steps), {"out": slow}, clock=clock)
    admit(ledger, {"id": 1, "name": "a", "n": 1})
    drive(ledger, runner, clock)
    statuses = sorted(r["status"] for r in ledger.executions())
    assert statuses == ["retrying", "succeeded"]  # the flow went on; the queued call waits for its retry
    parent = next(r for r in ledger.executions() if r["status"] == "succeeded")
    assert [a["outcome"] for a in ledger.attempts_of(parent["id"])] == ["queued"]
    clock.t += 60
    drive(ledger, runner, clock)
    assert sorted(r["status"] for r in ledger.executions()) == ["succeeded", "succeeded"]
    assert len({c[2] for c in slow.calls}) == 1 and len(slow.calls) == 2


def test_proceed_on_failure_records_the_failure_and_goes_on(tmp_path, ledger):
    clock = Clock()
    sink = Scripted(Outcome("failed", error="HTTP 400", status_code=400, condition="400"))
    steps = ACTION.replace('body = "mapped"', 'body = "mapped"\nproceed_on_failure = true')
    runner = FlowRunner(config(tmp_path, steps), {"out": sink}, clock=clock)
    admit(ledger, {"id": 1, "name": "a", "n": 1})
    drive(ledger, runner, clock)
    [row] = ledger.executions()
    assert row["status"] == "succeeded"
    assert ledger.attempts_of(row["id"])[0]["outcome"] == "failed"


class Broken(Scripted):
    """A connector with a bug: raises, or answers something that is not an Outcome."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def run(self, action, data, key):
        self.calls.append((str(action), data, key))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize("answer, named", [
    (RuntimeError("bug in the sink"), "connector 'out' raised RuntimeError: bug in the sink"),
    (ActionError("record > write: not an action of this connector"), "connector 'out' raised ActionError: record > write: not an action"),
    (ConnectionError("looks like a network error"), "connector 'out' raised ConnectionError: looks like a network error"),
    (False, "connector 'out' raised TypeError: run() returned bool, not an Outcome"),
])
@pytest.mark.parametrize("proceed", [False, True])
def test_a_connector_that_raises_fails_the_execution_at_once(tmp_path, ledger, answer, named, proceed):
    clock, broken = Clock(), Broken(answer)
    steps = ACTION + ("proceed_on_failure = true\n" if proceed else "")  # a bug is not a delivery failure to proceed past
    runner = FlowRunner(config(tmp_path, steps), {"out": broken}, clock=clock)
    admit(ledger, {"id": 1, "name": "a", "n": 1})
    drive(ledger, runner, clock)
    clock.t += 86_400  # a day later: nothing is due again
    drive(ledger, runner, clock)
    [row] = ledger.executions()
    assert row["status"] == "failed" and row["step"] == 1
    assert row["last_error"].startswith("flow 'f' step 1 (out > record > write): " + named)
    assert len(broken.calls) == 1
    [attempt] = ledger.attempts_of(row["id"])
    assert attempt["outcome"] == "failed" and named in attempt["error"]


def test_replay_gets_a_new_key():
    assert idempotency_key("f", 0, "s", "k") == idempotency_key("f", 0, "s", "k")
    assert idempotency_key("f", 0, "s", "k", replay=1) != idempotency_key("f", 0, "s", "k")
    assert idempotency_key("f", 1, "s", "k") != idempotency_key("f", 0, "s", "k")


def test_a_paused_connector_is_probed_once_not_hammered(tmp_path, ledger):
    clock = Clock()
    sink = Scripted(Outcome("paused", error="HTTP 401", status_code=401))
    runner = FlowRunner(config(tmp_path, ACTION), {"out": sink}, clock=clock)
    admit(ledger, *({"id": i, "name": "a", "n": i} for i in range(5)))
    drive(ledger, runner, clock)
    assert len(sink.calls) == 1  # the first 401 paused the connector; the other four did not call it
    assert {r["status"] for r in ledger.executions()} == {"paused"}
    assert {r["attempts"] for r in ledger.executions()} == {0}
    clock.t += 60
    drive(ledger, runner, clock)
    assert len(sink.calls) == 6 and ledger.counts() == {"f": {"succeeded": 5}}
    assert runner.paused == {}


def test_take_resumed_reports_a_resumed_connector_once(tmp_path, ledger):
    clock = Clock()
    sink = Scripted(Outcome("paused", error="HTTP 401", status_code=401))
    runner = FlowRunner(config(tmp_path, ACTION), {"out": sink}, clock=clock)
    admit(ledger, {"id": 1, "name": "a", "n": 1})
    drive(ledger, runner, clock)
    assert runner.take_resumed() is False  # paused, not resumed
    clock.t += 60
    drive(ledger, runner, clock)  # the probe gets through
    assert runner.take_resumed() is True
    assert runner.take_resumed() is False  # taken: the next drain round does not wake again


def test_take_resumed_does_not_lose_a_resume_noted_while_it_waits_for_the_lock(tmp_path):
    runner = FlowRunner(config(tmp_path, ACTION), {"out": Scripted()}, clock=Clock())
    taken = []
    with runner._lock:  # a worker thread is noting a resumed connector right now
        reader = threading.Thread(target=lambda: taken.append(runner.take_resumed()))
        reader.start()
        reader.join(0.05)
        assert reader.is_alive()  # the take waits for the worker instead of reading a half-made change
        runner._resumed = True  # as FlowRunner._note does, under the lock
    reader.join(5)
    assert taken == [True] and runner.take_resumed() is False


# --- outputs: kept whole only for a later step that reads them ----------------------------------------

BIG = {"items": ["x" * 100] * 200}  # about 21 KB of JSON


@pytest.mark.parametrize("later, whole", [
    ("", False),
    ('[[flows.steps]]\nkind = "map"\nfields = { n = "{{ steps[1][\'items\'] | length }}" }\n', True),
    ('[[flows.steps]]\nkind = "map"\nfields = { n = "{{ record.name }}" }\n', False),
])
def test_an_action_output_is_kept_whole_only_when_a_later_step_reads_steps(tmp_path, ledger, later, whole):
    clock, sink = Clock(), Scripted(Outcome.ok(BIG))
    runner = FlowRunner(config(tmp_path, ACTION + later), {"out": sink}, clock=clock)
    admit(ledger, {"id": 1, "name": "a", "n": 1})
    drive(ledger, runner, clock)
    stored = ledger.conn.execute("SELECT context FROM executions").fetchone()[0]
    output = json.loads(stored)["steps"]["1"]
    if whole:
        assert output == BIG and json.loads(stored)["steps"]["2"] == {"n": 200}
    else:
        assert output["length"] > OUTPUT_EXCERPT and len(output["excerpt"]) == OUTPUT_EXCERPT and len(stored) < 2 * OUTPUT_EXCERPT


@pytest.mark.parametrize("template, reads", [
    ("{{ steps[0].id }}", True), ("{{ steps | length }}", True), ("{% for s in steps %}{{ s }}{% endfor %}", True),
    ("{{ record.steps }}", False), ("{{ record.name }}", False), ("steps", True),
])
def test_reads_steps_finds_the_name_in_any_template(tmp_path, template, reads):
    cfg = config(tmp_path, f'[[flows.steps]]\nkind = "map"\nfields = {{ a = {{ b = ["{template}"] }} }}\n')
    assert reads_steps(cfg.flows[0].steps[0]) is reads


# --- a refusal that turns out to be the connector's ---------------------------------------------------------


def test_the_record_refused_just_before_a_pause_is_put_back_once(tmp_path, ledger):
    clock = Clock()
    refused = Outcome("failed", error="HTTP 403", status_code=403, condition="403")
    paused = Outcome("paused", error="two records refused in a row: HTTP 403", status_code=403, condition="403")
    sink = Scripted(refused, paused)
    runner = FlowRunner(config(tmp_path, ACTION), {"out": sink}, clock=clock)
    admit(ledger, {"id": 1, "name": "a", "n": 1}, {"id": 2, "name": "b", "n": 2})
    drive(ledger, runner, clock)
    first, second = ledger.executions()
    assert (first["status"], second["status"]) == ("failed", "paused")
    assert runner.take_put_back() == [first["id"]] and runner.take_put_back() == []


def test_a_refusal_followed_by_a_success_stays_the_records_own(tmp_path, ledger):
    clock = Clock()
    sink = Scripted(Outcome("failed", error="HTTP 403", status_code=403, condition="403"), Outcome.ok(),
                    Outcome("paused", error="HTTP 401", status_code=401))
    runner = FlowRunner(config(tmp_path, ACTION), {"out": sink}, clock=clock)
    admit(ledger, *({"id": i, "name": "a", "n": i} for i in range(3)))
    drive(ledger, runner, clock)
    assert [r["status"] for r in ledger.executions()] == ["failed", "succeeded", "paused"]
    assert runner.take_put_back() == []


# --- an unreachable connector ---------------------------------------------------------------------------


def test_an_unreachable_connector_is_probed_one_call_at_a_time_and_its_work_spends_no_attempts(tmp_path, ledger):
    clock = Clock()
    down = Outcome("retryable", error="connection failed (Connection refused)", condition="connection", unreachable=True)
    sink = Scripted(down, down)
    runner = FlowRunner(config(tmp_path, ACTION), {"out": sink}, clock=clock)
    admit(ledger, *({"id": i, "name": "a", "n": i} for i in range(5)))
    drive(ledger, runner, clock)
    assert len(sink.calls) == 1
    rows = ledger.executions()
    assert {r["status"] for r in rows} == {"paused"} and {r["attempts"] for r in rows} == {0}
    assert all(r["last_error"].startswith(unreachable_reason("out") + " since ") and "refused" in r["last_error"] for r in rows)
    assert runner.unreachable() == {"out": (NOW, "connection failed (Connection refused)")}
    clock.t += UNREACHABLE_PROBE
    drive(ledger, runner, clock)
    assert len(sink.calls) == 2  # one probe; refused again
    clock.t += UNREACHABLE_PROBE
    drive(ledger, runner, clock)
    assert len(sink.calls) == 2  # the next probe waits twice as long
    clock.t += UNREACHABLE_PROBE
    drive(ledger, runner, clock)  # the probe gets through; the others claimed with it go on behind it
    assert runner.unreachable() == {} and runner.take_resumed() is True  # the agent then wakes whatever still waits
    assert ledger.counts() == {"f": {"succeeded": 5}} and len(sink.calls) == 2 + 5


def test_a_connection_failure_that_reached_the_sink_is_retried_by_policy_as_before(tmp_path, ledger):
    clock = Clock()
    sink = Scripted(Outcome("retryable", error="connection reset", condition="connection"))
    runner = FlowRunner(config(tmp_path, ACTION), {"out": sink}, clock=clock)
    admit(ledger, {"id": 1, "name": "a", "n": 1})
    drive(ledger, runner, clock)
    [row] = ledger.executions()
    assert (row["status"], row["attempts"], row["next_at"]) == ("retrying", 1, NOW + 10) and runner.unreachable() == {}

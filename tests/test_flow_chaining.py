"""Flow chaining: `[[flows]] after = "A"` starts a flow for a record when flow A's execution of it succeeds.

The real CLI (in-process, or as a subprocess where it must be killed) polls a
real view server on 127.0.0.1 and sends to the project's local HTTP sink.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from agent.config import ConfigError, load
from agent.flows import FlowRunner, idempotency_key
from sinkserver import SinkServer
from state.base import Execution
from viewserver import ViewServer, make_leads

UPSTREAM, CHAINED, LAST = "upsert-customer", "welcome", "audit"
RETRY = '{ interval = "0s", jitter = false, attempts = 4 }'  # retries are due at once: `run --once` finishes them


def write_config(folder: Path, view: str, sink: str, *, audit: bool = False, concurrency: int = 4, flows: str = "") -> Path:
    """A flow that creates the lead, a flow `after` it that sends a welcome event, and optionally one after that."""
    cfg = folder / "agent.toml"
    chained_further = f"""
[[flows]]
name = "{LAST}"
after = "{CHAINED}"
  [[flows.steps]]
  kind = "action"
  action = "notify > audit > create"
  body = {{ lead = "{{{{ record.Email }}}}", upstream = "{{{{ upstream.flow }}}}", event = "{{{{ upstream.steps.event.seen }}}}" }}
""" if audit else ""
    cfg.write_text(f"""
[agent]
ledger = "var/agent.db"
log_level = "WARNING"
concurrency = {concurrency}

[sources.leads]
kind = "rest"
url = "{view}"
id = "lastSubmissionID"
entity = "RecordId"
first_run = "deliver"
timeout = "5s"

[connectors.crm]
kind = "http"
base_url = "{sink}"
timeout = "5s"
[connectors.crm.objects.leads]
path = "/leads"

[connectors.notify]
kind = "http"
base_url = "{sink}"
timeout = "5s"
[connectors.notify.objects.events]
path = "/events"
[connectors.notify.objects.audit]
path = "/audit"

[[flows]]
name = "{UPSTREAM}"
source = "leads"
  [[flows.steps]]
  kind = "map"
  fields = {{ email = "{{{{ record.Email | lower }}}}", name = "{{{{ record.FirstName }}}}" }}
  [[flows.steps]]
  kind = "action"
  id = "create"
  action = "crm > leads > create"
  body = "mapped"
  output = {{ email = "{{{{ response.email }}}}", status = "{{{{ status }}}}" }}
  retry = {RETRY}

[[flows]]
name = "{CHAINED}"
after = "{UPSTREAM}"
  [[flows.steps]]
  kind = "action"
  id = "event"
  action = "notify > events > create"
  body = {{ lead = "{{{{ upstream.steps.create.email }}}}", code = "{{{{ upstream.steps.create.status }}}}", first = "{{{{ record.FirstName }}}}", after = "{{{{ upstream.flow }}}}" }}
  output = {{ seen = "{{{{ response.lead }}}}" }}
  retry = {RETRY}
{chained_further}{flows}""")
    return cfg


@pytest.fixture
def sink():
    with SinkServer() as server:
        yield server


def run_once(cli, cfg: Path) -> tuple[int, str, str]:
    return cli("--config", str(cfg), "run", "--once")


def rows(cfg: Path) -> list[dict]:
    """Every execution in the ledger, oldest first (read-only, beside the agent's lock)."""
    with closing(sqlite3.connect(f"file:{cfg.parent / 'var' / 'agent.db'}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(
            "SELECT id, flow, source, key, entity, status, attempts, replay, single, version FROM executions ORDER BY id")]


def of_flow(cfg: Path, flow: str) -> list[dict]:
    return [r for r in rows(cfg) if r["flow"] == flow]


def attempts(cfg: Path, execution: int) -> list[str]:
    with closing(sqlite3.connect(f"file:{cfg.parent / 'var' / 'agent.db'}?mode=ro", uri=True)) as db:
        return [outcome for (outcome,) in db.execute("SELECT outcome FROM attempts WHERE execution = ? ORDER BY id", (execution,))]


def keys_sent(sink: SinkServer, path: str) -> list[str]:
    return [r["headers"]["Idempotency-Key"] for r in sink.requests_to("POST", path)]


def key_of(flow: str, step: str, lead: dict, replay: int = 0) -> str:
    return idempotency_key(flow, f"id:{step}", "leads", lead["lastSubmissionID"], replay)


# -- a chained flow runs once per upstream success, with the upstream's outputs ------------------------------------

def test_a_chained_flow_runs_once_per_upstream_success_and_sees_its_step_outputs(tmp_path, sink, cli):
    leads = make_leads(3)
    with ViewServer(leads) as view:
        cfg = write_config(tmp_path, view.url, sink.url)
        code, out, err = run_once(cli, cfg)
        assert code == 0, err
        events = sorted((r["json"] for r in sink.requests_to("POST", "/events")), key=lambda e: e["lead"])
        assert events == sorted(({"lead": lead["Email"].lower(), "code": 201, "first": lead["FirstName"], "after": UPSTREAM}
                                 for lead in leads), key=lambda e: e["lead"])
        assert sorted(keys_sent(sink, "/events")) == sorted(key_of(CHAINED, "event", lead) for lead in leads)
        assert not set(keys_sent(sink, "/events")) & set(keys_sent(sink, "/leads"))  # its own keys, not the upstream's
        chained = of_flow(cfg, CHAINED)
        assert [(r["status"], r["source"], r["replay"]) for r in chained] == [("succeeded", "leads", 0)] * 3
        assert {(r["key"], r["entity"]) for r in chained} == {(lead["lastSubmissionID"], lead["RecordId"]) for lead in leads}

        code, out, err = run_once(cli, cfg)  # nothing new: the chained flow does not run again
        assert code == 0, err
    assert len(sink.requests_to("POST", "/events")) == 3 and len(of_flow(cfg, CHAINED)) == 3


def test_a_flow_chained_after_a_chained_flow_sees_its_own_upstream(tmp_path, sink, cli):
    [lead] = make_leads(1)
    with ViewServer([lead]) as view:
        cfg = write_config(tmp_path, view.url, sink.url, audit=True)
        code, out, err = run_once(cli, cfg)
        assert code == 0, err
    [audit] = sink.requests_to("POST", "/audit")
    assert audit["json"] == {"lead": lead["Email"], "upstream": CHAINED, "event": lead["Email"].lower()}
    assert audit["headers"]["Idempotency-Key"] == idempotency_key(LAST, "0", "leads", lead["lastSubmissionID"])
    assert [(r["flow"], r["status"]) for r in rows(cfg)] == [(UPSTREAM, "succeeded"), (CHAINED, "succeeded"), (LAST, "succeeded")]


def test_a_large_upstream_output_reaches_the_chained_flow_whole(tmp_path, sink, cli):
    """The upstream's last action's output is kept whole (not cut to an excerpt) because a chained flow reads it."""
    [lead] = make_leads(1)
    lead["Notes"] = "x" * 10_000
    with ViewServer([lead]) as view:
        cfg = write_config(tmp_path, view.url, sink.url, flows=f"""
[[flows]]
name = "notes"
after = "{UPSTREAM}"
  [[flows.steps]]
  kind = "action"
  action = "notify > audit > create"
  body = {{ size = "{{{{ upstream.steps.create.notes | length }}}}" }}
""")
        cfg.write_text(cfg.read_text().replace('output = { email = "{{ response.email }}"',
                                               'output = { notes = "{{ record.Notes }}", email = "{{ response.email }}"'))
        code, out, err = run_once(cli, cfg)
        assert code == 0, err
    assert [r["json"] for r in sink.requests_to("POST", "/audit")] == [{"size": 10_000}]


# -- never after a failure -----------------------------------------------------------------------------------------

def test_a_chained_flow_never_runs_after_an_upstream_failure_and_starts_once_when_it_is_retried(tmp_path, sink, cli):
    leads = make_leads(3)
    refused = leads[1]["Email"].lower()
    broken = {"on": True}
    sink.fail_when(lambda r: broken["on"] and r["path"] == "/leads" and (r["json"] or {}).get("email") == refused, 400)
    with ViewServer(leads) as view:
        cfg = write_config(tmp_path, view.url, sink.url)
        code, out, err = run_once(cli, cfg)
        assert code == 1  # an execution failed
        assert sorted(e["json"]["lead"] for e in sink.requests_to("POST", "/events")) == sorted(
            lead["Email"].lower() for lead in leads if lead["Email"].lower() != refused)
        [failed] = [r for r in of_flow(cfg, UPSTREAM) if r["status"] == "failed"]
        assert {r["key"] for r in of_flow(cfg, CHAINED)} == {lead["lastSubmissionID"] for lead in leads} - {failed["key"]}

        broken["on"] = False  # the operator fixes the cause and retries the failed upstream
        code, out, err = cli("--config", str(cfg), "retry", str(failed["id"]))
        assert code == 0, err
        code, out, err = run_once(cli, cfg)
        assert code == 0, err
        code, out, err = run_once(cli, cfg)
        assert code == 0, err
    assert sorted(e["json"]["lead"] for e in sink.requests_to("POST", "/events")) == sorted(lead["Email"].lower() for lead in leads)
    assert len(of_flow(cfg, CHAINED)) == 3


def test_a_filtered_upstream_starts_nothing(tmp_path, sink, cli):
    leads = make_leads(2)
    with ViewServer(leads) as view:
        cfg = write_config(tmp_path, view.url, sink.url)
        cfg.write_text(cfg.read_text().replace(
            '  [[flows.steps]]\n  kind = "map"',
            f'  [[flows.steps]]\n  kind = "filter"\n  when = "record.RecordId != \'{leads[0]["RecordId"]}\'"\n  [[flows.steps]]\n  kind = "map"', 1))
        code, out, err = run_once(cli, cfg)
        assert code == 0, err
    assert {r["key"]: r["status"] for r in of_flow(cfg, UPSTREAM)} == {leads[0]["lastSubmissionID"]: "filtered",
                                                                        leads[1]["lastSubmissionID"]: "succeeded"}
    assert [r["key"] for r in of_flow(cfg, CHAINED)] == [leads[1]["lastSubmissionID"]]


def test_an_upstream_retried_until_it_succeeds_starts_the_chained_flow_once(tmp_path, sink, cli):
    [lead] = make_leads(1)
    sink.fail_next(2, 503)  # the upstream's first two attempts
    with ViewServer([lead]) as view:
        cfg = write_config(tmp_path, view.url, sink.url)
        code, out, err = run_once(cli, cfg)
        assert code == 0, err
    assert len(sink.requests_to("POST", "/leads")) == 3
    assert keys_sent(sink, "/events") == [key_of(CHAINED, "event", lead)]
    [upstream] = of_flow(cfg, UPSTREAM)
    assert upstream["status"] == "succeeded" and attempts(cfg, upstream["id"]) == ["retryable", "retryable", "succeeded"]
    assert [r["status"] for r in of_flow(cfg, CHAINED)] == ["succeeded"]


# -- crashes: the chained execution is created with the upstream's success, or not at all ---------------------------

def agent(cfg: Path, *args: str, failpoint: str = "") -> subprocess.CompletedProcess:
    """The real CLI as a subprocess (a failpoint kills it), in the config's folder."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    if failpoint:
        environ["AGENT_FAILPOINTS"] = failpoint
    return subprocess.run([sys.executable, "-m", "agent", "--config", str(cfg), *args],
                          capture_output=True, text=True, timeout=30, cwd=cfg.parent, env=environ)


def test_a_crash_between_the_upstream_success_and_the_chained_run_neither_loses_nor_doubles_it(tmp_path, sink):
    [lead] = make_leads(1)
    refusing = {"on": True}  # the chained flow's connector refuses our credentials: it waits, paused, without an attempt spent
    sink.fail_when(lambda r: refusing["on"] and r["path"] == "/events", 401)
    with ViewServer([lead]) as view:
        cfg = write_config(tmp_path, view.url, sink.url, concurrency=1)

        # 1. the upstream's request is accepted, the agent dies before its success is recorded: no chained execution yet
        crashed = agent(cfg, "run", "--once", failpoint="after_send:1")
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr
        assert [(r["flow"], r["status"]) for r in rows(cfg)] == [(UPSTREAM, "running")]

        # 2. the upstream is sent again under the same key (the sink answers it from its key) and succeeds: one chained execution
        again = agent(cfg, "run", "--once")
        assert "Traceback" not in again.stderr
        assert keys_sent(sink, "/leads") == [key_of(UPSTREAM, "create", lead)] * 2 and sink.replays == 1
        assert [(r["flow"], r["status"]) for r in rows(cfg)] == [(UPSTREAM, "succeeded"), (CHAINED, "paused")]

        # 3. the chained run is claimed (its intent committed), the agent dies before sending it
        refusing["on"] = False
        crashed = agent(cfg, "run", "--once", failpoint="after_claim:1")
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr
        assert [(r["flow"], r["status"]) for r in rows(cfg)] == [(UPSTREAM, "succeeded"), (CHAINED, "running")]

        # 4. the chained request is accepted, the agent dies before recording it
        crashed = agent(cfg, "run", "--once", failpoint="after_send:1")
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr

        # 5. sent again under its own stable key: the sink's one effect stands
        done = agent(cfg, "run", "--once")
        assert done.returncode == 0, done.stderr
    accepted = [r for r in sink.requests_to("POST", "/events") if r["headers"]["Idempotency-Key"] in sink.accepted]
    assert {r["headers"]["Idempotency-Key"] for r in accepted} == {key_of(CHAINED, "event", lead)}
    assert sink.accepted[key_of(CHAINED, "event", lead)]["lead"] == lead["Email"].lower()
    assert sink.replays == 2  # the upstream once, the chained flow once: each re-send answered from its key
    assert [(r["flow"], r["status"]) for r in rows(cfg)] == [(UPSTREAM, "succeeded"), (CHAINED, "succeeded")]


# -- replays -------------------------------------------------------------------------------------------------------

def test_a_replay_of_the_upstream_starts_the_chained_flow_again_under_a_new_key(tmp_path, cli):
    [lead] = make_leads(1)
    with ViewServer([lead]) as view, SinkServer(key_field="none") as sink:  # a replay creates the lead again: no conflict
        cfg = write_config(tmp_path, view.url, sink.url)
        assert run_once(cli, cfg)[0] == 0
        code, out, err = cli("--config", str(cfg), "replay", "--flow", UPSTREAM, "--yes")
        assert code == 0, err
        code, out, err = run_once(cli, cfg)
        assert code == 0, err
        assert keys_sent(sink, "/events") == [key_of(CHAINED, "event", lead), key_of(CHAINED, "event", lead, replay=1)]

        # a replay of the chained flow itself starts from the same upstream outputs, under a key of its own
        code, out, err = cli("--config", str(cfg), "replay", "--flow", CHAINED, "--yes")
        assert code == 0, err
        code, out, err = run_once(cli, cfg)
        assert code == 0, err
    sent = keys_sent(sink, "/events")
    assert len(sent) == 4 and len(set(sent)) == 4
    assert all(e["json"]["lead"] == lead["Email"].lower() and e["json"]["after"] == UPSTREAM for e in sink.requests_to("POST", "/events"))
    assert [r["replay"] for r in of_flow(cfg, CHAINED)] == [0, 1, 2, 3]
    assert [r["status"] for r in rows(cfg)] == ["succeeded"] * 6


# -- the pinned config version decides what is chained -------------------------------------------------------------

def test_the_chain_follows_the_config_version_the_upstream_was_admitted_under(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text("""
[sources.s]
kind = "file"
path = "none.json"
id = "id"

[[flows]]
name = "a"
source = "s"
  [[flows.steps]]
  kind = "map"
  id = "m"
  fields = { n = "{{ record.n + 1 }}" }

[[flows]]
name = "b"
after = "a"
  [[flows.steps]]
  kind = "map"
  fields = { got = "{{ upstream.steps.m.n }}", first = "{{ upstream.steps[0].n }}", from = "{{ upstream.flow }}" }
""")
    config = load(cfg)
    runner = FlowRunner(config, {}, clock=lambda: 100.0, version=2)
    runner.add_version(1, {"a": config.flows[0]})  # an older version: `b` did not exist yet

    def finish(flow: str, version: int, context: dict):
        return runner.run(Execution(1, flow, "s", "k", "k", 0, 1, None, context, version=version))

    now = finish("a", 2, {"record": {"n": 1}, "cursor": "c"})
    assert now.status == "succeeded"
    assert now.chain == [{"flow": "b", "context": {"record": {"n": 1}, "cursor": "c",
                                                   "upstream": {"flow": "a", "steps": {"0": {"n": 2}}, "ids": {"m": 0}}}}]
    assert finish("a", 1, {"record": {"n": 1}}).chain == []
    chained = finish("b", 2, now.chain[0]["context"])
    assert (chained.status, chained.context["mapped"], chained.chain) == ("succeeded", {"got": 2, "first": 2, "from": "a"}, [])


# -- agent status --------------------------------------------------------------------------------------------------

def test_status_shows_chained_flows_under_their_parent_and_json_carries_after(tmp_path, sink, cli):
    [lead] = make_leads(1)
    with ViewServer([lead]) as view:
        cfg = write_config(tmp_path, view.url, sink.url, audit=True, flows="""
[[flows]]
name = "other"
source = "leads"
  [[flows.steps]]
  kind = "filter"
  when = "false"
""")
        assert run_once(cli, cfg)[0] == 0
        code, out, err = cli("--config", str(cfg), "status")
        shown = out.split("flows:\n", 1)[1].split("connectors:", 1)[0].splitlines()
        names = [line.split()[0] for line in shown]
        assert names == [UPSTREAM, CHAINED, LAST, "other"]
        assert shown[1].startswith(f"    {CHAINED}  after {UPSTREAM}") and "succeeded 1" in shown[1]
        assert shown[2].startswith(f"      {LAST}  after {CHAINED}") and "after None" not in out
        code, out, err = cli("--config", str(cfg), "status", "--json")
    flows = json.loads(out)["flows"]
    assert {name: flows[name]["after"] for name in flows} == {UPSTREAM: None, CHAINED: UPSTREAM, LAST: CHAINED, "other": None}
    assert flows[LAST]["succeeded"] == 1


# -- config errors -------------------------------------------------------------------------------------------------

FLOW = """
[[flows]]
name = "{name}"
{origin}
  [[flows.steps]]
  kind = "map"
  fields = {{ x = "1" }}
"""


def config_with(folder: Path, *flows: tuple[str, str]) -> Path:
    cfg = folder / "agent.toml"
    cfg.write_text('[sources.leads]\nkind = "file"\npath = "leads.json"\nid = "id"\n'
                   + "".join(FLOW.format(name=name, origin=origin) for name, origin in flows))
    return cfg


@pytest.mark.parametrize("flows, path, message", [
    ([("a", 'source = "leads"\nafter = "b"'), ("b", 'source = "leads"')], "flows[0]",
     "flow 'a' has both source = 'leads' and after = 'b'; keep one"),
    ([("a", "")], "flows[0]", "flow 'a' has neither source nor after"),
    ([("a", 'source = "leads"'), ("b", 'after = "upsert"'), ("c", 'source = "leads"')], "flows[1].after",
     "unknown flow 'upsert' (known: a, c)"),
    ([("a", 'source = "leads"'), ("b", 'after = "c"'), ("c", 'after = "b"')], "flows[1].after", "a cycle of after: b -> c -> b"),
    ([("a", 'after = "a"')], "flows[0].after", "a cycle of after: a -> a"),
    ([("s", 'source = "leads"'), ("x", 'after = "z"'), ("y", 'after = "x"'), ("z", 'after = "y"'), ("t", 'after = "y"')],
     "flows[1].after", "a cycle of after: x -> z -> y -> x"),
])
def test_after_mistakes_are_config_errors_naming_the_flows(tmp_path, cli, flows, path, message):
    cfg = config_with(tmp_path, *flows)
    with pytest.raises(ConfigError) as error:
        load(cfg)
    assert [(p, m) for p, m in error.value.problems if message in m] == [(path, error.value.problems[0][1])]
    assert len(error.value.problems) == 1
    code, out, err = cli("--config", str(cfg), "validate")
    assert code == 2 and f"{cfg}: {path}: " in err and message in err and "Traceback" not in err


def test_a_chain_leading_back_to_a_source_loads(tmp_path):
    config = load(config_with(tmp_path, ("c", 'after = "b"'), ("a", 'source = "leads"'), ("b", 'after = "a"')))
    assert [(f.name, f.source, f.after) for f in config.flows] == [("c", None, "b"), ("a", "leads", None), ("b", None, "a")]
    assert [f.name for f in config.flows_of("leads")] == ["a"]  # the poller admits records for the flow with the source only
    assert config.root_source(config.flows[0]) == "leads"


def test_a_stored_flow_definition_names_only_the_origin_it_has(tmp_path):
    """Config versions keep flow definitions: one written before `after` existed keeps its content (and digest)."""
    from agent import versions

    config = load(config_with(tmp_path, ("a", 'source = "leads"'), ("b", 'after = "a"')))
    stored = versions.of(config).flows
    assert ("after" in stored["a"], "source" in stored["b"]) == (False, False)
    assert (stored["a"]["source"], stored["b"]["after"]) == ("leads", "a")
    assert [versions.flow_of(stored[name]) for name in ("a", "b")] == config.flows


def test_a_dry_run_of_a_chained_flow_starts_from_its_upstreams_dry_run(tmp_path, sink, cli):
    [lead] = make_leads(1)
    cfg = write_config(tmp_path, "http://127.0.0.1:9/view", sink.url)
    record = tmp_path / "lead.json"
    record.write_text(json.dumps(lead))
    code, out, err = cli("--config", str(cfg), "test", CHAINED, "--record", str(record), "--json")
    assert code == 0 and "Traceback" not in err, err
    [report] = json.loads(out)
    assert report["flow"] == CHAINED and report["key"] == lead["lastSubmissionID"] and report["status"] == "succeeded", report
    [step] = report["steps"]
    [request] = step["built"]["requests"]
    assert request["url"].endswith("/events") and request["headers"]["Idempotency-Key"] == key_of(CHAINED, "event", lead)
    assert request["body"]["after"] == UPSTREAM and request["body"]["first"] == lead["FirstName"], request
    assert sink.requests == []  # a dry run sends nothing


def test_a_chained_flow_cannot_be_run_on_demand_and_says_where_its_chain_starts(tmp_path):
    from agent.config import load
    from agent.endpoint import Endpoint, Reply

    cfg = write_config(tmp_path, "http://127.0.0.1:9/view", "http://127.0.0.1:9/sink")
    endpoint = Endpoint.__new__(Endpoint)  # the route alone: no socket, no agent needed to refuse
    endpoint.config = load(cfg)
    with pytest.raises(Reply) as refused:
        endpoint.run(CHAINED, b"")
    assert refused.value.status == 409
    assert refused.value.payload["error"] == (f"flow {CHAINED!r} runs after flow {UPSTREAM!r}, not from a poll; "
                                              f"start its chain with POST /flows/{UPSTREAM}/run")

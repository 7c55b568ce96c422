"""Request shapes per action: lookups, templates in paths and queries, new verbs, ok_status, succeed_when, retry.when, output.

Against json-server 0.17 (a real third-party REST API that addresses items by
id, not by email) and the project's own local sink.
"""
from __future__ import annotations

import json
from pathlib import Path

from fileconfig import write_file_flow

import pytest
import requests

from jsonserver import JsonServer
from sinkserver import SinkServer
from agent.templates import Templates
from sinks.base import Action
from sinks.http import HttpConnector

KEY = "k-0123456789abcdef"
FOUND = "{{ response[0].id if response else '' }}"
UPSERT = {"lookup": {"path": "/leads", "query": {"email": "{{ body.email }}"}, "found": FOUND},
          "method": "PATCH", "path": "/leads/{{ found }}", "create": {"method": "POST", "path": "/leads"}}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """One json-server for the module; each test works on records of its own."""
    with JsonServer(tmp_path_factory.mktemp("jsonserver"), {"leads": [{"id": 1, "email": "first@example.invalid"}], "jobs": []}) as server:
        yield server


@pytest.fixture
def sink():
    with SinkServer() as server:
        yield server


@pytest.fixture
def session():
    with requests.Session() as s:
        yield s


def connector(base_url: str, session: requests.Session, actions: dict, **obj) -> HttpConnector:
    table = {"kind": "http", "base_url": base_url, "objects": {"leads": {"path": "/leads", "actions": actions, **obj}}}
    return HttpConnector(HttpConnector.Config.model_validate(table), session=session, clock=lambda: 0.0, templates=Templates())


def leads(verb: str) -> Action:
    return Action("leads", verb)


# --- upsert by a field the server does not address items by -------------------------------------------


def test_upsert_by_email_creates_then_patches_the_item_its_lookup_found(api, session):
    crm = connector(api.url, session, {"upsert": UPSERT})
    email = "ann+sales&co@example.invalid"  # '+' and '&' would change the query if they were not encoded
    created = crm.run(leads("upsert"), {"body": {"email": email, "name": "Ann"}}, KEY)
    assert (created.status, created.status_code) == ("succeeded", 201)
    again = crm.run(leads("upsert"), {"body": {"email": email, "name": "Ann B"}}, KEY)
    assert (again.status, again.status_code, again.output["id"]) == ("succeeded", 200, created.output["id"])
    mine = [item for item in api.items("leads") if item["email"] == email]
    assert mine == [{"email": email, "name": "Ann B", "id": created.output["id"]}]  # one item, patched: not two


def test_the_default_upsert_still_patches_by_key_as_before(sink, session):
    table = {"kind": "http", "base_url": sink.url, "objects": {"leads": {"path": "/leads", "key": "email"}}}
    crm = HttpConnector(HttpConnector.Config.model_validate(table), session=session, clock=lambda: 0.0)
    crm.run(leads("upsert"), {"body": {"email": "a@x.invalid"}}, KEY)
    crm.run(leads("upsert"), {"body": {"email": "a@x.invalid", "n": 2}}, KEY)
    assert [(r["method"], r["path"]) for r in sink.requests] == [("GET", "/leads"), ("POST", "/leads"), ("GET", "/leads"), ("PATCH", "/leads/a%40x.invalid")]


def test_a_lookup_without_create_that_finds_nothing_fails_and_sends_nothing_more(api, session):
    crm = connector(api.url, session, {"update": {k: v for k, v in UPSERT.items() if k != "create"}})
    outcome = crm.run(leads("update"), {"body": {"email": "nobody@example.invalid"}}, KEY)
    assert outcome.status == "failed" and "the lookup found nothing" in outcome.error


def test_a_found_template_that_fails_fails_the_step_with_the_template_error(api, session):
    crm = connector(api.url, session, {"upsert": {**UPSERT, "lookup": {**UPSERT["lookup"], "found": "{{ response.id }}"}}})
    outcome = crm.run(leads("upsert"), {"body": {"email": "first@example.invalid"}}, KEY)
    assert outcome.status == "failed" and "lookup.found" in outcome.error and "no attribute 'id'" in outcome.error


def test_a_lookup_that_fails_ends_the_action_with_its_own_outcome(sink, session):
    sink.fail_next(1, 503)
    crm = connector(sink.url, session, {"upsert": UPSERT})
    outcome = crm.run(leads("upsert"), {"body": {"email": "a@x.invalid"}}, KEY)
    assert (outcome.status, outcome.status_code, len(sink.requests)) == ("retryable", 503, 1)


# --- delete of what is already gone -------------------------------------------------------------------------


def test_a_delete_of_a_missing_item_succeeds_with_ok_status_404(api, session):
    gone = {"path": "/leads/{{ body.id }}"}
    assert connector(api.url, session, {"delete": gone}).run(leads("delete"), {"body": {"id": 999}}, KEY).status == "failed"
    outcome = connector(api.url, session, {"delete": {**gone, "ok_status": [404]}}).run(leads("delete"), {"body": {"id": 999}}, KEY)
    assert (outcome.status, outcome.status_code) == ("succeeded", 404)


def test_ok_status_alone_keeps_the_default_delete_request(sink, session):
    crm = connector(sink.url, session, {"delete": {"ok_status": [404]}}, key="email")
    assert crm.run(leads("delete"), {"body": {"email": "none@x.invalid"}}, KEY).status == "succeeded"
    assert [(r["method"], r["path"]) for r in sink.requests] == [("DELETE", "/leads/none%40x.invalid")]


# --- new verbs; what data may and may not do to a URL ------------------------------------------------------


def test_a_custom_run_verb_posts_to_its_path_with_the_value_encoded(sink, session):
    crm = connector(sink.url, session, {"run": {"method": "POST", "path": "/jobs/{{ body.id }}/run"}})
    outcome = crm.run(leads("run"), {"body": {"id": "night ly?#1"}}, KEY)
    assert outcome.status == "succeeded"
    [request] = sink.requests
    assert (request["method"], request["path"], request["json"]) == ("POST", "/jobs/night%20ly%3F%231/run", {"id": "night ly?#1"})
    assert request["headers"]["Idempotency-Key"] == KEY


@pytest.mark.parametrize("value", ["", "a/b", "..", ".", None])
def test_a_path_value_that_is_not_one_segment_fails_naming_the_action_and_value(sink, session, value):
    crm = connector(sink.url, session, {"run": {"method": "POST", "path": "/jobs/{{ body.id }}/run"}})
    outcome = crm.run(leads("run"), {"body": {"id": value}}, KEY)
    assert outcome.status == "failed" and outcome.error.startswith("leads > run: path") and "cannot be one path segment" in outcome.error
    assert repr("" if value is None else value) in outcome.error
    assert sink.requests == []


def test_query_templates_are_sent_as_encoded_parameters(sink, session):
    crm = connector(sink.url, session, {"get": {"method": "GET", "path": "/leads", "query": {"email": "eq.{{ body.email }}", "n": "{{ body.n }}"}}})
    assert crm.run(leads("get"), {"body": {"email": "a&b=c#d@x.invalid", "n": 3}}, KEY).status == "succeeded"
    assert sink.requests[0]["query"] == {"email": "eq.a&b=c#d@x.invalid", "n": "3"}


@pytest.mark.parametrize("path", ["leads", "/leads?x=1", "/a//b", "/a b", "@evil.invalid/x"])
def test_a_path_template_that_could_leave_the_route_is_a_config_error(path):
    with pytest.raises(ValueError, match="is not a path template"):
        HttpConnector.Config.model_validate({"kind": "http", "base_url": "http://127.0.0.1:9", "objects": {
            "leads": {"path": "/leads", "actions": {"run": {"method": "POST", "path": path}}}}})


@pytest.mark.parametrize("shape, message", [
    ({"path": "/jobs/run"}, "'run' is a new verb: give it a method"),
    ({"method": "POST"}, "'run' is a new verb: give it a path"),
    ({"method": "POST", "path": "/x", "create": {"method": "POST"}}, "give a `lookup` too"),
    ({"method": "P0ST", "path": "/x"}, "is not an HTTP method"),
])
def test_an_incomplete_shape_is_a_config_error(shape, message):
    with pytest.raises(ValueError, match=message):
        HttpConnector.Config.model_validate({"kind": "http", "base_url": "http://127.0.0.1:9", "objects": {
            "leads": {"path": "/leads", "actions": {"run": shape}}}})


# --- success and retry on the raw result ----------------------------------------------------------------------


def test_a_slack_style_200_with_ok_false_fails_by_succeed_when(sink, session):
    crm = connector(sink.url, session, {"send": {"succeed_when": "status < 300 and body.ok"}})
    refused = crm.run(leads("send"), {"body": {"ok": False, "error": "channel_not_found"}}, KEY)  # the sink echoes the body
    assert (refused.status, refused.status_code, refused.condition) == ("failed", 201, "succeed_when")
    assert "succeed_when 'status < 300 and body.ok' is false" in refused.error and "channel_not_found" in refused.error
    assert crm.run(leads("send"), {"body": {"ok": True}}, "k2").status == "succeeded"


# --- through the agent: retry.when, output mapping, agent actions ---------------------------------------------------


def write_agent(folder: Path, base_url: str, records: list[dict], steps: str, actions: str = "") -> Path:
    connectors = f"""
[connectors.crm]
kind = "http"
base_url = "{base_url}"
[connectors.crm.objects.leads]
path = "/leads"
[connectors.crm.objects.jobs]
path = "/jobs"
{actions}"""
    return write_file_flow(folder, records, connectors, steps)


def test_retry_when_retries_what_the_on_list_does_not_name(tmp_path, sink, cli):
    sink.fail_next(1, 409)  # {"error": "scripted failure 409"}: permanent by default
    steps = """  [[flows.steps]]
  kind = "action"
  action = "crm > leads > create"
  retry = { on = [], when = "status == 409 and 'scripted' in body.error", interval = "0s", jitter = false }
"""
    cfg = write_agent(tmp_path, sink.url, [{"sid": "1", "email": "a@x.invalid"}], steps)
    status, out, err = cli("--config", str(cfg), "run", "--once")
    assert status == 0 and "sent: 1" in out and "will be retried" in err, out + err
    assert [r["method"] for r in sink.requests] == ["POST", "POST"]
    cfg.write_text(cfg.read_text().replace("'scripted'", "'locked'"))
    sink.fail_next(1, 409)
    (tmp_path / "leads.json").write_text(json.dumps({"records": [{"sid": "1", "email": "a@x.invalid"}, {"sid": "2"}]}))
    status, out, err = cli("--config", str(cfg), "run", "--once")
    assert status == 1 and "failed: 1" in out, out + err  # the first one sent now; the second refused and not retried


def test_an_output_mapping_reaches_a_later_step_by_step_id(tmp_path, api, cli):
    steps = """  [[flows.steps]]
  kind = "action"
  id = "lead"
  action = "crm > leads > create"
  body = { email = "{{ record.email }}" }
  output = { id = "{{ response.id }}", how = "{{ status }}" }

  [[flows.steps]]
  kind = "action"
  action = "crm > leads > touch"
  body = { id = "{{ steps.lead.id }}", same = "{{ steps[0].id }}", note = "touched" }
"""
    actions = """[connectors.crm.objects.leads.actions.touch]
method = "PATCH"
path = "/leads/{{ body.id }}"
"""
    cfg = write_agent(tmp_path, api.url, [{"sid": "1", "email": "mapped@example.invalid"}], steps, actions)
    status, out, err = cli("--config", str(cfg), "run", "--once")
    assert status == 0, out + err
    [item] = [i for i in api.items("leads") if i["email"] == "mapped@example.invalid"]
    assert item["note"] == "touched" and item["same"] == item["id"]
    status, out, err = cli("--config", str(cfg), "executions", "1")
    assert status == 0 and f'step 0 output: {{"id": {item["id"]}, "how": 201}}' in out, out


def test_agent_actions_shows_method_path_template_and_lookup(tmp_path, cli):
    actions = """[connectors.crm.objects.leads.actions.upsert]
lookup = { path = "/leads", query = { email = "eq.{{ body.email }}" }, found = "{{ response[0].id if response else '' }}" }
method = "PATCH"
path = "/leads/{{ found }}"
create = { method = "POST", path = "/leads" }
[connectors.crm.objects.jobs.actions.run]
method = "POST"
path = "/jobs/{{ body.id }}/run"
"""
    cfg = write_agent(tmp_path, "http://127.0.0.1:9", [], '  [[flows.steps]]\n  kind = "filter"\n  when = "true"\n', actions)
    status, out, err = cli("--config", str(cfg), "actions")
    assert status == 0, err
    assert "crm > jobs > run" in out and "POST /jobs/{{ body.id }}/run" in out
    assert "PATCH /leads/{{ found }} (when found)" in out and "GET /leads?email=eq.{{ body.email }}" in out
    assert "crm > leads > create                 POST /leads" in out
    status, out, err = cli("--config", str(cfg), "actions", "--json")
    listing = json.loads(out)
    assert listing["crm > jobs > run"]["request"]["request"] == "POST /jobs/{{ body.id }}/run"
    assert listing["crm > leads > upsert"]["request"]["create"] == "POST /leads (when not found)"


def test_a_template_syntax_error_in_a_shape_is_a_config_error(tmp_path, cli):
    actions = '[connectors.crm.objects.jobs.actions.run]\nmethod = "POST"\npath = "/jobs/{{ body.id | }}/run"\n'
    cfg = write_agent(tmp_path, "http://127.0.0.1:9", [], '  [[flows.steps]]\n  kind = "filter"\n  when = "true"\n', actions)
    status, out, err = cli("--config", str(cfg), "actions")
    assert status == 2 and "connectors.crm.objects.jobs.actions.run.path" in err and "is not a valid template" in err

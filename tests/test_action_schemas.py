"""JSON Schemas per object or action: checked before anything is sent, shown by `agent actions`, applied by `agent test`."""
from __future__ import annotations

import json
from pathlib import Path

from fileconfig import write_file_flow

import pytest

from sinkserver import SinkServer

LEAD_SCHEMA = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "required": ["email"],
               "properties": {"email": {"type": "string", "format": "email"}, "age": {"type": "integer", "minimum": 0}}}


@pytest.fixture
def sink():
    with SinkServer() as server:
        yield server


def write(folder: Path, sink_url: str, records: list[dict], *, object_schema: str = 'schema = "schemas/lead.json"', action: str = "") -> Path:
    (folder / "schemas").mkdir(exist_ok=True)
    (folder / "schemas/lead.json").write_text(json.dumps(LEAD_SCHEMA))
    connectors = f"""
[connectors.crm]
kind = "http"
base_url = "{sink_url}"
[connectors.crm.objects.leads]
path = "/leads"
{object_schema}
{action}"""
    steps = """  [[flows.steps]]
  kind = "action"
  action = "crm > leads > create"
  body = { email = "{{ record.email }}", age = "{{ record.age }}" }"""
    return write_file_flow(folder, records, connectors, steps)


def test_a_schema_violation_fails_the_step_before_any_request(tmp_path, sink, cli):
    cfg = write(tmp_path, sink.url, [{"sid": "1", "email": "a@x.invalid", "age": 3}, {"sid": "2", "email": "b@x.invalid", "age": -1},
                                     {"sid": "3", "email": "no-at-sign", "age": "old"}])
    status, out, err = cli("--config", str(cfg), "run", "--once")
    assert status == 1 and "sent: 1" in out and "failed: 2" in out, out + err
    assert [r["json"]["email"] for r in sink.requests] == ["a@x.invalid"]  # nothing of the two others was sent
    status, out, err = cli("--config", str(cfg), "executions", "--json", "--status", "failed")
    errors = " | ".join(row["last_error"] for row in json.loads(out))
    assert "invalid input: body.age: -1 is less than the minimum of 0 (schema schemas/lead.json, rule minimum)" in errors
    assert "body.age: 'old' is not of type 'integer' (schema schemas/lead.json, rule type)" in errors
    assert "body.email: 'no-at-sign' is not a 'email' (schema schemas/lead.json, rule format)" in errors
    status, out, err = cli("--config", str(cfg), "executions", "2")
    assert "attempt" not in out  # failed at once: no attempt was made, none is retried


def test_an_action_schema_overrides_the_objects(tmp_path, sink, cli):
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas/loose.json").write_text(json.dumps({"type": "object"}))
    action = '[connectors.crm.objects.leads.actions.create]\nschema = "schemas/loose.json"\n'
    cfg = write(tmp_path, sink.url, [{"sid": "1", "email": "x", "age": -5}], action=action)
    status, out, err = cli("--config", str(cfg), "run", "--once")
    assert status == 0 and "sent: 1" in out, out + err


def test_agent_actions_json_includes_the_schema_and_the_text_names_its_file(tmp_path, sink, cli):
    cfg = write(tmp_path, sink.url, [])
    status, out, err = cli("--config", str(cfg), "actions", "--json")
    listing = json.loads(out)
    body = listing["crm > leads > create"]["properties"]["body"]
    assert {name: body[name] for name in LEAD_SCHEMA} == LEAD_SCHEMA
    assert listing["crm > leads > send"]["request"]["schema"] == "schemas/lead.json"
    status, out, err = cli("--config", str(cfg), "actions")
    assert "crm > leads > create                 POST /leads   body (schema schemas/lead.json)" in out


def test_agent_test_applies_the_schema(tmp_path, sink, cli):
    cfg = write(tmp_path, sink.url, [])
    (tmp_path / "record.json").write_text(json.dumps({"sid": "9", "email": "a@x.invalid", "age": "ten"}))
    status, out, err = cli("--config", str(cfg), "test", "sync", "--record", str(tmp_path / "record.json"))
    assert status == 1 and "failed" in out and "body.age: 'ten' is not of type 'integer'" in out, out + err
    assert sink.requests == []


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    ("{not json", "not JSON"),
    (json.dumps({"type": "strin"}), "not a valid JSON Schema: at $.type"),
])
def test_a_missing_or_invalid_schema_file_is_a_config_error_naming_the_file(tmp_path, sink, cli, content, problem):
    cfg = write(tmp_path, sink.url, [], object_schema='schema = "schemas/other.json"')
    if content is not None:
        (tmp_path / "schemas/other.json").write_text(content)
    status, out, err = cli("--config", str(cfg), "run", "--once")
    assert status == 2 and "connectors.crm.objects.leads.schema" in err and "other.json" in err and problem in err, err
    assert not (tmp_path / "var/agent.db").exists()  # nothing touched

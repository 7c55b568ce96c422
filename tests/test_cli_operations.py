"""Operator commands, run as the real CLI: find, read and re-queue dead work; replay; dry runs; validate."""
import json
import socket

import pytest

from sinkserver import SinkServer
from test_cli_integration import PASSWORD, agent, write_config
from viewserver import ViewServer, make_leads


@pytest.fixture
def sink():
    with SinkServer() as server:
        yield server


def test_an_operator_finds_reads_and_requeues_a_dead_execution(tmp_path, sink):
    with ViewServer(make_leads(2), username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink)
        cfg.write_text(cfg.read_text().replace('retry = { attempts = 3, interval = "1s", jitter = false }', 'retry = { attempts = 1 }'))
        sink.fail_when(lambda request: request["method"] == "POST", 503)
        first = agent(cfg, "run", "--once")
        assert first.returncode == 1 and "gave up after 1 attempts" in first.stdout

        listing = agent(cfg, "executions", "--status", "dead")
        assert listing.returncode == 0 and listing.stdout.count("dead") == 2 and "503" in listing.stdout
        dead = json.loads(agent(cfg, "executions", "--status", "dead", "--json").stdout)
        detail = agent(cfg, "executions", str(dead[0]["id"]))
        assert "attempt 1" in detail.stdout and "retryable [503]" in detail.stdout

        health = agent(cfg, "status")
        assert health.returncode == 1 and "dead 2" in health.stdout

        sink._rules.clear()
        requeued = agent(cfg, "retry", "--dead")
        assert "re-queued 2" in requeued.stdout
        second = agent(cfg, "run", "--once")
        assert second.returncode == 0 and "sent: 2" in second.stdout
        keys = {r["headers"]["Idempotency-Key"] for r in sink.requests_to("POST")}
        assert len(keys) == 2  # the re-queued sends carried their original keys
        assert agent(cfg, "status").returncode == 0


def test_retry_of_an_execution_that_is_not_failed_changes_nothing(tmp_path, sink):
    with ViewServer(make_leads(1), username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink)
        agent(cfg, "run", "--once")
        result = agent(cfg, "retry", "1")
    assert result.returncode == 1 and "not failed, dead or paused (left alone): 1" in result.stdout
    assert agent(cfg, "retry").returncode == 2


def test_replay_sends_again_under_new_keys_after_confirmation(tmp_path, sink):
    with ViewServer(make_leads(3), username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink)
        agent(cfg, "run", "--once")
        unconfirmed = agent(cfg, "replay", "--flow", "leads-to-crm")
        assert unconfirmed.returncode == 2 and "3 execution(s) would be sent again" in unconfirmed.stderr
        entity = view.records[0]["RecordId"]
        one = agent(cfg, "replay", "--flow", "leads-to-crm", "--entity", entity, "--yes")
        assert "replaying 1" in one.stdout
        run = agent(cfg, "run", "--once")
        assert "sent: 1" in run.stdout
    gets = [r for r in sink.requests_to("GET")]
    keys = [r["headers"]["Idempotency-Key"] for r in gets]
    assert len(keys) == 4 and len(set(keys)) == 4  # the replay used a new key
    assert len(sink.requests_to("PATCH")) == 1  # the lead existed: the upsert updated it


def test_dry_run_shows_each_step_and_sends_nothing(tmp_path, sink):
    record = make_leads(1)[0]
    (tmp_path / "record.json").write_text(json.dumps(record))
    with ViewServer([], username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink)
        result = agent(cfg, "test", "leads-to-crm", "--record", str(tmp_path / "record.json"), "--json")
    assert result.returncode == 0, result.stderr
    [report] = json.loads(result.stdout)
    assert report["status"] == "succeeded"
    assert report["steps"][0]["output"]["email"] == record["Email"].lower()
    assert report["steps"][1]["send"] == {"body": report["steps"][0]["output"]}
    assert not sink.requests and not (tmp_path / "var" / "agent.db").exists()

    del record["FirstName"]
    (tmp_path / "record.json").write_text(json.dumps(record))
    failing = agent(cfg, "test", "leads-to-crm", "--record", str(tmp_path / "record.json"))
    assert failing.returncode == 1 and "FirstName" in failing.stdout


def test_validate_checks_reachability(tmp_path, sink):
    with ViewServer([], username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink)
        ok = agent(cfg, "validate")
        assert ok.returncode == 0 and ok.stdout.count(" ok\n") == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cfg.write_text(cfg.read_text().replace(sink.url, f"http://127.0.0.1:{closed}"))
    bad = agent(cfg, "validate")
    assert bad.returncode == 1 and "UNREACHABLE" in bad.stdout and "connectors.crm" in bad.stdout
    assert agent(cfg, "validate", "--offline").returncode == 0


def test_actions_lists_paths_and_schemas(tmp_path, sink):
    with ViewServer([], username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink)
    listing = json.loads(agent(cfg, "actions", "--json").stdout)
    assert "crm > leads > upsert" in listing and "body" in listing["crm > leads > upsert"]["properties"]


def test_unknown_source_for_poll_is_a_usage_error(tmp_path, sink):
    with ViewServer([], username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink)
    result = agent(cfg, "poll", "nope")
    assert result.returncode == 2 and "unknown source 'nope' (known: leads)" in result.stderr


def test_status_shows_a_paused_connector_and_why(tmp_path, sink):
    sink.fail_when(lambda request: True, 401)
    with ViewServer(make_leads(12), username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink)
        run = agent(cfg, "run", "--once")
        assert run.returncode == 0 and "paused: 12, waiting: 12" in run.stdout  # paused work waits; it has not failed
        assert run.stderr.count("PAUSED") == 1  # said loudly, once
    assert len(sink.requests) <= 4  # at most the calls already in flight (concurrency 4), not one per record
    report = json.loads(agent(cfg, "status", "--json").stdout)["flows"]["leads-to-crm"]
    assert report["paused"] == 12 and "401" in report["paused_because"]
    status = agent(cfg, "status")
    assert "PAUSED" in status.stdout and status.returncode == 1  # a health check sees it


def test_prune_applies_retention_and_keeps_what_is_recent(tmp_path, sink):
    with ViewServer(make_leads(2), username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink)
        agent(cfg, "run", "--once")
        kept = json.loads(agent(cfg, "prune", "--json").stdout)
        assert kept["executions"] == 0
        cfg.write_text(cfg.read_text().replace("concurrency = 4", 'concurrency = 4\nretention = "0s"'))
        pruned = json.loads(agent(cfg, "prune", "--json").stdout)
        assert pruned["executions"] == 2 and pruned["records"] == 0  # no window: seen keys are kept forever
        again = agent(cfg, "run", "--once")
        assert "new: 0" in again.stdout and "sent: 0" in again.stdout  # the dedupe memory survived the prune

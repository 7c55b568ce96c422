"""`agent run` as a long-running process: schedule, SIGTERM, one agent per ledger."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hostileserver import HostileServer, silent
from sinkserver import SinkServer
from test_cli_integration import PASSWORD, agent, write_config
from test_sink_hostile import write_config as sink_config
from viewserver import ViewServer, make_leads


def start(cfg):
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(cfg), "run"], cwd=cfg.parent, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "VIEW_PASSWORD": PASSWORD, "CRM_TOKEN": "t"},
    )


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_run_polls_on_schedule_delivers_and_stops_cleanly_on_sigterm(tmp_path):
    with SinkServer() as sink, ViewServer(make_leads(20), page_size=10, username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink, size=10)
        cfg.write_text(cfg.read_text().replace('first_run = "deliver"', 'first_run = "deliver"\nevery = "1s"'))
        proc = start(cfg)
        try:
            assert wait_for(lambda: len(sink.requests_to("POST")) == 20)
            view.records.append(make_leads(1, start="2026-12-01T00:00:00Z")[0])  # picked up by a scheduled poll
            assert wait_for(lambda: len(sink.requests_to("POST")) == 21)

            second = agent(cfg, "run", "--once")  # a second agent on the same ledger is refused
            assert second.returncode == 3 and "another agent is running" in second.stderr
            status = agent(cfg, "status", "--json")  # read-only commands still work beside it
            assert json.loads(status.stdout)["flows"]["leads-to-crm"]["succeeded"] == 21
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and PASSWORD not in err
        assert "stopping on SIGTERM" in err
    assert len(sink.requests_to("POST")) == 21


def test_sigterm_ends_an_idle_agent_sleeping_until_its_next_poll_at_once(tmp_path):
    with SinkServer() as sink, ViewServer(make_leads(3), page_size=10, username="integration", password=PASSWORD) as view:
        cfg = write_config(tmp_path, view, sink, size=10)
        cfg.write_text(cfg.read_text().replace('first_run = "deliver"', 'first_run = "deliver"\nevery = "1h"'))
        proc = start(cfg)
        try:
            assert wait_for(lambda: len(sink.requests_to("POST")) == 3)
            time.sleep(0.3)  # the outcomes recorded, the loop asleep until the next poll, an hour away
            asked = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=20)
            took = time.monotonic() - asked
        finally:
            proc.kill()
        assert proc.returncode == 0 and "agent stopped" in err, err
        assert took < 2.0  # the sleep ends with the stop, not at its end


def test_sigterm_during_a_slow_delivery_finishes_the_step(tmp_path):
    with SinkServer() as sink, ViewServer(make_leads(3), page_size=10, username="integration", password=PASSWORD) as view:
        sink.delay = 0.5
        cfg = write_config(tmp_path, view, sink)
        proc = start(cfg)
        assert wait_for(lambda: len(sink.requests) >= 1)  # the first GET of an upsert is in flight
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        rows = json.loads(agent(cfg, "executions", "--json").stdout)
        assert "running" not in {r["status"] for r in rows}  # nothing left half-done
        assert any(r["status"] == "succeeded" for r in rows)


def test_sighup_during_a_slow_delivery_finishes_the_step_and_exits_0(tmp_path):
    with SinkServer() as sink, ViewServer(make_leads(1), username="integration", password=PASSWORD) as view:
        sink.delay = 1.0  # the first request is slow: SIGHUP arrives while it is in flight
        cfg = write_config(tmp_path, view, sink)
        cfg.write_text(cfg.read_text().replace("crm > leads > upsert", "crm > leads > create"))  # one request per record
        proc = start(cfg)
        try:
            assert wait_for(lambda: len(sink.requests) == 1)
            sink.delay = 0.0
            proc.send_signal(signal.SIGHUP)
            out, err = proc.communicate(timeout=20)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
        assert "stopping on SIGHUP" in err and "Traceback" not in err
        [post] = sink.requests_to("POST", "/leads")
        assert list(sink.accepted) == [post["headers"]["Idempotency-Key"]] and sink.replays == 0
    [row] = json.loads(agent(cfg, "executions", "--json").stdout)
    made = json.loads(agent(cfg, "executions", str(row["id"]), "--json").stdout)["attempts_made"]
    assert row["status"] == "succeeded"  # finished, not left running to be sent again on restart
    assert [a["outcome"] for a in made] == ["succeeded"]


def stuck_config(folder, url: str):
    """One record to an http sink; the connector's timeout (a minute) is far longer than the test waits."""
    return sink_config(folder, url, timeout="60s")


@pytest.mark.parametrize("command", [["run"], ["run", "--once"]], ids=["run", "run-once"])
def test_a_stop_with_a_call_stuck_ends_within_the_grace_and_the_next_start_recovers_it(tmp_path, command):
    with HostileServer(silent(seconds=20)) as stuck:  # never answers while the test waits; ends by itself
        cfg = stuck_config(tmp_path, stuck.url)
        proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), *command], cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert wait_for(lambda: len(stuck.requests) == 1)
            asked = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=20)
            took = time.monotonic() - asked
        finally:
            proc.kill()
        assert took < 6.5, err  # the grace is 5 s
        assert proc.returncode == 0 and "Traceback" not in err, err
        assert "left as they are" in err
        key = next(line.split(b":", 1)[1].strip().decode() for line in stuck.requests[0].split(b"\r\n") if line.lower().startswith(b"idempotency-key:"))
    [row] = json.loads(agent(cfg, "executions", "--json").stdout)
    assert row["status"] == "running"  # not recorded: as after a crash
    with SinkServer() as sink:  # the sink answers again
        cfg.write_text(cfg.read_text().replace(stuck.url, sink.url))
        again = agent(cfg, "run", "--once")
        assert again.returncode == 0 and "sent: 1" in again.stdout, again.stderr
        assert "interrupted" in again.stderr
        assert list(sink.accepted) == [key]  # sent again under the same idempotency key
    made = json.loads(agent(cfg, "executions", str(row["id"]), "--json").stdout)["attempts_made"]
    assert [a["outcome"] for a in made] == ["interrupted", "succeeded"]

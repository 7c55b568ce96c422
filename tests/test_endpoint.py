"""The running agent's HTTP endpoint ([agent] listen) over a real socket, beside a real `agent run`."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from agent.cli import main
from sinkserver import SinkServer
from test_cli_integration import PASSWORD, write_config
from viewserver import ViewServer, make_leads, respond

TOKEN = "endpoint-token-0123456789abcdef"
FLOW = "leads-to-crm"
PARAMS = "params = { since = \"{{ cursor }}\", sku = \"{{ run.sku | default('') }}\" }"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening_config(tmp_path: Path, view: ViewServer, sink: SinkServer, port: int, *, every: str = "1h") -> Path:
    cfg = write_config(tmp_path, view, sink)
    text = cfg.read_text().replace("[agent]\n", f'[agent]\nlisten = "127.0.0.1:{port}"\nlisten_token = "${{AGENT_TOKEN}}"\n', 1)
    text = text.replace('first_run = "deliver"', f'first_run = "deliver"\nevery = "{every}"\n{PARAMS}', 1)
    cfg.write_text(text)
    return cfg


def environment() -> dict[str, str]:
    return {**os.environ, "VIEW_PASSWORD": PASSWORD, "CRM_TOKEN": "crm-token-123", "AGENT_TOKEN": TOKEN}


class Running:
    """`agent run` as a process, and its endpoint."""

    def __init__(self, cfg: Path, port: int):
        self.cfg, self.port = cfg, port
        self.proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "agent", "--config", str(cfg), "run"], cwd=cfg.parent, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment())
        assert wait_for(self.up, 20), "the endpoint never answered"

    def up(self) -> bool:
        try:
            self.call("GET", "/healthz", token=None)
            return True
        except requests.ConnectionError:
            assert self.proc.poll() is None, self.proc.communicate()[1]
            return False

    def call(self, method: str, path: str, token: str | None = TOKEN, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.request(method, f"http://127.0.0.1:{self.port}{path}", headers=headers, timeout=10, **kwargs)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # -X faulthandler: every thread's stack goes to stderr
            err = self.proc.communicate(timeout=20)[1]
            raise AssertionError(f"`agent run` did not stop within 20s of SIGTERM:\n{err[-8000:]}") from None
        assert self.proc.returncode == 0, err
        return err


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def status_json(cfg: Path, capfd, monkeypatch) -> tuple[int, dict]:
    """`agent status --json` in-process, beside the running agent."""
    for name, value in (("VIEW_PASSWORD", PASSWORD), ("CRM_TOKEN", "crm-token-123"), ("AGENT_TOKEN", TOKEN)):
        monkeypatch.setenv(name, value)
    capfd.readouterr()
    code = main(["--config", str(cfg), "status", "--json"])
    return code, json.loads(capfd.readouterr().out)


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """One agent that delivered 12 leads, for the read-only and bad-request cases."""
    with SinkServer() as sink, ViewServer(make_leads(12), username="integration", password=PASSWORD) as view:
        port = free_port()
        agent = Running(listening_config(tmp_path_factory.mktemp("endpoint"), view, sink, port), port)
        try:
            assert wait_for(lambda: len(sink.accepted) == 12)
            assert wait_for(lambda: agent.call("GET", "/flows").json()["flows"][0]["executions"]["succeeded"] == 12)
            yield agent
        finally:
            err = agent.stop()
            assert TOKEN not in err and PASSWORD not in err


def test_health_turns_503_after_three_failed_intervals_with_the_reasons_of_status_and_200_once_the_view_recovers(tmp_path, capfd, monkeypatch):
    with SinkServer() as sink, ViewServer(make_leads(3), username="integration", password=PASSWORD) as view:
        port = free_port()
        cfg = listening_config(tmp_path, view, sink, port, every="1s")
        agent = Running(cfg, port)
        try:
            assert wait_for(lambda: agent.call("GET", "/healthz", token=None).status_code == 200)
            assert agent.call("GET", "/healthz", token=None).json() == {"status": "ok", "reasons": []}
            view.fail_with(respond(503))
            failed_at = time.monotonic()
            assert wait_for(lambda: agent.call("GET", "/healthz", token=None).status_code == 503, 10)
            assert time.monotonic() - failed_at > 2  # three intervals of 1s without a good poll, not one failure
            health = agent.call("GET", "/healthz", token=None).json()
            code, status = status_json(cfg, capfd, monkeypatch)
            assert health["status"] == "unhealthy" and code == 1
            assert [re.sub(r"\d+s", "Ns", r) for r in health["reasons"]] == [re.sub(r"\d+s", "Ns", r) for r in status["reasons"]]
            assert re.fullmatch(r"source 'leads' is stale: no good poll for \d+s \(over 3 intervals of 1s\)", health["reasons"][0])
            view.fail_with(None)
            assert wait_for(lambda: agent.call("GET", "/healthz", token=None).status_code == 200, 10)
            code, status = status_json(cfg, capfd, monkeypatch)
            assert code == 0 and status["healthy"] and status["reasons"] == []
        finally:
            err = agent.stop()
    assert TOKEN not in err and "Traceback" not in err


def test_a_run_on_demand_reaches_the_view_with_its_parameter_and_leaves_the_cursor(tmp_path, capfd, monkeypatch):
    with SinkServer() as sink, ViewServer(make_leads(4), username="integration", password=PASSWORD) as view:
        port = free_port()
        cfg = listening_config(tmp_path, view, sink, port)
        agent = Running(cfg, port)
        try:
            assert wait_for(lambda: len(sink.accepted) == 4)
            before = status_json(cfg, capfd, monkeypatch)[1]["sources"]["leads"]
            view.records.append(make_leads(1, start="2026-12-24T10:00:00Z")[0])
            view.hits.clear()

            answer = agent.call("POST", f"/flows/{FLOW}/run", json={"params": {"sku": "123"}})
            assert answer.status_code == 202, answer.text
            run = answer.json()
            assert run["params"] == {"sku": "123"} and run["source"] == "leads" and answer.headers["Location"] == f"/runs/{run['run']}"
            assert wait_for(lambda: agent.call("GET", run["status"]).json()["state"] in ("done", "failed"))
            report = agent.call("GET", run["status"]).json()
            assert report["state"] == "done" and report["result"]["new"] == 1, report
            assert wait_for(lambda: len(sink.accepted) == 5)  # and delivered
            assert wait_for(lambda: agent.call("GET", run["status"]).json()["deliveries"]["by_status"] == {"succeeded": 1})
            delivery = agent.call("GET", run["status"]).json()["deliveries"]
            assert delivery["total"] == 1 and delivery["executions"][0]["flow"] == FLOW
            assert delivery["executions"][0]["key"] == str(view.records[-1]["lastSubmissionID"])

            sent = [parse_qs(urlsplit(hit).query, keep_blank_values=True) for hit in view.hits]
            assert sent and all(q["sku"] == ["123"] for q in sent)
            after = status_json(cfg, capfd, monkeypatch)[1]["sources"]["leads"]
            assert (after["cursor"], after["last_poll"], after["last_success"]) == (before["cursor"], before["last_poll"], before["last_success"])

            plain = agent.call("POST", f"/flows/{FLOW}/run")  # no body: an ordinary poll now
            assert plain.status_code == 202 and plain.json()["params"] == {}
            assert wait_for(lambda: agent.call("GET", plain.json()["status"]).json()["state"] == "done")
        finally:
            agent.stop()


@pytest.mark.parametrize("method, path", [("GET", "/metrics"), ("GET", "/flows"), ("GET", f"/flows/{FLOW}/log"), ("GET", "/executions/1"),
                                          ("POST", f"/flows/{FLOW}/run"), ("GET", "/runs/x"), ("GET", "/no/such/path")])
@pytest.mark.parametrize("token", [None, "wrong-token", "Basic " + TOKEN])
def test_everything_but_healthz_needs_the_token_and_a_401_reveals_nothing(running, method, path, token):
    headers = {} if token is None else {"Authorization": token if token.startswith("Basic") else f"Bearer {token}"}
    answer = requests.request(method, f"http://127.0.0.1:{running.port}{path}", headers=headers, timeout=10)
    assert answer.status_code == 401
    assert answer.json() == {"error": "unauthorized"}
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")


def test_healthz_needs_no_token(running):
    assert running.call("GET", "/healthz", token=None).json() == {"status": "ok", "reasons": []}


@pytest.mark.parametrize("method, path, body, status, message", [
    ("GET", "/flows/nope/log", None, 404, "unknown flow 'nope'"),
    ("POST", "/flows/nope/run", None, 404, "unknown flow 'nope'"),
    ("POST", f"/flows/{FLOW}/run", b'{"params": {"sku": ', 400, "the body is not JSON"),
    ("POST", f"/flows/{FLOW}/run", b'{"params": {"sku": 123}}', 400, "params.sku must be a string, not a number"),
    ("POST", f"/flows/{FLOW}/run", b'{"params": ["sku"]}', 400, "'params' must be an object of names to strings, not a list"),
    ("POST", f"/flows/{FLOW}/run", b'["sku"]', 400, "the body must be a JSON object"),
    ("POST", f"/flows/{FLOW}/run", b'{"parms": {}}', 400, "unknown key(s) in the body: 'parms' (allowed: 'params')"),
    ("GET", f"/flows/{FLOW}/log?limit=0", None, 400, "limit='0': give a number from 1 to 1000"),
    ("GET", f"/flows/{FLOW}/log?limit=ten", None, 400, "limit='ten'"),
    ("GET", "/executions/99999", None, 404, "no execution 99999"),
    ("GET", "/executions/one", None, 400, "execution ids are numbers, not 'one'"),
    ("GET", "/runs/nope", None, 404, "no run 'nope'"),
    ("GET", f"/flows/{FLOW}/run", None, 405, "GET is not allowed here (allowed: POST)"),
    ("GET", "/nope", None, 404, "no such endpoint: GET /nope"),
])
def test_bad_requests_are_answered_with_what_is_wrong(running, method, path, body, status, message):
    answer = running.call(method, path, data=body)
    assert answer.status_code == status
    assert message in answer.json()["error"]


def test_an_unknown_flow_answers_with_the_known_names(running):
    assert running.call("POST", "/flows/nope/run").json()["known"] == [FLOW]


def test_flows_log_and_one_execution(running):
    flows = running.call("GET", "/flows").json()["flows"]
    assert flows == [{"name": FLOW, "source": "leads", "after": None, "steps": 2,
                      "executions": {**{s: 0 for s in flows[0]["executions"]}, "succeeded": flows[0]["executions"]["succeeded"]}}]
    log = running.call("GET", f"/flows/{FLOW}/log?limit=3").json()
    ids = [row["id"] for row in log["executions"]]
    assert len(ids) == 3 and ids == sorted(ids, reverse=True)  # the newest first
    assert all(row["status"] == "succeeded" and row["last_error"] is None for row in log["executions"])
    one = running.call("GET", f"/executions/{ids[0]}").json()
    assert one["id"] == ids[0] and one["status"] == "succeeded"
    assert [(a["step"], a["outcome"]) for a in one["attempts"]] == [(1, "succeeded")]


def test_a_port_in_use_exits_2_naming_listen_and_the_port(tmp_path, capfd, monkeypatch):
    for name, value in environment().items():
        monkeypatch.setenv(name, value)
    with SinkServer() as sink, ViewServer(make_leads(1), username="integration", password=PASSWORD) as view, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = listening_config(tmp_path, view, sink, port)
        code = main(["--config", str(cfg), "run"])
    err = capfd.readouterr().err
    assert code == 2
    assert f"agent.listen: port {port} on 127.0.0.1 is already in use" in err and "[agent] listen" in err
    assert "Traceback" not in err and TOKEN not in err


@pytest.mark.parametrize("line, message", [
    ('listen = "localhost"', "agent.listen: 'localhost' has no port from 1 to 65535"),
    ('listen = "127.0.0.1:70000"', "has no port from 1 to 65535"),
    ('listen = "::1:8787"', "write an IPv6 address in brackets"),
    ('listen = "8787"\nlisten_token = "short-secret"', "agent.listen_token: (secret): is shorter than 16 characters"),
])
def test_a_bad_listen_or_token_is_a_config_error(tmp_path, capfd, line, message):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"[agent]\n{line}\n")
    assert main(["--config", str(cfg), "status"]) == 2
    err = capfd.readouterr().err
    assert message in err and "short-secret" not in err


def test_a_bare_port_listens_on_the_loopback_only():
    from agent.config import listen_address

    assert listen_address("8787") == listen_address(8787) == listen_address(":8787") == "127.0.0.1:8787"
    assert listen_address("[::1]:9000") == "[::1]:9000" and listen_address("0.0.0.0:80") == "0.0.0.0:80"


def test_the_token_is_masked_in_the_config_versions(tmp_path, capfd, monkeypatch):
    with SinkServer() as sink, ViewServer(make_leads(1), username="integration", password=PASSWORD) as view:
        for name, value in environment().items():
            monkeypatch.setenv(name, value)
        cfg = listening_config(tmp_path, view, sink, free_port())
        cfg.write_text(cfg.read_text().replace('"${AGENT_TOKEN}"', f'"{TOKEN}"'))
        assert main(["--config", str(cfg), "run", "--once"]) == 0
        capfd.readouterr()
        assert main(["--config", str(cfg), "config", "show"]) == 0
    out = capfd.readouterr().out
    assert 'listen_token = "***"' in out and TOKEN not in out


def test_a_ledger_on_a_full_disk_is_a_reason_of_the_health_rule(tmp_path, capfd, monkeypatch):
    from agent import health

    assert health.ledger_problem(tmp_path / "gone.db") == "the file is missing"
    with SinkServer() as sink, ViewServer(make_leads(1), username="integration", password=PASSWORD) as view:
        cfg = listening_config(tmp_path, view, sink, free_port())
        for name, value in environment().items():
            monkeypatch.setenv(name, value)
        assert main(["--config", str(cfg), "run", "--once"]) == 0
        assert status_json(cfg, capfd, monkeypatch)[1]["reasons"] == []
        monkeypatch.setattr(health.os, "statvfs", lambda path: type("Full", (), {"f_bavail": 0})())  # no disk can be filled here
        code, status = status_json(cfg, capfd, monkeypatch)
    assert code == 1 and status["ledger"] == {"writable": False, "problem": "the disk holding it is full"}
    assert status["reasons"] == ["the ledger cannot be written: the disk holding it is full"]

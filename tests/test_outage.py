"""A connector that cannot be reached: one probe at a time, a quiet log, a visible `status`, nothing lost or sent twice."""
from __future__ import annotations

import argparse
import json
import socket
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

import agent.cli
import sinkserver
from agent.cli import main
from agent.config import load
from agent.flows import UNREACHABLE_PROBE
from agent.process import Agent
from sinkserver import SinkServer
from test_sink_hostile import write_config as sink_config

N = 60


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def closed_port() -> int:
    """A port of 127.0.0.1 nobody listens on (the connection is refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_config(folder: Path, port: int, records: int = N) -> Path:
    """N records POSTed to 127.0.0.1:`port`; a retry waits an hour, so only probes reach it during a test."""
    return sink_config(folder, f"http://127.0.0.1:{port}", records=records, timeout="5s",
                       retry='retry = { interval = "1h", jitter = false }')


def status(cfg: Path, capfd, now: float | None = None, monkeypatch=None) -> tuple[int, dict]:
    """`agent status --json` in-process, without main()'s log set-up (which would take loguru away from caplog)."""
    if now is not None:
        monkeypatch.setattr(agent.cli, "time", SimpleNamespace(time=lambda: now))
    code = agent.cli.cmd_status(load(cfg), argparse.Namespace(json=True))
    return code, json.loads(capfd.readouterr().out)


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


def probes(agent_: Agent) -> int:
    return agent_.ledger.conn.execute("SELECT COUNT(*) FROM attempts WHERE outcome = 'retryable'").fetchone()[0]


def test_an_outage_is_probed_quietly_reported_by_status_and_then_delivered_once(tmp_path, caplog, capfd, monkeypatch):
    port = closed_port()
    cfg = write_config(tmp_path, port)
    began = time.time() - 600  # the outage began ten minutes ago
    clock = Clock(began)
    runner = Agent(load(cfg), clock=clock)
    try:
        runner.poll_all()
        runner.drain()
        rows = runner.ledger.executions()
        assert {r["status"] for r in rows} == {"paused"} and {r["attempts"] for r in rows} == {0}  # no attempt spent
        assert probes(runner) <= 4  # the calls in flight when the first refusal came
        [line] = warnings(caplog)  # one line about the connector, not one per record
        assert "connector 'crm': unreachable since" in line and f"{N} waiting" in line and "refused" in line

        code, report = status(tmp_path / "agent.toml", capfd)
        assert code == 0  # ten minutes: under unreachable_after (15 minutes)
        crm = report["connectors"]["crm"]
        assert (crm["reachable"], crm["unreachable_since"], crm["waiting"]) == (False, began, N)
        code, report = status(tmp_path / "agent.toml", capfd, now=began + 901, monkeypatch=monkeypatch)
        assert code == 1 and report["connectors"]["crm"]["unreachable_too_long"] is True
        monkeypatch.undo()

        caplog.clear()
        before = probes(runner)
        clock.t += UNREACHABLE_PROBE
        runner.drain()
        assert probes(runner) == before + 1  # one probe, the other executions kept waiting
        assert warnings(caplog) == []  # still unreachable: nothing new to say
        clock.t += 1
        runner.drain()
        assert probes(runner) == before + 1  # the next probe waits twice as long

        real = ThreadingHTTPServer
        monkeypatch.setattr(sinkserver, "ThreadingHTTPServer", lambda address, handler: real(("127.0.0.1", port), handler))
        with SinkServer() as sink:  # the sink comes back on the connector's address
            clock.t += 2 * UNREACHABLE_PROBE
            result = runner.drain()
            assert result.sent == N
            posts = sink.requests_to("POST")
            assert len(posts) == N and len({p["headers"]["Idempotency-Key"] for p in posts}) == N and sink.replays == 0
        assert any("connector 'crm': reachable again after" in line for line in warnings(caplog))
        assert runner.ledger.counts() == {"f": {"succeeded": N}}
    finally:
        runner.close()
    code, report = status(tmp_path / "agent.toml", capfd)
    assert code == 0 and report["connectors"]["crm"] == {"reachable": True, "unreachable_since": None, "last_error": None,
                                                       "waiting": 0, "unreachable_too_long": False}


def test_run_once_against_a_closed_port_logs_a_line_not_a_flood_and_status_keeps_the_start_of_the_outage(tmp_path, capfd):
    cfg = write_config(tmp_path, closed_port())
    assert main(["--config", str(cfg), "run", "--once"]) == 0  # waiting is not failing
    out, err = capfd.readouterr()
    assert f"paused: {N}" in out and "failed: 0" in out
    about = [line for line in err.splitlines() if "crm" in line or "refused" in line.lower()]
    assert len(about) == 1, err
    code, first = status(cfg, capfd)
    assert code == 0 and first["connectors"]["crm"]["waiting"] == N
    assert main(["--config", str(cfg), "run", "--once"]) == 0  # a restart probes at once, and it is still down
    out, err = capfd.readouterr()
    assert f"paused: {N}" in out and len([line for line in err.splitlines() if "crm" in line]) == 1  # "unreachable since ... when the agent last ran"
    code, again = status(cfg, capfd)
    assert again["connectors"]["crm"]["unreachable_since"] == first["connectors"]["crm"]["unreachable_since"]
    text = main(["--config", str(cfg), "status"])
    assert text == 0 and "crm              UNREACHABLE since" in capfd.readouterr().out


def test_unreachable_after_is_a_config_key(tmp_path):
    cfg = write_config(tmp_path, closed_port())
    cfg.write_text(cfg.read_text().replace('ledger = "agent.db"', 'ledger = "agent.db"\nunreachable_after = "2m"'))
    assert load(cfg).agent.unreachable_after == 120.0


@pytest.mark.parametrize("paused_for", ["credentials"])
def test_work_paused_for_credentials_still_makes_status_fail_at_once(tmp_path, capfd, paused_for):
    with SinkServer() as sink:
        sink.fail_when(lambda r: True, 401)
        cfg = write_config(tmp_path, int(sink.url.rsplit(":", 1)[1]), records=3)
        main(["--config", str(cfg), "run", "--once"])
        capfd.readouterr()
    code, report = status(cfg, capfd)
    assert code == 1 and report["connectors"]["crm"]["reachable"] is True and report["flows"]["f"]["paused"] == 3


def test_a_mail_server_that_is_down_is_held_the_same_way(tmp_path, capfd):
    cfg = write_config(tmp_path, closed_port(), records=20)
    text = cfg.read_text()
    head, _, _ = text.partition("[connectors.crm]")
    cfg.write_text(head + f"""[connectors.mail]
kind = "smtp"
host = "127.0.0.1"
port = {closed_port()}
security = "none"
sender = "agent@example.invalid"
[[flows]]
name = "f"
source = "leads"
  [[flows.steps]]
  kind = "action"
  action = "mail > message > send"
  to = "{{{{ record.email }}}}"
  subject = "hello"
  text = "hi"
""")
    assert main(["--config", str(cfg), "run", "--once"]) == 0
    out, err = capfd.readouterr()
    assert "paused: 20" in out and "failed: 0" in out
    assert len([line for line in err.splitlines() if "mail" in line]) == 1, err
    code, report = status(cfg, capfd)
    assert report["connectors"]["mail"]["reachable"] is False and report["connectors"]["mail"]["waiting"] == 20


def test_an_operator_fails_paused_work_by_hand_and_status_is_healthy_again(tmp_path, capfd):
    with SinkServer() as sink:
        sink.fail_when(lambda r: True, 401)
        cfg = write_config(tmp_path, int(sink.url.rsplit(":", 1)[1]), records=2)
        main(["--config", str(cfg), "run", "--once"])
        capfd.readouterr()
    ids = [row["id"] for row in json.loads((main(["--config", str(cfg), "executions", "--json"]), capfd.readouterr().out)[1])]
    assert main(["--config", str(cfg), "fail", *map(str, ids), "999", "--reason", "the CRM account was closed"]) == 1  # 999: no such work
    assert "failed 2 execution(s)" in capfd.readouterr().out
    code, report = status(cfg, capfd)
    assert report["flows"]["f"]["paused"] == 0 and report["flows"]["f"]["failed"] == 2
    main(["--config", str(cfg), "executions", "--json"])
    rows = json.loads(capfd.readouterr().out)
    assert {row["last_error"] for row in rows} == {"failed by hand: the CRM account was closed"}

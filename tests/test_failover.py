"""Several agents on one PostgreSQL ledger: a running agent takes over the work of one that froze or died within
about one lease, even when it has nothing else to do (no poll due, nothing new admitted)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.config import load
from agent.process import Agent
from sinkserver import SinkServer
from state.postgres import PostgresLedger
from test_cli_integration import PASSWORD, write_config
from test_scheduler import wait_until
from viewserver import ViewServer, make_leads

LEASE = 2.0


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("VIEW_PASSWORD", PASSWORD)
    monkeypatch.setenv("CRM_TOKEN", "crm-token-123")


def test_an_idle_agent_sends_the_work_of_a_frozen_one_once_its_lease_runs_out(tmp_path: Path, pg_url):
    with ViewServer(make_leads(3), username="integration", password=PASSWORD) as view, SinkServer() as sink:
        cfg = write_config(tmp_path, view, sink)
        text = cfg.read_text().replace('ledger = "var/agent.db"', f'ledger = "{pg_url}"\nlease = "{LEASE:g}s"')
        cfg.write_text(text.replace('timeout = "5s"', 'timeout = "1s"'))
        agent = Agent(load(cfg))
        frozen = PostgresLedger(pg_url)  # another agent: it claims everything, then is never heard of again
        loop = None
        try:
            assert agent.poll("leads").new == 3
            held = frozen.claim(time.time(), 10, LEASE)
            assert len(held) == 3
            claimed = time.monotonic()
            loop = threading.Thread(target=agent.run_forever, name="test-run")
            loop.start()  # its first poll admits nothing new; its next one is minutes away
            assert wait_until(lambda: len(sink.requests_to("POST", "/leads")) == 3, LEASE + 6)
            taken_after = time.monotonic() - claimed
        finally:
            agent.stopping.set()
            if loop is not None:
                loop.join(15)
            agent.close()
            frozen.close()
        assert LEASE - 0.5 < taken_after < LEASE + 3  # not before the lease ran out, and not at the next poll
        assert not loop.is_alive()

import signal
import sys
from pathlib import Path

import pytest
from loguru import logger

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown (and unused) when it is not loaded
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: two workers a core. Most tests wait on sockets, subprocesses and servers, not on the CPU:
    on 2 cores, 4 workers finish the suite in about 100 s where 2 take about 120 s."""
    import os

    return 2 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@pytest.fixture
def caplog(caplog):
    """Let pytest's caplog see loguru records (loguru's documented recipe)."""
    handler_id = logger.add(caplog.handler, format="{message}", level=0, filter=lambda record: record["level"].no >= caplog.handler.level, enqueue=False)
    yield caplog
    logger.remove(handler_id)


@pytest.fixture(autouse=True)
def _signal_handlers():
    """Tests that call the CLI in-process install the agent's stop handlers: put the previous ones back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture
def cli(capfd):
    """Run `agent ...` in this process; give back (exit status, stdout, stderr); its logging is undone after."""
    from agent.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        status = main(list(args))
        out, err = capfd.readouterr()
        return status, out, err

    yield run
    logger.remove()  # main() routed loguru to this test's captured stderr, which is closed after the test
    logger.add(sys.stderr)


# -- a real PostgreSQL (tests/pgserver.py): one server per test process, one database per test ----------------
@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server for this test process (each xdist worker starts its own); stopped at the end.

    When it cannot be started, every test that needs it fails with the reason (never skips)."""
    from pgserver import PgServer, PgServerError

    try:
        server = PgServer.start()
    except PgServerError as error:
        pytest.fail(f"PostgreSQL could not be started: {error}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server):
    """The URL of a fresh, empty database (copied from the server's template), dropped after the test."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)

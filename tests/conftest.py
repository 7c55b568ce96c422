import signal
import sys
from pathlib import Path

import pytest
from loguru import logger

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


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

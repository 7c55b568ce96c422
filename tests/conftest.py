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

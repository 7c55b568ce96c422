"""Logging setup: loguru to stderr, text or JSON lines, secrets masked."""
from __future__ import annotations

import sys

from loguru import logger

TEXT = "{time:YYYY-MM-DD HH:mm:ss} | {level: <7} | {message}"


def setup(level: str = "INFO", fmt: str = "text", secrets: list[str] | None = None, sink=sys.stderr) -> None:
    """Route loguru to ``sink``; any configured secret that slips into a message is masked."""
    hidden = sorted({s for s in secrets or [] if len(s) >= 4}, key=len, reverse=True)

    def mask(record) -> None:
        for secret in hidden:
            if secret in record["message"]:
                record["message"] = record["message"].replace(secret, "***")

    logger.remove()
    logger.configure(patcher=mask)
    logger.add(sink, level=level, format=TEXT, serialize=(fmt == "json"), backtrace=False, diagnose=False)

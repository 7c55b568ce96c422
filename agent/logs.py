"""Logging setup: loguru to stderr, text or JSON lines, secrets masked."""
from __future__ import annotations

import sys

from loguru import logger

TEXT = "{time:YYYY-MM-DD HH:mm:ss} | {level: <7} | {message}"
_LINES: list["Progress"] = []


def setup(level: str = "INFO", fmt: str = "text", secrets: list[str] | None = None, sink=None) -> None:
    """Route loguru to ``sink`` (the current stderr by default); any configured secret that slips into a message is masked."""
    sink = sink or sys.stderr
    hidden = sorted({s for s in secrets or [] if len(s) >= 4}, key=len, reverse=True)

    def mask(record) -> None:
        for secret in hidden:
            if secret in record["message"]:
                record["message"] = record["message"].replace(secret, "***")

    def write(message: str) -> None:
        for line in _LINES:
            line.done()  # a log line never lands in the middle of a progress line
        sink.write(message)
        sink.flush()

    logger.remove()
    logger.configure(patcher=mask)
    logger.add(write, level=level, format=TEXT, serialize=(fmt == "json"), backtrace=False, diagnose=False)


class Progress:
    """One self-overwriting status line on a terminal (a no-op elsewhere), at most 10 updates a second."""

    def __init__(self, stream=sys.stderr, clock=None):
        import time

        self.stream = stream
        self.enabled = hasattr(stream, "isatty") and stream.isatty()
        self.clock = clock or time.monotonic
        self._last = 0.0
        self._shown = False
        _LINES.append(self)

    def __call__(self, text: str) -> None:
        if not self.enabled or self.clock() - self._last < 0.1:
            return
        self._last = self.clock()
        self.stream.write("\r\x1b[K" + text[:200])
        self.stream.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

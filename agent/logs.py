"""Logging setup: loguru to stderr, text or JSON lines, secrets masked, control characters escaped.

Also the helpers every printer for people uses: ``printable`` (a value on one
line, nothing a terminal would interpret) and ``terminal_json`` (JSON text
that stays valid JSON and is just as safe).

loguru is imported when logging is set up, not with this module: a config
error is printed without it.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from functools import partial
from typing import Callable

from agent.secrets import Masker, masked

TEXT = "{time:YYYY-MM-DD HH:mm:ss} | {level: <7} | {message}"
_LINES: list["Progress"] = []
# C0, DEL, C1, line and paragraph separators, bidi overrides: what a terminal acts on or that reorders the line
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# the same characters that json.dumps(ensure_ascii=False) leaves raw (it escapes only C0)
_JSON_RAW = re.compile(r"[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` on one line with every control character escaped (``\\n``, ``\\x1b``): safe for a terminal and a log line."""
    return _CONTROL.sub(lambda m: _NAMED.get(m[0]) or (f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}"), str(text))


def printable_lines(text: str) -> str:
    """Several lines, each escaped on its own: the line breaks stay, nothing else a terminal would act on does."""
    return "\n".join(printable(line) for line in text.split("\n"))


def terminal_json(text: str) -> str:
    """JSON text with the control characters JSON may carry raw written as \\u escapes: the same JSON, safe for a terminal."""
    return _JSON_RAW.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


_deferred: Callable[[], None] | None = None  # setup's work, when a command that logs nothing of its own deferred it


def setup(level: str = "INFO", fmt: str = "text", secrets: list[str] | None = None, sink=None,
          mask: Callable[[str], str] | None = None, *, defer: bool = False) -> None:
    """Route loguru to ``sink`` (the current stderr by default); every form of a configured secret is masked
    (``mask``, else a Masker of ``secrets``), and a text line's message is escaped so a value cannot forge a line.

    ``defer``: loguru is neither imported nor set up until a standard-library log line (psycopg's) needs it. For
    a command whose own code never logs (`status`, a health check run every minute: loguru and the asyncio it
    brings are a tenth of its start); tests check that such a command leaves loguru unloaded."""
    global _deferred
    if defer and "loguru" not in sys.modules:
        _deferred = partial(setup, level, fmt, secrets, sink, mask)
        _route_standard_logging()
        return
    _deferred = None
    sink = sink or sys.stderr
    mask = mask or Masker(secrets or [])

    def patch(record) -> None:
        message = mask(record["message"])
        record["message"] = printable(message) if fmt == "text" else message

    def write(message: str) -> None:
        for line in _LINES:
            line.done()  # a log line never lands in the middle of a progress line
        # the whole line again: a traceback or a bound value may hold a secret (or, in text, an escape sequence) too
        sink.write(_masked_json(message, mask) if fmt == "json" else printable_lines(mask(message)))
        sink.flush()

    from loguru import logger

    logger.remove()
    logger.configure(patcher=patch)
    logger.add(write, level=level, format=TEXT, serialize=(fmt == "json"), backtrace=False, diagnose=False)
    _route_standard_logging()


class _ToLoguru(logging.Handler):
    """Standard-library log records (psycopg's pool logs this way) as loguru lines: the same format, the same masking."""

    def emit(self, record: logging.LogRecord) -> None:
        if _deferred is not None:
            _deferred()
        from loguru import logger

        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, "{}: {}", record.name, record.getMessage())


def _route_standard_logging() -> None:
    """psycopg logs with the standard library: through loguru instead, never raw to stderr (a JSON log stays JSON)."""
    psycopg = logging.getLogger("psycopg")
    psycopg.handlers = [_ToLoguru()]
    psycopg.propagate = False  # not to the root logger too
    psycopg.setLevel(logging.WARNING)  # the pool's INFO chatter is not the agent's


def _masked_json(line: str, mask: Callable[[str], str]) -> str:
    """One JSON log line with its secrets masked value by value (so it stays JSON) and terminal-safe."""
    if mask(line) != line:
        line = json.dumps(masked(json.loads(line), mask), default=str, ensure_ascii=False) + "\n"
    return terminal_json(line)


class Progress:
    """One self-overwriting status line on a terminal (a no-op elsewhere), at most 10 updates a second."""

    def __init__(self, stream=None, clock=None):
        import time

        self.stream = stream or sys.stderr  # today's stderr, not the one there was when this module was imported
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.clock = clock or time.monotonic
        self._last = 0.0
        self._shown = False
        _LINES.append(self)

    def __call__(self, text: str) -> None:
        if not self.enabled or self.clock() - self._last < 0.1:
            return
        self._last = self.clock()
        self.stream.write("\r\x1b[K" + printable(text[:200]))
        self.stream.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

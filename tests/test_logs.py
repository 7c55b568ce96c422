"""Logging: text or JSON lines, secrets masked, progress lines on terminals only."""
import io
import sys
import json

from loguru import logger

from agent import logs


def test_json_lines_carry_the_bound_context_and_never_a_secret():
    out = io.StringIO()
    logs.setup("INFO", "json", secrets=["hunter2-secret"], sink=out)
    logger.bind(source="leads").info("login with hunter2-secret failed")
    logger.debug("not shown at INFO")
    [line] = out.getvalue().splitlines()
    record = json.loads(line)["record"]
    assert record["message"] == "login with *** failed"
    assert record["extra"] == {"source": "leads"}


def test_text_lines_mask_secrets():
    out = io.StringIO()
    logs.setup("DEBUG", "text", secrets=["hunter2-secret"], sink=out)
    logger.warning("token hunter2-secret")
    assert "hunter2-secret" not in out.getvalue() and "| WARNING | token ***" in out.getvalue()


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_only_on_a_terminal_and_cleared_before_a_log_line():
    plain = logs.Progress(io.StringIO())
    plain("page 1")
    assert plain.stream.getvalue() == ""
    tty, now = Terminal(), [0.0]
    progress = logs.Progress(tty, clock=lambda: now[0])
    now[0] = 1.0
    progress("page 1")
    progress("page 2")  # within 0.1 s: skipped
    logs.setup("INFO", "text", sink=tty)
    logger.info("done")
    assert tty.getvalue().startswith("\r\x1b[Kpage 1\r\x1b[K") and "page 2" not in tty.getvalue()


def test_a_text_line_cannot_be_forged_nor_drive_the_terminal():
    out = io.StringIO()
    logs.setup("INFO", "text", sink=out)
    logger.warning("record {} failed", "k1\n2026-01-01 00:00:00 | ERROR   | forged\x1b]0;pwned\x07")
    try:
        raise ValueError("bad value \x1b[2J\x9b31m")
    except ValueError:
        logger.exception("step failed")
    text = out.getvalue()
    assert "| WARNING | record k1\\n2026-01-01 00:00:00 | ERROR   | forged\\x1b]0;pwned\\x07 failed\n" in text
    assert "ValueError: bad value \\x1b[2J\\x9b31m" in text  # a traceback's text too
    assert not [c for c in text if c != "\n" and (ord(c) < 32 or 0x7f <= ord(c) <= 0x9f)]


def test_progress_with_no_stream_given_shows_on_the_terminal_stderr_is(monkeypatch):
    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    progress = logs.Progress()  # as the agent makes it
    assert progress.enabled
    progress("page 1")
    assert "page 1" in tty.getvalue()


def test_psycopg_warnings_come_out_as_agent_log_lines_in_json(capsys):
    """The PostgreSQL driver logs through the standard library: its lines must be the agent's lines (a JSON log stays JSON)."""
    import io
    import json
    import logging

    from agent import logs

    out = io.StringIO()
    logs.setup("INFO", "json", secrets=["hunter2hunter2"], sink=out)
    logging.getLogger("psycopg.pool").warning("discarding closed connection to %s", "postgresql://a:hunter2hunter2@db/x")
    logging.getLogger("psycopg.pool").info("pool chatter")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["record"]["level"]["name"] == "WARNING"
    assert "discarding closed connection" in entry["text"] and "hunter2hunter2" not in lines[0]
    assert capsys.readouterr().err == ""

"""The ``mailbox`` connector: ``message > send`` into a local Maildir, each Message-ID once.

For offline use and for trying a config before pointing it at a real server:
every message is a real, openable email in ``new/`` of the Maildir at
``path`` (created when missing; a relative path is taken from the config
file's folder). The envelope a server would get is kept in ``Return-Path``
and ``Envelope-To`` headers, so Bcc recipients can be checked there.

A message whose Message-ID key (``<key@domain>``) the Maildir already holds is
skipped: ``succeeded`` with ``output["duplicate"] = True``. The keys are read
from the Maildir's headers once, on the first send, and then kept in memory,
so the skip survives restarts. Each message is fsynced before it counts as
sent. Outcomes: ``failed`` for an invalid message, ``paused`` when the folder
is not writable (condition "config"), ``retryable`` for other I/O errors
such as a full disk (condition "connection").
"""
from __future__ import annotations

import errno
import mailbox
import os
import threading
import time
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel

from sinks.base import Action, ActionError, ConnectorConfig, Outcome
from sinks.message import SEND, InvalidMessage, Mail, MessageInput, Sender, compose, message_key

_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


class MailboxConfig(ConnectorConfig):
    """``[connectors.NAME]`` with ``kind = "mailbox"``."""

    kind: Literal["mailbox"]
    path: Path
    sender: Sender = "sync-agent@localhost"

    def actions(self) -> dict[Action, type[BaseModel]]:
        return {SEND: MessageInput}


class MailboxConnector:
    """Writes ``message > send`` into a local Maildir."""

    Config = MailboxConfig

    def __init__(self, config: MailboxConfig, *, session: Any = None, clock: Callable[[], float] = time.time, base_dir: Path | None = None):
        self.config = config
        self.path = (base_dir or Path.cwd()) / config.path
        self._clock = clock
        self._lock = threading.Lock()
        self._maildir: mailbox.Maildir | None = None
        self._keys: set[str] | None = None

    def run(self, action: Action, data: dict[str, Any], key: str) -> Outcome:
        """Write one message unless its Message-ID is already there."""
        if action != SEND:
            raise ActionError(f"mailbox offers only '{SEND}', not '{action}'")
        try:
            mail = compose(data, sender=self.config.sender, key=key, now=self._clock(), linesep="\n")
        except InvalidMessage as exc:
            return Outcome("failed", error=str(exc))
        with self._lock:
            try:
                return self._deliver(mail)
            except OSError as exc:
                return _io_outcome(exc, self.path)

    def close(self) -> None:
        """Nothing to release: every message is written and synced when run returns."""

    def _deliver(self, mail: Mail) -> Outcome:
        """Write the message unless its key is held."""
        keys = self._held()
        if mail.key in keys:
            return Outcome.ok({"message_id": mail.message_id, "duplicate": True})
        name = self._write(_envelope(mail) + mail.raw)
        keys.add(mail.key)
        return Outcome.ok({"message_id": mail.message_id, "file": f"new/{name}"})

    def _held(self) -> set[str]:
        """The Message-ID keys in the Maildir, read once (creating the Maildir when missing)."""
        if self._keys is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._maildir = mailbox.Maildir(self.path, factory=None, create=True)
            self._keys = {message_key(message_id) for message_id in _message_ids(self.path)}
        return self._keys

    def _write(self, raw: bytes) -> str:
        """Add a message and sync it and its folder to disk; its file name."""
        name = self._maildir.add(raw)
        _fsync(self.path / "new" / name)
        _fsync(self.path / "new")
        return name


def _envelope(mail: Mail) -> bytes:
    """Return-Path and Envelope-To headers, as a delivering server adds them."""
    return f"Return-Path: <{mail.sender}>\nEnvelope-To: {', '.join(mail.recipients)}\n".encode("ascii")


def _message_ids(folder: Path) -> Iterator[str]:
    """The Message-ID of every message in a Maildir, reading headers only."""
    parser = BytesHeaderParser()
    for sub in ("new", "cur"):  # new first: a reader moving new -> cur meanwhile is still seen in cur
        for entry in (folder / sub).iterdir():
            if entry.name.startswith("."):
                continue
            try:
                message_id = parser.parsebytes(_head(entry))["Message-ID"]
            except FileNotFoundError:
                continue
            if message_id:
                yield str(message_id)


def _head(path: Path) -> bytes:
    """The header block of a message file."""
    lines = []
    with path.open("rb") as file:
        for line in file:
            if not line.strip():
                break
            lines.append(line)
    return b"".join(lines)


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _io_outcome(exc: OSError, path: Path) -> Outcome:
    """A folder we may not write is a config problem; other I/O errors may pass."""
    error = f"{path}: {exc.strerror or exc}"
    if exc.errno in _NOT_WRITABLE:
        return Outcome("paused", error=f"{error}; make the folder writable or change path", condition="config")
    return Outcome("retryable", error=error, condition="connection")

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
sent. Folders are created 0700 and messages 0600, whatever the umask.

Nothing inside the Maildir is followed through a symbolic link: the Maildir
folder and its ``new``, ``cur`` and ``tmp`` are opened with O_NOFOLLOW and
every file relative to them, so a link planted there cannot redirect a
message (a planted folder link pauses the connector, naming it), and an entry
that is not a regular file is neither read nor counted as a sent message.

Outcomes: ``failed`` for an invalid message, ``paused`` when the folder is not
writable or is a link (condition "config"), ``retryable`` for other I/O
errors such as a full disk (condition "connection").
"""
from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel

from sinks.base import Action, ActionError, ConnectorConfig, Outcome
from sinks.file import private_folders
from sinks.message import SEND, InvalidMessage, Mail, MessageInput, Sender, compose, message_key

_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_SUBFOLDERS = ("new", "cur", "tmp")
_SERIAL = itertools.count(1)


class FolderLink(OSError):
    """A folder of the Maildir is a symbolic link: the agent does not write through it."""


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
            private_folders(self.path)
            with _folder(self.path) as root:
                for sub in _SUBFOLDERS:
                    _private_folder(root, sub, self.path)
                self._keys = {message_key(message_id) for message_id in _message_ids(root, self.path)}
        return self._keys

    def _write(self, raw: bytes) -> str:
        """Write a message 0600 into tmp/, sync it, link it into new/ and sync that; its file name."""
        name = _unique_name(time.time())
        with _folder(self.path) as root, _folder("tmp", root, self.path) as tmp, _folder("new", root, self.path) as new:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=tmp)
            try:
                os.fchmod(fd, 0o600)  # the umask may have taken bits away; exactly 0600
                view = memoryview(raw)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(name, name, src_dir_fd=tmp, dst_dir_fd=new, follow_symlinks=False)
                os.unlink(name, dir_fd=tmp)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                os.rename(name, name, src_dir_fd=tmp, dst_dir_fd=new)  # a file system without hard links, as mailbox.Maildir does
            os.fsync(new)
        return name


def _envelope(mail: Mail) -> bytes:
    """Return-Path and Envelope-To headers, as a delivering server adds them."""
    return f"Return-Path: <{mail.sender}>\nEnvelope-To: {', '.join(mail.recipients)}\n".encode("ascii")


@contextmanager
def _folder(name: Path | str, parent: int | None = None, where: Path | None = None) -> Iterator[int]:
    """A folder opened without following a link (`name` relative to the open folder `parent`, which is at
    `where`); FolderLink if it is a link."""
    shown = where / name if where else Path(name)
    try:
        fd = os.open(name, _FOLDER, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(shown):
            raise FolderLink(exc.errno, f"{shown}: is a symbolic link") from None
        raise
    try:
        yield fd
    finally:
        os.close(fd)


def _private_folder(root: int, name: str, path: Path) -> None:
    """Create the Maildir's sub-folder `name` 0700 when missing; FolderLink if a link stands there."""
    try:
        os.mkdir(name, 0o700, dir_fd=root)
        os.chmod(name, 0o700, dir_fd=root)  # the umask may have taken bits away; exactly 0700
    except FileExistsError:
        with _folder(name, root, path):
            pass  # there already: a real folder, or FolderLink


def _unique_name(now: float) -> str:
    """A Maildir file name no other delivery uses: time, process, serial, host."""
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_SERIAL)}.{host}"


def _message_ids(root: int, path: Path) -> Iterator[str]:
    """The Message-ID of every message in a Maildir, reading headers only, never through a link."""
    from email.parser import BytesHeaderParser  # here: loading the config (`agent status`) needs no parser

    parser = BytesHeaderParser()
    for sub in ("new", "cur"):  # new first: a reader moving new -> cur meanwhile is still seen in cur
        with _folder(sub, root, path) as folder, os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue  # a link or anything but a regular file is not a message the agent wrote
                try:
                    message_id = parser.parsebytes(_head(entry.name, folder))["Message-ID"]
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ELOOP):
                        continue  # moved or removed meanwhile, or swapped for a link
                    raise
                if message_id:
                    yield str(message_id)


def _head(name: str, folder: int) -> bytes:
    """The header block of a message file (opened without following a link)."""
    lines = []
    with os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder), "rb") as file:
        for line in file:
            if not line.strip():
                break
            lines.append(line)
    return b"".join(lines)


def _io_outcome(exc: OSError, path: Path) -> Outcome:
    """A folder we may not write, or a link planted for one, is a config problem; other I/O errors may pass."""
    if isinstance(exc, FolderLink):
        return Outcome("paused", error=f"{exc.strerror}; the agent never writes through a link: remove it, or set path to the real folder",
                       condition="config")
    error = f"{path}: {exc.strerror or exc}"
    if exc.errno in _NOT_WRITABLE:
        return Outcome("paused", error=f"{error}; make the folder writable or change path", condition="config")
    return Outcome("retryable", error=error, condition="connection")

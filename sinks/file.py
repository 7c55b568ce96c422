"""The ``file`` connector: appends records to a JSON-lines file, once per idempotency key.

Config::

    [connectors.archive]
    kind = "file"
    path = "var/out.jsonl"

One action, ``record > write``, input ``{"body": <any JSON>}``: appends the line
``{"key": key, "body": body, "written": "<ISO 8601 UTC>"}``, flushed and fsynced.
A key already in the file is skipped (output ``{"duplicate": true}``), across
restarts too: the keys are read from the file on first use. A torn last line
left by a crash carries no usable key and is cut off before the next write.
The file is created 0600 and missing folders 0700, whatever the umask (it holds
personal data). A file that cannot be written (full disk, bad path) pauses the
connector; so does a symbolic link or anything but a regular file at the path:
it is never written, read or cut through, and the records wait until the
operator removes it (a link planted there must not redirect the data).
"""
from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from sinks.base import Action, ActionError, ConnectorConfig, Outcome

WRITE = Action("record", "write")


class RecordInput(BaseModel):
    """Input of record > write: any JSON value."""

    model_config = ConfigDict(extra="forbid")

    body: Any = Field(default_factory=dict)


class FileConfig(ConnectorConfig):
    """The ``file`` connector's table."""

    kind: Literal["file"] = "file"
    path: Path

    def actions(self) -> dict[Action, type[BaseModel]]:
        """The one action, record > write."""
        return {WRITE: RecordInput}


class FileConnector:
    """Writes each key once to a JSON-lines file; thread-safe."""

    Config = FileConfig

    def __init__(self, config: FileConfig, *, session: Any = None, clock: Callable[[], float] = time.time, base_dir: Path | None = None):
        self.config = config
        self.path = Path(base_dir or ".") / config.path.expanduser()  # relative to the config file's folder
        self.clock = clock
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._keys: set[str] | None = None  # None until the file has been read

    def run(self, action: Action, data: dict[str, Any], key: str) -> Outcome:
        """Append the body under `key` unless that key was written before."""
        if action != WRITE:
            raise ActionError(f"{action}: not an action of the file connector (known: {WRITE})")
        entry = {"key": key, "body": data.get("body", {}), "written": self._now()}
        try:
            line = json.dumps(entry, allow_nan=False, separators=(",", ":")).encode() + b"\n"
        except ValueError as exc:
            return Outcome("failed", error=f"{action}: the body is not JSON ({exc})", condition="input")
        with self._lock:
            try:
                return self._append(key, line)
            except OSError as exc:
                self._forget()
                return Outcome("paused", error=_io_problem(self.path, exc), condition="io")

    def close(self) -> None:
        """Close the file; the next run reopens it."""
        with self._lock:
            self._forget()

    def _append(self, key: str, line: bytes) -> Outcome:
        """Write one line and make it durable, or report the key as a duplicate."""
        if self._file is None or self._keys is None:
            self._file, self._keys = open_lines(self.path)
        if key in self._keys:
            return Outcome.ok({"duplicate": True})
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._keys.add(key)
        return Outcome.ok({"duplicate": False})

    def _forget(self) -> None:
        """Drop the open file and the keys, so the next write rereads the file as it really is."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # a failed flush on close changes nothing: the file is reread next time
        self._file, self._keys = None, None

    def _now(self) -> str:
        """The clock's time in ISO 8601, UTC."""
        return datetime.fromtimestamp(self.clock(), timezone.utc).isoformat()


def _io_problem(path: Path, exc: OSError) -> str:
    """What the operator reads when the file cannot be written."""
    if exc.errno == errno.ELOOP:
        return f"{path}: is a symbolic link; the agent writes only to a real file, never through a link (remove the link, or set path to the real file)"
    return f"{path}: cannot write ({exc.strerror or exc}); check the path and free space"


def private_folders(path: Path) -> None:
    """Create `path` and its missing parents, each 0700 whatever the umask; folders that exist are left as they are."""
    missing = []
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            continue  # another thread made it meanwhile
        os.chmod(folder, 0o700)  # the umask may have taken bits away; exactly 0700


def open_lines(path: Path) -> tuple[IO[bytes], set[str]]:
    """Open `path` for appending (creating it 0600, and its folders 0700) and return it with the keys it holds.

    Never through a symbolic link (ELOOP) and never anything but a regular file."""
    private_folders(path.parent)
    created = not os.path.lexists(path)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file; point path at a file")
        if created:
            os.fchmod(fd, 0o600)  # the umask may have taken bits away; exactly 0600
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    file = os.fdopen(fd, "a+b")
    try:
        keys = repair(file)
    except BaseException:
        file.close()
        raise
    if created:
        sync_directory(path.parent)
    return file, keys


def repair(file: IO[bytes]) -> set[str]:
    """The keys of every whole line; cut a torn last line, end a whole one that lacks its newline."""
    file.seek(0)
    keys: set[str] = set()
    kept, last = 0, b""
    for last in file:
        key = line_key(last)
        if key is not None:
            keys.add(key)
        if key is not None or last.endswith(b"\n"):
            kept += len(last)
    size = file.seek(0, os.SEEK_END)
    if kept < size:
        file.truncate(kept)
    elif last and not last.endswith(b"\n"):
        file.write(b"\n")
    else:
        return keys
    file.flush()
    os.fsync(file.fileno())
    return keys


def line_key(line: bytes) -> str | None:
    """The key of one written line, None if the line is not one of ours."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    key = entry.get("key") if isinstance(entry, dict) else None
    return key if isinstance(key, str) else None


def sync_directory(path: Path) -> None:
    """fsync a directory so a newly created file's name survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

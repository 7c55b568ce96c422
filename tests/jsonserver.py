"""json-server 0.17 (npm), a real third-party REST API, on a free port of 127.0.0.1 for tests.

    with JsonServer(tmp_path, {"leads": [{"id": 1, "email": "a@x"}]}) as api:
        requests.get(api.url + "/leads?email=a@x")

Its items are addressed by ``id`` (``/leads/1``), found by any field
(``/leads?email=a@x``); a POST of an id that exists answers 500, a DELETE of
a missing item 404. The binary is ``node_modules/.bin/json-server`` of the
project (``npm install --no-save --no-package-lock json-server@0.17``) or
one on PATH; without it, ``start`` raises with that reason, so the tests that
need it fail (never skip) where it was not installed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
INSTALL = "npm install --no-save --no-package-lock json-server@0.17"
START_WAIT = 15.0  # seconds for node to start and listen


def binary() -> str:
    """The json-server executable, or RuntimeError saying how to install it."""
    local = ROOT / "node_modules" / ".bin" / "json-server"
    found = str(local) if local.exists() else shutil.which("json-server")
    if not found:
        raise RuntimeError(f"json-server is not installed: run `{INSTALL}` in {ROOT.name}/ (needs node and npm)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JsonServer:
    """One json-server process serving ``db`` (written to ``folder/db.json``)."""

    def __init__(self, folder: Path, db: dict[str, Any]):
        self.file = folder / "db.json"
        self.file.write_text(json.dumps(db))
        self.url = ""
        self._process: subprocess.Popen | None = None
        self._error = ""

    def start(self) -> "JsonServer":
        for _ in range(3):  # a free port can be taken by someone else before node binds it: try another
            port = free_port()
            self._process = subprocess.Popen(
                [binary(), "--host", "127.0.0.1", "--port", str(port), "--quiet", str(self.file)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            self.url = f"http://127.0.0.1:{port}"
            if self._wait():
                return self
            self.stop()
        raise RuntimeError(f"json-server did not start: {self._error}")

    def _wait(self) -> bool:
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._error = self._process.stderr.read().decode(errors="replace")[-500:]
                return False
            try:
                requests.get(self.url + "/db", timeout=1)
                return True
            except requests.ConnectionError:
                time.sleep(0.02)
        self._error = f"not listening after {START_WAIT:g}s"
        return False

    def items(self, collection: str) -> list[dict[str, Any]]:
        """What the server holds now, read over HTTP."""
        return requests.get(f"{self.url}/{collection}", timeout=5).json()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)  # its own session: node and nothing else
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        if self._process is not None and self._process.stderr:
            self._process.stderr.close()
        self._process = None

    def __enter__(self) -> "JsonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

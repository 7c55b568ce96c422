"""A hostile HTTP server on 127.0.0.1 for tests: it answers every connection with a script.

    with HostileServer(drip_headers(seconds=3)) as server:
        requests.post(server.url + "/leads", json={}, timeout=...)

A script gets the accepted socket after the request was read and writes what
it likes. Every script ends by itself (bounded loops, bounded sleeps), and the
server stops accepting when the test leaves the ``with`` block.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from typing import Callable

Script = Callable[[socket.socket], None]
STEP = 0.02  # seconds between dripped bytes: far below any per-read timeout a test sets


class HostileServer:
    """Accepts connections on a free port of 127.0.0.1 and runs a script on each, in a thread.

    The n-th connection gets the n-th script; the last one serves every later connection.
    """

    def __init__(self, *scripts: Script):
        self.scripts = scripts
        self.connections = 0
        self.requests: list[bytes] = []  # the raw head of every request received
        self.url = ""
        self._listener: socket.socket | None = None
        self._stop = threading.Event()

    def __enter__(self) -> "HostileServer":
        listener = self._listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.05)
        threading.Thread(target=self._accept, name="hostile", daemon=True).start()
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:  # closed by __exit__
                return
            script = self.scripts[min(self.connections, len(self.scripts) - 1)]
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, script), daemon=True).start()

    def _serve(self, conn: socket.socket, script: Script) -> None:
        with conn:
            conn.settimeout(5)
            try:
                while True:  # keep-alive: one request after another, until the client hangs up
                    head = read_request(conn)
                    if not head:
                        return
                    self.requests.append(head)
                    script(conn)
            except OSError:  # the client hung up (it gave up waiting): the point of most scripts
                pass


def read_request(conn: socket.socket) -> bytes:
    """Read one request's head and its Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head


def _drip(head: bytes, seconds: float) -> Script:
    """Send `head`, then one byte every STEP, for `seconds` at most."""
    def script(conn: socket.socket) -> None:
        conn.sendall(head)
        for _ in range(int(seconds / STEP)):
            conn.sendall(b"x")
            time.sleep(STEP)
    return script


def drip_headers(seconds: float = 3.0) -> Script:
    """A status line, then one header byte every STEP, for `seconds` at most."""
    return _drip(b"HTTP/1.1 200 OK\r\nX-Drip: ", seconds)


def drip_body(seconds: float = 3.0) -> Script:
    """Headers promising a large body, then one body byte every STEP, for `seconds` at most."""
    return _drip(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n", seconds)


def drip_until_close(seconds: float = 3.0) -> Script:
    """An answer without a length, ended by closing the connection, dripped a byte every STEP for `seconds` at most."""
    return _drip(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n", seconds)


def silent(seconds: float = 3.0) -> Script:
    """Read the request and answer nothing for `seconds`, then hang up."""
    def script(conn: socket.socket) -> None:
        time.sleep(seconds)
    return script


def slow_json(seconds: float, body: bytes = b"[]") -> Script:
    """A whole, small JSON answer after `seconds`."""
    def script(conn: socket.socket) -> None:
        time.sleep(seconds)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return script


def big_json(size: int, status: int = 200) -> Script:
    """A JSON string body of about `size` bytes, sent whole and at once."""
    body = json.dumps("x" * size).encode()

    def script(conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return script

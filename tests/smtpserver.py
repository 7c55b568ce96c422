"""A real SMTP server on 127.0.0.1 for tests (aiosmtpd in a thread), recording what it receives.

    with SmtpServer(auth=("agent", "s3cret"), certificate=make_certificate(tmp_path)) as server:
        server.port                         # a free port, picked before start
        server.reply_next(1, "451 4.3.0 try later")          # the next DATA gets this reply
        server.reply_next(1, "550 5.1.1 no such user", at="RCPT")
        server.reply_next(1, "421 4.4.2 timeout exceeded", at="MAIL", close=True)   # reply, then hang up
        server.drop_next(1, at="DATA", after=1)                 # the second DATA from now is dropped
        server.drop_next(1)                 # the next MAIL FROM: connection closed, no reply
        server.stall_next(1, 0.3)           # the next DATA: accepted, answered after 0.3 s
        ...
        server.messages[0].message["Subject"], server.messages[0].rcpt_tos
        server.data                         # every DATA payload received, accepted or not
        server.connections                  # connections accepted since start

``certificate`` (cert, key) turns on STARTTLS (required before AUTH and mail)
or, with ``implicit_tls=True``, TLS from the first byte (SMTPS). ``auth``
(username, password) requires AUTH before MAIL FROM. Scripted steps apply
to the next n commands of the given stage (MAIL, RCPT or DATA), across
connections, in the order they were scripted.

``HostileSmtpServer(script)`` is a raw socket server for what aiosmtpd will not
do (drip a reply, send endless lines): ``script(conn, stop)`` plays each
connection, and everything ends by itself after ``lifetime`` seconds.
"""
from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import ssl
import subprocess
import threading
from collections import deque
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

HOST = "127.0.0.1"


@dataclass
class Received:
    """One message the server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    message: EmailMessage


def free_port() -> int:
    """A port nobody listens on now (aiosmtpd's Controller cannot take port 0)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def make_certificate(folder: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made with the openssl command: (cert, key)."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


class _Handler:
    """aiosmtpd hooks: play the script, else accept and record."""

    def __init__(self, server: "SmtpServer"):
        self.server = server

    async def handle_MAIL(self, smtp, session, envelope, address, options):
        # enforced here: aiosmtpd's auth_required warns whenever TLS is not required too
        if self.server.auth and not session.authenticated:
            return "530 5.7.0 Authentication required"

        def accept():
            envelope.mail_from, envelope.mail_options = address, list(options)
        return await self.server._play("MAIL", smtp, accept)

    async def handle_RCPT(self, smtp, session, envelope, address, options):
        return await self.server._play("RCPT", smtp, lambda: envelope.rcpt_tos.append(address))

    async def handle_DATA(self, smtp, session, envelope):
        with self.server._lock:
            self.server.data.append(envelope.original_content)
        return await self.server._play("DATA", smtp, lambda: self.server._record(envelope))


class _CountingController(Controller):
    """A Controller that counts the connections it accepts."""

    def __init__(self, server: "SmtpServer", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.owner = server

    def factory(self):
        self.owner.connections += 1
        return super().factory()


class SmtpServer:
    """A live SMTP server on 127.0.0.1 with a recorded inbox and scripted replies."""

    def __init__(self, *, auth: tuple[str, str] | None = None, certificate: tuple[Path, Path] | None = None, implicit_tls: bool = False):
        self.host, self.port = HOST, free_port()
        self.auth = auth
        self.messages: list[Received] = []
        self.data: list[bytes] = []
        self.logins: list[str] = []
        self.connections = 0
        self._script: dict[str, deque] = {"MAIL": deque(), "RCPT": deque(), "DATA": deque()}
        self._lock = threading.Lock()
        tls = _server_context(*certificate) if certificate else None
        options: dict = dict(server_hostname="smtp.test", ready_timeout=5)
        if tls and implicit_tls:
            options["ssl_context"] = tls
        elif tls:
            options.update(tls_context=tls, require_starttls=True)
        if auth:
            options.update(authenticator=self._authenticate, auth_require_tls=bool(tls))
        self._controller = _CountingController(self, _Handler(self), hostname=HOST, port=self.port, **options)

    def start(self) -> "SmtpServer":
        """Listen; the connection the Controller makes to check itself is not counted."""
        self._controller.start()
        self.connections = 0
        return self

    def stop(self) -> None:
        """Stop listening and end every connection."""
        self._controller.stop()

    def __enter__(self) -> "SmtpServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reply_next(self, n: int, reply: str, *, at: str = "DATA", close: bool = False, after: int = 0) -> None:
        """Answer the next n commands of stage `at` (past `after` accepted ones) with `reply`; hang up too, with close."""
        self._add(at, n, ("reply_close" if close else "reply", reply), after)

    def drop_next(self, n: int, *, at: str = "MAIL", after: int = 0) -> None:
        """Close the connection, without a reply, at the next n commands of stage `at` (past `after` accepted ones)."""
        self._add(at, n, ("drop", None), after)

    def stall_next(self, n: int, seconds: float, *, at: str = "DATA") -> None:
        """Accept the next n commands of stage `at` as usual, but answer `seconds` late."""
        self._add(at, n, ("stall", seconds))

    def _add(self, stage: str, n: int, step: tuple, after: int = 0) -> None:
        """Script a step for the next n commands of a stage, past `after` commands accepted as usual."""
        with self._lock:
            self._script[stage].extend([("accept", None)] * after + [step] * n)

    async def _play(self, stage: str, smtp, accept) -> str:
        """The reply to a command: the next scripted step of its stage, else accept it."""
        with self._lock:
            step, value = self._script[stage].popleft() if self._script[stage] else (None, None)
        if step == "reply":
            return value
        if step == "reply_close":  # as Postfix does when it gives up an idle connection: 421, then close
            asyncio.get_running_loop().call_soon(smtp.transport.close)  # runs after the reply is written
            return value
        if step == "drop":
            smtp.transport.abort()
            return "421 4.4.2 dropped"  # never reaches the client: the transport is gone
        accept()
        if step == "stall":
            await asyncio.sleep(value)  # accepted, but the client hears of it late
        return "250 OK"

    def _record(self, envelope) -> None:
        raw = envelope.original_content
        message = email.message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=email.policy.default)
        with self._lock:
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), raw, message))

    def _authenticate(self, smtp, session, envelope, mechanism, data) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login.decode(), data.password.decode()) == self.auth
        if ok:
            self.logins.append(data.login.decode())
        return AuthResult(success=ok, handled=False)


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The server side of TLS with the given certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


class HostileSmtpServer:
    """A raw TCP server on 127.0.0.1 that plays ``script(conn, stop)`` on each connection; it ends by itself."""

    def __init__(self, script, *, lifetime: float = 5.0):
        self.script, self.lifetime = script, lifetime
        self.host, self.port = HOST, 0
        self.connections = 0
        self._stop = threading.Event()
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []

    def __enter__(self) -> "HostileSmtpServer":
        self._listener.settimeout(0.05)
        self._threads.append(threading.Thread(target=self._accept, daemon=True))
        self._threads[0].start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for conn in list(self._conns):  # a script waiting for the client's next line ends now
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        """Accept until stopped or past the lifetime; each connection gets a thread."""
        stop = threading.Timer(self.lifetime, self._stop.set)
        stop.daemon = True
        stop.start()
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            self._conns.append(conn)
            thread = threading.Thread(target=self._play, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()
        stop.cancel()

    def _play(self, conn: socket.socket) -> None:
        """Run the script on one connection; the connection closes when the script ends or fails."""
        conn.settimeout(self.lifetime)
        with conn:
            try:
                self.script(Dialogue(conn), self._stop)
            except OSError:
                pass  # the client hung up: what a hostile server expects


class Dialogue:
    """The server's side of one raw SMTP connection: read a command, send lines."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.file = conn.makefile("rb")

    def send(self, *lines: str) -> None:
        self.conn.sendall("".join(line + "\r\n" for line in lines).encode())

    def command(self) -> str:
        """The next command line, upper-cased ('' once the client hung up)."""
        return self.file.readline(10_000).decode("ascii", "replace").strip().upper()

    def until(self, verb: str) -> None:
        """Answer 250 (354 to DATA, reading the message) to every command before `verb`; "." stops after a message."""
        while True:
            line = self.command()
            if not line:
                raise ConnectionError("the client hung up")
            if line.startswith(verb):
                return
            if line.startswith("DATA"):
                self.send("354 go on")
                while self.file.readline(100_000) not in (b".\r\n", b""):
                    pass
                if verb == ".":
                    return
            self.send("250 ok")

    def drip(self, stop: threading.Event, text: bytes, every: float = 0.05) -> None:
        """Send `text` again and again, pausing between sends, until stopped."""
        while not stop.wait(every):
            self.conn.sendall(text)

"""A real SMTP server on 127.0.0.1 for tests (aiosmtpd in a thread), recording what it receives.

    with SmtpServer(auth=("agent", "s3cret"), certificate=make_certificate(tmp_path)) as server:
        server.port                         # a free port, picked before start
        server.reply_next(1, "451 4.3.0 try later")          # the next DATA gets this reply
        server.reply_next(1, "550 5.1.1 no such user", at="RCPT")
        server.drop_next(1)                 # the next MAIL FROM: connection closed, no reply
        server.stall_next(1, 0.3)           # the next DATA: accepted, answered after 0.3 s
        ...
        server.messages[0].message["Subject"], server.messages[0].rcpt_tos
        server.connections                  # connections accepted since start

``certificate`` (cert, key) turns on STARTTLS (required before AUTH and mail)
or, with ``implicit_tls=True``, TLS from the first byte (SMTPS). ``auth``
(username, password) requires AUTH before MAIL FROM. Scripted steps apply
to the next n commands of the given stage (MAIL, RCPT or DATA), across
connections, in the order they were scripted.
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

    def reply_next(self, n: int, reply: str, *, at: str = "DATA") -> None:
        """Answer the next n commands of stage `at` with `reply` instead of accepting."""
        self._add(at, n, ("reply", reply))

    def drop_next(self, n: int, *, at: str = "MAIL") -> None:
        """Close the connection, without a reply, at the next n commands of stage `at`."""
        self._add(at, n, ("drop", None))

    def stall_next(self, n: int, seconds: float, *, at: str = "DATA") -> None:
        """Accept the next n commands of stage `at` as usual, but answer `seconds` late."""
        self._add(at, n, ("stall", seconds))

    def _add(self, stage: str, n: int, step: tuple) -> None:
        """Script a step for the next n commands of a stage."""
        with self._lock:
            self._script[stage].extend([step] * n)

    async def _play(self, stage: str, smtp, accept) -> str:
        """The reply to a command: the next scripted step of its stage, else accept it."""
        with self._lock:
            step, value = self._script[stage].popleft() if self._script[stage] else (None, None)
        if step == "reply":
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

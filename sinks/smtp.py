"""The ``smtp`` connector: ``message > send`` over one reused SMTP connection with verified TLS.

One connection is opened on the first send, upgraded with STARTTLS (or opened
with implicit TLS for ``security = "ssl"``), logged in once, and reused by
every later send; calls from several threads take turns on it. A reused
connection that the server let go meanwhile (closed, or a 421 such as
Postfix's "timeout exceeded" after an idle period) is reopened once, at once,
without spending an attempt, but only while the message cannot have been
taken: once DATA was accepted (354), a dropped connection is ambiguous and the
retry policy decides. TLS is always verified against the system's CAs, or
against ``ca_file`` for a private CA (smtplib's own default verifies nothing).

``timeout`` is a deadline for the whole dialogue of one message (connect,
EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA and the final reply), not for each
read: every socket read and write gets only the time left. A reply of more
than ``REPLY_LINES`` lines or ``REPLY_BYTES`` bytes ends the connection.

Outcomes (``status_code`` holds the SMTP reply code, ``error`` the reply)::

    250                                  succeeded  output {"message_id", "refused"}
    4xx reply (421, 450, 451, 452, ...)  retryable  condition "4xx" (a retry `on`
                                                    of "5xx" still matches it: its old name)
    past the deadline                    retryable  condition "timeout"
    dropped or refused connection,       retryable  condition "connection"
    a reply too long or unreadable
    5xx reply (550, 553, 554, ...)       failed
    530, 534, 535, 538 (authentication)  paused     condition "auth"
    untrusted certificate, TLS failure   paused     condition "tls"
    server lacks STARTTLS or AUTH        paused     condition "config"
    invalid address, unsafe header,      failed     nothing was sent; the error names the field
    a value email cannot carry

Every recipient refused is classified by the most hopeful code (paused, then
retryable, then failed); some refused is a success that lists them in
``output["refused"]``.

smtplib is imported at the first connection, not with this module:
loading the config model (`agent status`) does not pay for it. The classes
built on smtplib's (``DeadlinePassed``, ``HostileReply``, ``BoundedSMTP``,
``BoundedSMTP_SSL``) are made then too, once (``_smtplib_classes()``).
"""
from __future__ import annotations

import errno
import functools
import math
import socket
import ssl
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator

from sinks.base import Action, ActionError, ConnectorConfig, Outcome, SinkError, Timeout
from sinks.message import SEND, InvalidMessage, Mail, MessageInput, Sender, compose

if TYPE_CHECKING:
    import smtplib

REFUSAL_HOLD = 30.0  # seconds a refused login/TLS answers `paused` without connecting (below the agent's 60 s probe)
REPLY_LINES = 100  # lines in one reply; EHLO lists a dozen extensions, a server sending more is hostile
REPLY_BYTES = 64 * 1024  # bytes in one reply
_MAXLINE = 8192  # bytes in one reply line, as smtplib allows
_CHUNK = 16 * 1024  # bytes written at a time, each write given only the time left
_REPLY_SHOWN = 500  # characters of a server's reply kept in an error
_AUTH_CODES = {530, 534, 535, 538}  # authentication required, too weak, failed, needs encryption
_PRECEDENCE = ("paused", "retryable", "failed")


class SmtpConfig(ConnectorConfig):
    """``[connectors.NAME]`` with ``kind = "smtp"``."""

    kind: Literal["smtp"]
    host: str
    port: int = Field(587, ge=1, le=65535)  # 465 when security = "ssl" and no port is given
    security: Literal["starttls", "ssl", "none"] = "starttls"
    username: str | None = None
    password: SecretStr | None = None
    sender: Sender
    timeout: Timeout = 30.0
    ca_file: Path | None = None  # a private CA, trusted instead of the system's; relative to the config file

    @model_validator(mode="after")
    def _check(self) -> "SmtpConfig":
        if (self.username is None) != (self.password is None):
            raise ValueError("give both username and password, or neither")
        if self.security == "ssl" and "port" not in self.model_fields_set:
            self.port = 465
        return self

    def actions(self) -> dict[Action, type[BaseModel]]:
        return {SEND: MessageInput}


class Unreachable(ConnectionError):
    """No connection could be made (refused, unknown host): nothing reached the server."""


class _Bounded:
    """An smtplib.SMTP whose reads and writes end by ``deadline`` and whose replies are capped.

    smtplib's own timeout bounds each socket read, so a server that drips a
    line just inside it (an endless ``250-``) holds the caller forever.
    """

    data_accepted = False  # DATA got its 354: from here on the server may take the message

    def __init__(self, *args, deadline: float = math.inf, **kwargs):
        self.deadline = deadline  # time.monotonic() by which the current dialogue ends; set before connecting
        super().__init__(*args, **kwargs)

    def _time_left(self) -> float:
        """Seconds before the deadline, given to the socket; past it the connection is closed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.close()
            raise _smtplib_classes().DeadlinePassed("timed out: the dialogue took longer than timeout")
        if self.sock is not None:
            self.sock.settimeout(left)
        return left

    def _get_socket(self, host, port, timeout):
        """Connect (and, for SMTP_SSL, shake hands) within the time left."""
        return super()._get_socket(host, port, self._time_left())  # connect and implicit TLS within the deadline

    def send(self, s):
        """Write a command or the message in chunks, each within the time left."""
        data = memoryview(s.encode(self.command_encoding) if isinstance(s, str) else s)
        for start in range(0, max(len(data), 1), _CHUNK):  # a slow reader cannot stretch one write past the deadline
            self._time_left()
            super().send(data[start:start + _CHUNK])

    def getreply(self):
        """(code, text) of one reply, as smtplib's, read within the time left and capped in lines and bytes."""
        lines, size = [], 0
        while True:
            line = self._readline()
            size += len(line)
            if len(line) > _MAXLINE or len(lines) >= REPLY_LINES or size > REPLY_BYTES:
                self.close()
                raise _smtplib_classes().HostileReply(f"a reply over {REPLY_LINES} lines or {REPLY_BYTES // 1024} KB; is this an SMTP server?")
            lines.append(line[4:].strip(b" \t\r\n"))
            try:
                code = int(line[:3])
            except ValueError:
                return -1, b"\n".join(lines)
            if line[3:4] != b"-":
                self.data_accepted = self.data_accepted or code == 354
                return code, b"\n".join(lines)

    def _readline(self) -> bytes:
        """One reply line (at most _MAXLINE + 1 bytes), each socket read bounded by the time left."""
        import smtplib

        line = b""
        while True:
            self._time_left()
            try:
                if self.file is None:
                    self.file = self.sock.makefile("rb")
                ahead = self.file.peek(1)  # at most one socket read
            except (OSError, AttributeError) as exc:  # AttributeError: no socket (closed)
                self.close()
                raise smtplib.SMTPServerDisconnected(f"Connection unexpectedly closed: {exc}") from exc
            if not ahead:
                self.close()
                raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
            room = _MAXLINE + 1 - len(line)
            end = ahead.find(b"\n", 0, room)
            line += self.file.read(end + 1 if end >= 0 else min(len(ahead), room))
            if end >= 0 or len(line) > _MAXLINE:
                return line


@functools.cache
def _smtplib_classes() -> SimpleNamespace:
    """The classes built on smtplib's, made once, when the first connection needs them."""
    import smtplib

    class DeadlinePassed(smtplib.SMTPServerDisconnected):
        """The dialogue of one message took longer than ``timeout``; the connection is closed."""

    class HostileReply(smtplib.SMTPServerDisconnected):
        """A reply longer than any SMTP server sends; the connection is closed."""

    class BoundedSMTP(_Bounded, smtplib.SMTP):
        """Plain SMTP (STARTTLS follows) within a deadline."""

    class BoundedSMTP_SSL(_Bounded, smtplib.SMTP_SSL):
        """SMTP over implicit TLS within a deadline."""

    return SimpleNamespace(DeadlinePassed=DeadlinePassed, HostileReply=HostileReply, BoundedSMTP=BoundedSMTP, BoundedSMTP_SSL=BoundedSMTP_SSL)


if TYPE_CHECKING:
    SmtpFactory = Callable[[SmtpConfig, ssl.SSLContext | None, float], smtplib.SMTP]


def connect(config: SmtpConfig, context: ssl.SSLContext | None, timeout: float) -> smtplib.SMTP:
    """Open a connection (implicit TLS for ``security = "ssl"``) within ``timeout`` seconds; STARTTLS and login are the connector's."""
    deadline = time.monotonic() + timeout
    if config.security == "ssl":
        return _smtplib_classes().BoundedSMTP_SSL(config.host, config.port, context=context, deadline=deadline)
    return _smtplib_classes().BoundedSMTP(config.host, config.port, deadline=deadline)


class SmtpConnector:
    """Sends ``message > send`` through an SMTP server."""

    Config = SmtpConfig

    def __init__(self, config: SmtpConfig, *, session: Any = None, clock: Callable[[], float] = time.time,
                 smtp_factory: SmtpFactory | None = None, base_dir: Path | None = None):
        self.config = config
        self._clock = clock
        self._factory = smtp_factory or connect
        self._context = _tls_context(config, base_dir)
        self._lock = threading.Lock()
        self._refusal: tuple[float, Outcome] | None = None  # (until, outcome) after an auth/TLS refusal
        self._smtp: smtplib.SMTP | None = None
        self._server = f"{config.host}:{config.port}"

    def run(self, action: Action, data: dict[str, Any], key: str) -> Outcome:
        """Send one message; the Outcome says what the caller does next."""
        if action != SEND:
            raise ActionError(f"smtp offers only '{SEND}', not '{action}'")
        try:
            mail = compose(data, sender=self.config.sender, key=key, now=self._clock())
        except InvalidMessage as exc:
            return Outcome("failed", error=str(exc))
        import smtplib

        with self._lock:
            if self._refusal is not None and self._clock() < self._refusal[0]:
                return self._refusal[1]  # calls queued behind a refused login do not log in again
            try:
                refused = self._send(mail, time.monotonic() + self.config.timeout)
            except (OSError, ValueError) as exc:  # SMTPException, ssl.SSLError, TimeoutError; ValueError: an unreadable reply
                if not isinstance(exc, (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused)):
                    self._discard()  # a reply leaves the session usable (smtplib sent RSET); anything else may not
                outcome = self._outcome(exc)
                self._refusal = (self._clock() + REFUSAL_HOLD, outcome) if outcome.status == "paused" else None
                return outcome
            self._refusal = None
        output = {"message_id": mail.message_id, "refused": {addr: _reply_text(code, text) for addr, (code, text) in refused.items()}}
        return Outcome.ok(output, status_code=250)

    def dry_run(self, action: Action, data: dict[str, Any], key: str) -> Outcome:
        """Compose the message as run does (every address and header check) and send nothing."""
        if action != SEND:
            raise ActionError(f"smtp offers only '{SEND}', not '{action}'")
        try:
            mail = compose(data, sender=self.config.sender, key=key, now=self._clock())
        except InvalidMessage as exc:
            return Outcome("failed", error=str(exc))
        head, _, _ = mail.raw.partition(b"\r\n\r\n")
        return Outcome.ok({"mail_from": mail.sender, "rcpt_to": mail.recipients, "message_id": mail.message_id,
                           "headers": head.decode("ascii", "replace").replace("\r\n ", " ").split("\r\n")})

    def close(self) -> None:
        """Say QUIT and close the connection, if one is open."""
        with self._lock:
            if self._smtp is not None and self._smtp.sock is not None:
                self._smtp.deadline = time.monotonic() + self.config.timeout
                try:
                    self._smtp.quit()
                except OSError:
                    pass
            self._discard()

    def _send(self, mail: Mail, deadline: float) -> dict[str, tuple[int, bytes]]:
        """One SMTP transaction by the deadline; a reused connection the server let go is reopened once."""
        import smtplib

        reused = self._smtp is not None and self._smtp.sock is not None
        smtp = self._connection(deadline)
        try:
            return smtp.sendmail(mail.sender, mail.recipients, mail.raw)
        except (smtplib.SMTPServerDisconnected, smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused) as exc:
            if not (reused and _let_go(exc, smtp)):
                raise
            self._discard()
        from loguru import logger  # here, not at the top: `agent status` loads this module and logs nothing
        logger.debug("smtp {}: the server let the idle connection go; reconnecting", self._server)
        return self._connection(deadline).sendmail(mail.sender, mail.recipients, mail.raw)

    def _connection(self, deadline: float) -> smtplib.SMTP:
        """The open connection, or a new one (secured and logged in), set for a dialogue ending by the deadline."""
        if self._smtp is None or self._smtp.sock is None:
            self._smtp = self._open(deadline)
        self._smtp.deadline, self._smtp.data_accepted = deadline, False
        return self._smtp

    def _open(self, deadline: float) -> smtplib.SMTP:
        """Connect, STARTTLS when configured (never falling back to plain text), log in; all by the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise _smtplib_classes().DeadlinePassed("timed out: the dialogue took longer than timeout")
        try:
            smtp = self._factory(self.config, self._context, left)
        except OSError as exc:
            if not _no_route(exc):
                raise
            raise Unreachable(f"cannot connect ({exc.strerror or exc})") from exc
        smtp.deadline = deadline
        try:
            if self.config.security == "starttls":
                smtp.starttls(context=self._context)
            if self.config.username is not None:
                smtp.login(self.config.username, self.config.password.get_secret_value())
        except BaseException:
            smtp.close()
            raise
        from loguru import logger  # here, not at the top: `agent status` loads this module and logs nothing
        logger.debug("smtp {}: connected ({})", self._server, self.config.security)
        return smtp

    def _discard(self) -> None:
        """Forget the connection, closing its socket."""
        if self._smtp is not None:
            self._smtp.close()
        self._smtp = None

    def _outcome(self, exc: Exception) -> Outcome:
        """The Outcome of an SMTP exception, with the password scrubbed from its text."""
        outcome = classify(exc, self._server)
        secret = self.config.password.get_secret_value() if self.config.password else ""
        if secret and outcome.error:
            outcome.error = outcome.error.replace(secret, "***")
        return outcome


def _no_route(exc: OSError) -> bool:
    """Whether a connect failed before reaching the server (refused, unknown host, no route): nothing was sent."""
    return isinstance(exc, (ConnectionRefusedError, socket.gaierror)) or exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)


def _let_go(exc: OSError, smtp: smtplib.SMTP) -> bool:
    """Whether a reused connection failed because the server let it go, before it could take the message.

    Postfix answers the first command after its idle timeout with "421 4.4.2
    ... timeout exceeded", or has closed the connection already. Once DATA
    was accepted the server may hold the message, and after a timeout it may
    still be working on it: both are left to the retry policy.
    """
    import smtplib

    if getattr(smtp, "data_accepted", False) or _timed_out(exc) or isinstance(exc, _smtplib_classes().HostileReply):
        return False
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return any(code == 421 for code, _ in exc.recipients.values())
    if isinstance(exc, smtplib.SMTPResponseException):
        return exc.smtp_code == 421
    return True  # closed without a reply


def _timed_out(exc: BaseException) -> bool:
    """Whether an exception is (or was raised from) a timeout."""
    return isinstance(exc, (_smtplib_classes().DeadlinePassed, TimeoutError)) or isinstance(exc.__context__, TimeoutError)


def classify(exc: OSError | ValueError, server: str) -> Outcome:
    """What the caller does next after an SMTP or socket exception (SMTPException is an OSError)."""
    import smtplib

    if not isinstance(exc, OSError):  # a ValueError: smtplib could not read a reply (an AUTH challenge that is not base64)
        return Outcome("retryable", error=f"{server}: smtplib cannot read the server's reply ({type(exc).__name__}: {exc})", condition="connection")
    if isinstance(exc, Unreachable):
        return Outcome("retryable", error=f"{server}: {exc}", condition="connection", unreachable=True)
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return _refused(exc.recipients)
    if isinstance(exc, smtplib.SMTPResponseException):
        return _reply(exc.smtp_code, exc.smtp_error)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        condition = "timeout" if _timed_out(exc) else "connection"
        return Outcome("retryable", error=f"{server}: {exc}", condition=condition)
    if isinstance(exc, smtplib.SMTPException):  # no STARTTLS, no AUTH, no usable AUTH mechanism: a config problem
        return Outcome("paused", error=f"{server}: {exc}; check security, username and password", condition="config")
    if isinstance(exc, ssl.SSLCertVerificationError):
        error = f"{server}: TLS certificate not trusted ({exc.verify_message}); trust a private CA with ca_file"
        return Outcome("paused", error=error, condition="tls")
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return Outcome("paused", error=f"{server}: TLS failed ({exc}); check port and security", condition="tls")
    if isinstance(exc, TimeoutError):
        return Outcome("retryable", error=f"{server}: timed out", condition="timeout")
    return Outcome("retryable", error=f"{server}: {exc}", condition="connection")


def _reply(code: int, text: bytes | str) -> Outcome:
    """The Outcome of one SMTP reply that was not a success."""
    error = _reply_text(code, text)
    if code in _AUTH_CODES:
        return Outcome("paused", error=f"{error} (check username, password and security)", status_code=code, condition="auth")
    if 400 <= code < 500:
        return Outcome("retryable", error=error, status_code=code, condition="4xx")
    if 500 <= code < 600:
        return Outcome("failed", error=error, status_code=code)
    return Outcome("retryable", error=f"unexpected reply {error}", status_code=code, condition="connection")


def _refused(recipients: dict[str, tuple[int, bytes]]) -> Outcome:
    """Every recipient refused: the most hopeful of their replies decides."""
    outcomes = [_reply(code, text) for code, text in recipients.values()]
    decisive = min(outcomes, key=lambda outcome: _PRECEDENCE.index(outcome.status))
    listed = "; ".join(f"{addr}: {_reply_text(code, text)}" for addr, (code, text) in recipients.items())
    return Outcome(decisive.status, error=f"all recipients refused: {listed}", status_code=decisive.status_code, condition=decisive.condition)


def _reply_text(code: int, text: bytes | str) -> str:
    """'550 5.1.1 no such user' from a code and the server's reply."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if len(text) > _REPLY_SHOWN:  # a reply may be 64 KB: keep the log and the ledger readable
        text = text[:_REPLY_SHOWN] + f"… ({len(text)} characters)"
    return f"{code} {text}"


def _tls_context(config: SmtpConfig, base_dir: Path | None) -> ssl.SSLContext | None:
    """A verifying TLS context (trusting only ca_file when given), or None without TLS."""
    if config.security == "none":
        return None
    ca_file = (base_dir or Path.cwd()) / config.ca_file if config.ca_file else None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise SinkError(f"ca_file {ca_file}: not a readable CA certificate ({exc}); give a PEM file") from None

"""The ``smtp`` connector: ``message > send`` over one reused SMTP connection with verified TLS.

One connection is opened on the first send, upgraded with STARTTLS (or opened
with implicit TLS for ``security = "ssl"``), logged in once, and reused by
every later send; calls from several threads take turns on it. A reused
connection that the server closed meanwhile is reopened once, at once; the
retry carries the same Message-ID, so a receiver that honours it shows the
message once. TLS is always verified against the system's CAs, or against
``ca_file`` for a private CA (smtplib's own default verifies nothing).

Outcomes (``status_code`` holds the SMTP reply code, ``error`` the reply)::

    250                                  succeeded  output {"message_id", "refused"}
    4xx reply (421, 450, 451, 452, ...)  retryable  condition "5xx" (the retry
                                                    policy's server-side-temporary class)
    timeout                              retryable  condition "timeout"
    dropped or refused connection        retryable  condition "connection"
    5xx reply (550, 553, 554, ...)       failed
    530, 534, 535, 538 (authentication)  paused     condition "auth"
    untrusted certificate, TLS failure   paused     condition "tls"
    server lacks STARTTLS or AUTH        paused     condition "config"
    invalid address, unsafe header       failed     nothing was sent

Every recipient refused is classified by the most hopeful code (paused, then
retryable, then failed); some refused is a success that lists them in
``output["refused"]``.
"""
from __future__ import annotations

import smtplib
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable, Literal

from loguru import logger
from pydantic import BaseModel, Field, SecretStr, model_validator

from sinks.base import Action, ActionError, ConnectorConfig, Outcome, Seconds, SinkError
from sinks.message import SEND, InvalidMessage, Mail, MessageInput, Sender, compose

REFUSAL_HOLD = 30.0  # seconds a refused login/TLS answers `paused` without connecting (below the agent's 60 s probe)
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
    timeout: Seconds = 30.0
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


SmtpFactory = Callable[[SmtpConfig, ssl.SSLContext | None], smtplib.SMTP]


def connect(config: SmtpConfig, context: ssl.SSLContext | None) -> smtplib.SMTP:
    """Open a connection (implicit TLS for ``security = "ssl"``); STARTTLS and login are the connector's."""
    if config.security == "ssl":
        return smtplib.SMTP_SSL(config.host, config.port, timeout=config.timeout, context=context)
    return smtplib.SMTP(config.host, config.port, timeout=config.timeout)


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
        with self._lock:
            if self._refusal is not None and self._clock() < self._refusal[0]:
                return self._refusal[1]  # calls queued behind a refused login do not log in again
            try:
                refused = self._send(mail)
            except OSError as exc:  # SMTPException, ssl.SSLError and TimeoutError included
                if not isinstance(exc, (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused)):
                    self._discard()  # a reply leaves the session usable (smtplib sent RSET); anything else may not
                outcome = self._outcome(exc)
                self._refusal = (self._clock() + REFUSAL_HOLD, outcome) if outcome.status == "paused" else None
                return outcome
            self._refusal = None
        output = {"message_id": mail.message_id, "refused": {addr: _reply_text(code, text) for addr, (code, text) in refused.items()}}
        return Outcome.ok(output, status_code=250)

    def close(self) -> None:
        """Say QUIT and close the connection, if one is open."""
        with self._lock:
            if self._smtp is not None and self._smtp.sock is not None:
                try:
                    self._smtp.quit()
                except OSError:
                    pass
            self._discard()

    def _send(self, mail: Mail) -> dict[str, tuple[int, bytes]]:
        """One SMTP transaction; a reused connection the server dropped is reopened once."""
        reused = self._smtp is not None and self._smtp.sock is not None
        try:
            return self._connection().sendmail(mail.sender, mail.recipients, mail.raw)
        except smtplib.SMTPServerDisconnected as exc:
            self._discard()
            # after a timeout the server may hold the message already: leave the retry to the policy
            if not reused or isinstance(exc.__context__, TimeoutError):
                raise
        logger.debug("smtp {}: the server closed the connection; reconnecting", self._server)
        return self._connection().sendmail(mail.sender, mail.recipients, mail.raw)

    def _connection(self) -> smtplib.SMTP:
        """The open connection, or a new one: secured and logged in."""
        if self._smtp is None or self._smtp.sock is None:
            self._smtp = self._open()
        return self._smtp

    def _open(self) -> smtplib.SMTP:
        """Connect, STARTTLS when configured (never falling back to plain text), log in."""
        smtp = self._factory(self.config, self._context)
        try:
            if self.config.security == "starttls":
                smtp.starttls(context=self._context)
            if self.config.username is not None:
                smtp.login(self.config.username, self.config.password.get_secret_value())
        except BaseException:
            smtp.close()
            raise
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


def classify(exc: OSError, server: str) -> Outcome:
    """What the caller does next after an SMTP or socket exception (SMTPException is an OSError)."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return _refused(exc.recipients)
    if isinstance(exc, smtplib.SMTPResponseException):
        return _reply(exc.smtp_code, exc.smtp_error)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        condition = "timeout" if isinstance(exc.__context__, TimeoutError) else "connection"
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
        return Outcome("retryable", error=error, status_code=code, condition="5xx")
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

"""The email message shared by the smtp and mailbox connectors: its input model and how it is built.

``compose`` turns a rendered ``message > send`` input into a ``Mail``: the
envelope (MAIL FROM, every RCPT TO) and the bytes of the message. Everything
that comes from a record is checked here, so a bad value is a per-record
``InvalidMessage`` naming the field and the value, never a header injection:

- every header value is refused when it holds a control character, raw or
  RFC 2047-encoded (``sinks.base.header_safe``; CVE-2024-6923);
- addresses are parsed with ``email.utils.getaddresses`` and each must be a
  plain ASCII ``local@domain``; a string is a comma-separated list, while a
  list item is exactly one address (so a record value with a comma cannot
  add recipients when the config uses the list form);
- Bcc goes into the envelope only, never into a header.

The Message-ID is ``<key@sender-domain>`` (the idempotency key on the left):
a retry re-sends the same Message-ID, and a domain that is a real FQDN keeps
spam filters from scoring a made-up one.
"""
from __future__ import annotations

import email.policy
import email.utils
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from sinks.base import Action, ActionError, header_safe

SEND = Action("message", "send")

# 7bit: a non-ASCII body goes out quoted-printable or base64, so no server needs 8BITMIME.
_POLICY = email.policy.SMTP.clone(cte_type="7bit")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ADDR = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*")
_KEY = re.compile(r"[A-Za-z0-9._+=-]+")


class InvalidMessage(ValueError):
    """A rendered message input that cannot be sent as it is; the text names the field and value."""


def check_sender(value: str) -> str:
    """Validate a configured sender: one address, optionally with a display name."""
    _one_address("sender", value)
    return value


Sender = Annotated[str, AfterValidator(check_sender)]
# `addresses`: the agent splits a configured "a@x, {{ record.Email }}" on its commas BEFORE rendering, so a
# comma inside record data can never add a recipient (each piece must render to exactly one address)
Addresses = Annotated[str | list[str], Field(json_schema_extra={"addresses": True})]


class MessageInput(BaseModel):
    """Input of ``message > send``; address fields take a list or a comma-separated string."""

    # a template that is one {{ expression }} keeps its type: subject = "{{ record.Number }}" may be an int
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    to: Addresses
    cc: Addresses = Field([], json_schema_extra={"addresses": True})
    bcc: Addresses = Field([], json_schema_extra={"addresses": True})
    reply_to: Addresses = Field([], json_schema_extra={"addresses": True})
    subject: str
    text: str | None = None
    html: str | None = Field(None, json_schema_extra={"autoescape": True})

    @model_validator(mode="after")
    def _has_body(self) -> "MessageInput":
        if self.text is None and self.html is None:
            raise ValueError("give text, html or both")
        return self


@dataclass(frozen=True)
class Mail:
    """A composed message: its envelope and its bytes."""

    sender: str  # MAIL FROM
    recipients: list[str]  # RCPT TO: to, cc and bcc
    message_id: str
    raw: bytes

    @property
    def key(self) -> str:
        """The idempotency key carried in the Message-ID."""
        return message_key(self.message_id)


def message_key(message_id: str) -> str:
    """The left part of a Message-ID: ``<key@domain>`` -> ``key``."""
    return message_id.strip().strip("<>").rpartition("@")[0]


def compose(data: dict[str, Any] | MessageInput, *, sender: str, key: str, now: float, linesep: str = "\r\n") -> Mail:
    """Validate a rendered message input and build its envelope and bytes; raise InvalidMessage."""
    if not _KEY.fullmatch(key):
        raise ActionError(f"idempotency key {key!r} cannot be a Message-ID")  # a programming mistake, not a record's
    try:
        message = MessageInput.model_validate(data)
    except ValidationError as exc:
        raise InvalidMessage("; ".join(_explain(error) for error in exc.errors())) from None
    fields = {name: _addresses(name, getattr(message, name)) for name in ("to", "cc", "bcc", "reply_to")}
    if not fields["to"]:
        raise InvalidMessage(f"to: no recipient in {message.to!r}")
    if not header_safe(message.subject):
        raise InvalidMessage(f"subject: {message.subject!r} holds a control character (raw or encoded)")
    from_address = _one_address("sender", sender)
    message_id = f"<{key}@{from_address.domain}>"
    try:
        built = _build(message, fields, sender=sender, message_id=message_id, now=now)
        raw = built.as_bytes(policy=_POLICY.clone(linesep=linesep))
    except (UnicodeError, ValueError) as exc:  # e.g. a lone surrogate from a record
        raise InvalidMessage(f"message cannot be encoded: {exc}") from None
    recipients = _unique(a.addr_spec for name in ("to", "cc", "bcc") for a in fields[name])
    return Mail(from_address.addr_spec, recipients, message_id, raw)


def _explain(error: dict[str, Any]) -> str:
    """One pydantic error as 'field: message'."""
    where = ".".join(str(part) for part in error["loc"]) or "message"
    return f"{where}: {error['msg']}"


def _build(message: MessageInput, fields: dict[str, list[Address]], *, sender: str, message_id: str, now: float) -> EmailMessage:
    """The EmailMessage with headers and body; Bcc is left out on purpose."""
    built = EmailMessage(policy=_POLICY)
    built["From"] = sender
    built["To"] = fields["to"]
    for header, name in (("Cc", "cc"), ("Reply-To", "reply_to")):
        if fields[name]:
            built[header] = fields[name]
    built["Subject"] = message.subject
    built["Date"] = email.utils.format_datetime(datetime.fromtimestamp(now, timezone.utc))
    built["Message-ID"] = message_id
    built["Auto-Submitted"] = "auto-generated"  # RFC 3834: keeps vacation responders from answering
    if message.text is not None:
        built.set_content(message.text)
        if message.html is not None:
            built.add_alternative(message.html, subtype="html")
    else:
        built.set_content(message.html, subtype="html")
    return built


def _addresses(field: str, value: Addresses) -> list[Address]:
    """Parse an address field: a string is comma-separated, a list item is exactly one address."""
    if isinstance(value, str):
        return _parse(field, value)
    found = []
    for item in value:
        if item.strip():
            found.append(_one_address(field, item))
    return found


def _one_address(field: str, value: str) -> Address:
    """Exactly one address, or InvalidMessage."""
    parsed = _parse(field, value)
    if len(parsed) != 1:
        raise InvalidMessage(f"{field}: {value!r} is not exactly one address")
    return parsed[0]


def _parse(field: str, value: str) -> list[Address]:
    """Every address in a header value, each checked; InvalidMessage names the bad one."""
    if not header_safe(value):
        raise InvalidMessage(f"{field}: {value!r} holds a control character (raw or encoded)")
    found = []
    for name, addr in email.utils.getaddresses([value]):
        # getaddresses (3.11.7, before the strict mode of CVE-2023-27043) yields ('', '') for what it cannot parse
        if not _ADDR.fullmatch(addr):
            raise InvalidMessage(f"{field}: {value!r} is not a valid address")
        try:
            found.append(Address(display_name=name, addr_spec=addr))
        except (ValueError, IndexError):
            raise InvalidMessage(f"{field}: {value!r} is not a valid address") from None
    return found


def _unique(addresses) -> list[str]:
    """Addresses in order, each once (case-insensitive)."""
    seen: dict[str, str] = {}
    for address in addresses:
        seen.setdefault(address.lower(), address)
    return list(seen.values())

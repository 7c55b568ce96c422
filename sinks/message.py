"""The email message shared by the smtp and mailbox connectors: its input model and how it is built.

``compose`` turns a rendered ``message > send`` input into a ``Mail``: the
envelope (MAIL FROM, every RCPT TO) and the bytes of the message. Everything
that comes from a record is checked here, so a bad value is a per-record
``InvalidMessage`` naming the field and the value, never a header injection:

- every header value is refused when it holds a control character, raw or
  RFC 2047-encoded (``sinks.base.header_safe``; CVE-2024-6923), or an
  encoded word in a charset Python does not know;
- addresses are parsed with ``email.utils.getaddresses`` and each must be a
  plain ASCII ``local@domain`` within RFC 5321's limits (local part 64,
  domain 255, address 254 octets); a string is a comma-separated list, while
  a list item is exactly one address (so a record value with a comma cannot
  add recipients when the config uses the list form);
- a subject or display name longer than 2,000 characters is cut, ending in
  "…", before the message is built: folding a long header takes time
  quadratic in its length (a 600 KB subject took 95 s); for the same reason
  a field holds at most ``MAX_ADDRESSES`` addresses and ``MAX_NAMES``
  characters of display names;
- Bcc goes into the envelope only, never into a header.

Composing is on the path of every send, so what does not depend on the
record is done once per sender (its parsed address, its From line), and a
short plain header value (see ``_PLAIN``) is written as the library would
write it instead of being parsed and folded again; anything else goes through
the library's parser and folder.

Whatever the email library cannot take (a RecursionError on ``"(" * 3000``)
is an ``InvalidMessage`` naming the field too, never an exception.

The Message-ID is ``<key@sender-domain>`` (the idempotency key on the left):
a retry re-sends the same Message-ID, and a domain that is a real FQDN keeps
spam filters from scoring a made-up one.
"""
from __future__ import annotations

import email.policy
import email.utils
import functools
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from email.headerregistry import Address, HeaderRegistry
from email.message import EmailMessage
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from sinks.base import Action, ActionError, header_safe

SEND = Action("message", "send")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ADDR = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*")
_KEY = re.compile(r"[A-Za-z0-9._+=-]+")
MAX_SUBJECT = 2000  # characters; a longer subject is cut and ends in an ellipsis
MAX_NAME = 2000  # characters of a display name, cut likewise
MAX_ADDRESSES = 1000  # per field
MAX_NAMES = 8000  # characters of all display names in one field: folding them costs up to 0.25 ms a character
_MAX_LOCAL, _MAX_DOMAIN, _MAX_ADDRESS = 64, 255, 254  # octets, RFC 5321 4.5.3.1
# what the email library raises on odd input; AttributeError: a display name of only "." (". <a@example.org>")
_UNREADABLE = (LookupError, RecursionError, ValueError, IndexError, TypeError, AttributeError)
# A header value the library's parser and folder give back as it is: printable ASCII without an encoded word
# (parsing decodes "=?...?="); when it also fits on a line, it is written without them.
_PLAIN = re.compile(r"[ -~]+")
_LINE = 78  # characters of a header line before the policy folds it


class _Registry(HeaderRegistry):
    """The email library's header registry, making each header class once instead of once per header."""

    def __init__(self):
        super().__init__()
        self._made: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        made = self._made.get(name.lower())
        if made is None:
            made = self._made[name.lower()] = super().__getitem__(name)
        return made


# 7bit: a non-ASCII body goes out quoted-printable or base64, so no server needs 8BITMIME.
_POLICY = email.policy.SMTP.clone(cte_type="7bit", header_factory=_Registry())
_POLICIES = {"\r\n": _POLICY, "\n": _POLICY.clone(linesep="\n")}


class InvalidMessage(ValueError):
    """A rendered message input that cannot be sent as it is; the text names the field and value."""


def check_sender(value: str) -> str:
    """Validate a configured sender: one address, optionally with a display name, that a From header can carry."""
    _sender(value)
    _from_line(value, _POLICY)
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
        raise InvalidMessage(f"to: no recipient in {_show(message.to)}")
    subject = _cut(message.subject, MAX_SUBJECT)
    _check_header("subject", subject)
    from_address = _sender(sender)
    message_id = f"<{key}@{from_address.domain}>"
    policy = _POLICIES.get(linesep) or _POLICY.clone(linesep=linesep)
    raw = b"".join(_head(fields, subject=subject, sender=sender, message_id=message_id, now=now, policy=policy)) + _body(message, policy)
    recipients = _unique(a.addr_spec for name in ("to", "cc", "bcc") for a in fields[name])
    return Mail(from_address.addr_spec, recipients, message_id, raw)


def _explain(error: dict[str, Any]) -> str:
    """One pydantic error as 'field: message'."""
    where = ".".join(str(part) for part in error["loc"]) or "message"
    return f"{where}: {error['msg']}"


def _head(fields: dict[str, list[Address]], *, subject: str, sender: str, message_id: str, now: float,
          policy: email.policy.EmailPolicy) -> list[bytes]:
    """The message's own header lines, folded; Bcc is left out on purpose."""
    date = email.utils.format_datetime(datetime.fromtimestamp(now, timezone.utc))
    head = [_from_line(sender, policy)]
    for header, field in (("To", "to"), ("Cc", "cc"), ("Reply-To", "reply_to")):
        if fields[field]:
            head.append(_line(header, field, fields[field], policy))
    if subject:
        head.append(_line("Subject", "subject", subject, policy))
    head.append(_line("Date", "date", date, policy))
    head.append(_line("Message-ID", "key", message_id, policy))
    head.append(_line("Auto-Submitted", "", "auto-generated", policy))  # RFC 3834: keeps vacation responders from answering
    return head


@functools.lru_cache(maxsize=16)
def _from_line(sender: str, policy: email.policy.EmailPolicy) -> bytes:
    """The From line, the same for every message of a sender: always the library's (it repairs an odd sender)."""
    return _folded("From", "sender", sender, policy)


def _line(header: str, field: str, value: str | list[Address], policy: email.policy.EmailPolicy) -> bytes:
    """One header line as the email library folds it.

    A short plain value (a subject, a date, a Message-ID, addresses the
    library's own ``Address`` wrote) is written as it is: parsing and folding
    it would give the same line (tests/test_message.py compares both), and
    the two were most of what composing a message cost.
    """
    text = value if isinstance(value, str) else ", ".join(str(address) for address in value)
    if len(header) + 2 + len(text) <= _LINE and _PLAIN.fullmatch(text) and "=?" not in text:
        return f"{header}: {text}{policy.linesep}".encode("ascii")
    return _folded(header, field, value, policy)


def _folded(header: str, field: str, value: str | list[Address], policy: email.policy.EmailPolicy) -> bytes:
    """One header line parsed and folded by the email library; InvalidMessage names the field of a value it cannot take."""
    try:
        parsed = policy.header_store_parse(header, value)[1]
    except _UNREADABLE as exc:
        raise InvalidMessage(f"{field}: cannot be put in a header ({type(exc).__name__}: {_show(str(exc))})") from None
    try:
        return policy.fold_binary(header, parsed)
    except (UnicodeError, *_UNREADABLE) as exc:
        raise InvalidMessage(f"{field}: cannot be encoded ({type(exc).__name__}: {_show(str(exc))})") from None


def _body(message: MessageInput, policy: email.policy.EmailPolicy) -> bytes:
    """The MIME headers and body (text, html or both as alternatives), written with the policy's line ends."""
    body = EmailMessage(policy=_POLICY)  # a base64 body encodes CRLF line ends, whatever the file's line ends are
    try:
        if message.text is not None:
            body.set_content(message.text)
            if message.html is not None:
                body.add_alternative(message.html, subtype="html")
        else:
            body.set_content(message.html, subtype="html")
        return body.as_bytes(policy=policy)
    except (UnicodeError, *_UNREADABLE) as exc:  # e.g. a lone surrogate from a record
        raise InvalidMessage(f"text or html: cannot be encoded ({type(exc).__name__}: {_show(str(exc))})") from None


def _addresses(field: str, value: Addresses) -> list[Address]:
    """Parse an address field: a string is comma-separated, a list item is exactly one address."""
    if isinstance(value, str):
        found = _parse(field, value)
    elif len(value) > MAX_ADDRESSES:
        raise InvalidMessage(f"{field}: {len(value)} addresses; a field holds at most {MAX_ADDRESSES}")
    else:
        found = [_one_address(field, item) for item in value if item.strip()]
    names = sum(len(address.display_name) for address in found)
    if names > MAX_NAMES:
        raise InvalidMessage(f"{field}: display names of {names} characters in all; a field holds at most {MAX_NAMES}")
    return found


@functools.lru_cache(maxsize=16)
def _sender(value: str) -> Address:
    """The configured sender's address, parsed once."""
    return _one_address("sender", value)


def _one_address(field: str, value: str) -> Address:
    """Exactly one address, or InvalidMessage."""
    parsed = _parse(field, value)
    if len(parsed) != 1:
        raise InvalidMessage(f"{field}: {_show(value)} is not exactly one address")
    return parsed[0]


def _parse(field: str, value: str) -> list[Address]:
    """Every address in a header value, each checked; InvalidMessage names the bad one."""
    _check_header(field, value)
    try:
        pairs = email.utils.getaddresses([value])
    except _UNREADABLE as exc:  # RecursionError on "(" * 3000: comments nest without end
        raise InvalidMessage(f"{field}: {_show(value)} is not a valid address ({type(exc).__name__})") from None
    if len(pairs) > MAX_ADDRESSES:
        raise InvalidMessage(f"{field}: {len(pairs)} addresses; a field holds at most {MAX_ADDRESSES}")
    found = []
    for name, addr in pairs:
        # getaddresses (3.11.7, before the strict mode of CVE-2023-27043) yields ('', '') for what it cannot parse
        if not _ADDR.fullmatch(addr):
            raise InvalidMessage(f"{field}: {_show(value)} is not a valid address")
        local, _, domain = addr.rpartition("@")
        if len(local) > _MAX_LOCAL or len(domain) > _MAX_DOMAIN or len(addr) > _MAX_ADDRESS:
            raise InvalidMessage(f"{field}: {_show(addr)} is longer than RFC 5321 allows "
                                 f"(local part {_MAX_LOCAL}, domain {_MAX_DOMAIN}, address {_MAX_ADDRESS} octets)")
        try:
            if "=?" in local:  # the library reads an encoded word there and may refuse the address: it decides
                found.append(Address(display_name=_cut(name, MAX_NAME), addr_spec=addr))
            else:  # a dot-atom _ADDR matched: the library's parse would find these same two parts
                found.append(Address(display_name=_cut(name, MAX_NAME), username=local, domain=domain))
        except _UNREADABLE:
            raise InvalidMessage(f"{field}: {_show(value)} is not a valid address") from None
    return found


def _check_header(field: str, value: str) -> None:
    """InvalidMessage unless a header value is safe to pass on and readable."""
    try:
        safe = header_safe(value)
    except LookupError:  # an encoded word in a charset Python does not know: =?x-unknown?q?hi?=
        raise InvalidMessage(f"{field}: {_show(value)} holds an encoded word in an unknown charset") from None
    if not safe:
        raise InvalidMessage(f"{field}: {_show(value)} holds a control character (raw or encoded)")


def _cut(text: str, limit: int) -> str:
    """At most `limit` characters; a longer text is cut and ends in an ellipsis."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _show(value: Any, limit: int = 80) -> str:
    """A value for an error message: its repr, cut when long, so a 600 KB value does not fill the log."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} characters)"
    return repr(value)


def _unique(addresses) -> list[str]:
    """Addresses in order, each once (case-insensitive)."""
    seen: dict[str, str] = {}
    for address in addresses:
        seen.setdefault(address.lower(), address)
    return list(seen.values())

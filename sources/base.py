"""The source contract: a Source yields pages of records.

A source is constructed from its validated ``Config`` plus injected I/O
(``session=`` for HTTP) and offers one method::

    pages(params: dict[str, str]) -> Iterator[Page]

``params`` are the query parameters already rendered by the agent (the
cursor templates live in the agent, not here). Pages stream: a source
holds the page it handed over and at most one more (a page read ahead).

Errors, named by what the caller does next::

    SourceError                 base of everything a source raises
    └── PageError               this poll fails here; what was admitted stays,
                                the cursor stays, try again next poll
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Protocol

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from durations import DAY, seconds  # the duration types; agent.config reads them here


class SourceError(Exception):
    """Base of every error a source raises."""


class PageError(SourceError):
    """A page could not be read; the poll of this source fails at this page."""

    def __init__(self, message: str, *, page: int | None = None, status: int | None = None):
        super().__init__(message)
        self.page = page
        self.status = status


@dataclass
class Page:
    """One page of records as the view returned it (1-based ``number``)."""

    number: int
    records: list[Any]
    where: str = ""  # a human description of the page: URL without secrets, or file + line
    meta: dict[str, Any] = field(default_factory=dict)


class Source(Protocol):
    def pages(self, params: dict[str, str]) -> Iterator[Page]: ...


# Any duration: never negative, and short enough for date arithmetic (a 1e300 s `overlap` overflows a datetime).
Seconds = seconds(0, 3650 * DAY)
# How long one exchange with a server may take: too short fails every poll, longer than an hour is a hang.
Timeout = seconds(0.1, 3600)
Interval = seconds(1, 30 * DAY)  # between polls: below a second the scheduler spins
Window = seconds(60, 3650 * DAY)  # how far back a view reaches; seen keys are forgotten after it
Overlap = seconds(0, 30 * DAY)  # read back from the cursor


class SourceConfig(BaseModel):
    """Fields every source kind shares (the agent reads these; the kind reads its own)."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    records: str = "records"
    id: str = "id"
    updated: str | None = None
    entity: str | None = None
    dedupe: Literal["id", "id+updated", "content"] = "id"
    first_run: Literal["skip", "deliver"] = "skip"
    supersede: bool = False
    every: Interval = 300.0
    at: str | None = None
    timezone: str | None = None
    window: Window | None = None
    overlap: Overlap = 60.0
    max_record_bytes: int = 16 * 1024 * 1024
    max_page_bytes: int = Field(64 * 1024 * 1024, ge=1)  # of a body as parsed (inflated); a bigger page fails the poll
    max_records_per_page: int = Field(100_000, ge=1)  # parsed records cost far more memory than their text

    @field_validator("at")
    @classmethod
    def _clock_time(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d(:[0-5]\d)?", value):
            raise ValueError(f"{value!r} is not a time of day; write 'HH:MM' such as '02:00'")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        try:
            return value if value is None else str(ZoneInfo(value))
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone; write an IANA name such as 'Europe/Berlin'") from None


def parse_json(raw: bytes, what: str, page: int, excerpt: str = "") -> Any:
    """Strict UTF-8, then JSON; every failure a PageError starting with `what` ("file.json:", "page 2 of GET …: body is").

    Lone surrogates pass (the agent quarantines those records)."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PageError(f"{what} not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})", page=page) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PageError(f"{what} not JSON ({exc.msg}; line {exc.lineno} column {exc.colno}){': ' + excerpt if excerpt else ''}", page=page) from None
    except (ValueError, RecursionError) as exc:
        raise PageError(f"{what} not usable JSON ({type(exc).__name__}: {str(exc)[:120]})", page=page) from None


def counted(records: list[Any], cap: int, where: str, page: int) -> list[Any]:
    """`records`, or a PageError when there are more than `cap` of them (`where` names the page)."""
    if len(records) > cap:
        raise PageError(f"{where}: {len(records):,} records, over max_records_per_page = {cap:,}; "
                        "raise max_records_per_page if the view's pages are that long, or ask for smaller pages", page=page)
    return records


def dig(body: Any, path: str) -> Any:
    """Follow a dotted path ('data.items') into a JSON body; '' is the body itself."""
    node = body
    for part in path.split(".") if path else []:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and 0 <= _index(part) < len(node):
            node = node[_index(part)]
        else:
            raise KeyError(path)
    return node


def _index(part: str) -> int:
    """A path part as a list index, or -1: only ASCII digits ("²".isdigit() is true, int() refuses it), and few of them."""
    return int(part) if part.isascii() and part.isdigit() and len(part) <= 18 else -1

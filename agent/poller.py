"""Poll one source: stream its pages, identify and admit records, then move the cursor.

A poll that fails half-way keeps what it admitted (those records are safe)
and leaves the cursor where it was; the next poll starts from the old cursor
and the ledger absorbs the overlap.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from loguru import logger

from agent.config import Config
from agent.templates import RenderError, Templates
from sources.base import Page, SourceConfig, SourceError
from state.ledger import Admission, Ledger


class BadRecord(ValueError):
    """A record that cannot be admitted (it is quarantined, the page goes on)."""


@dataclass
class PollResult:
    source: str
    pages: int = 0
    fetched: int = 0
    new: int = 0
    primed: int = 0
    duplicates: int = 0
    quarantined: int = 0
    superseded: int = 0
    error: str | None = None
    cursor: str | None = None
    bad: list[str] = field(default_factory=list)


def content_hash(record: Any) -> str:
    text = json.dumps(record, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _text_key(value: Any, name: str) -> str:
    """Strings and integers are ids; `1` and `"1"` are the same key. Anything else is bad."""
    if isinstance(value, bool) or value is None or isinstance(value, (float, list, dict)):
        raise BadRecord(f"field {name!r} is {json.dumps(value)[:40]}, not a usable id (strings and integers only)")
    text = str(value)
    if not text.strip():
        raise BadRecord(f"field {name!r} is empty")
    return text


def dedupe_key(record: Any, cfg: SourceConfig) -> tuple[str, str]:
    """(id, key) for the `id` and `id+updated` modes, cheaply: no hashing, no size check."""
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a JSON object, not {type(record).__name__}")
    if cfg.id not in record:
        raise BadRecord(f"no {cfg.id!r} field (the source's id)")
    rid = _text_key(record[cfg.id], cfg.id)
    if cfg.dedupe == "id+updated":
        updated = record.get(cfg.updated) if cfg.updated else None
        return rid, f"{rid}@{'' if updated is None else updated}"
    return rid, rid


def identify(record: Any, cfg: SourceConfig) -> Admission:
    """The record's dedupe key, version, hash and entity by the source's settings."""
    rid, key = dedupe_key(record, cfg)
    try:  # one canonical dump gives the hash, the size, and the check for broken Unicode
        canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")
    except UnicodeEncodeError as error:
        raise BadRecord(f"holds a lone surrogate (broken Unicode) at character {error.start}") from None
    if len(canonical) > cfg.max_record_bytes:
        raise BadRecord(f"record is {len(canonical)} bytes, over max_record_bytes = {cfg.max_record_bytes}")
    digest = hashlib.sha256(canonical).hexdigest()
    updated = record.get(cfg.updated) if cfg.updated else None
    version = "" if updated is None else str(updated)
    key = digest if cfg.dedupe == "content" else key
    entity = _text_key(record[cfg.entity], cfg.entity) if cfg.entity and record.get(cfg.entity) is not None else (rid if cfg.dedupe != "content" else key)
    return Admission(key=key, id=rid, version=version, hash=digest, entity=entity, context={"record": record})


def _parse_time(value: Any) -> datetime | float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        parsed = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def cursor_value(highest: Any, overlap: float) -> str | None:
    """The highest `updated` seen minus the overlap, in the view's own style where possible."""
    parsed = _parse_time(highest)
    if parsed is None:
        return None if highest is None else str(highest)
    if isinstance(parsed, float):
        scale = 1000.0 if parsed > 1e11 else 1.0  # epoch milliseconds vs seconds
        value = parsed - overlap * scale
        return str(int(value)) if float(value).is_integer() else str(value)
    moved = (parsed - timedelta(seconds=overlap)).astimezone(timezone.utc)
    return moved.strftime("%Y-%m-%dT%H:%M:%S") + (f".{moved.microsecond:06d}" if moved.microsecond else "") + "Z"


MAX_PASSES = 3  # reads of one view in one poll when its order shifts under the paging


@dataclass
class _PollState:
    cursor: str | None
    prime: bool
    flows: list
    highest: Any = None
    previous: set = field(default_factory=set)
    shifted: bool = False
    truncated: bool = False


class Poller:
    """Polls the configured sources into the ledger."""

    def __init__(self, config: Config, ledger: Ledger, sources: dict[str, Any], *, clock: Callable[[], float],
                 templates: Templates | None = None, failpoint: Callable[[str], None] = lambda name: None,
                 progress: Callable[[str], None] = lambda text: None):
        self.failpoint = failpoint
        self.progress = progress
        self.config = config
        self.ledger = ledger
        self.sources = sources
        self.clock = clock
        self.templates = templates or Templates()

    def poll(self, name: str) -> PollResult:
        cfg = self.config.sources[name]
        result = PollResult(name)
        log = logger.bind(source=name)
        row = self.ledger.cursor(name)
        cursor = row["value"] if row else None
        prime = cfg.first_run == "skip" and not (row and row["last_success"] is not None)  # no good poll yet: first run
        flows = [(flow.name, cfg.supersede) for flow in self.config.flows_of(name)]
        self._warn_gap(name, cfg, row, log)
        started = self.clock()
        poll_id = self.ledger.start_poll(name, started)
        state = _PollState(cursor=cursor, prime=prime, flows=flows)
        try:
            params = {k: str(v) for k, v in self.templates.render(getattr(cfg, "params", {}) or {}, {"cursor": cursor or "", "source": name, "now": started}).items()}
            for number in range(1, MAX_PASSES + 1):
                state.previous, state.shifted = set(), False
                for page in self.sources[name].pages(params):
                    self.failpoint("after_fetch")
                    self._page(name, cfg, page, state, result, log)
                    self.progress(f"poll {name}: page {page.number}, {result.fetched} records, {result.new + result.primed} new")
                if not state.shifted or number == MAX_PASSES:
                    break
                log.info("{}: the view's order shifted while paging (a record showed on two pages); reading it again (pass {})", name, number + 1)
        except SourceError as error:
            result.error = str(error)
        except RenderError as error:
            result.error = f"params: {error}"
        if state.truncated:
            log.warning("{}: the poll stopped at paging.max_pages; the cursor stays so the older pages are not skipped", name)
        elif state.shifted:
            log.warning("{}: the view's order kept shifting over {} reads; the cursor stays so the next poll reads the same range", name, MAX_PASSES)
        elif state.highest is not None:
            result.cursor = cursor_value(state.highest, cfg.overlap)
        self.ledger.end_poll(poll_id, name, self.clock(), pages=result.pages, fetched=result.fetched, new=result.new,
                             primed=result.primed, quarantined=result.quarantined, error=result.error, cursor=result.cursor)
        self._log(result, log)
        return result

    def _page(self, name: str, cfg: SourceConfig, page: Page, state: "_PollState", result: PollResult, log) -> None:
        """Identify, quarantine and admit one page; note the highest `updated` and any shift."""
        known = self._known(name, cfg, page.records)
        good: list[Admission] = []
        keys: set[str] = set()
        for position, record in enumerate(page.records):
            if cfg.updated and isinstance(record, dict) and record.get(cfg.updated) is not None:
                state.highest = _later(state.highest, record[cfg.updated])
            seen_key = known.get(position)
            if seen_key is not None:  # seen before: it passed every check when it was admitted
                keys.add(seen_key)
                continue
            try:
                item = identify(record, cfg)
            except BadRecord as error:
                self._quarantine(name, page, position, record, str(error), result, log)
                continue
            item.context["cursor"] = state.cursor
            good.append(item)
            keys.add(item.key)
        state.shifted |= bool(keys & state.previous)  # only the previous page is kept: memory stays bounded by a page
        state.previous = keys
        state.truncated |= bool(page.meta.get("truncated"))
        admitted = self.ledger.admit(name, good, state.flows, self.clock(), prime=state.prime)
        result.pages += 1
        result.fetched += len(page.records)
        result.new += admitted.new
        result.primed += admitted.primed
        result.duplicates += admitted.duplicates + len(known)
        result.superseded += admitted.superseded
        log.debug("{} page {}: {} records, {} new", name, page.number, len(page.records), admitted.new + admitted.primed)

    def _known(self, name: str, cfg: SourceConfig, records: list) -> dict[int, str]:
        """position -> key of the records the ledger has seen (a re-poll skips hashing them)."""
        if cfg.dedupe == "content":
            return {}
        keyed = {}
        for position, record in enumerate(records):
            try:
                keyed[position] = dedupe_key(record, cfg)[1]
            except BadRecord:
                pass
        seen = self.ledger.seen(name, set(keyed.values()))
        return {position: key for position, key in keyed.items() if key in seen}

    def _quarantine(self, name: str, page: Page, position: int, record: Any, reason: str, result: PollResult, log) -> None:
        excerpt = json.dumps(record, ensure_ascii=True, default=str)[:300]
        first = self.ledger.quarantine(name, content_hash(record), reason, f"{page.where or page.number} record {position + 1}", excerpt, self.clock())
        result.quarantined += 1
        if first:
            result.bad.append(reason)
            log.warning("{}: {} record {} quarantined: {} — {}", name, page.where or f"page {page.number}", position + 1, reason, excerpt[:120])

    def _warn_gap(self, name: str, cfg: SourceConfig, row: dict | None, log) -> None:
        if cfg.window and row and row.get("last_success") and self.clock() - row["last_success"] > cfg.window:
            since = datetime.fromtimestamp(row["last_success"], timezone.utc).isoformat(timespec="seconds")
            log.warning("{}: no good poll since {}, longer than the view's window ({:.0f}s): records changed in between may have been missed", name, since, cfg.window)

    @staticmethod
    def _log(result: PollResult, log) -> None:
        summary = (f"poll {result.source}: {result.pages} pages, {result.fetched} records, {result.new} new, "
                   f"{result.primed} primed, {result.quarantined} quarantined")
        if result.error:
            log.error("{} — FAILED: {} (the cursor stays; next poll tries again)", summary, result.error)
        else:
            log.info(summary)


def _later(a: Any, b: Any) -> Any:
    """The later of two `updated` values (timestamps compared as times, not strings)."""
    if a is None:
        return b
    pa, pb = _parse_time(a), _parse_time(b)
    if pa is not None and pb is not None and type(pa) is type(pb):
        return b if pb > pa else a
    return b if str(b) > str(a) else a

"""Poll one source: stream its pages, identify and admit records, then move the cursor.

A poll that fails half-way keeps what it admitted (those records are safe)
and leaves the cursor where it was; the next poll starts from the old cursor
and the ledger absorbs the overlap.

A poll on demand with run parameters (``agent poll SOURCE --param sku=123``,
``POST /flows/NAME/run``) is an extra poll: ``{{ run.sku }}`` fills the
source's ``params`` and ``url`` templates (``run`` is an empty table on every
other poll), what it reads is de-duplicated (and primed, before the first good
poll) as usual, and it leaves the cursor, the last poll and the source's health
alone: the schedule and `status` go by scheduled polls only. Its summary is its
result (and the log), not a row in `polls`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from json.encoder import c_make_encoder, encode_basestring
from typing import Any, Callable
from urllib.parse import quote, urlsplit

from loguru import logger

from agent.config import Config
from agent.templates import RenderError, Templates
from sources.base import Page, SourceConfig, SourceError
from state.base import HASH_BYTES, Admission, LeaseLost, Ledger, LedgerError


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
    rekeyed: int = 0
    error: str | None = None
    cursor: str | None = None
    bad: list[str] = field(default_factory=list)
    run: dict[str, str] = field(default_factory=dict)  # the run parameters of a poll on demand (an extra poll)
    elsewhere: bool = False  # not polled here: another agent holds the source's lease
    scheduled: list[str] = field(default_factory=list)  # a run on demand: the keys it scheduled work for (MAX_RUN_KEYS at most)


def content_hash(record: Any) -> str:
    text = json.dumps(record, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _text_key(value: Any, name: str) -> str:
    """Strings and integers are ids; `1` and `"1"` are the same key. Anything else is bad."""
    if type(value) is str and value.strip() and "\x00" not in value:  # the usual id, passed on at once
        return value
    if isinstance(value, bool) or value is None or isinstance(value, (float, list, dict)):
        raise BadRecord(f"field {name!r} is {json.dumps(value)[:40]}, not a usable id (strings and integers only)")
    text = str(value)
    if not text.strip():
        raise BadRecord(f"field {name!r} is empty")
    if "\x00" in text:  # no ledger column can hold it (PostgreSQL text cannot), and no sink expects it in an id
        raise BadRecord(f"field {name!r} holds a NUL character, not a usable id")
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


_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str, allow_nan=False)
# The same encoder's C core built once: json.dumps builds an encoder and then its C core for every record. No
# circular-reference marks: a record parsed from JSON cannot hold a cycle. The bytes are json.dumps' exactly.
_canonical_chunks = (c_make_encoder(None, _CANONICAL.default, encode_basestring, None, ":", ",", True, False, False) if c_make_encoder
                     else lambda record, level: _CANONICAL.iterencode(record, _one_shot=True))


def canonical_json(record: Any) -> bytes:
    """The record as sorted, compact UTF-8 JSON: what its content hash is taken of (ValueError for NaN and infinities)."""
    return "".join(_canonical_chunks(record, 0)).encode("utf-8")


def identify(record: Any, cfg: SourceConfig, keys: tuple[str, str] | None = None) -> Admission:
    """The record's dedupe key, version, hash and entity by the source's settings (``keys``: its dedupe_key, when known)."""
    rid, key = keys or dedupe_key(record, cfg)
    try:  # one canonical dump gives the hash, the size, and the checks for broken Unicode and non-JSON numbers
        canonical = canonical_json(record)
    except UnicodeEncodeError as error:
        raise BadRecord(f"holds a lone surrogate (broken Unicode) at character {error.start}") from None
    except ValueError:  # NaN, Infinity, or a number too large for a float (1e400): sinks cannot carry them
        raise BadRecord("holds NaN, Infinity or a number out of range (not valid JSON)") from None
    if len(canonical) > cfg.max_record_bytes:
        raise BadRecord(f"record is {len(canonical)} bytes, over max_record_bytes = {cfg.max_record_bytes}")
    digest = hashlib.sha256(canonical).digest()
    updated = record.get(cfg.updated) if cfg.updated else None
    version = "" if updated is None else str(updated)
    if "\x00" in version:
        raise BadRecord(f"field {cfg.updated!r} holds a NUL character")
    key = digest.hex() if cfg.dedupe == "content" else key  # the whole SHA-256: keys of content sources always were
    entity = _text_key(record[cfg.entity], cfg.entity) if cfg.entity and record.get(cfg.entity) is not None else (rid if cfg.dedupe != "content" else key)
    return Admission(key=key, id=rid, version=version, hash=digest[:HASH_BYTES], entity=entity, context={"record": record})


FUTURE_TOLERANCE = 300.0  # seconds an `updated` may lie ahead of the agent's clock (clock skew) and still count


@dataclass(frozen=True)
class Stamp:
    """An `updated` value read as a time: its kind, epoch seconds, and the date-time for ISO text."""

    kind: str  # "iso" | "epoch_s" | "epoch_ms"
    seconds: float
    at: datetime | None = None


def read_stamp(value: Any) -> Stamp | None:
    """ISO 8601 text or an epoch number (seconds, or milliseconds above 1e11) as a Stamp; anything else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            return None
        if not math.isfinite(number):
            return None
        return Stamp("epoch_ms", number / 1000.0) if abs(number) > 1e11 else Stamp("epoch_s", number)
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
        return Stamp("iso", parsed.timestamp(), parsed)
    except (ValueError, OverflowError, OSError):
        return None


# ISO 8601 UTC text in fixed-width fields: two of the same length compare as text as their times compare.
_ISO_UTC = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?Z")


def _not_above(value: Any, highest: str | None) -> bool:
    """Whether `value` is, without parsing it, no later than `highest` (ISO UTC text of the _ISO_UTC shape).

    True only for text of that shape and length sorting at or below it: a valid time is then no later; an invalid
    one (month 13) is no time at all. Either way it cannot raise the cursor. False means: parse it to know."""
    return (highest is not None and type(value) is str and len(value) == len(highest) and value <= highest
            and _ISO_UTC.fullmatch(value) is not None)


def cursor_value(highest: Any, overlap: float) -> str | None:
    """The highest `updated` seen minus the overlap, in the view's own style; None when it is not a time."""
    stamp = read_stamp(highest)
    if stamp is None:
        return None
    if stamp.at is None:
        scale = 1000.0 if stamp.kind == "epoch_ms" else 1.0
        value = float(highest) - overlap * scale
        return str(int(value)) if float(value).is_integer() else str(value)
    try:
        moved = (stamp.at - timedelta(seconds=overlap)).astimezone(timezone.utc)
    except OverflowError:
        return None
    return moved.strftime("%Y-%m-%dT%H:%M:%S") + (f".{moved.microsecond:06d}" if moved.microsecond else "") + "Z"


MAX_PASSES = 3  # reads of one view in one poll when its order shifts under the paging
MAX_RUN_KEYS = 1000  # keys a run on demand remembers to report its deliveries (GET /runs/{id})


@dataclass
class _PollState:
    cursor: str | None
    flows: list
    started: float
    priming: float | None = None  # when priming began (first_run = "skip" and no good poll yet)
    rekey: bool = False  # the source identifies records differently since its last good poll
    kind: str | None = None  # the kind of time the cursor holds ("iso", "epoch_s", "epoch_ms")
    highest: Stamp | None = None
    highest_raw: Any = None
    highest_text: str | None = None  # highest_raw when it is ISO text in the fixed-width UTC shape (_ISO_UTC)
    unusable: list = field(default_factory=list)  # (record key, value, why) of new records whose `updated` cannot move the cursor
    checking: Stamp | bool | None = None  # a pass after the first: what the earlier pass had read up to (True: no time to go by)
    previous: set = field(default_factory=set)
    shifted: str = ""  # why this pass cannot be trusted to have read every record
    truncated: bool = False
    run: dict = field(default_factory=dict)  # run parameters: an extra poll, which leaves the cursor and the health alone
    source: Any = None  # what reads the view in this poll (the source, or a copy of it reading the rendered url)


class Poller:
    """Polls the configured sources into the ledger."""

    def __init__(self, config: Config, ledger: Ledger, sources: dict[str, Any], *, clock: Callable[[], float],
                 templates: Templates | None = None, failpoint: Callable[[str], None] = lambda name: None,
                 progress: Callable[[str], None] = lambda text: None, admitted: Callable[[], None] = lambda: None,
                 admitting: Callable[[str, set[str]], AbstractContextManager] = lambda source, entities: nullcontext()):
        self.failpoint = failpoint
        self.progress = progress
        self.admitted = admitted  # called once a page's new work is committed: delivery can start on it during the poll
        self.admitting = admitting  # held around each page's admission: it waits for sends of the page's entities in flight
        self.config = config
        self.ledger = ledger
        self.sources = sources
        self.clock = clock
        self.templates = templates or Templates()
        self.version: int | None = None  # the config version new executions are pinned to

    def poll(self, name: str, run: dict[str, str] | None = None) -> PollResult:
        """One poll; a bad value from the view or a bug fails this poll, never the agent, and what was admitted stays.

        With ``run`` parameters it is an extra poll (see the module docstring). When the source's lease passes to
        another agent during the poll, it ends at once: what was admitted stays, nothing more is written for it."""
        try:
            return self._poll(name, run)
        except LeaseLost as error:
            logger.bind(source=name).warning("{}: {}", name, error)
            return PollResult(name, run=dict(run or {}), error=str(error), elsewhere=True)

    def _poll(self, name: str, run: dict[str, str] | None) -> PollResult:
        cfg = self.config.sources[name]
        result = PollResult(name, run=dict(run or {}))
        log = logger.bind(source=name)
        identity = source_identity(cfg)
        row, rekey = self._identity_check(name, cfg, identity, log)
        if rekey:  # records known under the previous identity are found by their content: indexed for this poll only
            self.ledger.content_index(True)
        cursor = row["value"] if row else None
        flows = [(flow.name, cfg.supersede) for flow in self.config.flows_of(name)]
        self._warn_gap(name, cfg, row, log)
        started = self.clock()
        poll_id = None if result.run else self.ledger.start_poll(name, started)
        state = _PollState(cursor=cursor, flows=flows, started=started, rekey=rekey, run=result.run)
        state.kind = stamp.kind if (stamp := read_stamp(cursor)) else None
        if cfg.first_run == "skip" and not (row and row["last_success"] is not None):  # no good poll yet: first run
            state.priming = self.ledger.start_priming(name, started)
        try:
            self._read(name, cfg, state, result, log)
        except SourceError as error:
            result.error = str(error)
        except RenderError as error:
            result.error = str(error)
        except (LedgerError, LeaseLost):
            raise
        except Exception as error:  # a value no check foresaw: this poll fails, the records admitted so far stay
            log.opt(exception=error).debug("poll of {} failed unexpectedly", name)
            result.error = f"unexpected error while polling: {type(error).__name__}: {str(error)[:200]}"
        if state.truncated:
            log.warning("{}: the poll stopped at paging.max_pages; the cursor stays so the older pages are not skipped", name)
        elif state.shifted:
            log.warning("{}: {} on every one of {} reads; the cursor stays so the next poll reads the same range", name, state.shifted, MAX_PASSES)
        elif state.highest is not None and not state.run:  # an extra poll never moves the cursor
            result.cursor = cursor_value(state.highest_raw, cfg.overlap)
        self._report_unusable(name, cfg, state, log)
        self._report_priming(name, cfg, state, row, result, log)
        if result.rekeyed:
            log.warning("{}: re-keyed {} record(s): already known under the source's previous identity, now marked seen "
                        "under the new one; nothing is sent for them", name, result.rekeyed)
        if poll_id is not None:
            self.ledger.end_poll(poll_id, name, self.clock(), pages=result.pages, fetched=result.fetched, new=result.new,
                                 primed=result.primed, quarantined=result.quarantined, error=result.error, cursor=result.cursor,
                                 identity=json.dumps(identity, sort_keys=True))
            if rekey and result.error is None:  # the new identity is recorded: no poll re-keys until it changes again
                self.ledger.content_index(False)
        self._log(result, log)
        return result

    def _identity_check(self, name: str, cfg: SourceConfig, identity: dict, log) -> tuple[dict | None, bool]:
        """(cursor row, re-key?): another view is a new source; another way of keying records means re-keying."""
        row = self.ledger.cursor(name)
        stored = json.loads(row["identity"]) if row and row.get("identity") else None
        if stored is None or stored == identity:
            return row, False
        if stored.get("view") != identity["view"]:
            log.warning("{}: the source now reads another view (its kind, url or path changed): it is treated as a new source, "
                        "its cursor is reset and first_run = {!r} decides what is sent", name, cfg.first_run)
            self.ledger.new_view(name)
            return self.ledger.cursor(name), False
        changed = ", ".join(f"{key} {stored['key'].get(key)!r} -> {value!r}" for key, value in identity["key"].items() if stored["key"].get(key) != value)
        log.warning("{}: records are now identified differently ({}); records already known are recognised by their content "
                    "and marked seen under the new identity without being sent", name, changed)
        return row, True

    def _read(self, name: str, cfg: SourceConfig, state: "_PollState", result: PollResult, log) -> None:
        """Read the view, again (up to MAX_PASSES) when its order shifted or records left it while it was paged."""
        context = {"cursor": state.cursor or "", "source": name, "now": state.started, "run": dict(state.run)}
        try:
            params = {k: str(v) for k, v in self.templates.render(getattr(cfg, "params", {}) or {}, context).items()}
        except RenderError as error:
            raise RenderError(f"params: {error}") from None
        state.source = self._reader(name, cfg, context)
        for number in range(1, MAX_PASSES + 1):
            state.previous, state.shifted, pages = set(), "", 0
            for page in state.source.pages(params):
                self.failpoint("after_fetch")
                self._page(name, cfg, page, state, result, log)
                pages += 1  # the empty page that ends paging counts: records that left the view may have emptied it
                self.progress(f"poll {name}: page {page.number}, {result.fetched} records, {result.new + result.primed} new")
            # Records that leave the view while it is paged move others up onto pages already read: those are skipped,
            # and a cursor past them loses them for good. So a paged read that moves the cursor is read once more; it is
            # sound when that read finds nothing new but versions newer than the first read (or new records at the top).
            # A read of one full page and an empty one is paged too: the records that were to fill page 2 may be on page 1 now.
            verify = number == 1 and pages > 1 and not state.truncated and not state.shifted and _uses_cursor(cfg)
            if not (state.shifted or verify) or number == MAX_PASSES:
                return
            state.checking = state.highest or True
            if state.shifted:
                log.info("{}: {}; reading it again (pass {})", name, state.shifted, number + 1)

    def _reader(self, name: str, cfg: SourceConfig, context: dict[str, Any]) -> Any:
        """The source, or for a templated ``url`` a copy of it reading the rendered URL (same session, same worker)."""
        url = getattr(cfg, "url", None)
        if not url or not any(mark in url for mark in ("{{", "{%")):
            return self.sources[name]
        rendered = render_url(self.templates, url, context)
        reader = copy.copy(self.sources[name])  # shallow: one request in flight per view still holds across both
        reader.config = cfg.model_copy(update={"url": rendered})
        return reader

    def _page(self, name: str, cfg: SourceConfig, page: Page, state: "_PollState", result: PollResult, log) -> None:
        """Identify, quarantine and admit one page; note the highest usable `updated` and any shift."""
        keyed, known = self._known(name, cfg, page.records)
        good: list[Admission] = []
        keys: set[str] = set()
        places: dict[str, int] = {}  # key -> position, for the check of a later pass
        bad: set[int] = set()
        for position, record in enumerate(page.records):
            seen = known.get(position)
            if seen is not None:  # seen before: it passed every check when it was admitted
                keys.add(seen[0])
                self._note_updated(cfg, record, state, None)
                continue
            try:
                item = identify(record, cfg, keyed.get(position))
            except BadRecord as error:
                if state.checking is None:  # a later pass of the same poll meets it again: quarantined once per poll
                    self._quarantine(name, page, position, record, str(error), result, log)
                bad.add(position)
                continue
            item.context["cursor"] = state.cursor
            stamp = self._note_updated(cfg, record, state, item.key)
            item.version_at = stamp.seconds if stamp else None  # orders the entity's versions; a future date orders nothing
            # priming covers what the view showed when it began; a version dated after that is new: deliver it
            item.prime = state.priming is not None and not (item.version_at is not None and item.version_at > state.priming)
            good.append(item)
            keys.add(item.key)
            places.setdefault(item.key, position)
        if state.checking and good and not state.shifted:
            state.shifted = self._skipped(name, cfg, page, good, places, bad, state)
        if keys & state.previous:  # only the previous page is kept: memory stays bounded by a page
            state.shifted = "the view's order shifted while it was paged (a record showed on two pages)"
        state.previous = keys
        state.truncated |= bool(page.meta.get("truncated"))
        if state.rekey and good:  # the same content under the previous identity: a version already handled
            held = self.ledger.known_content(name, {item.hash for item in good})
            for item in good:
                item.rekeyed = item.hash in held
        shown = {key: last for key, last in known.values()}
        with self.admitting(name, {item.entity for item in good}):
            admitted = self.ledger.admit(name, good, state.flows, self.clock(), shown=shown, version=self.version)
        result.pages += 1
        result.fetched += len(page.records)
        result.new += admitted.new
        if admitted.new:
            self.admitted()
        if state.run:
            result.scheduled.extend(admitted.scheduled[:MAX_RUN_KEYS - len(result.scheduled)])
        result.primed += admitted.primed
        result.duplicates += admitted.duplicates + len(known)
        result.superseded += admitted.superseded
        result.rekeyed += admitted.rekeyed
        log.debug("{} page {}: {} records, {} new", name, page.number, len(page.records), admitted.new + admitted.primed)

    def _skipped(self, name: str, cfg: SourceConfig, page: Page, good: list[Admission], places: dict[str, int],
                 bad: set[int], state: "_PollState") -> str:
        """In a later pass: why a record new to the ledger is one the earlier pass skipped (empty: it is simply new).

        New since the earlier pass is a version dated after everything it read, or, without a usable date,
        a record at the top of page 1 (above every record read before)."""
        # `good` holds only keys the ledger did not know (see _known), except under content dedupe, which looks nothing up first
        held = self.ledger.seen(name, {item.key for item in good}) if cfg.dedupe == "content" else set()
        top = 0
        if page.number == 1:
            fresh = {places[item.key] for item in good if item.key not in held} | bad
            while top in fresh:
                top += 1
        newer = state.checking.seconds if isinstance(state.checking, Stamp) else None
        skipped = "records left the view while it was paged: a record the earlier read skipped turned up"
        for item in good:
            if item.key in held:
                continue
            if newer is not None and item.version_at is not None:  # dated: its time tells
                if item.version_at <= newer:
                    return skipped
            elif not (page.number == 1 and places[item.key] < top):
                return skipped
        return ""

    def _note_updated(self, cfg: SourceConfig, record: Any, state: "_PollState", new_key: str | None) -> Stamp | None:
        """Let an admitted record's `updated` raise the cursor when it is a time of the cursor's kind and not in the future.

        A value that cannot is noted for the poll's report when the record is new (``new_key``): reported once."""
        if not cfg.updated or not isinstance(record, dict) or record.get(cfg.updated) is None:
            return None
        value = record[cfg.updated]
        if new_key is None and _not_above(value, state.highest_text):  # a seen record: only a higher time would matter
            return None
        stamp = read_stamp(value)
        if stamp is None:
            why = "not a time"
        elif stamp.seconds > state.started + FUTURE_TOLERANCE:
            why = "in the future"
        elif state.kind is not None and stamp.kind != state.kind:
            why = f"a different kind of time than the cursor ({_KINDS[stamp.kind]}, not {_KINDS[state.kind]})"
        else:
            state.kind = stamp.kind
            if state.highest is None or stamp.seconds > state.highest.seconds:
                state.highest, state.highest_raw = stamp, value
                state.highest_text = value if isinstance(value, str) and _ISO_UTC.fullmatch(value) else None
            return stamp
        if new_key is not None:
            state.unusable.append((new_key, value, why))
        return stamp if why != "in the future" else None

    def _known(self, name: str, cfg: SourceConfig, records: list) -> tuple[dict[int, tuple[str, str]], dict[int, tuple[str, float]]]:
        """position -> (id, key) of the records with a usable id, and position -> (key, last seen) of those the ledger
        has seen (a re-poll skips hashing them)."""
        if cfg.dedupe == "content":
            return {}, {}
        keyed = {}
        for position, record in enumerate(records):
            try:
                keyed[position] = dedupe_key(record, cfg)
            except BadRecord:
                pass
        seen = self.ledger.seen(name, {key for _, key in keyed.values()})
        return keyed, {position: (key, seen[key]) for position, (_, key) in keyed.items() if key in seen}

    def _quarantine(self, name: str, page: Page, position: int, record: Any, reason: str, result: PollResult, log) -> None:
        excerpt = json.dumps(record, ensure_ascii=True, default=str)[:300]
        first = self.ledger.quarantine(name, content_hash(record), reason, f"{page.where or page.number} record {position + 1}", excerpt, self.clock())
        result.quarantined += 1
        if first:
            result.bad.append(reason)
            log.warning("{}: {} record {} quarantined: {} — {}", name, page.where or f"page {page.number}", position + 1, reason, excerpt[:120])

    @staticmethod
    def _report_unusable(name: str, cfg: SourceConfig, state: "_PollState", log) -> None:
        if not state.unusable:
            return
        examples = "; ".join(f"record {key!r}: {json.dumps(value, default=str)[:40]} is {why}" for key, value, why in state.unusable[:3])
        log.warning("{}: {} new record(s) have a '{}' the cursor cannot use ({}{}); they are admitted as usual, the cursor ignores their value",
                    name, len(state.unusable), cfg.updated, examples, "; …" if len(state.unusable) > 3 else "")

    def _report_priming(self, name: str, cfg: SourceConfig, state: "_PollState", row: dict | None, result: PollResult, log) -> None:
        """Say plainly what a poll that primes again (the first poll has not yet succeeded) did."""
        if state.priming is None or state.priming == state.started or not (result.primed or result.new):
            return
        since = datetime.fromtimestamp(state.priming, timezone.utc).isoformat(timespec="seconds")
        if cfg.updated:
            log.warning("{}: still priming (first_run = \"skip\", no complete poll since {}): {} record(s) marked seen without sending, "
                        "{} delivered because '{}' dates them after priming began", name, since, result.primed, result.new, cfg.updated)
        else:
            log.warning("{}: still priming (first_run = \"skip\", no complete poll since {}): {} record(s) marked seen WITHOUT sending; "
                        "without `updated` the agent cannot tell records that appeared since then from old ones", name, since, result.primed)

    def _warn_gap(self, name: str, cfg: SourceConfig, row: dict | None, log) -> None:
        if cfg.window and row and row.get("last_success") and self.clock() - row["last_success"] > cfg.window:
            since = datetime.fromtimestamp(row["last_success"], timezone.utc).isoformat(timespec="seconds")
            log.warning("{}: no good poll since {}, longer than the view's window ({:.0f}s): records changed in between may have been missed", name, since, cfg.window)

    @staticmethod
    def _log(result: PollResult, log) -> None:
        run = f" (on demand: {', '.join(f'{k}={v}' for k, v in result.run.items())})" if result.run else ""
        summary = (f"poll {result.source}{run}: {result.pages} pages, {result.fetched} records, {result.new} new, "
                   f"{result.primed} primed, {result.quarantined} quarantined")
        if result.error:
            log.error("{} — FAILED: {} (the cursor stays; next poll tries again)", summary, result.error)
        else:
            log.info(summary)


def render_url(templates: Templates, url: str, context: dict[str, Any]) -> str:
    """A source's url template rendered, run values and the cursor percent-encoded; the origin must stay as written.

    So a run parameter can choose a path or a query, never another host to send the view's credentials to."""
    encoded = {**context, "cursor": quote(str(context.get("cursor", "")), safe=""),
               "run": {k: quote(str(v), safe="") for k, v in context.get("run", {}).items()}}
    try:
        rendered = str(templates.render(url, encoded))
    except RenderError as error:
        raise RenderError(f"url: {error}") from None
    if _origin(rendered) != _origin(url):
        raise RenderError("url: a template may fill the path and the query only; write the scheme, host and port out in the url")
    return rendered


def _origin(url: str) -> tuple[str, str | None, int | None] | None:
    """(scheme, host, port) of a URL; None when it has no valid port."""
    parts = urlsplit(url)
    try:
        return parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return None


def source_identity(cfg: SourceConfig) -> dict:
    """What makes the source's records what they are: the view it reads, and how a record's key is made."""
    where = str(getattr(cfg, "url", None) or getattr(cfg, "path", ""))
    view = hashlib.sha256(f"{cfg.kind}\x1f{where}".encode()).hexdigest()[:16]  # a hash: the URL may hold a key
    key = {"id": cfg.id, "dedupe": cfg.dedupe, "records": cfg.records}
    if cfg.dedupe == "id+updated":
        key["updated"] = cfg.updated
    return {"view": view, "key": key}


_KINDS = {"iso": "ISO 8601 text", "epoch_s": "epoch seconds", "epoch_ms": "epoch milliseconds"}


def _uses_cursor(cfg: SourceConfig) -> bool:
    """Whether the source asks the view for what changed since the cursor (so a skipped record would stay behind it)."""
    templates = [*(getattr(cfg, "params", None) or {}).values(), getattr(cfg, "url", "") or ""]
    return any("cursor" in str(template) for template in templates)

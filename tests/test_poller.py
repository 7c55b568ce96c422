"""Polling into the ledger: identification, quarantine, the cursor rule, failures half-way, ties at page edges."""
import json
import random
import textwrap
import time
from datetime import timedelta

import pytest

from agent.config import load
from agent.http import build_session
from agent.poller import BadRecord, Poller, cursor_value, identify
from sources.rest import RestSource
from state.sqlite import SqliteLedger as Ledger
from viewserver import ViewServer, make_leads, update

NOW = 1_800_000_000.0


def source_config(tmp_path, url: str, extra: str = "", size: int = 10):
    (tmp_path / "agent.toml").write_text(textwrap.dedent(f"""
        [sources.leads]
        kind = "rest"
        url = "{url}"
        id = "lastSubmissionID"
        updated = "lastModified"
        entity = "RecordId"
        first_run = "deliver"
        paging = {{ kind = "page", size = {size} }}
        {extra}
        [connectors.out]
        kind = "file"
        path = "out.jsonl"
        [[flows]]
        name = "f"
        source = "leads"
        [[flows.steps]]
        kind = "action"
        action = "out > record > write"
    """))
    return load(tmp_path / "agent.toml")


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "agent.db") as led:
        yield led


def poller(cfg, ledger):
    sources = {name: RestSource(c, session=build_session()) for name, c in cfg.sources.items()}
    return Poller(cfg, ledger, sources, clock=lambda: NOW)


def keys(ledger) -> set[str]:
    return {r[0] for r in ledger.conn.execute("SELECT key FROM records")}


@pytest.mark.parametrize("value, problem", [
    (None, "not a usable id"), ("", "empty"), (True, "not a usable id"), (1.5, "not a usable id"),
    ([1], "not a usable id"), ({"a": 1}, "not a usable id"), ("a\x00b", "NUL character"),
])
def test_unusable_ids_are_bad_records(tmp_path, value, problem):
    cfg = source_config(tmp_path, "http://127.0.0.1:9/x").sources["leads"]
    with pytest.raises(BadRecord, match=problem):
        identify({"lastSubmissionID": value}, cfg)


def test_integer_and_string_ids_are_the_same_key(tmp_path):
    cfg = source_config(tmp_path, "http://127.0.0.1:9/x").sources["leads"]
    assert identify({"lastSubmissionID": 1}, cfg).key == identify({"lastSubmissionID": "1"}, cfg).key == "1"


def test_lone_surrogate_and_oversized_records_are_bad(tmp_path):
    cfg = source_config(tmp_path, "http://127.0.0.1:9/x", "max_record_bytes = 100").sources["leads"]
    with pytest.raises(BadRecord, match="lone surrogate"):
        identify({"lastSubmissionID": "1", "Name": "\ud800"}, cfg)
    with pytest.raises(BadRecord, match="max_record_bytes"):
        identify({"lastSubmissionID": "1", "Notes": "x" * 200}, cfg)


@pytest.mark.parametrize("dedupe, same", [("id", True), ("id+updated", False), ("content", False)])
def test_dedupe_modes(tmp_path, dedupe, same):
    cfg = source_config(tmp_path, "http://127.0.0.1:9/x", f'dedupe = "{dedupe}"').sources["leads"]
    a = {"lastSubmissionID": "1", "lastModified": "2026-01-01T00:00:00Z", "x": 1}
    b = {"lastSubmissionID": "1", "lastModified": "2026-01-02T00:00:00Z", "x": 2}
    assert (identify(a, cfg).key == identify(b, cfg).key) is same


def test_cursor_is_the_highest_time_minus_the_overlap():
    assert cursor_value("2026-11-20T10:00:00Z", 60) == "2026-11-20T09:59:00Z"
    assert cursor_value("2026-11-20T10:00:00+01:00", 0) == "2026-11-20T09:00:00Z"
    assert cursor_value(1_700_000_000, 60) == "1699999940"
    assert cursor_value(1_700_000_000_000, 60) == "1699999940000"


def test_poll_admits_every_page_and_moves_the_cursor(tmp_path, ledger):
    with ViewServer(make_leads(25, start="2026-11-20T10:00:00Z"), page_size=10) as view:
        cfg = source_config(tmp_path, view.url)
        result = poller(cfg, ledger).poll("leads")
    assert (result.pages, result.fetched, result.new, result.error) == (3, 25, 25, None)
    newest = max(r["lastModified"] for r in view.records)
    assert ledger.cursor("leads")["value"] == cursor_value(newest, 60)


def test_a_poll_failing_half_way_keeps_what_it_admitted_and_leaves_the_cursor(tmp_path, ledger):
    with ViewServer(make_leads(25), page_size=10) as view:
        cfg = source_config(tmp_path, view.url)
        first = poller(cfg, ledger).poll("leads")
        before = ledger.cursor("leads")["value"]
        view.records.extend(make_leads(15, start="2026-11-02T00:00:00Z"))  # newer: served first
        served = []

        def fail_second_page(handler):
            served.append(handler.path)
            if len(served) == 2:
                handler.reply(503, b'{"error": "busy"}')
            else:
                handler.serve()

        view.fail_with(fail_second_page)
        second = poller(cfg, ledger).poll("leads")
        assert second.error and "503" in second.error and second.new == 10
        assert ledger.cursor("leads")["value"] == before
        view.fail_with(None)
        third = poller(cfg, ledger).poll("leads")
    assert first.new == 25 and third.error is None and third.new == 5
    assert len(keys(ledger)) == 40


def test_the_next_page_is_read_while_a_page_is_admitted(tmp_path, ledger):
    with ViewServer(make_leads(25), page_size=10) as view:
        cfg = source_config(tmp_path, view.url)
        before_admitting = []  # (requests the view had seen, records in the ledger) when page 1 arrived

        def after_fetch(point: str) -> None:
            if not before_admitting:
                ends = time.monotonic() + 5
                while len(view.hits) < 2 and time.monotonic() < ends:
                    time.sleep(0.002)
                before_admitting.append((len(view.hits), len(keys(ledger))))

        sources = {name: RestSource(c, session=build_session()) for name, c in cfg.sources.items()}
        result = Poller(cfg, ledger, sources, clock=lambda: NOW, failpoint=after_fetch).poll("leads")
    assert before_admitting == [(2, 0)]  # page 2 was asked for before page 1 was admitted
    assert result.error is None and result.new == 25 and len(view.hits) == 3


def test_equal_timestamps_reordered_between_pages_lose_nothing(tmp_path, ledger):
    """Three pages of records sharing one lastModified, shuffled before every page request."""
    leads = make_leads(30, start="2026-11-20T10:00:00Z", step=0)
    rng = random.Random(4)
    with ViewServer(leads, page_size=10) as view:
        cfg = source_config(tmp_path, view.url, 'params = { since = "{{ cursor }}" }')

        def shuffle(handler):
            view.records = rng.sample(view.records, len(view.records))
            handler.serve()

        view.fail_with(shuffle)
        p = poller(cfg, ledger)
        first = p.poll("leads")
        assert first.pages > 3  # the shift was seen and the view read again in the same poll
        assert ledger.cursor("leads")["value"] is None  # unstable: the cursor did not move past the tie
        while len(keys(ledger)) < 30 and len(view.hits) < 100:
            p.poll("leads")
    assert keys(ledger) == {r["lastSubmissionID"] for r in leads}


def test_a_record_updated_while_paging_is_delivered_in_its_new_version(tmp_path, ledger):
    leads = make_leads(30, start="2026-11-20T10:00:00Z")
    with ViewServer(leads, page_size=10) as view:
        cfg = source_config(tmp_path, view.url, 'params = { since = "{{ cursor }}" }')
        p = poller(cfg, ledger)
        moved = {}

        def update_oldest(handler):
            if not moved:
                oldest = min(range(len(view.records)), key=lambda i: view.records[i]["lastModified"])
                view.records[oldest] = moved["new"] = update(view.records[oldest])
            handler.serve()

        view.fail_with(update_oldest, times=1)
        p.poll("leads")
        p.poll("leads")
    assert moved["new"]["lastSubmissionID"] in keys(ledger)


def test_late_write_within_the_overlap_is_caught(tmp_path, ledger):
    with ViewServer(make_leads(5, start="2026-11-20T10:00:00Z"), page_size=10) as view:
        cfg = source_config(tmp_path, view.url, 'params = { since = "{{ cursor }}" }')
        p = poller(cfg, ledger)
        p.poll("leads")
        newest = max(r["lastModified"] for r in view.records)
        late = make_leads(1, start=newest)[0]
        late["lastModified"] = cursor_value(newest, 30)  # written "30 s ago" but visible only now
        view.records.append(late)
        p.poll("leads")
    assert late["lastSubmissionID"] in keys(ledger)


def test_window_gap_warns(tmp_path, ledger, caplog):
    with ViewServer(make_leads(2), page_size=10) as view:
        cfg = source_config(tmp_path, view.url, 'window = "1h"')
        Poller(cfg, ledger, {"leads": RestSource(cfg.sources["leads"], session=build_session())}, clock=lambda: NOW).poll("leads")
        Poller(cfg, ledger, {"leads": RestSource(cfg.sources["leads"], session=build_session())}, clock=lambda: NOW + 7200).poll("leads")
    assert "may have been missed" in caplog.text


@pytest.mark.parametrize("value, kind", [
    ("2026-11-20T10:00:00Z", "iso"), ("2026-11-20T10:00:00+01:00", "iso"), ("2026-11-20", "iso"),
    (1_700_000_000, "epoch_s"), (1_700_000_000.5, "epoch_s"), (1_700_000_000_000, "epoch_ms"),
    ("n/a", None), ("", None), (None, None), (True, None), (float("nan"), None), (float("inf"), None),
    (10 ** 400, None), ("9" * 401, None), ("9999-12-31T23:59:59-23:59", "iso"), ([2026], None), ({"t": 1}, None),
])
def test_read_stamp_takes_times_and_refuses_the_rest(value, kind):
    from agent.poller import read_stamp
    stamp = read_stamp(value)
    assert (stamp.kind if stamp else None) == kind


def test_a_cursor_that_would_overflow_is_no_cursor():
    assert cursor_value("0001-01-01T00:00:00Z", 60) is None
    assert cursor_value("9999-12-31T23:59:59-23:59", 0) is None
    assert cursor_value("n/a", 60) is None


def test_records_holding_nan_or_infinity_are_quarantined(tmp_path, ledger):
    leads = make_leads(3, start="2026-11-20T10:00:00Z")
    leads[0]["Score"], leads[1]["Score"] = float("nan"), float("inf")
    with ViewServer(leads, page_size=10) as view:
        cfg = source_config(tmp_path, view.url)
        result = poller(cfg, ledger).poll("leads")
    assert (result.new, result.quarantined, result.error) == (1, 2, None)
    assert all("NaN, Infinity" in row["reason"] for row in ledger.quarantined())


class _Exploding:
    """A source whose second page hits a value no check foresaw."""

    def pages(self, params):
        from sources.base import Page
        yield Page(1, make_leads(2, start="2026-11-20T10:00:00Z"), "page 1")
        raise OverflowError("int too large to convert to float")


def test_an_unexpected_error_fails_the_poll_and_keeps_what_was_admitted(tmp_path, ledger):
    cfg = source_config(tmp_path, "http://127.0.0.1:9/x")
    result = Poller(cfg, ledger, {"leads": _Exploding()}, clock=lambda: NOW).poll("leads")
    assert result.new == 2 and "OverflowError" in result.error
    assert ledger.cursor("leads")["value"] is None and ledger.cursor("leads")["last_error"] == result.error
    assert ledger.counts() == {"f": {"pending": 2}}


TRICKY_TIMES = [
    "2026-11-20T10:00:00Z", "2026-11-20T10:00:00.5Z", "2026-11-20T10:00:00.123456Z", "2026-11-20 10:00:05Z",
    "2026-13-20T10:00:00Z", "2026-11-20T24:00:00Z", "2026-11-20T10:00:60Z", "2026-11-20T10:00:00z", "２026-11-20T10:00:00Z",
    "2026-11-20T10:00:00+00:00", "2026-11-20T09:59:59Z", "2026-02-29T10:00:00Z", "2024-02-29T10:00:00Z", "0000-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z", "2026-11-20T10:00:00.9999Z", "2026-11-20T10:00:01.0000Z", "2026-11-20T10:00:00.1234567Z",
]


def test_iso_utc_text_of_one_shape_sorts_as_its_time_so_a_lower_one_is_not_parsed():
    from agent.poller import _not_above, read_stamp

    rng = random.Random(12)
    base = read_stamp("2000-01-01T00:00:00Z").at
    values = list(TRICKY_TIMES)
    for digits in (0, 1, 3, 6):
        for _ in range(300):
            at = base + timedelta(seconds=rng.uniform(-3e9, 3e9))
            values.append(at.strftime("%Y-%m-%dT%H:%M:%S") + (f".{at.microsecond:06d}"[:digits + 1] if digits else "") + "Z")
    skipped = 0
    for value in values:
        for highest in values:
            top = read_stamp(highest)
            if top is None or not _not_above(value, highest):
                continue
            stamp = read_stamp(value)
            assert stamp is None or stamp.seconds <= top.seconds, (value, highest)
            skipped += 1
    assert skipped > 100_000  # the usual case takes the fast way


def test_seen_records_raise_the_cursor_exactly_as_when_every_time_is_parsed(tmp_path, ledger):
    from agent.poller import _PollState, read_stamp

    cfg = source_config(tmp_path, "http://view.test/x")
    p = poller(cfg, ledger)
    rng = random.Random(3)
    for _ in range(200):
        values = rng.sample(TRICKY_TIMES, 6)
        state = _PollState(cursor=None, flows=[], started=NOW)
        for value in values:
            p._note_updated(cfg.sources["leads"], {"lastModified": value}, state, None)
        usable = [v for v in values if read_stamp(v) is not None and read_stamp(v).seconds <= NOW + 300]  # none in the future
        best = max(usable, key=lambda v: read_stamp(v).seconds, default=None)
        assert (state.highest.seconds if state.highest else None) == (read_stamp(best).seconds if best else None), values


@pytest.mark.parametrize("record", [
    {"b": [1.5, 1e16, -0.0, 1e-07, 2 ** 70, True, None], "a": {"z": {}, "y": []}},
    {"text": "x\u2028\x01\"\\é😀\x7f", "é": 1, "e": 2, "Z": 3, "😀": 4, "\uffff": 5},
    {"id": "S1", "nested": [{"k": [1, [2, [3]]]}]},
])
def test_the_canonical_bytes_of_a_record_are_sorted_compact_json_exactly(record):
    from agent.poller import canonical_json

    assert canonical_json(record) == json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


@pytest.mark.parametrize("record, error", [({"n": float("nan")}, ValueError), ({"i": float("inf")}, ValueError), ({"s": "\ud800"}, UnicodeEncodeError)])
def test_canonical_bytes_refuse_what_json_dumps_refuses(record, error):
    from agent.poller import canonical_json

    with pytest.raises(error):
        canonical_json(record)

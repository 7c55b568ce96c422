"""Holes in "nothing lost, nothing sent twice" that odd view data and ordinary operations open.

Each test drives the real agent (the CLI in-process, or the Agent with a fake
clock where days must pass) against a real view server on 127.0.0.1 and a
real file sink, and checks what was delivered.
"""
import json
import os
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent import logs
from agent.cli import main
from agent.config import load
from agent.process import Agent
from state.sqlite import SqliteLedger as Ledger
from viewserver import ViewServer, make_leads, update

FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def write_config(folder: Path, url: str, *, first_run: str = "deliver", size: int = 10, source: str = "",
                 agent: str = "", supersede: bool = False, updated: bool = True) -> Path:
    cfg = folder / "agent.toml"
    cfg.write_text(f"""
[agent]
ledger = "var/agent.db"
concurrency = 4
{agent}

[sources.leads]
kind = "rest"
url = "{url}"
id = "lastSubmissionID"
{'updated = "lastModified"' if updated else ''}
entity = "RecordId"
first_run = "{first_run}"
supersede = {str(supersede).lower()}
timeout = "5s"
params = {{ since = "{{{{ cursor }}}}" }}
paging = {{ kind = "page", size = {size} }}
{source}

[connectors.out]
kind = "file"
path = "var/out.jsonl"

[[flows]]
name = "copy"
source = "leads"
  [[flows.steps]]
  kind = "action"
  action = "out > record > write"
""")
    return cfg


def cli(capfd, cfg: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(cfg), *args])
    out, err = capfd.readouterr()
    return code, out, err


def delivered(cfg: Path) -> list[dict]:
    """The records the file sink holds, in the order they were written."""
    out = cfg.parent / "var" / "out.jsonl"
    return [json.loads(line)["body"] for line in out.read_text().splitlines()] if out.exists() else []


def ids(records: list[dict]) -> list[str]:
    return [r["lastSubmissionID"] for r in records]


def soon(seconds: float = 2) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).strftime(FORMAT)


# 1. a far-future or non-date `updated` -------------------------------------------------------------

def test_a_far_future_or_odd_updated_value_never_moves_the_cursor_past_new_records(tmp_path, capfd):
    leads = make_leads(5, start="2026-11-20T10:00:00Z")
    odd = [dict(make_leads(1)[0], lastModified=value) for value in ("9999-12-31T23:59:59Z", "n/a", 10 ** 400, "9999-12-31T23:59:59-23:59")]
    no_id = {k: v for k, v in make_leads(1)[0].items() if k != "lastSubmissionID"}
    no_id["lastModified"] = "9999-12-30T00:00:00Z"  # quarantined: its value must not count either
    with ViewServer(leads + odd + [no_id], page_size=100) as view:
        cfg = write_config(tmp_path, view.url)
        code, out, err = cli(capfd, cfg, "run", "--once")
        assert code == 1 and "quarantined: 1" in out  # the record without an id
        assert "in the future" in err and "not a time" in err and "Traceback" not in err
        cursor = Ledger(tmp_path / "var" / "agent.db", hold=False).cursor("leads")["value"]
        assert cursor == "2026-11-20T10:03:00Z"  # the newest real time minus the 1 minute overlap
        fresh = make_leads(2, start="2026-11-21T09:00:00Z")
        view.records.extend(fresh)
        code, out, err = cli(capfd, cfg, "run", "--once")
        assert "in the future" not in err  # reported once, when the record was new
    assert set(ids(fresh)) <= set(ids(delivered(cfg)))
    assert len(delivered(cfg)) == 11


# 2. the newest version of an entity wins ------------------------------------------------------------

def test_with_supersede_the_stale_version_on_a_later_page_is_the_one_retired(tmp_path, capfd):
    leads = make_leads(4, start="2026-11-20T10:00:00Z")
    newest = update(leads[0], at="2026-11-20T12:00:00Z", FirstName="Newest")
    with ViewServer(leads + [newest], page_size=3) as view:  # newest-first: the new version on page 1, the old on page 2
        cfg = write_config(tmp_path, view.url, supersede=True)
        code, out, err = cli(capfd, cfg, "run", "--once")
        assert code == 0, err
    versions = [r for r in delivered(cfg) if r["RecordId"] == leads[0]["RecordId"]]
    assert ids(versions) == [newest["lastSubmissionID"]]


def test_without_supersede_versions_of_one_entity_are_delivered_oldest_first(tmp_path, capfd):
    leads = make_leads(3, start="2026-11-20T10:00:00Z")
    middle = update(leads[1], at="2026-11-20T11:00:00Z", FirstName="Middle")
    newest = update(leads[1], at="2026-11-20T12:00:00Z", FirstName="Newest")
    with ViewServer(leads + [middle, newest], page_size=100) as view:  # one page, newest first
        cfg = write_config(tmp_path, view.url)
        assert cli(capfd, cfg, "run", "--once")[0] == 0
    versions = [r for r in delivered(cfg) if r["RecordId"] == leads[1]["RecordId"]]
    assert ids(versions) == ids([leads[1], middle, newest])  # the newest lands last at the sink


# 3. priming ends -------------------------------------------------------------------------------------

def fail_page(number: int):
    """A fault answering 503 to every request for page `number`."""
    def fault(handler):
        if f"page={number}&" in handler.path + "&":
            return handler.reply(503, b'{"error": "busy"}')
        handler.serve()
    return fault


def test_records_that_appear_while_priming_keeps_failing_are_delivered(tmp_path, capfd):
    old = make_leads(25, start="2026-11-20T10:00:00Z")
    with ViewServer(old, page_size=10) as view:
        view.fail_with(fail_page(3))
        cfg = write_config(tmp_path, view.url, first_run="skip")
        code, out, err = cli(capfd, cfg, "run", "--once")
        assert code == 1 and "primed: 20" in out and "503" in err
        fresh = make_leads(4, start=soon(), step=1)
        view.records.extend(fresh)
        code, out, err = cli(capfd, cfg, "run", "--once")
        assert code == 1 and "new: 4" in out and "still priming" in err
        view.fail_with(None)
        code, out, err = cli(capfd, cfg, "run", "--once")
        assert code == 0 and "primed: 5" in out  # the old page 3, never sent
    assert sorted(ids(delivered(cfg))) == sorted(ids(fresh))


def test_priming_again_without_updated_says_so_plainly(tmp_path, capfd):
    with ViewServer(make_leads(25, start="2026-11-20T10:00:00Z"), page_size=10) as view:
        view.fail_with(fail_page(3))
        cfg = write_config(tmp_path, view.url, first_run="skip", updated=False)
        cli(capfd, cfg, "run", "--once")
        view.records.extend(make_leads(2, start=soon()))
        code, out, err = cli(capfd, cfg, "run", "--once")
    assert "primed: 2" in out and "marked seen WITHOUT sending" in err and "cannot tell" in err


# 4. records leaving the view while it is paged -------------------------------------------------------

def test_records_deleted_while_paging_do_not_make_others_be_skipped(tmp_path, capfd):
    leads = make_leads(40, start="2026-11-20T10:00:00Z")
    with ViewServer(leads, page_size=10) as view:
        def delete_newest(handler):
            if "page=2&" in handler.path + "&" and not getattr(delete_newest, "done", False):
                delete_newest.done = True
                newest = sorted(view.records, key=lambda r: r["lastModified"])[-10:]
                view.records = [r for r in view.records if r not in newest]
            handler.serve()

        view.fail_with(delete_newest)
        cfg = write_config(tmp_path, view.url)
        code, out, err = cli(capfd, cfg, "run", "--once")
        assert code == 0, err
        assert "records left the view while it was paged" in err
        cli(capfd, cfg, "run", "--once")
    assert sorted(ids(delivered(cfg))) == sorted(ids(leads))  # the 10 deleted ones had been read on page 1


def test_a_record_deleted_deeper_than_page_1_while_paging_makes_no_other_be_skipped(tmp_path, capfd):
    """The kill storm found it: without `paging.total`, page 1 read again looks the same; the second read finds the gap."""
    leads = make_leads(25, start="2026-11-20T10:00:00Z")
    with ViewServer(leads, page_size=10) as view:
        def delete_from_page_2(handler):
            if "page=3&" in handler.path + "&" and not getattr(delete_from_page_2, "done", False):
                delete_from_page_2.done = True
                newest_first = sorted(view.records, key=lambda r: r["lastModified"], reverse=True)
                view.records = [r for r in view.records if r is not newest_first[12]]  # read on page 2 already
            handler.serve()

        view.fail_with(delete_from_page_2)
        cfg = write_config(tmp_path, view.url)
        code, out, err = cli(capfd, cfg, "run", "--once")
        assert code == 0 and "records left the view while it was paged" in err, err
        cli(capfd, cfg, "run", "--once")
    assert sorted(ids(delivered(cfg))) == sorted(ids(leads))


def test_records_deleted_while_paging_that_empty_the_last_page_make_no_other_be_skipped(tmp_path, capfd):
    """The kill storm found it: page 1 full, its two newest records deleted before page 2 is asked for, so the two
    that were to fill page 2 move onto page 1, already read, and page 2 comes back empty: one page of records,
    yet a paged read, so it is read again before the cursor moves past them."""
    leads = make_leads(12, start="2026-11-20T10:00:00Z")
    with ViewServer(leads, page_size=10) as view:
        def delete_two_newest(handler):
            if "page=2&" in handler.path + "&" and not getattr(delete_two_newest, "done", False):
                delete_two_newest.done = True
                newest = sorted(view.records, key=lambda r: r["lastModified"])[-2:]
                view.records = [r for r in view.records if r not in newest]
            handler.serve()

        view.fail_with(delete_two_newest)
        cfg = write_config(tmp_path, view.url)
        code, out, err = cli(capfd, cfg, "run", "--once")
        assert code == 0 and "records left the view while it was paged" in err, err
        cli(capfd, cfg, "run", "--once")
    assert sorted(ids(delivered(cfg))) == sorted(ids(leads))  # the 2 deleted ones had been read on page 1


def test_new_records_arriving_at_the_top_while_paging_keep_the_cursor_moving(tmp_path, capfd):
    leads = make_leads(30, start="2026-11-20T10:00:00Z")
    with ViewServer(leads, page_size=10) as view:
        def insert_once(handler):
            if "page=2&" in handler.path + "&" and not getattr(insert_once, "done", False):
                insert_once.done = True
                view.records.extend(make_leads(3, start="2026-11-21T10:00:00Z"))
            handler.serve()

        view.fail_with(insert_once)
        cfg = write_config(tmp_path, view.url)
        code, out, err = cli(capfd, cfg, "run", "--once")
        assert code == 0 and "left the view" not in err
        cursor = Ledger(tmp_path / "var" / "agent.db", hold=False).cursor("leads")["value"]
    assert cursor == "2026-11-21T10:01:00Z"  # insertions only push records down: the cursor moves
    assert len(delivered(cfg)) == 33


# 5. a ledger file that holds no ledger ---------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"not sqlite at all, just text"])
def test_an_existing_file_without_a_ledger_is_refused_not_reused(tmp_path, capfd, content):
    with ViewServer(make_leads(3), page_size=10) as view:
        cfg = write_config(tmp_path, view.url)
        assert cli(capfd, cfg, "run", "--once")[0] == 0
        ledger = tmp_path / "var" / "agent.db"
        ledger.write_bytes(content)
        code, out, err = cli(capfd, cfg, "run", "--once")
    assert code == 3 and "Traceback" not in err
    assert ("holds no ledger" in err and "move this file away" in err) if not content else "damaged" in err
    assert ledger.read_bytes() == content  # left exactly as it was
    assert len(delivered(cfg)) == 3


def test_a_sqlite_file_of_something_else_is_refused(tmp_path, capfd):
    (tmp_path / "var").mkdir()
    with sqlite3.connect(tmp_path / "var" / "agent.db") as other:
        other.execute("CREATE TABLE notes (text)")
    cfg = write_config(tmp_path, "http://127.0.0.1:9/view")
    code, out, err = cli(capfd, cfg, "run", "--once")
    assert code == 3 and "no ledger tables" in err


def test_a_missing_ledger_is_created_whole(tmp_path, capfd):
    with ViewServer(make_leads(2), page_size=10) as view:
        cfg = write_config(tmp_path, view.url)
        assert cli(capfd, cfg, "run", "--once")[0] == 0
    assert sorted(p.name for p in (tmp_path / "var").iterdir() if "creating" in p.name) == []
    with Ledger(tmp_path / "var" / "agent.db") as led:
        assert led.counts() == {"copy": {"succeeded": 2}}


# 6. `window` forgets only what the view no longer shows -----------------------------------------------

def test_window_keeps_keys_the_view_still_shows_and_forgets_the_rest(tmp_path):
    logs.setup()
    leads = make_leads(3, start="2026-11-20T10:00:00Z")
    with ViewServer(leads, page_size=10) as view:
        cfg = write_config(tmp_path, view.url, source='window = "1d"', agent='retention = "1h"')
        cfg.write_text(cfg.read_text().replace('params = { since = "{{ cursor }}" }\n', ""))  # the whole view every poll
        now = [1_800_000_000.0]
        agent = Agent(load(cfg), clock=lambda: now[0])
        try:
            def poll() -> int:
                result = agent.poll("leads")
                agent.drain()
                return result.new

            assert poll() == 3
            gone = view.records.pop()  # the view stops showing one record
            for hours in (20, 40):
                now[0] = 1_800_000_000.0 + hours * 3600
                assert poll() == 0
            now[0] = 1_800_000_000.0 + 50 * 3600  # first seen 50 h ago; last shown 10 h ago
            removed = agent.prune()
            assert removed["records"] == 1  # only the key no poll showed within the window (plus the refresh margin)
            assert poll() == 0  # nothing the view still shows is sent again
            view.records.append(gone)
            assert poll() == 1  # forgotten on purpose: the view stopped showing it for longer than its window
        finally:
            agent.close()
    assert len(delivered(cfg)) == 3  # the re-admitted record went out under its old idempotency key: the file sink skipped it


# 8. one agent per ledger, whatever the path says ------------------------------------------------------

def test_a_symlinked_ledger_path_is_held_by_the_same_lock(tmp_path, capfd):
    (tmp_path / "var").mkdir()
    cfg = write_config(tmp_path, "http://127.0.0.1:9/view", agent="")
    cfg.write_text(cfg.read_text().replace('ledger = "var/agent.db"', 'ledger = "alias.db"'))
    with Ledger(tmp_path / "var" / "agent.db"):  # the first agent
        os.symlink(tmp_path / "var" / "agent.db", tmp_path / "alias.db")
        code, out, err = cli(capfd, cfg, "run", "--once")
    assert code == 3 and "another agent is running" in err


def test_a_planted_lock_symlink_is_not_followed(tmp_path, capfd):
    (tmp_path / "var").mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / "var" / "agent.db.lock")
    cfg = write_config(tmp_path, "http://127.0.0.1:9/view")
    code, out, err = cli(capfd, cfg, "run", "--once")
    assert code == 3 and "lock file" in err
    assert victim.read_text() == "keep me"

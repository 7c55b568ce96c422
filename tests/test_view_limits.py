"""A hostile view costs a bounded wait and bounded memory: `timeout` is a deadline per page, and pages have size caps.

Through the real CLI in-process against a local view server whose faults end by themselves.
"""
from __future__ import annotations

import gzip
import json
import math
import signal
import socket
import sys
import threading
import time

import pydantic
import pytest
import requests

from sources.base import PageError
from sources.file import FileSource
from sources.rest import RestSource
from viewserver import ViewServer, make_leads

DRIP_FOR = 3.0  # a dripping fault gives up after this long, so a test that fails cannot hang
DRIP_EVERY = 0.05


def write_config(tmp_path, view: ViewServer, source: str = "", paging: str = '{ kind = "none" }'):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[agent]
ledger = "var/agent.db"

[sources.leads]
kind = "rest"
url = "{view.url}"
id = "lastSubmissionID"
updated = "lastModified"
first_run = "deliver"
paging = {paging}
{source}

[connectors.out]
kind = "file"
path = "var/out.jsonl"

[[flows]]
name = "leads-to-file"
source = "leads"
  [[flows.steps]]
  kind = "action"
  action = "out > record > write"
""")
    return cfg


def drip(handler, head: bytes, piece: bytes) -> None:
    """Send `head`, then `piece` every DRIP_EVERY seconds until the client leaves or DRIP_FOR has passed."""
    handler.close_connection = True
    ends = time.monotonic() + DRIP_FOR
    try:
        handler.wfile.write(head)
        while time.monotonic() < ends:
            handler.wfile.write(piece)
            handler.wfile.flush()
            time.sleep(DRIP_EVERY)
        handler.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the client gave up: that is the point


def drips_body(handler) -> None:
    """Honest headers, then a body that arrives one byte at a time and never completes."""
    drip(handler, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"records\": [", b" ")


def drips_headers(handler) -> None:
    """A status line, then one header that never ends."""
    drip(handler, b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a")


@pytest.mark.parametrize("fault", [drips_body, drips_headers], ids=["body", "headers"])
def test_timeout_is_a_deadline_for_the_whole_page(tmp_path, cli, fault):
    with ViewServer(make_leads(3)) as view:
        view.fail_with(fault, times=1)
        cfg = write_config(tmp_path, view, 'timeout = "0.5s"')
        started = time.monotonic()
        status, out, err = cli("--config", str(cfg), "run", "--once")
        took = time.monotonic() - started
    assert status == 1, out + err
    assert f"poll leads failed: page 1 of GET {view.url}: no complete answer within 0.5s (timeout)" in out
    assert took < DRIP_FOR - 0.5, f"the poll waited {took:.1f}s: the drip, not the deadline, ended it"
    assert "Traceback" not in out + err


def test_a_slow_but_steady_page_within_the_deadline_is_read():
    leads = make_leads(3)

    def steady(handler):
        body = json.dumps({"records": leads}).encode()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        for start in range(0, len(body), len(body) // 4 + 1):
            handler.wfile.write(body[start:start + len(body) // 4 + 1])
            handler.wfile.flush()
            time.sleep(0.02)

    with ViewServer(leads) as view:
        view.fail_with(steady, times=1)
        pages = list(make_source(view.url, timeout="2s").pages({}))
    assert [r["lastSubmissionID"] for r in pages[0].records] == [r["lastSubmissionID"] for r in leads]


def test_a_view_hanging_from_an_earlier_poll_is_not_asked_again_while_it_hangs():
    with ViewServer(make_leads(3)) as view:
        view.fail_with(drips_headers, times=1)
        source = make_source(view.url, timeout="0.3s")
        with pytest.raises(PageError, match=r"no complete answer within 0.3s"):
            list(source.pages({}))
        with pytest.raises(PageError, match=r"an earlier request to this view is still waiting for its answer"):
            list(source.pages({}))
        assert len(view.hits) == 1  # no second connection while the first still hangs


def test_a_page_read_ahead_that_passes_its_deadline_while_the_caller_is_busy_fails_as_a_timeout():
    leads, dripped = make_leads(150), threading.Event()

    def slow_second_page(handler):
        if "page=2" not in handler.path:
            return handler.serve()
        body = json.dumps({"records": leads[100:]}).encode()
        try:
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            for start in range(0, len(body), len(body) // 4 + 1):  # the whole body, but over 0.4 s: past the 0.2 s deadline
                handler.wfile.write(body[start:start + len(body) // 4 + 1])
                handler.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass  # the client gave up at the deadline
        finally:
            dripped.set()

    with ViewServer(leads) as view:
        view.fail_with(slow_second_page)
        pages = make_source(view.url, timeout="0.2s", paging={"kind": "page"}).pages({})
        assert len(next(pages).records) == 100
        assert dripped.wait(5)  # the caller was busy with page 1 until the page ahead was over its deadline
        with pytest.raises(PageError, match=r"page 2 of GET .*: no complete answer within 0.2s \(timeout\)"):
            next(pages)


def test_a_stop_request_ends_the_wait_for_a_page_read_ahead():
    stopping = threading.Event()
    with ViewServer(make_leads(150)) as view:
        view.fail_with(lambda handler: handler.serve() if "page=1" in handler.path else drips_headers(handler))
        config = RestSource.Config.model_validate({"kind": "rest", "url": view.url, "timeout": "2s", "paging": {"kind": "page"}})
        pages = RestSource(config, session=requests.Session(), stopping=stopping).pages({})
        next(pages)
        stopping.set()
        asked = time.monotonic()
        with pytest.raises(PageError, match=r"page 2 of GET .*: not read, the agent is stopping"):
            next(pages)
    assert time.monotonic() - asked < 1


# Size caps


def make_source(url: str, **config) -> RestSource:
    return RestSource(RestSource.Config.model_validate({"kind": "rest", "url": url, **config}), session=requests.Session())


def hung_up_on(fault):
    """`fault`, quiet when the client hangs up half-way (as it should when the body is over its cap)."""

    def answer(handler) -> None:
        handler.close_connection = True  # the client will not read to the end: this connection is done
        try:
            fault(handler)
        except OSError:
            pass

    answer.__name__ = fault.__name__
    return answer


@hung_up_on
def big_body(handler) -> None:
    """An honest 200 whose body is far over a 1,000-byte cap."""
    handler.reply(200, json.dumps({"records": make_leads(50)}).encode())


BOMB = gzip.compress(b'{"records": [], "padding": "' + b" " * 10_000_000 + b'"}', 9)


@hung_up_on
def gzip_bomb(handler) -> None:
    """A small gzip body (about 10 KB) that inflates to 10 MB of JSON."""
    handler.reply(200, BOMB, {"Content-Encoding": "gzip"})


@hung_up_on
def unannounced(handler) -> None:
    """A body without Content-Length, sent until the connection closes: only counting can stop it."""
    handler.close_connection = True
    handler.send_response(200)
    handler.end_headers()
    handler.wfile.write(json.dumps({"records": make_leads(50)}).encode())


@pytest.mark.parametrize("fault", [big_body, gzip_bomb, unannounced])
def test_a_page_over_max_page_bytes_fails_the_poll_naming_the_cap(tmp_path, cli, fault):
    with ViewServer(make_leads(3)) as view:
        view.fail_with(fault, times=1)
        cfg = write_config(tmp_path, view, "max_page_bytes = 1000")
        status, out, err = cli("--config", str(cfg), "run", "--once")
    assert status == 1, out + err
    assert f"poll leads failed: page 1 of GET {view.url}: the body is over max_page_bytes = 1,000 bytes" in out
    assert "raise max_page_bytes" in out
    assert "new: 0" in out and "Traceback" not in out + err


def test_a_body_that_does_not_inflate_fails_the_poll():
    with ViewServer([]) as view:
        view.fail_with(hung_up_on(lambda handler: handler.reply(200, b'{"records": []}', {"Content-Encoding": "gzip"})), times=1)
        with pytest.raises(PageError, match=r"page 1 of GET .*: request failed: DecodeError"):
            list(make_source(view.url).pages({}))


def test_a_gzip_body_within_the_cap_is_read_inflated():
    leads = make_leads(20)

    def gzipped(handler):
        handler.reply(200, gzip.compress(json.dumps({"records": leads}).encode()), {"Content-Encoding": "gzip"})

    with ViewServer(leads) as view:
        view.fail_with(gzipped, times=1)
        pages = list(make_source(view.url).pages({}))
    assert len(pages[0].records) == 20


def test_a_page_over_max_records_per_page_fails_the_poll_and_admits_nothing_of_it(tmp_path, cli):
    leads = make_leads(9)
    with ViewServer(leads, paging="page", page_size=3) as view:
        view.fail_with(lambda handler: handler.serve() if "page=1" in handler.path else handler.reply(
            200, json.dumps({"records": leads[:6]}).encode()), times=2)
        cfg = write_config(tmp_path, view, "max_records_per_page = 5", '{ kind = "page", size = 3 }')
        status, out, err = cli("--config", str(cfg), "run", "--once")
    assert status == 1, out + err
    assert f"page 2 of GET {view.url}: 6 records, over max_records_per_page = 5; raise max_records_per_page" in out
    assert "new: 3" in out  # page 1 was admitted and delivered; nothing of page 2
    status, out, _ = cli("--config", str(cfg), "status", "--json")
    assert json.loads(out)["sources"]["leads"]["cursor"] is None  # the cursor stays: the next poll reads it all again


def test_max_pages_and_the_page_caps_work_together():
    with ViewServer(make_leads(10), paging="page", page_size=3) as view:
        pages = list(make_source(view.url, max_records_per_page=3, paging={"kind": "page", "size": 3, "max_pages": 2}).pages({}))
    assert [len(page.records) for page in pages] == [3, 3]
    assert pages[-1].meta == {"truncated": True}


def test_the_caps_have_defaults():
    config = RestSource.Config.model_validate({"kind": "rest", "url": "http://view.test/x"})
    assert (config.max_page_bytes, config.max_records_per_page) == (64 * 1024 * 1024, 100_000)


# Numbers JSON cannot hold: the source hands them over as floats, the agent decides (it quarantines those records)


def test_non_finite_numbers_reach_the_agent_as_floats():
    body = b'{"records": [{"id": 1, "x": NaN}, {"id": 2, "x": Infinity}, {"id": 3, "x": -Infinity}, {"id": 4, "x": 1e400}]}'
    with ViewServer([]) as view:
        view.fail_with(lambda handler: handler.reply(200, body), times=1)
        records = list(make_source(view.url).pages({}))[0].records
    assert math.isnan(records[0]["x"])
    assert [r["x"] for r in records[1:]] == [math.inf, -math.inf, math.inf]


# The file source


def file_source(tmp_path, name: str, **config) -> FileSource:
    return FileSource(FileSource.Config.model_validate({"kind": "file", "path": name, **config}), base_dir=tmp_path)


def test_a_json_file_over_max_page_bytes_is_refused_before_it_is_read(tmp_path):
    with (tmp_path / "huge.json").open("wb") as huge:
        huge.truncate(200 * 1024 * 1024)  # sparse: costs no disk, but reading it whole would cost 200 MB
    with pytest.raises(PageError) as caught:
        list(file_source(tmp_path, "huge.json", max_page_bytes=1000).pages({}))
    assert str(caught.value) == (f"{tmp_path / 'huge.json'}: the file is over max_page_bytes = 1,000 bytes; "
                                 "raise max_page_bytes, or write JSON Lines (format = \"jsonl\"), which is read a page at a time")


def test_a_json_file_over_max_records_per_page_is_refused(tmp_path):
    (tmp_path / "leads.json").write_text(json.dumps({"records": make_leads(6)}))
    with pytest.raises(PageError, match=r"leads.json: 6 records, over max_records_per_page = 5; raise max_records_per_page"):
        list(file_source(tmp_path, "leads.json", max_records_per_page=5).pages({}))


def test_a_jsonl_line_over_max_page_bytes_is_refused_naming_the_line(tmp_path):
    lines = [json.dumps(lead) for lead in make_leads(3)]
    lines[1] = json.dumps({"lastSubmissionID": "S-big", "blob": "x" * 5000})
    (tmp_path / "leads.jsonl").write_text("\n".join(lines) + "\n")
    pages = file_source(tmp_path, "leads.jsonl", max_page_bytes=1000).pages({})
    with pytest.raises(PageError) as caught:
        list(pages)
    assert str(caught.value) == f"{tmp_path / 'leads.jsonl'} line 2: the line is over max_page_bytes = 1,000 bytes; raise max_page_bytes"


def test_jsonl_pages_end_at_the_byte_cap_as_well_as_page_size(tmp_path):
    lines = [json.dumps({"lastSubmissionID": f"S{i:03d}", "pad": "x" * 50}) + "\n" for i in range(10)]  # all one length
    (tmp_path / "leads.jsonl").write_text("".join(lines))
    pages = list(file_source(tmp_path, "leads.jsonl", max_page_bytes=3 * len(lines[0]) + 10, page_size=100).pages({}))
    assert [len(page.records) for page in pages] == [3, 3, 3, 1]
    assert [r["lastSubmissionID"] for page in pages for r in page.records] == [f"S{i:03d}" for i in range(10)]
    assert [page.where.rsplit(" ", 1)[1] for page in pages] == ["1-3", "4-6", "7-9", "10-10"]


def test_jsonl_pages_are_cut_at_max_records_per_page_too(tmp_path):
    (tmp_path / "leads.jsonl").write_text("".join(json.dumps(lead) + "\n" for lead in make_leads(5)))
    pages = list(file_source(tmp_path, "leads.jsonl", max_records_per_page=2).pages({}))
    assert [len(page.records) for page in pages] == [2, 2, 1]


def test_a_rest_page_size_over_max_records_per_page_is_a_config_error():
    with pytest.raises(pydantic.ValidationError, match=r"paging.size = 500 is over max_records_per_page = 100: every full page would fail"):
        RestSource.Config.model_validate({"kind": "rest", "url": "http://view.test/x", "paging": {"kind": "page", "size": 500}, "max_records_per_page": 100})


def test_the_request_worker_ends_when_idle_and_a_new_one_takes_the_next_request():
    from sources.rest import _Worker

    worker = _Worker()

    def run(job):  # hand the job over and wait for it, as a page's GET is
        return worker.wait(worker.start(job), time.monotonic() + 5)

    assert run(lambda: 1) == {"answer": 1}
    first = worker._thread  # waiting up to 30s for the next job
    worker.IDLE_EXIT = 0.01
    assert run(lambda: 2) == {"answer": 2}  # the same thread; after it, it waits only 10ms
    first.join(5)
    assert not first.is_alive() and worker._thread is None
    assert run(lambda: 3) == {"answer": 3}
    assert worker._thread is not first and worker.idle
    assert "error" in run(lambda: 1 / 0)


def test_agent_run_stops_on_sigterm_within_seconds_while_a_view_drips(tmp_path):
    """The issue's measure: a view that drips bytes, a 30 s timeout, and SIGTERM ends `agent run` within 5 s, exit 0."""
    import os
    import subprocess

    from hostileserver import HostileServer, drip_headers

    with HostileServer(drip_headers(seconds=10)) as view:
        cfg = tmp_path / "agent.toml"
        cfg.write_text(f"""
[sources.leads]
kind = "rest"
url = "{view.url}/view"
id = "id"
timeout = "30s"
[connectors.out]
kind = "file"
path = "out.jsonl"
[[flows]]
name = "f"
source = "leads"
  [[flows.steps]]
  kind = "action"
  action = "out > record > write"
""")
        proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), "run"], cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
        try:
            deadline = time.monotonic() + 20
            while not view.requests and time.monotonic() < deadline:
                time.sleep(0.02)
            assert view.requests, "the agent never asked the view"
            time.sleep(0.3)  # well into the dripping answer
            asked = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=20)
            took = time.monotonic() - asked
        finally:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert took < 5, f"stopped after {took:.1f}s"
    assert "not read, the agent is stopping" in err

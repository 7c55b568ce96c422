"""RestSource against a real local view server, and `responses` for the edge cases."""
import json
import re
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pydantic
import pytest
import requests
import responses

from sources.base import PageError
from sources.rest import RestSource
from viewserver import ViewServer, drop_connection, make_leads, respond, short_body, truncated_json, update
from test_scheduler import wait_until

API = "http://view.test/api/views/Leads"


def make_source(url: str, session: requests.Session | None = None, **config) -> RestSource:
    """A RestSource for `url` with config keys as in agent.toml."""
    return RestSource(RestSource.Config.model_validate({"kind": "rest", "url": url, **config}), session=session or requests.Session())


def page_of(path: str) -> int:
    """The page number a request to the view server asked for."""
    return int(parse_qs(urlsplit(path).query)["page"][-1])


def ids(pages) -> list[str]:
    """Every record's lastSubmissionID, in the order the pages gave them."""
    return [record["lastSubmissionID"] for page in pages for record in page.records]


# Paging against the real view server

PAGINGS = {
    "none": ({"kind": "none"}, [250], 1),
    "page": ({"kind": "page", "size": 100}, [100, 100, 50], 3),
    "offset": ({"kind": "offset", "size": 100}, [100, 100, 50], 3),
    "cursor": ({"kind": "cursor", "next": "next"}, [100, 100, 50], 3),
    "link": ({"kind": "link"}, [100, 100, 50], 3),
    "next_url": ({"kind": "next_url", "next": "next"}, [100, 100, 50], 3),
}


@pytest.mark.parametrize("kind", PAGINGS)
def test_each_paging_kind_reads_the_whole_view_newest_first(kind):
    paging, sizes, requests_made = PAGINGS[kind]
    leads = make_leads(250)
    with ViewServer(leads, paging=kind, page_size=100) as view:
        pages = list(make_source(view.url, paging=paging).pages({}))
    assert [len(page.records) for page in pages] == sizes
    assert [page.number for page in pages] == list(range(1, len(sizes) + 1))
    assert ids(pages) == [lead["lastSubmissionID"] for lead in reversed(leads)]
    assert len(view.hits) == requests_made


def test_page_paging_sends_page_and_size_parameters():
    with ViewServer(make_leads(250), paging="page", page_size=100) as view:
        list(make_source(view.url, paging={"kind": "page", "size": 100}).pages({}))
    assert view.hits == [f"/api/views/Leads/All?pageSize=100&page={n}" for n in (1, 2, 3)]


def test_a_full_last_page_is_followed_by_an_empty_one_that_stops_paging():
    with ViewServer(make_leads(200), paging="offset", page_size=100) as view:
        pages = list(make_source(view.url, paging={"kind": "offset", "size": 100}).pages({}))
    assert [len(page.records) for page in pages] == [100, 100, 0]
    assert [hit.split("offset=")[1] for hit in view.hits] == ["0", "100", "200"]


def test_total_stops_paging_without_the_extra_empty_request():
    with ViewServer(make_leads(200), paging="page", page_size=100) as view:
        pages = list(make_source(view.url, paging={"kind": "page", "size": 100, "total": "total"}).pages({}))
    assert [len(page.records) for page in pages] == [100, 100]
    assert len(view.hits) == 2
    assert pages[-1].meta == {"total": 200}


@pytest.mark.parametrize("records_path", ["data.items", ""])
def test_records_path_nested_or_the_body_itself(records_path):
    with ViewServer(make_leads(150), paging="page", records_path=records_path) as view:
        pages = list(make_source(view.url, records=records_path, paging={"kind": "page"}).pages({}))
    assert [len(page.records) for page in pages] == [100, 50]


def test_params_are_sent_on_every_page_and_since_filters_the_view():
    leads = make_leads(250, start="2026-11-01T10:00:00Z", step=60)  # the last 50 are from 13:20 on
    with ViewServer(leads, paging="next_url") as view:
        pages = list(make_source(view.url, paging={"kind": "next_url", "next": "next"}).pages({"since": "2026-11-01T13:20:00Z"}))
    assert ids(pages) == [lead["lastSubmissionID"] for lead in reversed(leads[200:])]
    assert all("since=2026-11-01T13%3A20%3A00Z" in hit for hit in view.hits)


def test_an_updated_record_is_served_first():
    leads = make_leads(5)
    with ViewServer(leads) as view:
        view.records[2] = update(view.records[2], Status="Qualified")
        first = next(make_source(view.url, paging={"kind": "page"}).pages({})).records[0]
    assert first["RecordId"] == leads[2]["RecordId"]
    assert first["lastSubmissionID"] != leads[2]["lastSubmissionID"]


def test_pages_stream_with_one_page_fetched_ahead_at_most():
    with ViewServer(make_leads(250)) as view:
        pages = make_source(view.url, paging={"kind": "page"}).pages({})
        assert view.hits == []  # a generator: nothing fetched before the first next()
        next(pages)
        assert wait_until(lambda: len(view.hits) == 2, 5), view.hits  # page 2 is asked for while the caller handles page 1
        assert [page_of(hit) for hit in view.hits] == [1, 2]  # and no further: the generator waits at page 1
        next(pages)
        assert wait_until(lambda: len(view.hits) == 3, 5)
        assert len(next(pages).records) == 50  # a short page: nothing more is asked for
        assert next(pages, None) is None and [page_of(hit) for hit in view.hits] == [1, 2, 3]


def test_a_page_fetched_ahead_is_not_read_when_the_caller_stops_early_and_the_next_read_goes_on():
    slow = threading.Event()

    def slow_second_page(handler):
        if page_of(handler.path) == 2 and not slow.is_set():
            slow.set()
            time.sleep(0.2)  # still answering when the caller stops: the next read must not find the worker busy
        handler.serve()

    with ViewServer(make_leads(250)) as view:
        view.fail_with(slow_second_page)
        source = make_source(view.url, paging={"kind": "page"}, timeout="5s")
        pages = source.pages({})
        next(pages)
        assert slow.wait(5)
        pages.close()  # the poll failed while admitting page 1
        assert len(ids(source.pages({}))) == 250


def test_where_names_page_and_path_without_query_values():
    with ViewServer(make_leads(150)) as view:
        pages = list(make_source(view.url, paging={"kind": "page"}).pages({"since": "2020-01-01T00:00:00Z"}))
    assert pages[1].where == f"page 2 of GET {view.url}"


def test_basic_auth_from_the_session_is_sent():
    session = requests.Session()
    session.auth = ("integration", "s3cret")
    with ViewServer(make_leads(3), username="integration", password="s3cret") as view:
        pages = list(make_source(view.url, session, paging={"kind": "page"}).pages({}))
    assert len(pages[0].records) == 3


def test_missing_credentials_fail_the_page_with_401():
    with ViewServer(make_leads(3), username="integration", password="s3cret") as view:
        with pytest.raises(PageError) as caught:
            list(make_source(view.url, paging={"kind": "page"}).pages({}))
    assert (caught.value.status, caught.value.page) == (401, 1)
    assert "HTTP 401" in str(caught.value)


def test_a_failing_second_page_yields_the_first_then_raises():
    with ViewServer(make_leads(250)) as view:
        view.fail_with(lambda handler: handler.serve() if page_of(handler.path) == 1 else respond(503)(handler))
        pages = make_source(view.url, paging={"kind": "page"}).pages({})
        assert len(next(pages).records) == 100
        with pytest.raises(PageError) as caught:
            next(pages)
    assert (caught.value.status, caught.value.page) == (503, 2)
    assert "page 2 of GET" in str(caught.value)


@pytest.mark.parametrize("fault, message", [
    (drop_connection, "connection failed: Remote end closed connection without response"),
    (short_body, r"request failed: IncompleteRead\(13 bytes read"),
    (truncated_json, "body is not JSON"),
])
def test_real_connection_faults_become_page_errors(fault, message):
    with ViewServer(make_leads(3)) as view:
        view.fail_with(fault, times=1)
        with pytest.raises(PageError, match=message) as caught:
            list(make_source(view.url, paging={"kind": "page"}).pages({}))
        assert caught.value.page == 1
        assert len(list(make_source(view.url, paging={"kind": "page"}).pages({}))[0].records) == 3  # the fault was one-shot


def test_connection_refused_names_the_reason_not_the_query():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = make_source(f"http://127.0.0.1:{port}/api?key=TOPSECRET", params={})
    with pytest.raises(PageError) as caught:
        list(source.pages({"token": "ALSOSECRET"}))
    assert "Connection refused" in str(caught.value)
    assert "SECRET" not in str(caught.value)


# Edge cases with `responses`

@pytest.mark.parametrize("status", [400, 401, 403, 404, 429, 500, 503])
@responses.activate
def test_http_errors_name_status_page_and_a_short_excerpt(status):
    responses.get(API, status=status, body="x" * 5000)
    with pytest.raises(PageError) as caught:
        list(make_source(API).pages({}))
    message = str(caught.value)
    assert (caught.value.status, caught.value.page) == (status, 1)
    assert f"page 1 of GET {API}: HTTP {status}" in message
    assert "x" * 200 in message and "x" * 201 not in message


@responses.activate
def test_redirects_are_not_followed():
    responses.get(API, status=302, headers={"Location": "http://elsewhere.test/login?next=1"})
    with pytest.raises(PageError, match=r"HTTP 302 redirect to http://elsewhere.test/login;") as caught:
        list(make_source(API).pages({}))
    assert caught.value.status == 302
    assert len(responses.calls) == 1


@responses.activate
def test_timeout_is_configured_and_reported():
    responses.get(API, body=requests.ReadTimeout("read timed out"))
    with pytest.raises(PageError, match=r"no complete answer within 5s \(timeout\)"):
        list(make_source(API, timeout="5s").pages({}))
    assert 4.0 < responses.calls[0].request.req_kwargs["timeout"] <= 5.0  # each read may take at most what is left of the 5s


@responses.activate
def test_connection_reset_is_a_page_error():
    responses.get(API, body=requests.ConnectionError(ConnectionResetError(104, "Connection reset by peer")))
    with pytest.raises(PageError, match=r"connection failed: \[Errno 104\] Connection reset by peer"):
        list(make_source(API).pages({}))


@pytest.mark.parametrize("body, message", [
    (b'{"records": ["caf\xe9"]}', r"body is not UTF-8 \(byte 0xe9 at offset 17\)"),
    (b"<html>Service Unavailable</html>", r"body is not JSON \(Expecting value; line 1 column 1\): <html>"),
    (b'{"records": [1, 2', r"body is not JSON \(Expecting"),
    (b"", r"body is not JSON .*\(empty body\)"),
    (b"[" * 100_000 + b"]" * 100_000, r"body is not usable JSON \(RecursionError"),
    (b'{"items": []}', r"no records at 'records' \(found: items\)"),
    (b'[{"id": 1}]', r"no records at 'records' .*set records = \"\""),
    (b'{"records": {"id": 1}}', r"'records' is a dict, not a list"),
])
@responses.activate
def test_bad_bodies_fail_the_page_clearly(body, message):
    responses.get(API, body=body)
    with pytest.raises(PageError, match=message) as caught:
        list(make_source(API).pages({}))
    assert caught.value.page == 1


@responses.activate
def test_lone_surrogate_and_bom_pass_through():
    responses.get(API, body=b'\xef\xbb\xbf{"records": [{"id": "a\\ud800b"}]}')
    (page,) = make_source(API).pages({})
    assert page.records == [{"id": "a\ud800b"}]


def full_page(request):
    """A full page of 2 records numbered by the page parameter."""
    number = int(request.params.get("page", 1))
    return 200, {}, json.dumps({"records": [{"id": 2 * number}, {"id": 2 * number + 1}]})


@responses.activate
def test_a_server_ignoring_the_page_parameter_is_an_error_not_a_loop():
    responses.get(API, json={"records": [{"id": 1}, {"id": 2}]})
    pages = make_source(API, paging={"kind": "page", "size": 2}).pages({})
    assert next(pages).records == [{"id": 1}, {"id": 2}]
    with pytest.raises(PageError, match="page 2 .* repeats the previous page") as caught:
        next(pages)
    assert caught.value.page == 2
    assert len(responses.calls) == 2


@responses.activate
def test_max_pages_stops_with_a_warning(caplog):
    responses.add_callback(responses.GET, API, callback=full_page)
    pages = list(make_source(API, paging={"kind": "page", "size": 2, "max_pages": 3}).pages({}))
    assert [page.number for page in pages] == [1, 2, 3]
    assert len(responses.calls) == 3
    assert "stopped at paging.max_pages = 3" in caplog.text


@responses.activate
def test_cursor_token_is_sent_back_until_there_is_none():
    responses.get(API, match=[responses.matchers.query_param_matcher({"since": "x"})], json={"records": [{"id": 1}], "meta": {"next": "tok 2"}})
    responses.get(API, match=[responses.matchers.query_param_matcher({"since": "x", "after": "tok 2"})], json={"records": [{"id": 2}], "meta": {"next": None}})
    pages = list(make_source(API, paging={"kind": "cursor", "param": "after", "next": "meta.next"}).pages({"since": "x"}))
    assert [page.records for page in pages] == [[{"id": 1}], [{"id": 2}]]


@responses.activate
def test_relative_next_url_resolves_against_the_current_page():
    responses.get(API, json={"records": [{"id": 1}], "next": "Leads?page=2"})
    responses.get("http://view.test/api/views/Leads?page=2", json={"records": [{"id": 2}], "next": ""})
    pages = list(make_source(API, paging={"kind": "next_url", "next": "next"}).pages({}))
    assert [page.records for page in pages] == [[{"id": 1}], [{"id": 2}]]
    assert responses.calls[1].request.url == "http://view.test/api/views/Leads?page=2"


@pytest.mark.parametrize("target", [
    "http://evil.test/api/views/Leads?page=2",
    "https://view.test/api/views/Leads?page=2",
    "http://view.test:8080/api/views/Leads?page=2",
    "//evil.test/x",
])
@responses.activate
def test_next_urls_off_the_configured_host_are_refused(target):
    responses.get(API, json={"records": [{"id": 1}], "next": target}, headers={"Link": f'<{target}>; rel="next"'})
    for paging in ({"kind": "next_url", "next": "next"}, {"kind": "link"}):
        pages = make_source(API, paging=paging).pages({})
        assert next(pages).records == [{"id": 1}]
        with pytest.raises(PageError, match="not the configured host; refusing to follow it") as caught:
            next(pages)
        assert caught.value.page == 2
        assert "page=2" not in str(caught.value)
    assert len(responses.calls) == 2  # nothing was sent to the other host


@responses.activate
def test_link_header_paging_follows_rel_next():
    responses.get(API, json={"records": [{"id": 1}]}, headers={"Link": f'<{API}?p=2>; rel="next", <{API}?p=9>; rel="last"'})
    responses.get(f"{API}?p=2", json={"records": [{"id": 2}]})
    pages = list(make_source(API, paging={"kind": "link"}).pages({}))
    assert [page.records for page in pages] == [[{"id": 1}], [{"id": 2}]]


# Config

def test_config_defaults_and_durations():
    config = RestSource.Config.model_validate({"kind": "rest", "url": API, "timeout": "2m", "paging": {"kind": "page"}})
    assert config.timeout == 120.0
    assert (config.paging.param, config.paging.size_param, config.paging.size, config.paging.start) == ("page", "pageSize", 100, 1)
    assert config.paging.max_pages == 10_000
    assert RestSource.Config.model_validate({"kind": "rest", "url": API}).paging.kind == "none"


@pytest.mark.parametrize("config, error", [
    ({"url": API, "auth": {"kind": "basic"}}, "auth"),
    ({"url": API, "paging": {"kind": "pages"}}, "'none', 'page', 'offset', 'cursor', 'link', 'next_url'"),
    ({"url": API, "paging": {"kind": "page", "sise": 5}}, "sise"),
    ({"url": API, "paging": {"kind": "cursor"}}, "next"),
    ({"url": "ftp://view.test/x?key=TOPSECRET"}, "must be an http:// or https:// URL"),
    ({"url": API, "timeout": "30 secs"}, "write a number and a unit"),
])
def test_config_errors(config, error):
    with pytest.raises(pydantic.ValidationError) as caught:
        RestSource.Config.model_validate({"kind": "rest", **config})
    assert re.search(re.escape(error), str(caught.value))


# Hostile values from the view: every one is data, so it fails the poll with a PageError, never a crash

HOSTILE = {
    "next URL port out of range": ({"kind": "next_url", "next": "next"}, {"next": "http://view.test:99999/next?token=SECRET"}, {},
                                   "the next URL at 'next' is 'http://view.test:99999/next', not a usable URL (its port is out of range"),
    "next URL port not a number": ({"kind": "next_url", "next": "next"}, {"next": "http://user:SECRET@view.test:8o/n?t=SECRET"}, {},
                                   "the next URL at 'next' is 'http://view.test:8o/n', not a usable URL (its port is not a number"),
    "next URL invalid IPv6": ({"kind": "next_url", "next": "next"}, {"next": "http://[::1/next?token=SECRET"}, {},
                              "the next URL at 'next' is 'http://[::1/next', not a usable URL (its host is not a valid IP address"),
    "next URL too long to show": ({"kind": "next_url", "next": "next"}, {"next": "http://[" + "a" * 5000}, {},
                                  "the next URL at 'next' is 'http://[" + "a" * 31 + "…', not a usable URL"),
    "Link header port out of range": ({"kind": "link"}, {}, {"Link": '<http://view.test:99999/next?token=SECRET>; rel="next"'},
                                      "the Link header's next URL is 'http://view.test:99999/next', not a usable URL (its port is out of range"),
    "Link header invalid IPv6": ({"kind": "link"}, {}, {"Link": '<http://[::1/next?token=SECRET>; rel="next"'},
                                 "the Link header's next URL is 'http://[::1/next', not a usable URL"),
    "cursor token is an object": ({"kind": "cursor", "next": "next"}, {"next": {"token": "SECRET"}}, {},
                                  "the next-page token at 'next' is a dict, not a string"),
    "total a superscript digit": ({"kind": "page", "size": 1, "total": "total"}, {"total": "²"}, {},
                                  "the total at 'total' is '²', not a count"),
    "total of 5,000 digits": ({"kind": "page", "size": 1, "total": "total"}, {"total": "9" * 5000}, {},
                              "the total at 'total' is '" + "9" * 39 + "…', not a count"),
    "total negative": ({"kind": "page", "size": 1, "total": "total"}, {"total": -1}, {}, "the total at 'total' is '-1', not a count"),
    "total a list": ({"kind": "page", "size": 1, "total": "total"}, {"total": [[1]]}, {}, "the total at 'total' is a list, not a count"),
}


@pytest.mark.parametrize("case", HOSTILE)
@responses.activate
def test_a_hostile_paging_value_fails_the_poll_after_yielding_its_page(case):
    paging, body, headers, message = HOSTILE[case]
    responses.get(API, json={"records": [{"id": 1}], **body}, headers=headers)
    pages = make_source(API, paging=paging).pages({})
    assert next(pages).records == [{"id": 1}]  # the records were read fine: they are kept; only where to go next is bad
    with pytest.raises(PageError) as caught:
        next(pages)
    text = str(caught.value)
    assert text.startswith(f"page 1 of GET {API}: ")
    assert message in text
    assert "SECRET" not in text and len(text) < 300
    assert caught.value.page == 2
    assert len(responses.calls) == 1  # nothing was sent anywhere with the bad value


@pytest.mark.parametrize("location", ["http://[::1/login?token=SECRET", "http://view.test:99999/login?token=SECRET"])
@responses.activate
def test_a_redirect_to_a_hostile_location_is_a_page_error(location):
    responses.get(API, status=302, headers={"Location": location})
    with pytest.raises(PageError, match=r"HTTP 302 redirect to 'http://[^']*/login'; redirects are not followed") as caught:
        list(make_source(API).pages({}))
    assert "SECRET" not in str(caught.value) and caught.value.page == 1


@pytest.mark.parametrize("total, fetched", [(2, [2]), ("2", [2]), (3, [2, 0])])
@responses.activate
def test_a_total_as_a_number_or_digits_still_stops_paging(total, fetched):
    responses.get(API, json={"records": [{"id": 1}, {"id": 2}], "total": total})
    responses.get(API, json={"records": [], "total": total})
    pages = list(make_source(API, paging={"kind": "page", "size": 2, "total": "total"}).pages({}))
    assert [len(page.records) for page in pages] == fetched


@responses.activate
def test_a_non_ascii_digit_in_a_configured_path_is_a_name_not_an_index():
    responses.get(API, json={"records": [["a"], ["b"]]})
    with pytest.raises(PageError, match=r"no records at 'records.²'"):
        list(make_source(API, records="records.²").pages({}))


@pytest.mark.parametrize("url", ["http://view.test:99999/api?key=TOPSECRET", "http://view.test:x/api?key=TOPSECRET", "http://[::1/api?key=TOPSECRET"])
def test_a_configured_url_with_a_bad_port_or_host_is_a_config_error(url):
    with pytest.raises(pydantic.ValidationError) as caught:
        RestSource.Config.model_validate({"kind": "rest", "url": url})
    [error] = caught.value.errors()
    assert error["msg"].startswith("Value error, must be an http:// or https:// URL with a host")
    assert "TOPSECRET" not in error["msg"]

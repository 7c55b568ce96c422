"""The http connector: each verb against a real local sink, edge cases with `responses`."""
from __future__ import annotations

import threading
from email.utils import format_datetime
from datetime import datetime, timezone

import pydantic
import pytest
import requests
import responses

from sinkserver import SinkServer
from sinks.base import Action, ActionError
from sinks.http import HttpConnector, classify

NOW = 1_700_000_000.0
KEY = "k-0123456789abcdef"
BASE = "https://crm.example.invalid/api"


@pytest.fixture
def sink():
    """A fresh local HTTP sink."""
    with SinkServer() as server:
        yield server


@pytest.fixture
def session():
    """A keep-alive session, closed after the test."""
    with requests.Session() as s:
        yield s


def make(base_url: str, session: requests.Session, **overrides) -> HttpConnector:
    """An http connector with objects `leads` (key email) and `hooks` (no key)."""
    table = {"kind": "http", "base_url": base_url, "objects": {"leads": {"path": "/leads", "key": "email"}, "hooks": {"path": "/hooks/new"}}}
    return HttpConnector(HttpConnector.Config.model_validate({**table, **overrides}), session=session, clock=lambda: NOW)


@pytest.fixture
def crm(sink, session):
    """A connector pointed at the local sink."""
    return make(sink.url, session)


@pytest.fixture
def mocked(session):
    """A connector pointed at a `responses`-mocked base URL."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield make(BASE, session), rsps


LEAD = {"email": "ann@example.invalid", "name": "Ann"}


def leads(verb: str) -> Action:
    return Action("leads", verb)


# --- the main path, against the real sink ---------------------------------------------------


def test_create_posts_the_body_with_the_key(crm, sink):
    outcome = crm.run(leads("create"), {"body": LEAD}, KEY)
    assert (outcome.status, outcome.status_code, outcome.output) == ("succeeded", 201, LEAD)
    [request] = sink.requests
    assert (request["method"], request["path"], request["json"]) == ("POST", "/leads", LEAD)
    assert request["headers"]["Idempotency-Key"] == KEY
    assert sink.accepted == {KEY: LEAD}


def test_send_posts_any_json_to_an_object_without_key(crm, sink):
    outcome = crm.run(Action("hooks", "send"), {"body": [1, "two"]}, KEY)
    assert outcome.status == "succeeded"
    assert sink.requests_to("POST", "/hooks/new")[0]["json"] == [1, "two"]


@pytest.mark.parametrize("verb, method", [("update", "PUT"), ("replace", "PUT"), ("patch", "PATCH")])
def test_verbs_that_write_one_record(crm, sink, verb, method):
    sink.objects["/leads"] = {LEAD["email"]: {**LEAD, "name": "Old", "stage": "new"}}
    outcome = crm.run(leads(verb), {"body": LEAD}, KEY)
    assert outcome.status == "succeeded"
    [request] = sink.requests
    assert (request["method"], request["path"], request["json"]) == (method, "/leads/ann%40example.invalid", LEAD)
    assert sink.objects["/leads"][LEAD["email"]]["name"] == "Ann"


def test_delete_sends_no_body(crm, sink):
    sink.objects["/leads"] = {LEAD["email"]: LEAD}
    outcome = crm.run(leads("delete"), {"body": {"email": LEAD["email"]}}, KEY)
    assert (outcome.status, outcome.status_code, outcome.output) == ("succeeded", 204, None)
    assert sink.requests[0]["json"] is None and sink.objects["/leads"] == {}


def test_get_outputs_the_response_body(crm, sink):
    sink.objects["/leads"] = {LEAD["email"]: {**LEAD, "id": 7}}
    outcome = crm.run(leads("get"), {"body": {"email": LEAD["email"]}}, KEY)
    assert (outcome.status, outcome.output) == ("succeeded", {**LEAD, "id": 7})


def test_get_of_a_missing_record_fails(crm):
    outcome = crm.run(leads("get"), {"body": {"email": "nobody@example.invalid"}}, KEY)
    assert (outcome.status, outcome.condition, outcome.status_code) == ("failed", "404", 404)


def test_upsert_creates_when_not_found(crm, sink):
    outcome = crm.run(leads("upsert"), {"body": LEAD}, KEY)
    assert outcome.status == "succeeded"
    assert [(r["method"], r["path"], r["query"]) for r in sink.requests] == [
        ("GET", "/leads", {"email": LEAD["email"]}),
        ("POST", "/leads", {}),
    ]
    assert sink.objects["/leads"] == {LEAD["email"]: LEAD}


def test_upsert_patches_when_found(crm, sink):
    sink.objects["/leads"] = {LEAD["email"]: {**LEAD, "name": "Old", "stage": "won"}}
    outcome = crm.run(leads("upsert"), {"body": LEAD}, KEY)
    assert (outcome.status, outcome.output) == ("succeeded", {**LEAD, "stage": "won"})
    assert [(r["method"], r["path"]) for r in sink.requests] == [("GET", "/leads"), ("PATCH", "/leads/ann%40example.invalid")]


def test_every_request_carries_the_idempotency_key(crm, sink):
    sink.objects["/leads"] = {LEAD["email"]: LEAD}
    for verb in ("create", "update", "replace", "patch", "get", "upsert", "delete"):
        crm.run(leads(verb), {"body": {**LEAD, "email": "x@example.invalid"} if verb == "create" else LEAD}, KEY)
    crm.run(Action("hooks", "send"), {"body": {}}, KEY)
    assert len(sink.requests) == 9  # upsert is two requests
    keys = [r["headers"].get("Idempotency-Key") for r in sink.requests]
    assert set(keys) == {KEY, f"{KEY}-update"} and keys.count(f"{KEY}-update") == 1  # the upsert's PATCH: a derived key


def test_custom_idempotency_header_and_static_headers(sink, session):
    crm = make(sink.url, session, idempotency_header="X-Request-Id", headers={"X-Source": "agent"})
    crm.run(leads("create"), {"body": LEAD}, KEY)
    headers = sink.requests[0]["headers"]
    assert (headers["X-Request-Id"], headers["X-Source"], "Idempotency-Key" in headers) == (KEY, "agent", False)


def test_a_repeat_with_the_same_key_is_absorbed_by_the_sink(crm, sink):
    first = crm.run(leads("create"), {"body": LEAD}, KEY)
    second = crm.run(leads("create"), {"body": LEAD}, KEY)
    assert (first.status, second.status, second.status_code) == ("succeeded", "succeeded", 201)
    assert sink.replays == 1 and len(sink.objects["/leads"]) == 1


def test_a_dropped_answer_is_retryable_and_the_retry_is_a_replay(crm, sink):
    sink.drop_after_accept(1)
    lost = crm.run(leads("create"), {"body": LEAD}, KEY)
    assert (lost.status, lost.condition) == ("retryable", "connection")
    retry = crm.run(leads("create"), {"body": LEAD}, KEY)
    assert retry.status == "succeeded" and sink.replays == 1 and len(sink.objects["/leads"]) == 1


def test_a_slow_sink_times_out(sink, session):
    crm = make(sink.url, session, timeout="100ms")
    sink.delay = 0.3
    outcome = crm.run(leads("create"), {"body": LEAD}, KEY)
    assert (outcome.status, outcome.condition) == ("retryable", "timeout")


def test_a_refused_connection_is_retryable(session):
    with SinkServer() as gone:
        url = gone.url
    outcome = make(url, session).run(leads("create"), {"body": LEAD}, KEY)
    assert (outcome.status, outcome.condition, outcome.unreachable) == ("retryable", "connection", True)
    assert "refused" in outcome.error.lower() and "127.0.0.1" not in outcome.error


def test_an_answer_dropped_after_the_request_is_not_unreachable(crm, sink):
    sink.drop_after_accept(1)
    outcome = crm.run(leads("create"), {"body": LEAD}, KEY)
    assert (outcome.condition, outcome.unreachable) == ("connection", False)  # the sink was reached: a record problem at most


# --- 403: one record forbidden, or the credentials ------------------------------------------------


def test_a_403_for_one_record_fails_it_and_others_go_on(crm, sink):
    sink.fail_when(lambda r: r["json"] == {"email": "no@example.invalid"}, 403)
    outcomes = [crm.run(leads("create"), {"body": {"email": email}}, f"key-{email}")
                for email in ("a@example.invalid", "no@example.invalid", "b@example.invalid", "no@example.invalid", "c@example.invalid")]
    assert [o.status for o in outcomes] == ["succeeded", "failed", "succeeded", "failed", "succeeded"]
    assert outcomes[1].condition == "403" and "HTTP 403" in outcomes[1].error


def test_the_same_record_refused_twice_stays_its_own_problem(crm, sink):
    sink.fail_when(lambda r: True, 403)
    first = crm.run(leads("create"), {"body": LEAD}, KEY)
    again = crm.run(leads("create"), {"body": LEAD}, KEY)
    assert (first.status, again.status) == ("failed", "failed")


def test_two_records_refused_in_a_row_pause_the_connector(crm, sink):
    sink.fail_when(lambda r: True, 403)
    first = crm.run(leads("create"), {"body": {"email": "a@example.invalid"}}, "key-a")
    second = crm.run(leads("create"), {"body": {"email": "b@example.invalid"}}, "key-b")
    assert (first.status, second.status, second.condition) == ("failed", "paused", "403")
    assert "two records refused in a row" in second.error and "HTTP 403" in second.error


def test_an_upsert_whose_write_is_refused_counts_as_refused_although_its_lookup_succeeded(crm, sink):
    sink.fail_when(lambda r: r["method"] != "GET", 403)  # a read-only token
    first = crm.run(leads("upsert"), {"body": {"email": "a@example.invalid"}}, "key-a")
    second = crm.run(leads("upsert"), {"body": {"email": "b@example.invalid"}}, "key-b")
    assert (first.status, second.status) == ("failed", "paused")


def test_scripted_429_carries_retry_after(crm, sink):
    sink.fail_next(1, 429, retry_after=7)
    outcome = crm.run(leads("create"), {"body": LEAD}, KEY)
    assert (outcome.status, outcome.condition, outcome.retry_after) == ("retryable", "429", 7.0)
    assert crm.run(leads("create"), {"body": LEAD}, KEY).status == "succeeded"


def test_upsert_retried_after_a_lost_create_at_a_strict_sink(session):
    with SinkServer(strict_keys=True) as strict:
        crm = make(strict.url, session)
        strict.drop_after_accept(1)
        assert crm.run(leads("upsert"), {"body": LEAD}, KEY).condition == "connection"
        retry = crm.run(leads("upsert"), {"body": LEAD}, KEY)  # the lookup now finds the record: PATCH, derived key
        assert retry.status == "succeeded", retry.error
        assert strict.requests[-1]["headers"]["Idempotency-Key"] == f"{KEY}-update"


def test_upsert_stops_when_the_lookup_fails(crm, sink):
    sink.fail_when(lambda r: r["method"] == "GET", 503)
    outcome = crm.run(leads("upsert"), {"body": LEAD}, KEY)
    assert (outcome.status, outcome.condition) == ("retryable", "5xx")
    assert [r["method"] for r in sink.requests] == ["GET"]


def test_concurrent_runs_each_create_once(crm, sink):
    bodies = [{"email": f"u{i}@example.invalid"} for i in range(40)]
    outcomes = []

    def deliver(i):
        outcomes.append(crm.run(leads("create"), {"body": bodies[i % 20]}, f"key-{i % 20}"))

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [o.status for o in outcomes] == ["succeeded"] * 40
    assert len(sink.objects["/leads"]) == 20 and sink.replays == 20


# --- input and config -------------------------------------------------------------------------


def test_the_key_is_one_url_encoded_path_segment(crm, sink):
    crm.run(leads("patch"), {"body": {"email": "a/b c?d"}}, KEY)
    assert sink.requests[0]["path"] == "/leads/a%2Fb%20c%3Fd"


@pytest.mark.parametrize("body, says", [
    ({"name": "Ann"}, "no field 'email'"),
    ({"email": ""}, "body.email"),
    ({"email": ".."}, "body.email"),
    ({"email": True}, "body.email"),
    ({"email": {"a": 1}}, "body.email"),
])
def test_a_missing_or_unusable_key_fails_without_a_request(crm, sink, body, says):
    outcome = crm.run(leads("update"), {"body": body}, KEY)
    assert outcome.status == "failed" and says in outcome.error
    assert sink.requests == []


def test_an_integer_key_is_used_as_text(crm, sink):
    crm.run(leads("delete"), {"body": {"email": 42}}, KEY)
    assert sink.requests[0]["path"] == "/leads/42"


def test_objects_without_key_offer_only_create_and_send(crm):
    actions = crm.config.actions()
    assert {a.verb for a in actions if a.object == "hooks"} == {"create", "send"}
    assert {a.verb for a in actions if a.object == "leads"} == {"create", "send", "update", "replace", "patch", "delete", "get", "upsert"}
    with pytest.raises(ActionError, match="hooks > update"):
        crm.run(Action("hooks", "update"), {"body": {}}, KEY)


def test_input_models():
    actions = HttpConnector.Config(base_url=BASE, objects={"leads": {"path": "/leads", "key": "email"}}).actions()
    assert actions[leads("create")].model_validate({}).body == {}
    with pytest.raises(pydantic.ValidationError):
        actions[leads("update")].model_validate({"body": [1]})
    with pytest.raises(pydantic.ValidationError):
        actions[leads("create")].model_validate({"body": {}, "url": "http://elsewhere"})


@pytest.mark.parametrize("change, says", [
    ({"base_url": "crm.example.invalid"}, "not a base URL"),
    ({"base_url": "https://crm.example.invalid/api?token=x"}, "not a base URL"),
    ({"objects": {"leads": {"path": "leads"}}}, "starts with '/'"),
    ({"objects": {"leads": {"path": "/leads", "kee": "email"}}}, "kee"),
    ({"objects": {}}, "objects"),
    ({"auth": {"kind": "bearer"}}, "auth"),
    ({"timeout": "soon"}, "not a duration"),
    ({"timeout": "0s"}, "between 100ms and 1h"),
    ({"headers": {"X-Evil": "a\r\nInjected: 1"}}, "control characters"),
    ({"idempotency_header": "Idem Key"}, "not a header name"),
])
def test_config_errors_name_the_problem(change, says):
    table = {"base_url": BASE, "objects": {"leads": {"path": "/leads"}}, **change}
    with pytest.raises(pydantic.ValidationError, match=says):
        HttpConnector.Config.model_validate(table)


def test_config_defaults_and_trailing_slashes():
    config = HttpConnector.Config.model_validate({"kind": "http", "base_url": BASE + "/", "timeout": "5s", "objects": {"l": {"path": "/leads/"}}})
    assert (config.base_url, config.objects["l"].path, config.timeout, config.idempotency_header) == (BASE, "/leads", 5.0, "Idempotency-Key")


# --- edge cases with `responses` --------------------------------------------------------------

TABLE = [
    (200, "succeeded", None), (201, "succeeded", None), (204, "succeeded", None),
    (301, "failed", "301"), (400, "failed", "400"), (401, "paused", "401"), (403, "failed", "403"),
    (404, "failed", "404"), (408, "retryable", "408"), (409, "failed", "409"), (422, "failed", "422"),
    (425, "retryable", "425"), (429, "retryable", "429"), (500, "retryable", "5xx"),
    (502, "retryable", "5xx"), (503, "retryable", "5xx"),
]


@pytest.mark.parametrize("code, status, condition", TABLE)
def test_status_code_to_outcome(mocked, code, status, condition):
    crm, rsps = mocked
    rsps.post(BASE + "/leads", status=code, json={"detail": "x"} if code != 204 else None, headers={"Location": "https://elsewhere.invalid/"})
    outcome = crm.run(leads("create"), {"body": LEAD}, KEY)
    assert (outcome.status, outcome.condition, outcome.status_code) == (status, condition, code)
    assert len(rsps.calls) == 1  # a redirect is not followed
    if status != "succeeded":
        assert outcome.error.startswith(f"POST /leads: HTTP {code}") and '"detail": "x"' in outcome.error


def test_the_error_holds_a_short_excerpt_and_no_headers(mocked):
    crm, rsps = mocked
    crm.session.headers["Authorization"] = "Bearer s3cret"
    rsps.post(BASE + "/leads", status=422, body="bad\n" * 500, headers={"Set-Cookie": "session=s3cret"})
    outcome = crm.run(leads("create"), {"body": LEAD}, KEY)
    assert len(outcome.error) <= 300 and "bad bad" in outcome.error and "s3cret" not in outcome.error


def test_retry_after_in_seconds(mocked):
    crm, rsps = mocked
    rsps.post(BASE + "/leads", status=503, headers={"Retry-After": "120"})
    assert crm.run(leads("create"), {"body": LEAD}, KEY).retry_after == 120.0


def test_retry_after_as_an_http_date_uses_the_injected_clock(mocked):
    crm, rsps = mocked
    when = format_datetime(datetime.fromtimestamp(NOW + 90, timezone.utc), usegmt=True)
    rsps.post(BASE + "/leads", status=429, headers={"Retry-After": when})
    assert crm.run(leads("create"), {"body": LEAD}, KEY).retry_after == 90.0


@pytest.mark.parametrize("value, expected", [("Wed, 21 Oct 2015 07:28:00 GMT", 0.0), ("soon", None), ("nan", None), ("-5", 0.0)])
def test_retry_after_in_the_past_or_unreadable(mocked, value, expected):
    crm, rsps = mocked
    rsps.post(BASE + "/leads", status=429, headers={"Retry-After": value})
    assert crm.run(leads("create"), {"body": LEAD}, KEY).retry_after == expected


@pytest.mark.parametrize("error, status, condition", [
    (requests.exceptions.ReadTimeout("read timed out"), "retryable", "timeout"),
    (requests.exceptions.ConnectTimeout("connect timed out"), "retryable", "timeout"),
    (requests.exceptions.ConnectionError(ConnectionResetError(104, "Connection reset by peer")), "retryable", "connection"),
    (requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead"), "retryable", "connection"),
    (requests.exceptions.SSLError("certificate verify failed"), "paused", "tls"),
    (requests.exceptions.InvalidHeader("bad header"), "failed", "request"),
])
def test_exceptions_to_outcome(mocked, error, status, condition):
    crm, rsps = mocked
    rsps.post(BASE + "/leads", body=error)
    outcome = crm.run(leads("create"), {"body": LEAD}, KEY)
    assert (outcome.status, outcome.condition, outcome.status_code) == (status, condition, None)
    assert outcome.error.startswith("POST /leads: ")


def test_a_reset_names_its_cause(mocked):
    crm, rsps = mocked
    rsps.post(BASE + "/leads", body=requests.exceptions.ConnectionError(ConnectionResetError(104, "Connection reset by peer")))
    assert "Connection reset by peer" in crm.run(leads("create"), {"body": LEAD}, KEY).error


@pytest.mark.parametrize("body, content_type, output", [
    ("plain ok", "text/plain", "plain ok"),
    ("{not json", "application/json", "{not json"),
    ("", "text/plain", None),
    ('{"id": 7}', "text/plain", {"id": 7}),
])
def test_success_output(mocked, body, content_type, output):
    crm, rsps = mocked
    rsps.post(BASE + "/leads", status=200, body=body, content_type=content_type)
    outcome = crm.run(leads("create"), {"body": LEAD}, KEY)
    assert (outcome.status, outcome.output) == ("succeeded", output)


@pytest.mark.parametrize("lookup, write", [
    ([], "POST"),
    ({}, "POST"),
    ([{"email": LEAD["email"], "id": 1}], "PATCH"),
    ([{"email": "ANN@example.invalid"}], "PATCH"),
    ({"id": 1}, "PATCH"),
    ([{"id": 1}], "PATCH"),
    ([{"email": "bob@example.invalid"}, {"email": "cy@example.invalid"}], "POST"),  # the query was ignored
])
def test_upsert_reads_the_lookup(mocked, lookup, write):
    crm, rsps = mocked
    rsps.get(BASE + "/leads", json=lookup, match=[responses.matchers.query_param_matcher({"email": LEAD["email"]})])
    rsps.patch(BASE + "/leads/ann%40example.invalid", json=LEAD)
    rsps.post(BASE + "/leads", json=LEAD, status=201)
    outcome = crm.run(leads("upsert"), {"body": LEAD}, KEY)
    assert outcome.status == "succeeded"
    assert [c.request.method for c in rsps.calls] == ["GET", write]
    assert [c.request.headers["Idempotency-Key"] for c in rsps.calls] == [KEY, KEY if write == "POST" else f"{KEY}-update"]


def test_upsert_creates_after_a_404_lookup(mocked):
    crm, rsps = mocked
    rsps.get(BASE + "/leads", status=404)
    rsps.post(BASE + "/leads", status=201, json=LEAD)
    assert crm.run(leads("upsert"), {"body": LEAD}, KEY).status_code == 201


def test_upsert_refuses_a_lookup_that_is_not_json(mocked):
    crm, rsps = mocked
    rsps.get(BASE + "/leads", body="<html>login</html>", content_type="text/html")
    outcome = crm.run(leads("upsert"), {"body": LEAD}, KEY)
    assert (outcome.status, len(rsps.calls)) == ("failed", 1) and "not JSON" in outcome.error


def test_upsert_pauses_on_401_without_writing(mocked):
    crm, rsps = mocked
    rsps.get(BASE + "/leads", status=401, json={"error": "token expired"})
    outcome = crm.run(leads("upsert"), {"body": LEAD}, KEY)
    assert (outcome.status, outcome.condition, len(rsps.calls)) == ("paused", "401", 1)


def test_a_body_that_is_not_json_fails(mocked):
    crm, _ = mocked
    outcome = crm.run(leads("create"), {"body": {"x": float("nan")}}, KEY)
    assert (outcome.status, outcome.condition) == ("failed", "request")


def test_classify_a_raw_socket_error():
    outcome = classify("POST /x", ConnectionRefusedError(111, "Connection refused"), NOW)
    assert (outcome.status, outcome.condition, outcome.error) == ("retryable", "connection", "POST /x: connection failed (Connection refused)")


def test_a_static_header_with_an_encoded_word_of_an_unknown_charset_is_refused_not_a_crash():
    from sinks.base import header_safe

    assert header_safe("=?x-unknown?q?hi?=") is False  # decoding it raised LookupError before
    assert header_safe("=?utf-8?q?hi?=") is True


def test_the_environments_proxy_settings_are_read_once_per_origin_and_still_apply(monkeypatch):
    """requests would read os.environ for proxies on every call; the session reads it once per origin, with the same result."""
    from agent.http import build_session

    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "skip.invalid")
    session = build_session()
    via = session.merge_environment_settings("http://crm.invalid/a", {}, None, None, None)
    direct = session.merge_environment_settings("http://skip.invalid/a", {}, None, None, None)
    assert via["proxies"].get("http") == "http://proxy.invalid:3128" and "http" not in direct["proxies"]
    monkeypatch.setenv("HTTP_PROXY", "http://other.invalid:3128")  # read once: the settings of the first call stay
    assert session.merge_environment_settings("http://crm.invalid/b", {}, None, None, None)["proxies"]["http"] == "http://proxy.invalid:3128"
    assert build_session().merge_environment_settings("http://crm.invalid/b", {}, None, None, None)["proxies"]["http"] == "http://other.invalid:3128"

"""The ``http`` connector: actions on the objects of a REST API, one request per verb.

Config (``[connectors.NAME]``; the agent builds auth into the session)::

    kind = "http"
    base_url = "https://crm.example.invalid/api"
    idempotency_header = "Idempotency-Key"     # carries the step's key on every request
    timeout = "30s"
    headers = { X-Source = "sync-agent" }       # optional static headers
    [connectors.NAME.objects.leads]
    path = "/leads"
    key = "email"      # the body field that names a record there

Every action's input is ``{"body": ...}``. With P the object's path, K its key
field and k = body[K] (URL-encoded as one path segment)::

    create, send      POST P            (any object: no key needed)
    update, replace   PUT P/k           (only objects with a key, like all below)
    patch             PATCH P/k
    delete            DELETE P/k
    get               GET P/k           output = the response body
    upsert            GET P?K=k, then PATCH P/k if found, else POST P

A response or exception becomes an Outcome in one place, ``classify``::

    2xx                              succeeded  output = JSON body, else text, else None
    2xx with a body over 1 MB        failed     "response over 1 MB": read no further
    401, TLS failure                 paused     a credential or config problem
    403                              failed     this record is forbidden; but see below
    408, 425, 429, 5xx               retryable  with Retry-After when the server sent it
    timeout, connection error        retryable  ``unreachable`` when no connection was made
    3xx, other 4xx, unsendable       failed     redirects are not followed: fix base_url

A 403 that concerns one record fails that record; when two different records
are refused with 403 in a row, with no success in between, the refusal is the
credentials' (a token without the right scope) and the connector pauses.

``timeout`` is a deadline for the whole action (connect, send, headers and
body; both requests of an upsert): the body is streamed and the deadline
checked between chunks, each socket read waits at most the time left, and a
watchdog cuts the connection of a call still blocked at the deadline (a server
dripping its headers a byte at a time). Of a 2xx answer at most MAX_RESPONSE
bytes are read, of an error answer only enough for its excerpt.
"""
from __future__ import annotations

import email.utils
import heapq
import itertools
import json as jsonlib
import math
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, replace
from datetime import timezone
from typing import Any, Callable, Literal
from urllib.parse import quote, urlsplit

import requests
import urllib3
import urllib3.connection
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sinks.base import Action, ActionError, ConnectorConfig, Outcome, Timeout, header_safe

METHODS = {
    "create": "POST",
    "send": "POST",
    "update": "PUT",
    "replace": "PUT",
    "patch": "PATCH",
    "delete": "DELETE",
    "get": "GET",
    "upsert": "GET",  # then PATCH or POST
}
KEYED = {"update", "replace", "patch", "delete", "get", "upsert"}
WITHOUT_BODY = {"delete", "get"}
ERROR_CHARS = 300
MAX_RESPONSE = 1024 * 1024  # bytes of a 2xx answer read at most: a sink answering more fails the step
ERROR_READ = 16 * 1024  # bytes of an error answer read: enough for its excerpt
CHUNK = 64 * 1024
# Every requests exception is an OSError too, so a bare socket error is told apart from them in classify.
CONNECTION_ERRORS = (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class Body(BaseModel):
    """Input of create and send: any JSON value."""

    model_config = ConfigDict(extra="forbid")

    body: Any = Field(default_factory=dict)


class KeyedBody(BaseModel):
    """Input of the verbs that address one record: a JSON object holding the object's key field."""

    model_config = ConfigDict(extra="forbid")

    body: dict[str, Any]


class HttpObject(BaseModel):
    """One object of the API: its path under base_url and the field that names a record."""

    model_config = ConfigDict(extra="forbid")

    path: str
    key: str | None = None

    @field_validator("path")
    @classmethod
    def _plain_path(cls, value: str) -> str:
        if not re.fullmatch(r"/[^\s?#]*", value):
            raise ValueError(f"{value!r} is not a path; write one that starts with '/', without spaces, '?' or '#': '/leads'")
        return value.rstrip("/")


class HttpConfig(ConnectorConfig):
    """The ``http`` connector's table; ``auth`` is taken out by the agent, which builds the session."""

    kind: Literal["http"] = "http"
    base_url: str
    idempotency_header: str = "Idempotency-Key"
    timeout: Timeout = 30.0
    headers: dict[str, str] = Field(default_factory=dict)
    objects: dict[str, HttpObject] = Field(min_length=1)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise ValueError(f"{value!r} is not a base URL; write http(s)://host/prefix without '?' or '#': 'https://crm.example.invalid/api'")
        return value.rstrip("/")

    @field_validator("idempotency_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _TOKEN.fullmatch(value):
            raise ValueError(f"{value!r} is not a header name; use letters, digits and '-': 'Idempotency-Key'")
        return value

    @field_validator("headers")
    @classmethod
    def _safe_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _TOKEN.fullmatch(name) or not header_safe(text):
                raise ValueError(f"header {name!r}: names use letters, digits and '-'; values hold no control characters")
        return value

    def actions(self) -> dict[Action, type[BaseModel]]:
        """create and send for every object; the verbs that need k only where the object has a key."""
        return {
            Action(name, verb): KeyedBody if verb in KEYED else Body
            for name, obj in self.objects.items()
            for verb in METHODS
            if obj.key or verb not in KEYED
        }


class HttpConnector:
    """Runs actions against a REST API through an injected (authenticated) session; thread-safe.

    The session's connection pools are switched to connections the deadline watchdog can cut.
    """

    Config = HttpConfig

    def __init__(self, config: HttpConfig, *, session: requests.Session, clock: Callable[[], float]):
        self.config = config
        self.session = session
        self.clock = clock
        self._actions = config.actions()
        self._refused: str | None = None  # the key of the last call refused with 403 since the last success
        self._lock = threading.Lock()
        _watch(session)

    def run(self, action: Action, data: dict[str, Any], key: str) -> Outcome:
        """Send the request(s) of `action` with `key` in the idempotency header; never raises for delivery."""
        if action not in self._actions:
            known = ", ".join(sorted(map(str, self._actions)))
            raise ActionError(f"{action}: not an action of this http connector (known: {known})")
        call = _Call(time.monotonic() + self.config.timeout)
        _current.call = call  # the connections this thread uses register with it, so the watchdog can cut them
        _WATCHDOG.watch(call)
        try:
            outcome = self._act(action, data.get("body", {}), key, call)
        finally:
            call.finish()
            _current.call = None
        return self._judge_refusal(outcome, key)

    def _act(self, action: Action, body: Any, key: str, call: _Call) -> Outcome:
        """The request(s) of one action, all within the call's deadline."""
        obj = self.config.objects[action.object]
        if action.verb not in KEYED:
            return self._request("POST", obj.path, key, call, json=body)
        try:
            k = key_value(body, obj.key)
        except ValueError as exc:
            return Outcome("failed", error=f"{action}: {exc}", condition="input")
        item = f"{obj.path}/{quote(k, safe='')}"
        if action.verb == "upsert":
            return self._upsert(obj, k, item, body, key, call)
        return self._request(METHODS[action.verb], item, key, call, json=None if action.verb in WITHOUT_BODY else body)

    def _judge_refusal(self, outcome: Outcome, key: str) -> Outcome:
        """A 403 fails its record; a second record refused in a row, with no success between, pauses the connector."""
        with self._lock:
            if outcome.status == "succeeded":
                self._refused = None
            if outcome.status_code != 403 or outcome.status != "failed":
                return outcome
            alone = self._refused in (None, key)
            self._refused = key
        if alone:
            return outcome
        return replace(outcome, status="paused", error=_cut(f"two records refused in a row, check the permissions of the credentials: {outcome.error}"))

    def close(self) -> None:
        """Nothing to release: the session belongs to the agent, which closes it."""

    def _upsert(self, obj: HttpObject, k: str, item: str, body: Any, key: str, call: _Call) -> Outcome:
        """GET P?K=k, then PATCH P/k when the record is there, else POST P."""
        lookup = self._request("GET", obj.path, key, call, params={obj.key: k})
        if lookup.status_code == 404:
            return self._request("POST", obj.path, key, call, json=body)
        if lookup.status != "succeeded":
            return lookup
        if isinstance(lookup.output, str):
            return Outcome("failed", error=f"GET {obj.path}: the lookup answered text, not JSON; check the object's path", status_code=lookup.status_code, condition="lookup")
        if found(lookup.output, obj.key, k):
            # A derived key, still stable across retries: when a create's answer was lost, the retry finds the
            # record and patches it; strict servers refuse one key reused for a different request.
            return self._request("PATCH", item, f"{key}-update", call, json=body)
        return self._request("POST", obj.path, key, call, json=body)

    def _request(self, method: str, path: str, key: str, call: _Call, *, json: Any = None, params: dict | None = None) -> Outcome:
        """One request to base_url + path within the call's deadline, its answer read up to a cap, classified."""
        what = f"{method} {path}"
        left = call.left()
        if left <= 0:
            return Outcome("retryable", error=f"{what}: timed out", condition="timeout")
        headers = {"Accept": "application/json", **self.config.headers, self.config.idempotency_header: key}
        try:
            response = self.session.request(
                method, self.config.base_url + path, params=params, json=json, headers=headers,
                timeout=(left, left), allow_redirects=False, stream=True,
            )
            result: Answer | BaseException = read_answer(response, call)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            result = exc
        outcome = classify(what, result, self.clock())
        if call.fired:  # the watchdog cut the connection: what was read may be cut short too (headers without their end)
            return Outcome("retryable", error=f"{what}: timed out", condition="timeout", unreachable=outcome.unreachable)
        return outcome


def key_value(body: Any, field: str) -> str:
    """The text of body[field], usable as one path segment; ValueError naming the field otherwise."""
    if not isinstance(body, dict) or field not in body:
        raise ValueError(f"the body has no field {field!r}, the object's key; add it to the body")
    value = body[field]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() in ("", ".", ".."):
        raise ValueError(f"body.{field} is {str(value)[:40]!r}; the object's key must be a non-empty string or an integer")
    return str(value)


def found(answer: Any, field: str, k: str) -> bool:
    """Whether a lookup's JSON shows the record: a non-empty object or list, unless every item names another key."""
    items = answer if isinstance(answer, list) else [answer] if isinstance(answer, dict) and answer else []
    keyed = [item for item in items if isinstance(item, dict) and field in item]
    # A server that ignores the query answers every record; only a match counts then.
    return len(keyed) < len(items) or any(str(item[field]).casefold() == k.casefold() for item in keyed)


@dataclass
class Answer:
    """A response as far as it was read: at most MAX_RESPONSE bytes of a 2xx body, ERROR_READ of another."""

    status_code: int
    reason: str
    headers: Any
    content: bytes
    encoding: str | None
    whole: bool  # the body was read to its end

    @property
    def text(self) -> str:
        try:
            return self.content.decode(self.encoding or "utf-8", "replace")
        except LookupError:  # a charset Python does not know
            return self.content.decode("utf-8", "replace")


def read_answer(response: requests.Response, call: _Call) -> Answer:
    """Read a streamed response up to its cap, checking the deadline between chunks; the connection is released or closed."""
    limit = MAX_RESPONSE if 200 <= response.status_code < 300 else ERROR_READ
    parts, size, whole = [], 0, True
    try:
        for chunk in response.iter_content(CHUNK):
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                whole = False
                break
            if call.left() <= 0:
                raise TimeoutError("the deadline passed while the body was read")
    finally:
        response.close()  # a body not read to its end closes the connection instead of returning it to the pool
    encoding = requests.utils.get_encoding_from_headers(response.headers)
    return Answer(response.status_code, response.reason or "", response.headers, b"".join(parts)[:limit], encoding, whole)


def classify(what: str, result: Answer | BaseException, now: float) -> Outcome:
    """The one place where a response or a request exception becomes an Outcome."""
    if isinstance(result, (requests.exceptions.SSLError, ssl.SSLError)):
        return Outcome("paused", error=_cut(f"{what}: TLS failed ({reason(result)}); check the certificate or the URL"), condition="tls")
    if isinstance(result, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
        return Outcome("retryable", error=f"{what}: timed out", condition="timeout", unreachable=unreachable(result))
    if isinstance(result, CONNECTION_ERRORS) or (isinstance(result, OSError) and not isinstance(result, requests.RequestException)):
        return Outcome("retryable", error=_cut(f"{what}: connection failed ({reason(result)})"), condition="connection", unreachable=unreachable(result))
    if isinstance(result, BaseException):
        return Outcome("failed", error=_cut(f"{what}: request not sent ({type(result).__name__}: {reason(result)})"), condition="request")
    code = result.status_code
    if 200 <= code < 300 and not result.whole:
        return Outcome("failed", error=f"{what}: HTTP {code} with a response over 1 MB, not read further; the sink may have applied the request",
                       status_code=code, condition="response")
    if 200 <= code < 300:
        return Outcome.ok(response_body(result), status_code=code)
    if code == 401:
        status = "paused"
    elif code in (408, 425, 429) or code >= 500:
        status = "retryable"
    else:
        status = "failed"
    return Outcome(
        status,
        error=_cut(": ".join(filter(None, [what, f"HTTP {code} {result.reason or ''}".rstrip(), excerpt(result)]))),
        status_code=code,
        retry_after=retry_after(result.headers.get("Retry-After"), now),
        condition="5xx" if code >= 500 else str(code),
    )


def response_body(answer: Answer) -> Any:
    """The parsed JSON body, else its text, else None."""
    if not answer.content:
        return None
    try:
        return jsonlib.loads(answer.content)
    except ValueError:  # UnicodeDecodeError included
        return answer.text


def excerpt(answer: Answer, limit: int = 200) -> str:
    """The start of a response body on one line."""
    text = " ".join(answer.text.split())
    return text if len(text) <= limit else text[:limit] + "…"


_UNREACHABLE = (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError, requests.ConnectTimeout,
                ConnectionRefusedError, socket.gaierror)


def unreachable(exc: BaseException) -> bool:
    """Whether the connection itself could not be made (refused, unknown host, connect timeout): nothing was sent."""
    return any(isinstance(cause, _UNREACHABLE) for cause in _causes(exc))


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date), None if absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - now
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _causes(exc: BaseException):
    """The exception, then each one it wraps (requests wraps urllib3 wraps socket errors); bounded in case of a cycle."""
    yield exc
    for _ in range(10):
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((arg for arg in exc.args if isinstance(arg, BaseException)), None) or exc.__cause__ or exc.__context__
        if not isinstance(inner, BaseException) or inner is exc:
            return
        exc = inner
        yield exc


def reason(exc: BaseException) -> str:
    """The innermost cause of a request exception, e.g. 'Connection refused', without the URL around it."""
    *_, exc = _causes(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _cut(text: str) -> str:
    """An error text no longer than ERROR_CHARS."""
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"


# --- the deadline watchdog ------------------------------------------------------------------------

_current = threading.local()  # .call: the _Call of the action this thread runs


class _Call:
    """One action's deadline and the connection it uses now; ``cut`` shuts that connection when time is up."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.conn: Any = None
        self.socks: list[socket.socket] = []  # kept: http.client drops conn.sock when an answer ends the connection, still reading it
        self.fired = False
        self.done = False
        self._lock = threading.Lock()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def finish(self) -> None:
        with self._lock:
            self.done = True

    def cut(self) -> None:
        """Shut the socket down: a read blocked on it returns at once, in the thread that waits."""
        with self._lock:
            if self.done:
                return
            self.fired = True
            socks = [*self.socks, getattr(self.conn, "sock", None)]  # the connection's own: a TLS handshake under way
        for sock in filter(None, socks):
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: an SSLSocket's would drop its TLS state
            except OSError:
                pass


class _Watchdog:
    """One daemon thread that cuts every call still running at its deadline."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, _Call]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._compact_at = 1024

    def watch(self, call: _Call) -> None:
        with self._wake:
            if len(self._due) >= self._compact_at:  # finished calls wait for their deadline in the heap: drop them now and then
                self._due = [entry for entry in self._due if not entry[2].done]
                heapq.heapify(self._due)
                self._compact_at = max(1024, 2 * len(self._due))
            heapq.heappush(self._due, (call.deadline, next(self._order), call))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="http-deadlines", daemon=True)
                self._thread.start()
            elif self._due[0][2] is call:
                self._wake.notify()

    def _run(self) -> None:
        with self._wake:
            while True:
                while self._due and self._due[0][2].done:
                    heapq.heappop(self._due)
                if not self._due:
                    self._wake.wait()
                    continue
                left = self._due[0][0] - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                heapq.heappop(self._due)[2].cut()


_WATCHDOG = _Watchdog()


class _Cuttable:
    """A urllib3 connection that registers itself and its socket with the calling thread's _Call at every step."""

    def connect(self) -> None:
        self._register()
        super().connect()  # type: ignore[misc]
        self._register()

    def request(self, *args: Any, **kwargs: Any) -> None:
        self._register()
        super().request(*args, **kwargs)  # type: ignore[misc]
        self._register()  # plain HTTP connects inside request()

    def getresponse(self) -> Any:
        self._register()
        return super().getresponse()  # type: ignore[misc]

    def _register(self) -> None:
        call = getattr(_current, "call", None)
        if call is None:
            return
        if call.fired:
            raise TimeoutError("the deadline passed")
        call.conn = self
        if self.sock is not None and self.sock not in call.socks:  # type: ignore[attr-defined]
            call.socks.append(self.sock)  # type: ignore[attr-defined]


class _HTTPConnection(_Cuttable, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_Cuttable, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _watch(session: requests.Session) -> None:
    """Let the watchdog cut the session's connections; its adapters keep their pool sizes and retries."""
    for adapter in session.adapters.values():
        manager = getattr(adapter, "poolmanager", None)
        if manager is not None:
            manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

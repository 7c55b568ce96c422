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
    401, 403, TLS failure            paused     a credential or config problem
    408, 425, 429, 5xx               retryable  with Retry-After when the server sent it
    timeout, connection error        retryable
    3xx, other 4xx, unsendable       failed     redirects are not followed: fix base_url
"""
from __future__ import annotations

import email.utils
import math
import re
import ssl
from datetime import timezone
from typing import Any, Callable, Literal
from urllib.parse import quote, urlsplit

import requests
import urllib3
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sinks.base import Action, ActionError, ConnectorConfig, Outcome, Seconds, header_safe

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
    timeout: Seconds = Field(30.0, gt=0)
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
    """Runs actions against a REST API through an injected (authenticated) session; thread-safe."""

    Config = HttpConfig

    def __init__(self, config: HttpConfig, *, session: requests.Session, clock: Callable[[], float]):
        self.config = config
        self.session = session
        self.clock = clock
        self._actions = config.actions()

    def run(self, action: Action, data: dict[str, Any], key: str) -> Outcome:
        """Send the request(s) of `action` with `key` in the idempotency header; never raises for delivery."""
        if action not in self._actions:
            known = ", ".join(sorted(map(str, self._actions)))
            raise ActionError(f"{action}: not an action of this http connector (known: {known})")
        obj = self.config.objects[action.object]
        body = data.get("body", {})
        if action.verb not in KEYED:
            return self._request("POST", obj.path, key, json=body)
        try:
            k = key_value(body, obj.key)
        except ValueError as exc:
            return Outcome("failed", error=f"{action}: {exc}", condition="input")
        item = f"{obj.path}/{quote(k, safe='')}"
        if action.verb == "upsert":
            return self._upsert(obj, k, item, body, key)
        return self._request(METHODS[action.verb], item, key, json=None if action.verb in WITHOUT_BODY else body)

    def close(self) -> None:
        """Nothing to release: the session belongs to the agent, which closes it."""

    def _upsert(self, obj: HttpObject, k: str, item: str, body: Any, key: str) -> Outcome:
        """GET P?K=k, then PATCH P/k when the record is there, else POST P."""
        lookup = self._request("GET", obj.path, key, params={obj.key: k})
        if lookup.status_code == 404:
            return self._request("POST", obj.path, key, json=body)
        if lookup.status != "succeeded":
            return lookup
        if isinstance(lookup.output, str):
            return Outcome("failed", error=f"GET {obj.path}: the lookup answered text, not JSON; check the object's path", status_code=lookup.status_code, condition="lookup")
        if found(lookup.output, obj.key, k):
            # A derived key, still stable across retries: when a create's answer was lost, the retry finds the
            # record and patches it; strict servers refuse one key reused for a different request.
            return self._request("PATCH", item, f"{key}-update", json=body)
        return self._request("POST", obj.path, key, json=body)

    def _request(self, method: str, path: str, key: str, *, json: Any = None, params: dict | None = None) -> Outcome:
        """One request to base_url + path, classified."""
        headers = {"Accept": "application/json", **self.config.headers, self.config.idempotency_header: key}
        try:
            result: requests.Response | Exception = self.session.request(
                method, self.config.base_url + path, params=params, json=json, headers=headers,
                timeout=self.config.timeout, allow_redirects=False,
            )
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            result = exc
        return classify(f"{method} {path}", result, self.clock())


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


def classify(what: str, result: requests.Response | BaseException, now: float) -> Outcome:
    """The one place where a response or a request exception becomes an Outcome."""
    if isinstance(result, (requests.exceptions.SSLError, ssl.SSLError)):
        return Outcome("paused", error=_cut(f"{what}: TLS failed ({reason(result)}); check the certificate or the URL"), condition="tls")
    if isinstance(result, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
        return Outcome("retryable", error=f"{what}: timed out", condition="timeout")
    if isinstance(result, CONNECTION_ERRORS) or (isinstance(result, OSError) and not isinstance(result, requests.RequestException)):
        return Outcome("retryable", error=_cut(f"{what}: connection failed ({reason(result)})"), condition="connection")
    if isinstance(result, BaseException):
        return Outcome("failed", error=_cut(f"{what}: request not sent ({type(result).__name__}: {reason(result)})"), condition="request")
    code = result.status_code
    if 200 <= code < 300:
        return Outcome.ok(response_body(result), status_code=code)
    if code in (401, 403):
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


def response_body(response: requests.Response) -> Any:
    """The parsed JSON body, else its text, else None."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


def excerpt(response: requests.Response, limit: int = 200) -> str:
    """The start of a response body on one line."""
    text = " ".join(response.text.split())
    return text if len(text) <= limit else text[:limit] + "…"


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


def reason(exc: BaseException) -> str:
    """The innermost cause of a request exception, e.g. 'Connection refused', without the URL around it."""
    for _ in range(10):  # requests wraps urllib3 wraps socket errors; bounded in case of a cycle
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((arg for arg in exc.args if isinstance(arg, BaseException)), None) or exc.__cause__ or exc.__context__
        if not isinstance(inner, BaseException) or inner is exc:
            break
        exc = inner
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _cut(text: str) -> str:
    """An error text no longer than ERROR_CHARS."""
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"

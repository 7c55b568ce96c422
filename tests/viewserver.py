"""A real HTTP view server on 127.0.0.1 for tests and benchmarks.

    with ViewServer(make_leads(250), paging="page", page_size=100) as view:
        requests.get(view.url, params={"page": 2}).json()["records"]

It serves ``records`` newest-first by ``lastModified`` (as given when a record
lacks it), paged the way the source's ``paging`` kinds expect with their
default parameter names:

    none      every record in one body
    page      ?page=N (1-based) &pageSize=S
    offset    ?offset=N &limit=S
    cursor    ?cursor=T &limit=S; the body's "next" holds the next token (null at the end)
    link      ?page=N &pageSize=S; an absolute ``Link: <...>; rel="next"`` header
    next_url  ?page=N &pageSize=S; the body's "next" holds a relative URL (null at the end)

The body is ``{<records_path>: [...], "total": n, "next": ...}`` (nested for a
dotted path; the bare list when ``records_path`` is ""). ``?since=T`` serves
only records with ``lastModified >= T`` (ISO-8601 UTC text compares in time
order). With ``username``/``password`` set, requests without that basic auth
get 401.

Faults: ``fail_next(n, status)`` answers the next n requests with ``status``;
``fail_with(fault, times)`` hands the next requests to ``fault(handler)``,
which answers as it likes (``respond``, ``drop_connection``,
``truncated_json``, ``short_body``, or ``handler.serve()`` for a normal page).

Replace records rather than editing them in place (``view.records[i] =
update(view.records[i])``): the newest-first order is re-sorted only when the
list changes.
"""
from __future__ import annotations

import base64
import bisect
import itertools
import json
import socket
import socketserver
import threading
import unicodedata
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode, urlsplit

PAGINGS = ("none", "page", "offset", "cursor", "link", "next_url")
_SIZE_PARAM = {"offset": "limit", "cursor": "limit"}  # the others use pageSize


class _Watched(list):
    """A list that counts its changes, so the server re-sorts only after one."""

    version = 0


def _counted(name: str):
    """Wrap list method `name` so that calling it bumps the list's version."""
    method = getattr(list, name)

    def changed(self, *args):
        self.version += 1
        return method(self, *args)

    return changed


for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse"):
    setattr(_Watched, _name, _counted(_name))


class Handler(BaseHTTPRequestHandler):
    """One request; keep-alive with exact Content-Length, no Nagle stall on loopback."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):
        """Hand the request to the ViewServer."""
        self.server.view._handle(self)

    def serve(self) -> None:
        """Answer with the page this request asks for (for faults that let a request through)."""
        self.server.view._serve(self)

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        """Send a complete response."""
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        """Stay quiet: tests and benchmarks read their own output."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        """Bind without the reverse DNS lookup HTTPServer does, which can stall for seconds."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def respond(status: int, body: bytes = b'{"error": "injected fault"}') -> Callable[[Handler], None]:
    """A fault that answers `status` with `body`."""
    return lambda handler: handler.reply(status, body)


def drop_connection(handler: Handler) -> None:
    """A fault that closes the connection without answering."""
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


def truncated_json(handler: Handler) -> None:
    """A fault that answers 200 with JSON cut off half-way (the length is honest)."""
    handler.reply(200, '{"records": [{"lastSubmissionID": "S1", "FirstName": "Jos'.encode())


def short_body(handler: Handler) -> None:
    """A fault that announces 1000 bytes, sends a few, and closes."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.write(b'{"records": [')
    drop_connection(handler)


def _encode(body: Any) -> bytes:
    """UTF-8 JSON; \\u-escaped when a lone surrogate cannot be encoded raw."""
    try:
        return json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(body).encode()


def _nest(path: str, records: list, extra: dict) -> Any:
    """The body: records at the dotted `path`, `extra` keys at the top."""
    if not path:
        return records
    node: Any = records
    for part in reversed(path.split(".")):
        node = {part: node}
    return {**node, **extra}


class ViewServer:
    """A paged, optionally authenticated JSON view on 127.0.0.1 (see the module docstring)."""

    def __init__(self, records: list[dict], paging: str = "page", page_size: int = 100, records_path: str = "records",
                 username: str | None = None, password: str | None = None):
        if paging not in PAGINGS:
            raise ValueError(f"unknown paging {paging!r} (known: {', '.join(PAGINGS)})")
        if not records_path and paging in ("cursor", "next_url"):
            raise ValueError(f"paging {paging!r} needs a body object for 'next'; give a records_path")
        self.records = records
        self.paging, self.page_size, self.records_path = paging, page_size, records_path
        self.hits: list[str] = []
        self._auth = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode() if username is not None else None
        self._lock = threading.Lock()
        self._fault: Callable[[Handler], Any] | None = None
        self._fault_left: int | None = None
        self._sorted_from: tuple[list, int] = ([], -1)
        self._server: _Server | None = None

    @property
    def records(self) -> list[dict]:
        """The view's records (mutable; the server sees changes on the next request)."""
        return self._records

    @records.setter
    def records(self, records: list[dict]) -> None:
        self._records = _Watched(records)

    @property
    def url(self) -> str:
        """The view's URL (the server must be started)."""
        return f"http://127.0.0.1:{self._server.server_port}/api/views/Leads/All"

    def start(self) -> ViewServer:
        """Listen on a free port and serve in a background thread."""
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.view = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> ViewServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next `n` requests with HTTP `status`."""
        self.fail_with(respond(status), times=n)

    def fail_with(self, fault: Callable[[Handler], Any] | None, times: int | None = None) -> None:
        """Hand the next `times` requests (every one when None) to `fault(handler)`; None clears it."""
        with self._lock:
            self._fault, self._fault_left = fault, times

    def _claim_fault(self) -> Callable[[Handler], Any] | None:
        """The fault for this request, counting one use of it."""
        with self._lock:
            fault = self._fault
            if fault and self._fault_left is not None:
                self._fault_left -= 1
                if self._fault_left <= 0:
                    self._fault = None
            return fault

    def _handle(self, handler: Handler) -> None:
        """Log the hit, check auth, let a fault answer or serve the page."""
        with self._lock:
            self.hits.append(handler.path)
        if self._auth and handler.headers.get("Authorization") != self._auth:
            return handler.reply(401, b'{"error": "unauthorized"}', {"WWW-Authenticate": 'Basic realm="view"'})
        fault = self._claim_fault()
        return fault(handler) if fault else self._serve(handler)

    def _serve(self, handler: Handler) -> None:
        """Answer with the page the query asks for (400 on a bad number)."""
        parts = urlsplit(handler.path)
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        try:
            body, headers = self._page(parts.path, query, handler.server.server_port)
        except ValueError as exc:
            return handler.reply(400, _encode({"error": str(exc)}))
        handler.reply(200, _encode(body), headers)

    def _page(self, path: str, query: dict[str, str], port: int) -> tuple[Any, dict[str, str]]:
        """The body and headers for one request."""
        ordered, count = self._selected(query.get("since"))
        size = _number(query, _SIZE_PARAM.get(self.paging, "pageSize"), self.page_size)
        number = _number(query, "page", 1)
        start = {"none": 0, "offset": _number(query, "offset", 0), "cursor": _number(query, "cursor", 0)}.get(self.paging, (number - 1) * size)
        end = count if self.paging == "none" else min(start + size, count)
        more = end < count
        following = urlencode({**query, "page": number + 1})
        nexts = {"cursor": str(end) if more else None, "next_url": f"{path}?{following}" if more else None}
        extra = {"total": count, **({"next": nexts[self.paging]} if self.paging in nexts else {})}
        headers = {"Link": f'<http://127.0.0.1:{port}{path}?{following}>; rel="next"'} if self.paging == "link" and more else {}
        return _nest(self.records_path, ordered[start:end], extra), headers

    def _selected(self, since: str | None) -> tuple[list[dict], int]:
        """The served order and how many of its first records pass `since`."""
        ordered, ascending = self._ordered()
        if since is None:
            return ordered, len(ordered)
        if ascending is not None:
            return ordered, len(ascending) - bisect.bisect_left(ascending, since)
        kept = [r for r in ordered if not isinstance(r, dict) or str(r.get("lastModified", since)) >= since]
        return kept, len(kept)

    def _ordered(self) -> tuple[list[dict], list[str] | None]:
        """Records newest-first (and their times ascending), re-sorted only after a change."""
        with self._lock:
            source, version = self._sorted_from
            if source is not self._records or version != self._records.version:
                records = list(self._records)
                ascending = None
                if all(isinstance(r, dict) and "lastModified" in r for r in records):
                    records.sort(key=lambda r: str(r["lastModified"]), reverse=True)  # stable: ties keep their given order
                    ascending = [str(r["lastModified"]) for r in reversed(records)]  # odd values (numbers, NaN) as text
                self._sorted, self._sorted_from = (records, ascending), (self._records, self._records.version)
            return self._sorted


def _number(query: dict[str, str], name: str, default: int) -> int:
    """A non-negative integer query parameter."""
    value = query.get(name, str(default))
    if not value.isdigit():
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


# Lead Registration data

_FIRST = ["José", "Anna", "Zoë", "Łukasz", "Søren", "Marie-Thérèse", "Mei", "Ahmed", "İlkay", "John"]
_LAST = ["García", "Schmidt", "Nørgaard", "Wiśniewski", "O'Brien", "Dubois", "Chen", "Haddad", "Yılmaz", "Smith"]
_COMPANIES = ["Müller GmbH", "Acme Corp", "Société Générale de Test", "Nordic Ltd", "東京 Trading", "Globex"]
_STATUSES = ["New", "Contacted", "Qualified", "Spam"]
_EPOCH = "2026-11-01T10:00:00Z"
_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class _Issued:
    """Process-wide serials and the newest time handed out, so every lead and version is unique and newer."""

    records = itertools.count(1)
    submissions = itertools.count(1)
    newest = datetime.strptime(_EPOCH, _FORMAT).replace(tzinfo=timezone.utc)

    @classmethod
    def time(cls, at: datetime) -> str:
        """`at` as ISO text, remembered if it is the newest so far."""
        cls.newest = max(cls.newest, at)
        return at.strftime(_FORMAT)


def _ascii(text: str) -> str:
    """`text` without accents or non-ASCII letters (for e-mail local parts)."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().replace("'", "").lower()


def make_leads(n: int, start: str = _EPOCH, step: float = 60) -> list[dict]:
    """`n` Lead Registration records, the first modified at `start`, each next `step` seconds later."""
    first_time = datetime.strptime(start, _FORMAT).replace(tzinfo=timezone.utc)
    leads = []
    for i in range(n):
        serial = next(_Issued.records)
        first, last = _FIRST[serial % len(_FIRST)], _LAST[serial * 7 % len(_LAST)]
        leads.append({
            "lastSubmissionID": f"S{next(_Issued.submissions):09d}",
            "RecordId": f"R{serial:07d}",
            "lastModified": _Issued.time(first_time + timedelta(seconds=i * step)),
            "FirstName": first,
            "LastName": last,
            "Email": f"{_ascii(first)}.{_ascii(last)}{serial}@example.invalid",
            "Company": _COMPANIES[serial % len(_COMPANIES)],
            "Status": _STATUSES[serial % len(_STATUSES)],
            "Phone": f"+49 30 {serial:07d}",
        })
    return leads


def update(record: dict, at: str | None = None, **changes: Any) -> dict:
    """A new version of `record`: new lastSubmissionID, lastModified `at` (default: a second after the newest issued)."""
    when = datetime.strptime(at, _FORMAT).replace(tzinfo=timezone.utc) if at else _Issued.newest + timedelta(seconds=1)
    return {**record, **changes, "lastSubmissionID": f"S{next(_Issued.submissions):09d}", "lastModified": _Issued.time(when)}

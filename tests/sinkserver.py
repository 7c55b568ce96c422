"""A real HTTP sink on 127.0.0.1 for tests: records requests, honours idempotency keys, fails on demand.

    with SinkServer() as sink:
        requests.post(sink.url + "/leads", json={"email": "a@x"}, headers={"Idempotency-Key": "k1"})
        assert sink.accepted == {"k1": {"email": "a@x"}}

Objects live in ``sink.objects[P][k]``, k being the body's ``key_field``:
POST P creates (409 if k exists), PUT P/k creates or replaces, PATCH P/k merges,
DELETE P/k removes, GET P/k reads one, GET P?field=value lists the matches.
A POST/PUT/PATCH/DELETE whose idempotency key was accepted (2xx) before gets the
first answer again and counts in ``replays``; GET ignores the key, as real APIs do.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote, urlsplit

from requests.structures import CaseInsensitiveDict

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
Answer = tuple[int, Any, dict[str, str]]


class SinkServer:
    """An HTTP sink in a thread; every attribute below may be read by tests, under no lock."""

    def __init__(self, key_field: str = "email", idempotency_header: str = "Idempotency-Key", strict_keys: bool = False):
        self.key_field = key_field
        self.idempotency_header = idempotency_header
        self.strict_keys = strict_keys  # True: a key reused for another method or path gets 422 (IETF draft, Stripe)
        self.requests: list[dict[str, Any]] = []  # method, path (raw), query, headers, json
        self.accepted: dict[str, Any] = {}  # idempotency key -> body of the first 2xx request
        self.objects: dict[str, dict[str, Any]] = {}  # collection path -> k -> object
        self.replays = 0
        self.delay = 0.0  # seconds before answering each request
        self.url = ""
        self._answers: dict[str, tuple[str, str, int, Any]] = {}
        self._rules: list[dict[str, Any]] = []
        self._drops = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> "SinkServer":
        """Listen on a free port of 127.0.0.1 and serve in a daemon thread."""
        server = self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.sink = self  # type: ignore[attr-defined]
        # stop() waits up to one poll interval
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, name="sinkserver", daemon=True).start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "SinkServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(self, n: int, status: int, retry_after: int | str | None = None) -> None:
        """Answer the next n requests with `status` (and Retry-After) without handling them."""
        self._rules.append({"when": lambda request: True, "left": n, "status": status, "retry_after": retry_after})

    def fail_when(self, when: Callable[[dict[str, Any]], bool], status: int, retry_after: int | str | None = None) -> None:
        """Answer every request for which when(request) is true with `status`, without handling it."""
        self._rules.append({"when": when, "left": None, "status": status, "retry_after": retry_after})

    def drop_after_accept(self, n: int = 1) -> None:
        """Handle the next n accepted writes, then close the connection without answering."""
        self._drops += n

    def requests_to(self, method: str, path: str | None = None) -> list[dict[str, Any]]:
        """The recorded requests with this method (and raw path)."""
        return [r for r in self.requests if r["method"] == method and path in (None, r["path"])]

    def answer(self, request: dict[str, Any]) -> Answer | None:
        """Record `request` and decide its answer (status, JSON body, headers); None drops the connection."""
        with self._lock:
            self.requests.append(request)
        if self.delay:
            time.sleep(self.delay)
        with self._lock:  # one request at a time from here, so a key is checked and stored atomically
            failure = self._scripted(request)
            if failure:
                return failure
            key = request["headers"].get(self.idempotency_header) if request["method"] in MUTATING else None
            if key in self._answers:
                return self._replay(request, key)
            status, body = self._apply(request)
            if not 200 <= status < 300 or request["method"] not in MUTATING:
                return status, body, {}
            if key:
                self._answers[key] = (request["method"], request["path"], status, body)
                self.accepted[key] = request["json"]
            if self._drops:
                self._drops -= 1
                return None
            return status, body, {}

    def _scripted(self, request: dict[str, Any]) -> Answer | None:
        """The answer of the first failure rule that applies to `request`, if any."""
        for rule in self._rules:
            if rule["left"] != 0 and rule["when"](request):
                if rule["left"] is not None:
                    rule["left"] -= 1
                headers = {} if rule["retry_after"] is None else {"Retry-After": str(rule["retry_after"])}
                return rule["status"], {"error": f"scripted failure {rule['status']}"}, headers
        return None

    def _replay(self, request: dict[str, Any], key: str) -> Answer:
        """The first answer given under `key`, or 422 when strict and the key now names another request."""
        method, path, status, body = self._answers[key]
        if self.strict_keys and (method, path) != (request["method"], request["path"]):
            return 422, {"error": f"idempotency key reused: first {method} {path}"}, {}
        self.replays += 1
        return status, body, {}

    def _apply(self, request: dict[str, Any]) -> tuple[int, Any]:
        """Carry out a request on the object store."""
        method, path, body = request["method"], request["path"], request["json"]
        if method == "GET" and (request["query"] or path in self.objects):
            items = self.objects.get(path, {}).values()
            return 200, [item for item in items if all(str(item.get(f)) == v for f, v in request["query"].items())]
        if method in ("POST", "PUT", "PATCH") and not isinstance(body, dict):
            return (201, body) if method == "POST" else (400, {"error": "the body must be a JSON object"})
        if method == "POST":
            stored = self.objects.setdefault(path, {})
            if self.key_field in body and str(body[self.key_field]) in stored:
                return 409, {"error": f"{self.key_field} {body[self.key_field]!r} exists"}
            if self.key_field in body:
                stored[str(body[self.key_field])] = body
            return 201, body
        collection, _, k = path.rpartition("/")
        k = unquote(k)
        stored = self.objects.setdefault(collection, {}) if method == "PUT" else self.objects.get(collection, {})
        if method == "PUT":
            stored[k] = body
            return 200, body
        if k not in stored:
            return 404, {"error": f"{path} not found"}
        if method == "PATCH":
            stored[k] = {**stored[k], **body}
        elif method == "DELETE":
            del stored[k]
            return 204, None
        return 200, stored[k]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so every answer carries Content-Length
    disable_nagle_algorithm = True  # without it a keep-alive client stalls ~40 ms per request

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if len(raw) < length:  # the client died mid-body: no request arrived, nothing to accept
            self.close_connection = True
            return
        url = urlsplit(self.path)
        request = {"method": self.command, "path": url.path, "query": dict(parse_qsl(url.query)),
                   "headers": CaseInsensitiveDict(self.headers.items()), "json": None}
        try:
            request["json"] = json.loads(raw) if raw else None
        except ValueError:
            return self._reply(400, {"error": "the body is not JSON"}, {})
        answer = self.server.sink.answer(request)  # type: ignore[attr-defined]
        if answer is None:
            self.close_connection = True
            return
        self._reply(*answer)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def _reply(self, status: int, body: Any, headers: dict[str, str]) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        try:
            self.end_headers()
            self.wfile.write(data)
        except ConnectionError:  # the client gave up waiting (a timeout test); nobody is left to answer
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

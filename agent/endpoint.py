"""The running agent's HTTP endpoint (``[agent] listen``): health, metrics, flow logs and runs on demand.

    GET  /healthz                   200 {"status": "ok"} or 503 {"status": "unhealthy", "reasons": [...]} (no token needed)
    GET  /metrics                   Prometheus text (see agent/metrics.py)
    GET  /flows                     every flow with its source and its executions by status
    GET  /flows/{name}/log?limit=N  the flow's newest executions (50 unless asked; at most 1000), status and last error
    GET  /executions/{id}           one execution and every attempt
    POST /flows/{name}/run          optional body {"params": {"sku": "123"}}: poll the flow's source now and deliver;
                                    202 {"run": id, ...}
    GET  /runs/{id}                 what became of a run on demand: its poll and the deliveries it scheduled

Served by a thread of `agent run` with its own read-only connection to the
ledger (the agent's connection belongs to its loop), so the endpoint and
delivery never wait for each other; a run on demand is handed to the agent's
loop (``Agent.request_run``), which polls and delivers. With
``[agent] listen_token`` every path but /healthz needs ``Authorization: Bearer
<token>``; without it the answer is 401 and nothing else. A port already in
use is a config error (exit 2) naming ``[agent] listen``.
"""
from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import re
import socket
import socketserver
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

from loguru import logger

from agent import health
from agent.config import Config, ConfigError
from agent.process import RunQueueFull
from agent.secrets import Masker, masked
from state import open_ledger
from state.base import FLOW_STATUSES, Ledger, LedgerError

MAX_BODY = 64 * 1024  # bytes of a POST body
MAX_CONNECTIONS = 32  # served at once; more are closed at once (a flood cannot pile up threads)
CLIENT_TIMEOUT = 10.0  # seconds a client may take to send its request
RUN_LISTED = 100  # executions GET /runs/{id} lists (all are counted)
LOG_LIMIT, LOG_MAX = 50, 1000
ENDPOINTS = ["GET /healthz", "GET /metrics", "GET /flows", "GET /flows/{name}/log?limit=N", "GET /executions/{id}",
             "POST /flows/{name}/run", "GET /runs/{id}"]


class Reply(Exception):
    """An answer other than 200, raised from anywhere in a request's handling."""

    def __init__(self, status: int, payload: dict, headers: dict[str, str] | None = None):
        super().__init__(payload.get("error", ""))
        self.status, self.payload, self.headers = status, payload, headers or {}


@contextmanager
def serving(agent: Any) -> Iterator["Endpoint | None"]:
    """Serve ``agent``'s endpoint while the block runs (nothing when ``[agent] listen`` is absent)."""
    if not agent.config.agent.listen:
        yield None
        return
    endpoint = Endpoint(agent.config)
    try:
        endpoint.start(agent)
        yield endpoint
    finally:
        endpoint.stop()


class Endpoint:
    """The listening socket (bound at construction) and, once started, the thread serving it."""

    def __init__(self, config: Config):
        self.config = config
        self.mask = Masker.of(config)
        self.host, self.port = split_address(config.agent.listen)
        token = config.agent.listen_token
        self.token = token.get_secret_value().strip().encode() if token is not None else None
        self.server = _bind(config, self.host, self.port)
        self.server.endpoint = self
        self.port = self.server.server_address[1]
        self.lock = threading.Lock()  # one ledger connection, one request at a time reads it
        self.ledger: Ledger | None = None
        self.agent: Any = None
        self._thread: threading.Thread | None = None

    def start(self, agent: Any) -> None:
        """Open the endpoint's own ledger connection and serve in a daemon thread."""
        self.agent = agent
        self.ledger = open_ledger(self.config.ledger_location, reader=True, mask=self.mask)
        agent.metrics.watch(self.ledger, self.config, self.lock)
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, name="endpoint", daemon=True)
        self._thread.start()
        logger.info("endpoint listening on http://{}:{} (/healthz, /metrics, /flows, /runs){}", _shown_host(self.host), self.port,
                    "" if self.token else "; no listen_token: anyone who can reach it can read flow logs and start runs")
        if self.token is None and not _loopback(self.host):
            logger.warning("[agent] listen = {!r} is reachable from other machines and has no listen_token: set one", self.config.agent.listen)

    def stop(self) -> None:
        """Stop serving, close the socket and the ledger connection."""
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join()
        self.server.server_close()
        if self.ledger is not None:
            with self.lock:
                self.ledger.close()

    # -- one request ------------------------------------------------------------------------------
    def answer(self, method: str, target: str, headers: Any, body: bytes) -> tuple[int, bytes, str, dict[str, str]]:
        """(status, body, content type, headers) for one request; no exception escapes."""
        parts = urlsplit(target)
        path = parts.path.rstrip("/") or "/"
        try:
            if path != "/healthz":
                self._authorize(headers.get("Authorization"))
            route, args = _route(method, path)
            result = route(self, *args, query=parse_qs(parts.query), body=body, headers=headers)
            if isinstance(result, tuple):  # a body of its own (the metrics text)
                return result
            return 200, self._json(result), "application/json", {}
        except Reply as reply:
            return reply.status, self._json(reply.payload), "application/json", reply.headers
        except LedgerError as error:
            return 503, self._json({"error": f"the ledger cannot be read now: {error}"}), "application/json", {}
        except Exception:  # a bug answers 500 and is logged; the agent goes on
            logger.exception("endpoint: {} {} failed", method, path)
            return 500, self._json({"error": "internal error (see the agent's log)"}), "application/json", {}

    def _authorize(self, given: str | None) -> None:
        if self.token is None:
            return
        scheme, _, value = (given or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token):
            raise Reply(401, {"error": "unauthorized"}, {"WWW-Authenticate": 'Bearer realm="sync-agent"'})

    def _json(self, payload: Any) -> bytes:
        """JSON with every configured secret masked."""
        return json.dumps(masked(payload, self.mask), ensure_ascii=False, default=str).encode()

    def _read(self, work: Callable[[Ledger], Any]) -> Any:
        with self.lock:
            return work(self.ledger)

    # -- routes ------------------------------------------------------------------------------------
    def healthz(self, **_: Any) -> Any:
        try:
            report = self._read(lambda ledger: health.assess(self.config, ledger, time.time()))
        except LedgerError as error:
            raise Reply(503, {"status": "unhealthy", "reasons": [f"the ledger cannot be read: {error}"]}) from None
        if not report["healthy"]:
            raise Reply(503, {"status": "unhealthy", "reasons": report["reasons"]})
        return {"status": "ok", "reasons": []}

    def metrics(self, headers: Any, **_: Any) -> tuple[int, bytes, str, dict[str, str]]:
        body, content_type = self.agent.metrics.scrape(headers.get("Accept"))
        return 200, body, content_type, {}

    def flows(self, **_: Any) -> Any:
        counts, paused = self._read(lambda ledger: (ledger.counts(), ledger.pause_reasons()))
        out = []
        for flow in self.config.flows:
            c = counts.get(flow.name, {})
            item = {"name": flow.name, "source": flow.source, "after": flow.after, "steps": len(flow.steps),
                    "executions": {status: c.get(status, 0) for status in FLOW_STATUSES}}
            if flow.name in paused:
                item["paused_because"] = paused[flow.name]
            out.append(item)
        return {"flows": out}

    def flow_log(self, name: str, query: dict[str, list[str]], **_: Any) -> Any:
        flow = self._flow(name)
        limit = _limit(query)
        rows = self._read(lambda ledger: ledger.execution_list(flow=flow.name, limit=limit))
        return {"flow": flow.name, "source": flow.source, "executions": rows}

    def execution(self, ident: str, **_: Any) -> Any:
        if not ident.isdigit():
            raise Reply(400, {"error": f"execution ids are numbers, not {ident!r}"})
        number = int(ident)
        row, attempts = self._read(lambda ledger: (ledger.executions(ids=[number]), ledger.attempts_of(number)))
        if not row:
            raise Reply(404, {"error": f"no execution {number}"})
        return {**row[0], "attempts": attempts}

    def run(self, name: str, body: bytes, **_: Any) -> Any:
        flow = self._flow(name)
        params = run_params(body)
        if flow.source is None:  # chained: its work starts from another flow's successes, not from a poll
            root = flow
            while root.after is not None:
                root = self._flow(root.after)
            raise Reply(409, {"error": f"flow {flow.name!r} runs after flow {flow.after!r}, not from a poll; "
                                       f"start its chain with POST /flows/{root.name}/run"})
        try:
            run_id = self.agent.request_run(flow.source, params)
        except RunQueueFull as error:
            raise Reply(429, {"error": str(error)}, {"Retry-After": "5"}) from None
        raise Reply(202, {"run": run_id, "flow": flow.name, "source": flow.source, "params": params, "status": f"/runs/{run_id}"},
                     {"Location": f"/runs/{run_id}"})

    def run_status(self, ident: str, **_: Any) -> Any:
        found = self.agent.run_status(ident)
        if found is None:
            raise Reply(404, {"error": f"no run {ident!r} (runs are kept while the agent runs)"})
        keys = found.pop("scheduled")
        if found["state"] in ("done", "failed"):
            found["deliveries"] = self._deliveries(found["source"], keys)
        return found

    def _deliveries(self, source: str, keys: list[str]) -> dict[str, Any]:
        """What became of the work a run scheduled: counts by status, and the executions (the first RUN_LISTED of them)."""
        rows = self._read(lambda ledger: [row for key in keys for row in ledger.executions_of(source, key)])
        by_status: dict[str, int] = {}
        for row in rows:
            by_status[row["status"]] = by_status.get(row["status"], 0) + 1
        listed = [{name: row[name] for name in ("id", "flow", "key", "status", "attempts", "last_error")} for row in rows[:RUN_LISTED]]
        return {"total": len(rows), "by_status": by_status, "executions": listed}

    def _flow(self, name: str) -> Any:
        flow = next((f for f in self.config.flows if f.name == name), None)
        if flow is None:
            raise Reply(404, {"error": f"unknown flow {name!r}", "known": [f.name for f in self.config.flows]})
        return flow


_ROUTES: list[tuple[str, re.Pattern, Callable[..., Any]]] = [
    ("GET", re.compile(r"/healthz"), Endpoint.healthz),
    ("GET", re.compile(r"/metrics"), Endpoint.metrics),
    ("GET", re.compile(r"/flows"), Endpoint.flows),
    ("GET", re.compile(r"/flows/([^/]+)/log"), Endpoint.flow_log),
    ("GET", re.compile(r"/executions/([^/]+)"), Endpoint.execution),
    ("POST", re.compile(r"/flows/([^/]+)/run"), Endpoint.run),
    ("GET", re.compile(r"/runs/([^/]+)"), Endpoint.run_status),
]


def _route(method: str, path: str) -> tuple[Callable[..., Any], list[str]]:
    """The route for a request and its path's arguments (percent-decoded); 404 or 405 otherwise."""
    allowed = []
    for verb, pattern, route in _ROUTES:
        found = pattern.fullmatch(path)
        if found and verb == method:
            return route, [unquote(arg) for arg in found.groups()]
        if found:
            allowed.append(verb)
    if allowed:
        raise Reply(405, {"error": f"{method} is not allowed here (allowed: {', '.join(allowed)})"}, {"Allow": ", ".join(allowed)})
    raise Reply(404, {"error": f"no such endpoint: {method} {path}", "endpoints": ENDPOINTS})


def run_params(body: bytes) -> dict[str, str]:
    """The run parameters of a POST body: nothing, or {"params": {name: string, …}}; 400 naming what is wrong."""
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise Reply(400, {"error": f"the body is not JSON ({error}); send {{\"params\": {{\"sku\": \"123\"}}}} or nothing"}) from None
    if not isinstance(data, dict):
        raise Reply(400, {"error": f"the body must be a JSON object such as {{\"params\": {{\"sku\": \"123\"}}}}, not {_kind(data)}"})
    unknown = sorted(set(data) - {"params"})
    if unknown:
        raise Reply(400, {"error": f"unknown key(s) in the body: {', '.join(map(repr, unknown))} (allowed: 'params')"})
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise Reply(400, {"error": f"'params' must be an object of names to strings, not {_kind(params)}"})
    for name, value in params.items():
        if not name.strip():
            raise Reply(400, {"error": "a parameter name in 'params' is empty"})
        if not isinstance(value, str):
            raise Reply(400, {"error": f"params.{name} must be a string, not {_kind(value)} (write \"{json.dumps(value)[:40]}\" in quotes)"})
    return params


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _limit(query: dict[str, list[str]]) -> int:
    text = (query.get("limit") or [str(LOG_LIMIT)])[-1]
    if not text.isdigit() or not 1 <= int(text) <= LOG_MAX:
        raise Reply(400, {"error": f"limit={text!r}: give a number from 1 to {LOG_MAX}"})
    return int(text)


def split_address(listen: str) -> tuple[str, int]:
    """'host:port' (as config.listen_address wrote it) as (host, port); an IPv6 host loses its brackets."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _shown_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bind(config: Config, host: str, port: int) -> "_Server":
    """The listening socket; a port in use or an address not of this machine is a config error (exit 2)."""
    try:
        return _Server((host, port), _Handler, family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            why = f"port {port} on {_shown_host(host)} is already in use (another agent or program listens there): choose another port for [agent] listen, or stop it"
        else:
            why = f"[agent] listen cannot listen on {_shown_host(host)} port {port}: {error.strerror or error}"
        raise ConfigError(str(config.path), [("agent.listen", why)]) from None


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that serves at most MAX_CONNECTIONS at once."""

    daemon_threads = True
    endpoint: Endpoint

    def __init__(self, address: tuple[str, int], handler: type, family: int):
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.address_family = family  # read by TCPServer.__init__ when it makes the socket
        super().__init__(address, handler)

    def server_bind(self) -> None:
        """Bind without the reverse DNS lookup HTTPServer does, which can stall for seconds."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: this one is closed unanswered
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(BaseHTTPRequestHandler):
    """Reads one request (HTTP/1.0: one per connection), lets the Endpoint answer it."""

    timeout = CLIENT_TIMEOUT
    server_version = "sync-agent"
    sys_version = ""

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            return self._send(411, b'{"error": "send the body with a Content-Length"}', "application/json", {})
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return self._send(413, json.dumps({"error": f"the body is over {MAX_BODY} bytes"}).encode(), "application/json", {})
        self._serve(self.rfile.read(int(length or 0)))

    def _serve(self, body: bytes) -> None:
        self._send(*self.server.endpoint.answer(self.command, self.path, self.headers, body))

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("endpoint: {}", format % args)  # the request line and status only: never a header, so never the token

"""What `agent validate` checks beyond the config: can each source and connector be reached, and will it let the agent in?

Plain `validate` opens a TCP connection to each server (or looks at each
file and folder): it cannot tell a wrong password, a wrong token or an
untrusted certificate from a right one. `validate --connect` does what the
agent does, with the configured auth, and sends nothing::

    rest source      GET url (its own query, no params, no paging)       a 2xx is ok
    http connector   GET base_url with its auth and headers              any answer but 401, 403 and 5xx is ok
    smtp connector   connect, STARTTLS (verified) or TLS, AUTH, QUIT     logged in (or no login configured) is ok
    anything else    the plain check (a file, a folder)

Each check ends with a verdict::

    ok             reached, and the credentials were not refused
    LOGIN FAILED   HTTP 401 or 403, SMTP 530/534/535/538: the password or token is wrong
    UNTRUSTED      the TLS certificate is not trusted, or the TLS handshake failed
    UNREACHABLE    no connection, or no answer within the source's or connector's timeout
    FAILED         any other answer (a 404 from a view, a 5xx, a server without STARTTLS or AUTH)

Every wait is bounded by the configured ``timeout``: a server that drips its
answer is given up on, not waited for.
"""
from __future__ import annotations

import os
import queue
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from agent.config import Config

OK, LOGIN_FAILED, UNTRUSTED, UNREACHABLE, FAILED = "ok", "LOGIN FAILED", "UNTRUSTED", "UNREACHABLE", "FAILED"
TCP_TIMEOUT = 5.0  # seconds for the plain check's connect
_WRAPPER = re.compile(r"^(?:<[^>]*>|[A-Za-z]+\([^)]*\)):\s*")  # urllib3's "<…Connection object at 0x…>: " or "HTTPConnection(host=…): "


@dataclass
class Check:
    """One source or connector checked: where in the config, what was reached, the verdict and why."""

    where: str  # "sources.leads"
    target: str  # host:port, a URL without credentials or query, or a path
    verdict: str = OK
    detail: str = ""  # for ok: what was proven ("HTTP 200", "logged in"); otherwise what went wrong

    @property
    def ok(self) -> bool:
        return self.verdict == OK

    def __str__(self) -> str:
        if self.ok:
            return f"ok ({self.detail})" if self.detail else "ok"
        return f"{self.verdict}: {self.detail}"


def reachability(config: Config) -> Iterator[Check]:
    """The plain check of every source and connector: a TCP connect, or a readable file / writable folder."""
    for where, cfg in _targets(config):
        yield _plain(config, where, cfg)


def logins(config: Config) -> Iterator[Check]:
    """The authenticated check (`--connect`) of every source and connector."""
    for where, cfg in _targets(config):
        kind = getattr(cfg, "kind", None)
        if kind == "rest":
            yield _http(where, cfg.url, config.auth.get(where), cfg.timeout, {}, view=True)
        elif kind == "http":
            yield _http(where, cfg.base_url, config.auth.get(where), cfg.timeout, cfg.headers, view=False)
        elif kind == "smtp":
            yield _smtp(where, cfg, config.base_dir)
        else:
            yield _plain(config, where, cfg)


def _targets(config: Config) -> Iterator[tuple[str, Any]]:
    for section, table in (("sources", config.sources), ("connectors", config.connectors)):
        for name, cfg in table.items():
            yield f"{section}.{name}", cfg


def _plain(config: Config, where: str, cfg: Any) -> Check:
    url = getattr(cfg, "url", None) or getattr(cfg, "base_url", None)
    if url:
        parts = urlsplit(str(url))
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return _connect(where, parts.hostname or "", port)
    if getattr(cfg, "host", None):
        return _connect(where, cfg.host, cfg.port)
    path = config.base_dir / cfg.path
    problem = _unusable(path, where.startswith("sources."))
    return Check(where, str(path), *((UNREACHABLE, problem) if problem else (OK, "")))


def _connect(where: str, host: str, port: int) -> Check:
    target = f"{host}:{port}"
    try:
        socket.create_connection((host, port), timeout=TCP_TIMEOUT).close()
    except OSError as error:
        return Check(where, target, UNREACHABLE, error.strerror or str(error))
    return Check(where, target)


def _unusable(path: Path, read: bool) -> str | None:
    if read:
        return None if path.is_file() else "no such file"
    folder = next((p for p in [path, *path.parents] if p.exists()), None)
    return None if folder is not None and os.access(folder, os.W_OK) else "not writable"


def _public(url: str) -> str:
    """A URL without credentials, query or fragment: safe to print."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _http(where: str, url: str, auth: Any, timeout: float, headers: dict[str, str], *, view: bool) -> Check:
    """GET the URL with the configured auth; a view must answer 2xx, an API only must not refuse us or fail."""
    if "{{" in url:  # a templated URL (run parameters): its server is what can be checked without a run
        parts = urlsplit(url.split("{{", 1)[0])
        url, view = f"{parts.scheme}://{parts.netloc}/", False
    target = _public(url)
    answer = _bounded(lambda: _get(url, auth, timeout, headers), timeout)
    if answer is None:
        return Check(where, target, UNREACHABLE, f"no answer within {timeout:g}s")
    if isinstance(answer, Exception):
        return Check(where, target, FAILED, f"{type(answer).__name__}: {answer}")
    if isinstance(answer, Check):
        answer.where, answer.target = where, target
        return answer
    if answer in (401, 403):
        return Check(where, target, LOGIN_FAILED, f"HTTP {answer}: the configured auth was refused (check the password or token)")
    if 200 <= answer < 300:
        return Check(where, target, OK, f"HTTP {answer}")
    if view or answer >= 500:
        return Check(where, target, FAILED, f"HTTP {answer}" + (" (is url the view's address?)" if answer == 404 else ""))
    return Check(where, target, OK, f"HTTP {answer}: reached, the credentials were not refused")


def _get(url: str, auth: Any, timeout: float, headers: dict[str, str]) -> int | Check:
    """The status code of a GET (the body is not read), or the Check that says why there is none."""
    import requests

    from agent.http import build_session

    session = build_session(auth)
    session.headers.update(headers)
    try:
        with session.get(url, timeout=timeout, stream=True, allow_redirects=False) as response:
            return response.status_code
    except requests.exceptions.SSLError as error:
        return Check("", "", UNTRUSTED, _tls_problem(error))
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as error:
        return Check("", "", UNREACHABLE, _reason(error))
    except requests.RequestException as error:
        return Check("", "", FAILED, _reason(error))
    finally:
        session.close()


def _tls_problem(error: Exception) -> str:
    text = str(error)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        detail = text.split("certificate verify failed:", 1)[-1].split("(", 1)[0].strip(" ')\"")
        return f"the server's TLS certificate is not trusted ({detail or 'verify failed'})"
    return f"the TLS handshake failed ({_reason(error)})"


def _reason(error: Exception) -> str:
    """The innermost reason requests and urllib3 give, without the URL they wrap it in."""
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return _WRAPPER.sub("", str(reason if reason is not None else error))


def _smtp(where: str, cfg: Any, base_dir: Path) -> Check:
    """Connect, secure (never falling back to plain text) and log in as the connector does; then QUIT."""
    target = f"{cfg.host}:{cfg.port}"
    outcome = _bounded(lambda: _smtp_login(cfg, base_dir, target), cfg.timeout + 1)  # the dialogue has its own deadline
    if outcome is None:
        return Check(where, target, UNREACHABLE, f"no answer within {cfg.timeout:g}s")
    if isinstance(outcome, Exception):
        return Check(where, target, FAILED, f"{type(outcome).__name__}: {outcome}")
    if outcome.status == "succeeded":
        return Check(where, target, OK, "logged in" if cfg.username else f"{cfg.security}, no login configured")
    verdict = {"auth": LOGIN_FAILED, "tls": UNTRUSTED}.get(outcome.condition or "")
    if verdict is None:
        verdict = UNREACHABLE if outcome.condition in ("connection", "timeout") and outcome.status == "retryable" else FAILED
    return Check(where, target, verdict, outcome.error or outcome.status)


def _smtp_login(cfg: Any, base_dir: Path, target: str):
    import ssl

    from sinks.base import Outcome
    from sinks.smtp import classify, connect

    context = None if cfg.security == "none" else ssl.create_default_context(cafile=base_dir / cfg.ca_file if cfg.ca_file else None)
    try:
        smtp = connect(cfg, context, cfg.timeout)
        try:
            if cfg.security == "starttls":
                smtp.starttls(context=context)
            if cfg.username is not None:
                smtp.login(cfg.username, cfg.password.get_secret_value())
            smtp.quit()
        finally:
            smtp.close()
    except (OSError, ValueError) as error:  # SMTPException and ssl.SSLError are OSErrors; ValueError: an unreadable reply
        return classify(error, target)
    return Outcome.ok()


def _bounded(work: Callable[[], Any], seconds: float) -> Any:
    """work()'s result, or None when it has not returned within `seconds` (its daemon thread is left to end with the process)."""
    results: queue.SimpleQueue = queue.SimpleQueue()

    def attempt() -> None:
        try:
            results.put(work())
        except Exception as error:  # handed to the caller as a verdict: a check never ends the command with a traceback
            results.put(error)

    threading.Thread(target=attempt, name="validate", daemon=True).start()
    try:
        return results.get(timeout=seconds)
    except queue.Empty:
        return None

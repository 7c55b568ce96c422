"""The REST view source: GET a JSON view page by page and yield each page as it arrives.

``paging.kind`` picks a paginator; each is a config model with one method,
``follow(url, params, last)``: the next request after the page ``last``
(``None`` before the first), or ``None`` to stop::

    none      one request
    page      param=start, start+1, ...  (size_param=size when set)
    offset    param=start, start+size, ... (size_param=size)
    cursor    param=<token found at the dotted path `next` in the body>
    link      the RFC 8288 ``Link: <...>; rel="next"`` header
    next_url  the URL found at the dotted path `next` in the body (may be relative)

Every kind also stops at an empty page, when the optional ``total`` path says
everything was fetched, and after ``max_pages`` pages (with a warning). A page
that repeats the previous one is an error, not an endless loop. Next URLs
must stay on the configured scheme, host and port, and redirects are not
followed, so credentials only ever go where the config points.

Every value a view sends is data: a next URL that does not parse, a token or
total of the wrong kind ends the poll with a PageError naming the page and
at most 40 characters of the value (never its query string or credentials).
The page that carried it is yielded first: its records were read fine.

Pages are read one ahead: while the caller admits a page, the next one is
fetched on the source's worker thread, so the view's time and the agent's
overlap. At most two pages are held (the one handed over and the one
ahead), and a caller that stops early (its poll failed) leaves nothing behind:
the page ahead is given up before the next poll asks again.

A hostile view costs a bounded wait and bounded memory. ``timeout`` is a
deadline for the whole exchange of one page (connect, headers, body), not for
each read, counted from when the page is asked for: a view that drips bytes
fails the poll when it passes, also on a page read ahead that nobody waits for
yet. The body is streamed and inflated as it arrives, and a page over
``max_page_bytes`` (counted after decompression) or ``max_records_per_page``
fails the poll before more memory is spent; nothing of that page is admitted.

requests, urllib3 and queue are imported when a source is built or a page
fetched, not with this module: loading the config model (`agent status`)
does not pay for them.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, Literal, Union
from urllib.parse import SplitResult, urljoin, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sources.base import Page, PageError, SourceConfig, Timeout, counted, dig, parse_json

if TYPE_CHECKING:
    import queue

    import requests


@dataclass
class Response:
    """What the paginators may read from one fetched page."""

    number: int
    url: str
    body: Any
    links: dict
    count: int


@dataclass
class _Answer:
    """One page request's answer, its body read (and inflated) under the cap."""

    status: int
    reason: str | None
    location: str | None
    links: dict
    content: bytearray


@dataclass
class _Pending:
    """A page asked for and not yet read: its request runs on the source's worker."""

    url: str
    number: int
    where: str
    stop: threading.Event  # set: the caller gave up on it, stop reading
    deadline: float  # time.monotonic() by which the exchange must end
    ticket: _Ticket


_CHUNK = 64 * 1024
_ERROR_EXCERPT = 4096  # of an error page's body: enough for the excerpt in the message


def _length(response: requests.Response) -> int:
    """The announced Content-Length, or -1 when there is none or it does not parse."""
    value = response.headers.get("Content-Length", "")
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else -1


@dataclass
class _Ticket:
    """A job handed to the worker: its outcome ({"answer": ...} or {"error": ...}) once `done` is set."""

    outcome: dict[str, Any]
    done: threading.Event


class _Worker:
    """A daemon thread that runs one job at a time while its caller waits with a timeout; it ends when idle a while.

    Not a ThreadPoolExecutor: that joins its threads at exit, and a view that never
    finishes its headers would then hold up the agent's exit.
    """

    IDLE_EXIT = 30.0  # seconds without a job before the thread ends (the next job starts another)

    def __init__(self):
        import queue

        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None

    @property
    def idle(self) -> bool:
        """False while a job runs, also one its caller stopped waiting for."""
        return self._idle.is_set()

    def start(self, job: Callable[[], Any]) -> _Ticket:
        """Hand `job` to the thread (started when there is none) and return at once."""
        ticket = _Ticket({}, threading.Event())
        self._idle.clear()
        with self._lock:  # the thread ends only under this lock, with no job queued
            self._jobs.put((job, ticket))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="view-requests", daemon=True)
                self._thread.start()
        return ticket

    @staticmethod
    def wait(ticket: _Ticket, until: float, interrupt: threading.Event | None = None) -> dict[str, Any] | None:
        """The job's outcome, or None when it is not done by `until` (time.monotonic()) or `interrupt` is set first."""
        while not ticket.done.wait(min(0.1, max(until - time.monotonic(), 0.0))):
            if time.monotonic() >= until or (interrupt is not None and interrupt.is_set()):
                return None
        return ticket.outcome

    def _loop(self) -> None:
        import queue

        while True:
            try:
                job, ticket = self._jobs.get(timeout=self.IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            try:
                ticket.outcome["answer"] = job()
            except BaseException as error:  # handed to the waiting caller, raised there
                ticket.outcome["error"] = error
            self._idle.set()
            ticket.done.set()


class _Paging(BaseModel):
    model_config = ConfigDict(extra="forbid")

    total: str | None = None
    max_pages: int = Field(10_000, ge=1)


class NoPaging(_Paging):
    kind: Literal["none"] = "none"

    def follow(self, url: str, params: dict[str, str], last: Response | None):
        """One request, no follow-up."""
        return None if last else (url, params)


class _SizedPaging(_Paging):
    """Page and offset paging: ask for `size` records at a position until a page comes back short."""

    size_param: str | None
    size: int = Field(100, ge=1)

    def follow(self, url: str, params: dict[str, str], last: Response | None):
        if last and last.count < self.size:
            return None
        sizing = {self.size_param: str(self.size)} if self.size_param else {}
        return url, {**params, **sizing, self.param: str(self.position(last.number if last else 0))}


class PagePaging(_SizedPaging):
    kind: Literal["page"]
    param: str = "page"
    size_param: str | None = "pageSize"
    start: int = 1

    def position(self, pages_read: int) -> int:
        return self.start + pages_read


class OffsetPaging(_SizedPaging):
    kind: Literal["offset"]
    param: str = "offset"
    size_param: str | None = "limit"
    start: int = 0

    def position(self, pages_read: int) -> int:
        return self.start + pages_read * self.size


class CursorPaging(_Paging):
    kind: Literal["cursor"]
    param: str = "cursor"
    next: str

    def follow(self, url: str, params: dict[str, str], last: Response | None):
        """Send back the token the previous body named; stop when there is none."""
        if last is None:
            return url, params
        token = _found(last.body, self.next)
        if isinstance(token, (dict, list, bool)):
            raise PageError(f"the next-page token at '{self.next}' is a {type(token).__name__}, not a string")
        return None if token in (None, "") else (url, {**params, self.param: str(token)})


class LinkPaging(_Paging):
    kind: Literal["link"]

    def follow(self, url: str, params: dict[str, str], last: Response | None):
        """Follow the Link header's rel="next" URL; it carries its own query."""
        if last is None:
            return url, params
        target = last.links.get("next", {}).get("url")
        return (_joined(last.url, target, "the Link header's next URL"), {}) if target else None


class NextUrlPaging(_Paging):
    kind: Literal["next_url"]
    next: str

    def follow(self, url: str, params: dict[str, str], last: Response | None):
        """Follow the URL the previous body named (relative to that page); it carries its own query."""
        if last is None:
            return url, params
        target = _found(last.body, self.next)
        if target not in (None, "") and not isinstance(target, str):
            raise PageError(f"the next URL at '{self.next}' is a {type(target).__name__}, not a string")
        return (_joined(last.url, target, f"the next URL at '{self.next}'"), {}) if target else None


Paging = Annotated[
    Union[NoPaging, PagePaging, OffsetPaging, CursorPaging, LinkPaging, NextUrlPaging],
    Field(discriminator="kind"),
]


def _found(body: Any, path: str) -> Any:
    """The value at a dotted path, or None when the body does not have it."""
    try:
        return dig(body, path)
    except KeyError:
        return None


def _shown(text: str) -> str:
    """At most 40 characters of a value from a view, quoted: enough to recognise it, never a whole body."""
    return repr(text if len(text) <= 40 else text[:39] + "…")


def _shown_url(url: str) -> str:
    """At most 40 characters of a URL from a view, without its query, fragment or credentials."""
    text = re.split(r"[?#]", url, maxsplit=1)[0]
    if found := re.match(r"([A-Za-z][A-Za-z0-9+.-]*:)?//([^/]*)", text):
        text = f"{found[1] or ''}//{found[2].rpartition('@')[2]}{text[found.end():]}"
    return _shown(text)


def _url_problem(error: ValueError) -> str:
    """What urllib found wrong, without echoing the URL (its parts may hold credentials)."""
    text = str(error)
    if "out of range" in text:
        return "its port is out of range 0-65535"
    if "Port could not be cast" in text:
        return "its port is not a number"
    if "IPv4" in text or "IPv6" in text:
        return "its host is not a valid IP address"
    return "it does not parse"


def _parsed(url: str) -> SplitResult:
    """urlsplit(url) with its host and port checked; ValueError when either is impossible."""
    parts = urlsplit(url)
    _ = parts.hostname, parts.port  # urllib checks these lazily: ask now, not when the URL is used
    return parts


def _repeat_fix(paging: _Paging) -> str:
    """What to change when a page repeats the previous one; the usual cause is a view that answers past its end with its last page."""
    ignored = "the server ignores the paging parameter (check paging.param)"
    if paging.total is not None:
        return ignored
    return ("the view answers a page past its end with its last page again (usual fix: set paging.total to the path of "
            f"the record count in its body, e.g. total = \"total\", so paging stops at the end), or {ignored}")


def _joined(base: str, target: str, what: str) -> str:
    """`target` resolved against `base`, or a PageError saying why that URL cannot be used."""
    try:
        url = urljoin(base, target)
        _parsed(url)
    except ValueError as error:
        raise PageError(f"{what} is {_shown_url(target)}, not a usable URL ({_url_problem(error)})") from None
    return url


def _origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and effective port: what must match for credentials to be sent."""
    parts = _parsed(url)
    return parts.scheme, parts.hostname or "", parts.port if parts.port is not None else {"http": 80, "https": 443}.get(parts.scheme)


def _public(url: str) -> str:
    """A URL without credentials or query string, safe for logs and errors."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _redirect_target(url: str, location: str | None) -> str:
    """Where a redirect points, safe to print; a Location that does not parse is shown cut short."""
    if not location:
        return "nowhere"
    try:
        return _public(_joined(url, location, "the Location"))
    except PageError:
        return _shown_url(location)


def _excerpt(content: bytes) -> str:
    """At most 200 characters of a body, on one line."""
    text = " ".join(content[:400].decode("utf-8", "replace").split())
    return text[:200] or "(empty body)"


_REASONS = (r"\[Errno -?\d+\] [^'\")]+", "Remote end closed connection without response", r"IncompleteRead\([^)]*\)", "Connection aborted")


def _reason(exc: Exception) -> str:
    """The useful part of a requests error, without the URL and its query string."""
    for pattern in _REASONS:
        if found := re.search(pattern, str(exc)):
            return found[0]
    return type(exc).__name__


class RestSource:
    """Polls one REST view; see the module docstring for paging."""

    class Config(SourceConfig):
        kind: Literal["rest"]
        url: str
        timeout: Timeout = 30.0
        params: dict[str, str] = {}
        paging: Paging = NoPaging()

        @field_validator("url")
        @classmethod
        def _http_url(cls, url: str) -> str:
            """Only http(s) URLs with a host and a valid port; the value is not echoed, it may hold a key."""
            wanted = "must be an http:// or https:// URL with a host, like 'https://app.example/api/views/Leads'"
            try:
                parts = _parsed(url)
            except ValueError as error:
                raise ValueError(f"{wanted} ({_url_problem(error)})") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(wanted)
            return url

        @model_validator(mode="after")
        def _pages_fit(self) -> RestSource.Config:
            """A page size over the record cap would fail every full page."""
            size = getattr(self.paging, "size", None)
            if size is not None and size > self.max_records_per_page:
                raise ValueError(f"paging.size = {size} is over max_records_per_page = {self.max_records_per_page}: every full page would fail; "
                                 "lower paging.size or raise max_records_per_page")
            return self

    def __init__(self, config: RestSource.Config, *, session: requests.Session, stopping: threading.Event | None = None):
        self.config = config
        self.session = session
        self.stopping = stopping  # the agent's stop request: a page being read is given up at once
        self._worker = _Worker()

    def pages(self, params: dict[str, str]) -> Iterator[Page]:
        """Yield the view's pages in order; the next page is fetched while the caller handles this one (one ahead at most)."""
        paging, request = self.config.paging, self.config.paging.follow(self.config.url, params, None)
        fetched, total, previous = 0, None, None
        ahead: _Pending | None = self._ask(*request, 1)
        try:
            for number in range(1, paging.max_pages + 1):
                asked, ahead = ahead, None
                response = self._answer(asked)
                records = self._records(response.body, number, response.url)
                response.count = len(records)
                signature = (len(records), records[0], records[-1]) if records else None
                if signature and signature == previous:
                    raise PageError(f"{self._where(number, response.url)} repeats the previous page: {_repeat_fix(paging)}", page=number)
                fetched, broken = fetched + len(records), None
                try:
                    total = self._total(response, total)
                    done = not records or (total is not None and fetched >= total)
                    request = None if done else self._next(request[0], params, response)
                except PageError as error:  # a bad paging value: this page's records are good, the poll ends after them
                    request, broken = None, PageError(f"{self._where(number, response.url)}: {error}", page=number + 1)
                meta = {"total": total} if total is not None else {}
                if request and number == paging.max_pages:
                    from loguru import logger  # here, not at the top: `agent status` loads this module and logs nothing
                    logger.warning("{}: stopped at paging.max_pages = {}; the view has more", self._where(number, response.url), number)
                    meta["truncated"] = True  # the agent keeps the cursor: the unread (older) pages must be read later
                elif request:
                    ahead = self._ask(*request, number + 1)  # read while the caller admits this page: the view's time overlaps ours
                response.body = None  # the records are handed over, drop the rest: this page and the one ahead in memory
                yield Page(number, records, self._where(number, response.url), meta)
                if broken:
                    raise broken
                if request is None:
                    return
                previous = signature
        finally:
            if ahead is not None:  # the caller stopped reading (its poll failed): the page ahead is not wanted
                self._drop(ahead)

    def _ask(self, url: str, params: dict[str, str], number: int) -> _Pending:
        """Start the GET of one page on this source's worker; its deadline runs from now.

        A server that drips its headers a byte at a time keeps the worker reading; the
        next page of this view is not asked for until it ends, so at most one waits.
        """
        where, timeout = self._where(number, url), self.config.timeout
        if not self._worker.idle:
            raise PageError(f"{where}: an earlier request to this view is still waiting for its answer (past its {timeout:g}s deadline); "
                            "not asking again until it ends", page=number)
        stop, deadline = threading.Event(), time.monotonic() + timeout
        job = self._worker.start(lambda: self._exchange(url, params, where, number, stop, deadline))
        return _Pending(url, number, where, stop, deadline, job)

    def _answer(self, pending: _Pending) -> Response:
        """Wait for a page asked for until its deadline; every failure becomes a PageError naming the page."""
        where, number = pending.where, pending.number
        outcome = self._worker.wait(pending.ticket, pending.deadline, self.stopping)
        if outcome is None:
            pending.stop.set()
            if self.stopping is not None and self.stopping.is_set():
                raise PageError(f"{where}: not read, the agent is stopping", page=number)
            raise PageError(f"{where}: no complete answer within {self.config.timeout:g}s (timeout)", page=number)
        if "error" in outcome:
            raise outcome["error"]
        answer = outcome["answer"]
        if 300 <= answer.status < 400:
            raise self._redirected(where, pending.url, answer.status, answer.location, number)
        if not 200 <= answer.status < 300:
            raise PageError(f"{where}: HTTP {answer.status} {answer.reason or ''}: {_excerpt(answer.content)}", page=number, status=answer.status)
        body = parse_json(answer.content, f"{where}: body is", number, _excerpt(answer.content))  # on the worker it only competes for the GIL
        return Response(number, pending.url, body, answer.links, 0)

    def _drop(self, pending: _Pending) -> None:
        """Give up a page asked for ahead: stop reading its body and wait (within its deadline) for the exchange to end,
        so the next poll finds the worker free."""
        pending.stop.set()
        self._worker.wait(pending.ticket, pending.deadline, self.stopping)

    def _exchange(self, url: str, params: dict[str, str], where: str, number: int, stop: threading.Event, deadline: float) -> _Answer:
        """One request and its body, streamed under the size cap; every failure a PageError."""
        import requests  # loaded by the session already: a lookup

        answers: list[requests.Response] = []  # requests parses a redirect's Location even when not following it
        try:
            with self.session.get(url, params=params or None, timeout=max(deadline - time.monotonic(), 0.001), allow_redirects=False,
                                  stream=True, hooks={"response": lambda answer, **_: answers.append(answer)}) as response:
                status, links, reason, location = response.status_code, response.links, response.reason, response.headers.get("Location")
                content = bytearray() if 300 <= status < 400 else self._body(response, where, number, stop, deadline, 200 <= status < 300)
        except requests.Timeout:
            raise PageError(f"{where}: no complete answer within {self.config.timeout:g}s (timeout)", page=number) from None
        except requests.ConnectionError as exc:
            raise PageError(f"{where}: connection failed: {_reason(exc)}", page=number) from None
        except (requests.RequestException, ValueError) as exc:  # ValueError: a Location or URL from the view that does not parse
            if answers and answers[-1].is_redirect:
                raise self._redirected(where, url, answers[-1].status_code, answers[-1].headers["Location"], number) from None
            raise PageError(f"{where}: request failed: {_reason(exc)}", page=number) from None
        return _Answer(status, reason, location, links, content)

    def _body(self, response: requests.Response, where: str, number: int, stop: threading.Event, deadline: float,
              wanted: bool) -> bytearray:
        """The body, inflated as it arrives and refused once over `max_page_bytes`; of an error page only its start."""
        import urllib3  # loaded by the session already: a lookup

        cap = self.config.max_page_bytes if wanted else _ERROR_EXCERPT
        if wanted and response.headers.get("Content-Encoding", "identity") == "identity" and _length(response) > cap:
            raise self._over(where, number)  # announced: refused before a byte of it is read
        body = bytearray()
        try:
            while chunk := response.raw.read1(_CHUNK, decode_content=True):  # read1: what one read brought, at most _CHUNK inflated
                if stop.is_set():
                    break  # the caller stopped waiting; closing the response drops the connection
                if time.monotonic() > deadline:  # a page read ahead has nobody waiting on it to give up at the deadline
                    raise PageError(f"{where}: no complete answer within {self.config.timeout:g}s (timeout)", page=number)
                body += chunk
                if len(body) > cap:
                    if not wanted:
                        return body[:cap]
                    raise self._over(where, number)
        except urllib3.exceptions.ReadTimeoutError:
            raise PageError(f"{where}: no complete answer within {self.config.timeout:g}s (timeout)", page=number) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:  # cut short, reset, or an encoding that does not inflate
            raise PageError(f"{where}: request failed: {_reason(exc)}", page=number) from None
        return body

    def _over(self, where: str, number: int) -> PageError:
        """The error for a body over the cap."""
        return PageError(f"{where}: the body is over max_page_bytes = {self.config.max_page_bytes:,} bytes (counted after decompression); "
                         "raise max_page_bytes if the view's pages are that big, or ask for smaller pages", page=number)

    @staticmethod
    def _redirected(where: str, url: str, status: int, location: str | None, number: int) -> PageError:
        """The error for a redirect answer: it is never followed."""
        target = _redirect_target(url, location)
        return PageError(f"{where}: HTTP {status} redirect to {target}; redirects are not followed, put the final URL in the config", page=number, status=status)

    def _records(self, body: Any, number: int, url: str) -> list[Any]:
        """The list at the configured `records` path."""
        path = self.config.records
        try:
            records = dig(body, path)
        except KeyError:
            keys = ", ".join(list(body)[:10]) if isinstance(body, dict) else f"the body is a {type(body).__name__}"
            hint = "; set records = \"\" when the body is the list itself" if isinstance(body, list) else ""
            raise PageError(f"{self._where(number, url)}: no records at '{path}' (found: {keys}){hint}", page=number) from None
        if not isinstance(records, list):
            raise PageError(f"{self._where(number, url)}: '{path or '(the body)'}' is a {type(records).__name__}, not a list of records", page=number)
        return counted(records, self.config.max_records_per_page, self._where(number, url), number)

    def _total(self, response: Response, known: int | None) -> int | None:
        """The record count the body announces at `paging.total`, or what an earlier page said."""
        path = self.config.paging.total
        value = _found(response.body, path) if path else None
        if value is None:
            return known
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        # ASCII digits only ("²".isdigit() is true) and few of them (int() refuses over 4,300 digits; no view holds 10^18 records)
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
            return int(value)
        shown = _shown(str(value)) if isinstance(value, (str, int, float)) else f"a {type(value).__name__}"
        raise PageError(f"the total at '{path}' is {shown}, not a count")

    def _next(self, url: str, params: dict[str, str], last: Response) -> tuple[str, dict[str, str]] | None:
        """The request after page `last`; refuse one on another scheme, host or port: it would receive the credentials."""
        request = self.config.paging.follow(url, params, last)
        if request and _origin(request[0]) != _origin(self.config.url):
            scheme, host, port = _origin(request[0])
            raise PageError(f"the next-page URL points at {scheme}://{host}:{port}, not the configured host; refusing to follow it")
        return request

    def _where(self, number: int, url: str) -> str:
        """'page 3 of GET http://host/path' without query string or credentials."""
        return f"page {number} of GET {_public(url)}"

"""Shared helpers: import paths, servers in a child process, agent configs, timing and the table."""
from __future__ import annotations

import multiprocessing
import statistics
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "tests", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

PAGE = 1000  # records per view page


def _serve(kind: str, n: int, conn, options: dict | None = None) -> None:
    """Child process: serve a view of `n` leads, a sink or an SMTP server until the parent says stop.

    A view told ("show", k) serves only its `k` oldest leads from then on (its newest-first pages
    grow by the others when told ("show", n) again): new records appear between two polls.
    """
    options = options or {}
    if kind == "smtp":
        from smtpserver import SmtpServer

        server = SmtpServer()
        server.start()
        conn.send(f"{server.host}:{server.port}")
        conn.recv()
        server.stop()
        return
    from sinkserver import SinkServer
    from viewserver import ViewServer, make_leads

    # a lead a minute, the newest a day ago: none dated after the agent's clock, nor after its priming began
    start = datetime.now(timezone.utc) - timedelta(minutes=n, days=1)
    leads = make_leads(n, start=start.strftime("%Y-%m-%dT%H:%M:%SZ")) if kind == "view" else []
    server = ViewServer(leads[:options.get("show", n)], paging="page", page_size=PAGE) if kind == "view" else SinkServer()
    if kind == "sink":
        server.delay = options.get("delay", 0.0)
    server.start()
    url = server.url
    if kind == "view":  # sort the view once before anyone measures
        urllib.request.urlopen(f"{url}?page=1&pageSize=1").read()
    conn.send(url)
    while (message := conn.recv()) != "stop":
        server.records = leads[:message[1]]
        urllib.request.urlopen(f"{url}?page=1&pageSize=1").read()  # sorted again before anyone measures
        conn.send("ok")
    server.stop()


class Served(str):
    """The URL of a server in a child process (a str), able to tell a view to show more or fewer records."""

    conn = None

    def show(self, k: int) -> None:
        self.conn.send(("show", k))
        self.conn.recv()


@contextmanager
def served(kind: str, n: int = 0, **options) -> Iterator[Served]:
    """A ViewServer of `n` leads ("view"), a SinkServer ("sink", `delay=` seconds per request) or an
    SmtpServer ("smtp", yields "host:port") in its own process; yields its URL.

    Its own process so the server's CPU time does not compete for the agent's GIL.
    """
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    process = ctx.Process(target=_serve, args=(kind, n, theirs, options), daemon=True)
    process.start()
    try:
        url = Served(mine.recv())
        url.conn = mine
        yield url
    finally:
        mine.send("stop")
        process.join(10)


def write_config(folder: Path, view_url: str, sink_url: str = "http://127.0.0.1:9", *, first_run: str = "deliver",
                 concurrency: int = 4) -> Path:
    """A REST -> HTTP config like tests/test_cli_integration.py's: page paging, a map step, `send`."""
    path = folder / "agent.toml"
    path.write_text(f"""
[agent]
ledger = "var/agent.db"
log_level = "WARNING"
concurrency = {concurrency}

[sources.leads]
kind = "rest"
url = "{view_url}"
id = "lastSubmissionID"
updated = "lastModified"
entity = "RecordId"
first_run = "{first_run}"
timeout = "30s"
paging = {{ kind = "page", param = "page", size_param = "pageSize", size = {PAGE}, start = 1 }}

[connectors.crm]
kind = "http"
base_url = "{sink_url}"
idempotency_header = "Idempotency-Key"
timeout = "30s"
[connectors.crm.objects.leads]
path = "/leads"
key = "email"

[[flows]]
name = "leads-to-crm"
source = "leads"

  [[flows.steps]]
  kind = "map"
  fields = {{ email = "{{{{ record.Email | lower }}}}", name = "{{{{ record.FirstName }}}} {{{{ record.LastName }}}}", version = "{{{{ record.lastSubmissionID }}}}" }}

  [[flows.steps]]
  kind = "action"
  action = "crm > leads > send"
  body = "mapped"
""")
    return path


def make_agent(folder: Path, view_url: str, sink_url: str = "http://127.0.0.1:9", **options):
    """An Agent on a fresh ledger in `folder`, built the way the CLI builds it."""
    from agent import logs
    from agent.config import load
    from agent.process import Agent

    logs.setup("WARNING")
    return Agent(load(write_config(folder, view_url, sink_url, **options)))


@contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        yield Path(folder)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@dataclass
class Row:
    """One figure: the agent against the bare operation, medians of the runs."""

    name: str
    size: str
    bare: list[float]
    agent: list[float]
    unit: str = "s"
    note: str = ""

    @property
    def ratio(self) -> float:
        return statistics.median(self.agent) / statistics.median(self.bare)


def table(rows: list[Row]) -> str:
    head = f"{'benchmark':<34} {'size':>9} {'bare':>10} {'agent':>10} {'ratio':>7} {'runs':>4}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        bare, agent = statistics.median(r.bare), statistics.median(r.agent)
        lines.append(f"{r.name:<34} {r.size:>9} {bare:>8.2f}{r.unit:<2} {agent:>8.2f}{r.unit:<2} {r.ratio:>6.2f}x {len(r.agent):>4}  {r.note}")
    return "\n".join(lines)


def human(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main(run, doc: str | None) -> None:
    """The command line of one benchmark script: --quick, --repeats N, then its table."""
    import argparse

    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(table(run(args.quick, args.repeats)))

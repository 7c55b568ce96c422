"""The performance targets P1-P9, each against its bare operation in the same run; a table and a JSON file.

    .venv/bin/python bench/run.py --targets [--quick] [--repeats N] [--json FILE] [--only P1,P3]
    .venv/bin/python bench/targets.py        [--quick] [--repeats N] [--json FILE] [--only P1,P3]

P1  `agent poll leads`, fresh ledger, first_run = "skip" (whole process)   vs bare fetch + parse (whole process)
P2  `agent poll leads` again, nothing new (whole process)                  vs the same bare; and vs dlt's re-run
P3  SqliteLedger.admit, random 32-hex keys in pages of 1,000, one flow,
    200k (quick: 50k) into a ledger holding 1M seen records                 vs executemany of the same rows, same
                                                                               pragmas, a transaction per page
P4  `agent run --once`, 4,000 new records, concurrency 1, instant sink      vs fetch + serial keep-alive POSTs
P5  the same, concurrency 8, a sink answering in 10 ms                      vs fetch + POSTs from 8 threads; and
                                                                               vs the agent's own concurrency 1
P6  Agent.drain() of 5,000 emails to a local aiosmtpd, concurrency 1       vs EmailMessage + send_message, one
                                                                               connection
P7  peak RSS of `agent poll leads` on a 1M view (and on the 100k of P1)
P8  ledger bytes per record once its executions finished and retention ran (the P4 ledger, pruned)
P9  dlt's first load of the view (whole process)                            vs `agent poll leads` of P1

Whole processes are started the way a user starts them (the `agent` command beside this Python;
`python bench/bare.py ...`; `python bench/peer.py ...`), timed from start to exit; the peak RSS
comes from wait4. Servers run in their own processes. The view holds 100,000 records (quick:
10,000) served newest first in pages of 1,000; for P4 and P5 the 4,000 newest are hidden while
the ledger is primed, then shown. Agent and bare alternate within each repetition, so a busy
machine slows both. The dlt peer needs `pip install -e '.[bench]'`; without it those rows say
"dlt not installed".
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import PAGE, human, scratch, served, write_config

BENCH = Path(__file__).resolve().parent
AGENT = Path(sys.executable).with_name("agent")  # the installed console script beside this python
SOURCE, FLOW = "leads", "leads-to-crm"


# -- figures and the table ---------------------------------------------------------------------

@dataclass
class Figure:
    """One target: the bare (or peer) runs and the agent's, and how their medians compare."""

    id: str
    what: str
    bare_what: str
    bare: list[float]
    agent: list[float]
    unit: str = "s"
    ratio_of: str = "agent/bare"  # or "bare/agent" (a speed-up), or "agent" (a plain value)
    op: str = "<="
    limit: float = 1.0
    note: str = ""
    missing: str = ""  # why the figure could not be measured

    @property
    def ratio(self) -> float | None:
        if self.missing or not self.agent or (self.ratio_of != "agent" and not self.bare):
            return None
        agent = statistics.median(self.agent)
        bare = statistics.median(self.bare) if self.bare else None
        return {"agent/bare": lambda: agent / bare, "bare/agent": lambda: bare / agent, "agent": lambda: agent}[self.ratio_of]()

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        return None if ratio is None or self.op == "info" else ratio <= self.limit if self.op == "<=" else ratio >= self.limit

    @property
    def target(self) -> str:
        if self.op == "info":
            return "(informative)"
        mark = "≤" if self.op == "<=" else "≥"
        return f"{self.ratio_of} {mark} {self.limit:g}" + ("" if self.ratio_of == "agent" else "×")

    def as_json(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "met": self.met, "target": self.target,
                "bare_median": statistics.median(self.bare) if self.bare else None,
                "agent_median": statistics.median(self.agent) if self.agent else None}


def spread(values: list[float]) -> str:
    """The largest distance of a run from the median, in percent of it."""
    if len(values) < 2:
        return "1 run"
    middle = statistics.median(values)
    return f"±{100 * max(abs(v - middle) for v in values) / middle:.0f}%"


def _value(values: list[float], unit: str) -> str:
    if not values:
        return "-"
    middle = statistics.median(values)
    return f"{middle:,.0f} {unit}" if middle >= 1000 else f"{middle:.2f} {unit}" if unit == "s" else f"{middle:.0f} {unit}"


def table(figures: list[Figure]) -> str:
    """A Markdown table: id, figure, bare, agent, ratio, target, met?, runs and their spread."""
    lines = ["| id | figure | bare | agent | ratio | target | met? | runs (spread bare / agent) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in figures:
        if f.missing or f.ratio is None:
            lines.append(f"| {f.id} | {f.what} | {f.bare_what} | - | - | {f.target} | {f.missing or 'not measured'} | |")
            continue
        ratio = _value(f.agent, f.unit) if f.ratio_of == "agent" else f"{f.ratio:.2f}×"
        met = "-" if f.met is None else "yes" if f.met else "**no**"
        runs = f"{len(f.bare)}/{len(f.agent)} ({spread(f.bare)} / {spread(f.agent)})" if f.bare else f"{len(f.agent)} ({spread(f.agent)})"
        bare = f"{f.bare_what}: {_value(f.bare, f.unit)}" if f.bare else f.bare_what
        lines.append(f"| {f.id} | {f.what}{' (' + f.note + ')' if f.note else ''} | {bare} | {_value(f.agent, f.unit)} | {ratio} | "
                     f"{f.target} | {met} | {runs} |")
    return "\n".join(lines)


# -- whole processes ---------------------------------------------------------------------------

@dataclass
class Ran:
    seconds: float
    rss_mb: float
    cpu: float  # user + system seconds
    out: str


# Started from this small process, not from the benchmark itself: a child's ru_maxrss after vfork + exec
# keeps the RSS of the process that started it, and the benchmark's own is larger than a poll's.
LAUNCH = """import json, os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as out:
    json.dump({"seconds": seconds, "rss_kb": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime,
               "code": os.waitstatus_to_exitcode(status)}, out)
"""


def run_process(argv: list[str], cwd: Path, env: dict | None = None) -> Ran:
    """Run a command to its end; wall seconds, peak RSS (wait4) and CPU time. A failure stops the benchmark."""
    out_path, err_path, result = cwd / ".bench-out", cwd / ".bench-err", cwd / ".bench-ran"
    with out_path.open("w") as out, err_path.open("w") as err:
        subprocess.run([sys.executable, "-c", LAUNCH, str(result), *map(str, argv)], cwd=cwd, stdout=out, stderr=err, env=env,
                       check=False)
    text = out_path.read_text()
    ran = json.loads(result.read_text()) if result.exists() else {"code": "no result"}
    if ran["code"] != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} exited {ran['code']}:\n{text}\n{err_path.read_text()[-3000:]}")
    result.unlink()
    return Ran(ran["seconds"], ran["rss_kb"] / 1024, ran["cpu"], text)


def summary(text: str) -> dict[str, int]:
    """The counts of `agent poll` / `agent run --once`'s summary line ("polled: 1, fetched: 100000, ...")."""
    line = next(line for line in text.splitlines() if line.startswith("polled:"))
    return {k.strip(): int(v) for k, v in (part.split(":") for part in line.split(", "))}


def agent_cli(folder: Path, *argv: str) -> Ran:
    return run_process([str(AGENT), "--config", str(folder / "agent.toml"), *argv], folder)


def bare_cli(folder: Path, *argv: str) -> tuple[Ran, dict]:
    ran = run_process([sys.executable, str(BENCH / "bare.py"), *argv], folder)
    return ran, json.loads(ran.out)


def dlt_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("dlt") is not None and find_spec("duckdb") is not None


def peer_cli(folder: Path, url: str) -> Ran:
    env = {**os.environ, "RUNTIME__DLTHUB_TELEMETRY": "false", "DLT_DATA_DIR": str(folder / "dlt-data")}
    return run_process([sys.executable, str(BENCH / "peer.py"), url, str(folder)], folder, env)


# -- P1, P2, P4, P5, P7 (100k), P8, P9: the view, as a user runs the agent -----------------------

@dataclass
class ViewRuns:
    bare: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    again: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    bare_rss: list[float] = field(default_factory=list)
    dlt_first: list[float] = field(default_factory=list)
    dlt_again: list[float] = field(default_factory=list)
    post1: list[float] = field(default_factory=list)
    once1: list[float] = field(default_factory=list)
    post8: list[float] = field(default_factory=list)
    once8: list[float] = field(default_factory=list)
    slow1: list[float] = field(default_factory=list)
    ledger_bytes: dict = field(default_factory=dict)


def _poll_figures(url: str, n: int, repeats: int, runs: ViewRuns, keep: Path) -> None:
    """P1 and P2: bare fetch, then the agent's first poll and its re-poll on a fresh ledger, per repetition."""
    with scratch() as folder:
        bare_cli(folder, "fetch", url)  # warm up: the file cache, the server's sort
        run_process([str(AGENT), "--version"], folder)
    for i in range(repeats):
        with scratch() as folder:
            ran, out = bare_cli(folder, "fetch", url)
            assert out["fetched"] == n, out
            runs.bare.append(ran.seconds)
            runs.bare_rss.append(ran.rss_mb)
            write_config(folder, url, first_run="skip")
            ran = agent_cli(folder, "poll", SOURCE)
            got = summary(ran.out)
            assert got["fetched"] == n and got["primed"] == n and got["new"] == 0, got
            runs.first.append(ran.seconds)
            runs.rss.append(ran.rss_mb)
            ran = agent_cli(folder, "poll", SOURCE)
            got = summary(ran.out)
            assert got["fetched"] == n and got["primed"] == 0 and got["new"] == 0, got
            runs.again.append(ran.seconds)
            if i == repeats - 1:
                shutil.copytree(folder / "var", keep / "var")  # the primed ledger P4 and P5 start from


def _peer_figures(url: str, n: int, repeats: int, runs: ViewRuns) -> None:
    """P2's and P9's peer: dlt's first load (once: it is the slowest run of all), then its re-runs."""
    with scratch() as folder:
        ran = peer_cli(folder, url)
        assert json.loads(ran.out)["rows"] == n, ran.out
        runs.dlt_first.append(ran.seconds)
        for _ in range(repeats):
            ran = peer_cli(folder, url)
            assert json.loads(ran.out)["rows"] == 0, ran.out
            runs.dlt_again.append(ran.seconds)


def _deliver_once(url: str, keep: Path, sink_url: str, concurrency: int, new: int) -> tuple[float, Path | None]:
    """`agent run --once` on a copy of the primed ledger: the `new` records shown since go out."""
    folder = Path(tempfile.mkdtemp(prefix="bench-"))  # kept by the caller: the last P4 ledger is P8's
    shutil.copytree(keep / "var", folder / "var")
    write_config(folder, url, sink_url, first_run="skip", concurrency=concurrency)
    ran = agent_cli(folder, "run", "--once")
    got = summary(ran.out)
    assert got["new"] == new and got["sent"] == new and got["failed"] == 0 and got["waiting"] == 0, got
    return ran.seconds, folder


def _deliver_figures(url: str, n: int, new: int, repeats: int, slow_runs: int, runs: ViewRuns, keep: Path) -> None:
    """P4, P5 (and P8 from the last P4 ledger): the view grows by `new` records, which go out."""
    url.show(n + new)
    last: Path | None = None
    for _ in range(repeats):
        with scratch() as folder, served("sink") as sink:
            ran, out = bare_cli(folder, "post", url, sink, str(new), "1")
            assert out["posted"] == new, out
            runs.post1.append(ran.seconds)
        with served("sink") as sink:
            seconds, folder = _deliver_once(url, keep, sink, 1, new)
            runs.once1.append(seconds)
            if last:
                shutil.rmtree(last)
            last = folder
        with scratch() as folder, served("sink", delay=0.01) as sink:
            ran, out = bare_cli(folder, "post", url, sink, str(new), "8")
            assert out["posted"] == new, out
            runs.post8.append(ran.seconds)
        with served("sink", delay=0.01) as sink:
            seconds, folder = _deliver_once(url, keep, sink, 8, new)
            runs.once8.append(seconds)
            shutil.rmtree(folder)
    for _ in range(slow_runs):
        with served("sink", delay=0.01) as sink:
            seconds, folder = _deliver_once(url, keep, sink, 1, new)
            runs.slow1.append(seconds)
            shutil.rmtree(folder)
    try:
        runs.ledger_bytes = ledger_bytes(last / "var" / "agent.db")
    finally:
        shutil.rmtree(last)


def ledger_bytes(path: Path) -> dict:
    """P8: prune every finished execution (retention ran), then the bytes the ledger's pages hold per seen record."""
    from state import open_ledger

    ledger = open_ledger(str(path))
    try:
        now = time.time()
        pruned = ledger.prune(now + 1, {}, now)
        size = ledger.size()
    finally:
        ledger.close()
    conn = sqlite3.connect(path)
    try:
        page_size, pages, free = (conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "page_count", "freelist_count"))
        records = conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        left = conn.execute("SELECT COUNT(*) FROM executions").fetchone()[0]
    finally:
        conn.close()
    return {"records": records, "executions_left": left, "pruned": pruned, "used_bytes": (pages - free) * page_size,
            "file_bytes": size, "per_record": (pages - free) * page_size / records, "file_per_record": size / records}


def view_figures(n: int, new: int, repeats: int, slow_runs: int, want: set[str]) -> ViewRuns:
    runs = ViewRuns()
    with served("view", n + new, show=n) as url, scratch() as keep:
        _poll_figures(url, n, repeats + 2, runs, keep)  # seconds each: two more runs steady their medians
        if want & {"P2", "P9"} and dlt_installed():
            _peer_figures(url, n, repeats, runs)
        if want & {"P4", "P5", "P8"}:
            _deliver_figures(url, n, new, repeats, slow_runs, runs, keep)
    return runs


# -- P3: admission at the ledger ---------------------------------------------------------------

def _key(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def _lead(key: str, i: int) -> dict:
    return {"lastSubmissionID": key, "RecordId": f"R{i:09d}", "lastModified": "2026-11-01T10:00:00Z", "FirstName": "Zoë",
            "LastName": "Nørgaard", "Email": f"zoe.norgaard{i}@example.invalid", "Company": "Müller GmbH", "Status": "New",
            "Phone": f"+49 30 {i:07d}"}


def _prefill(path: Path, held: int, rng: random.Random) -> None:
    """A ledger holding `held` seen records (their executions long finished and pruned), by bare inserts."""
    from state.sqlite import SqliteLedger

    SqliteLedger(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    for start in range(0, held, 10_000):
        rows = [(SOURCE, k, None, "2026-11-01T10:00:00Z", bytes.fromhex(k), 1.7e9) for k in (_key(rng) for _ in range(min(10_000, held - start)))]
        conn.executemany(RECORDS_SQL, rows)
    conn.execute("COMMIT")
    conn.close()


def _bare_conn(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode = WAL", "synchronous = FULL", "foreign_keys = ON"):  # the ledger's own
        conn.execute(f"PRAGMA {pragma}")
    return conn


RECORDS_SQL = "INSERT INTO records (source, key, id, version, hash, first_seen) VALUES (?, ?, ?, ?, ?, ?)"
EXECUTIONS_SQL = ("INSERT INTO executions (flow, source, key, entity, step, status, attempts, next_at, context, created, updated,"
                  " version_at, version) VALUES (?, ?, ?, ?, 0, 'pending', 0, ?, ?, ?, ?, ?, ?)")


def admit_figures(held: int, n: int) -> tuple[list[float], list[float], dict]:
    """P3, paired: page by page, the agent's admit into one copy of the filled ledger and the bare
    executemany into another (rows and their JSON built before the clock starts, for both).
    Returns the per-block rates (records/s, a block is a tenth of the pages) of bare and agent."""
    from state.base import Admission, to_json
    from state.sqlite import SqliteLedger

    rng = random.Random(12)
    with scratch() as folder:
        _prefill(folder / "filled.db", held, rng)
        for name in ("agent.db", "bare.db"):
            shutil.copy(folder / "filled.db", folder / name)
        ledger, bare = SqliteLedger(folder / "agent.db"), _bare_conn(folder / "bare.db")
        blocks, per_block = [[0.0, 0.0]], max(1, n // PAGE // 10)
        dumping = 0.0
        gc.collect()
        try:
            for p in range(n // PAGE):
                now = 1.8e9 + p
                items = []
                for i in range(PAGE):
                    k = _key(rng)
                    items.append(Admission(key=k, id=k, version="2026-11-01T10:00:00Z", hash=bytes.fromhex(k), entity=f"R{p * PAGE + i:09d}",
                                           context={"record": _lead(k, p * PAGE + i)}))
                records = [(SOURCE, a.key, None, a.version, a.hash, now) for a in items]  # as the ledger keeps them (id is the key)
                started = time.perf_counter()
                executions = [(FLOW, SOURCE, a.key, a.entity, now, to_json(a.context), now, now, None, 1) for a in items]
                dumping += time.perf_counter() - started
                order = (0, 1) if p % 2 == 0 else (1, 0)  # neither side always goes first after the other's fsync
                for side in order:
                    started = time.perf_counter()
                    if side == 0:
                        result = ledger.admit(SOURCE, items, [(FLOW, False)], now, version=1)
                        assert result.new == PAGE, result
                    else:
                        bare.execute("BEGIN IMMEDIATE")
                        bare.executemany(RECORDS_SQL, records)
                        bare.executemany(EXECUTIONS_SQL, executions)
                        bare.execute("COMMIT")
                    blocks[-1][side] += time.perf_counter() - started
                if (p + 1) % per_block == 0 and p + 1 < n // PAGE:
                    blocks.append([0.0, 0.0])
        finally:
            ledger.close()
            bare.close()
    size = per_block * PAGE
    bare_rates = [size / b for b, _ in blocks if b]
    agent_rates = [size / a for _, a in blocks if a]
    return bare_rates, agent_rates, {"json_dumps_s": dumping, "bare_s": sum(b for b, _ in blocks), "agent_s": sum(a for _, a in blocks)}


# -- P6: email -----------------------------------------------------------------------------------

MAIL_FLOW = """
[[flows]]
name = "lead-email"
source = "leads"

  [[flows.steps]]
  kind = "action"
  action = "mail > message > send"
  to = ["sales@example.invalid"]
  reply_to = ["{{ record.Email }}"]
  subject = "New lead: {{ record.FirstName }} {{ record.LastName }}"
  text = \"\"\"{{ record.FirstName }} {{ record.LastName }} ({{ record.Company }}) registered.
Email: {{ record.Email }}
\"\"\"
"""


def _mail_config(folder: Path, smtp: str, leads: list[dict]) -> Path:
    host, port = smtp.rsplit(":", 1)
    (folder / "leads.json").write_text(json.dumps({"records": leads}), encoding="utf-8")
    path = folder / "agent.toml"
    path.write_text(f"""[agent]
ledger = "var/agent.db"
log_level = "WARNING"
concurrency = 1

[sources.leads]
kind = "file"
path = "leads.json"
id = "lastSubmissionID"
entity = "RecordId"
first_run = "deliver"

[connectors.mail]
kind = "smtp"
host = "{host}"
port = {port}
security = "none"
sender = "Sync Agent <agent@example.invalid>"
timeout = "30s"
""" + MAIL_FLOW, encoding="utf-8")
    return path


def bare_mail(smtp: str, leads: list[dict]) -> float:
    """EmailMessage built and sent with send_message, one connection for all: what the flow sends, by hand."""
    import smtplib
    from email.message import EmailMessage
    from email.utils import formatdate

    host, port = smtp.rsplit(":", 1)
    start = time.perf_counter()
    with smtplib.SMTP(host, int(port), timeout=30) as server:
        server.ehlo()
        for r in leads:
            message = EmailMessage()
            message["From"] = "Sync Agent <agent@example.invalid>"
            message["To"] = "sales@example.invalid"
            message["Reply-To"] = r["Email"]
            message["Subject"] = f"New lead: {r['FirstName']} {r['LastName']}"
            message["Date"] = formatdate(localtime=False)
            message["Message-ID"] = f"<{r['lastSubmissionID']}@example.invalid>"
            message.set_content(f"{r['FirstName']} {r['LastName']} ({r['Company']}) registered.\nEmail: {r['Email']}\n")
            server.send_message(message)
    return time.perf_counter() - start


def agent_mail(smtp: str, leads: list[dict]) -> float:
    """Agent.drain() of one email per lead (the poll that admitted them is not timed)."""
    from agent import logs
    from agent.config import load
    from agent.process import Agent

    with scratch() as folder:
        logs.setup("WARNING")
        agent = Agent(load(_mail_config(folder, smtp, leads)))
        try:
            polled = agent.poll(SOURCE)
            assert polled.new == len(leads), polled
            gc.collect()
            seconds, result = _timed(agent.drain)
            assert result.sent == len(leads) and not result.errors, result
            return seconds
        finally:
            agent.close()


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def mail_figures(n: int, repeats: int) -> tuple[list[float], list[float]]:
    from viewserver import make_leads

    leads = make_leads(n)
    bare, agent = [], []
    with served("smtp") as smtp:  # warm up: imports, the server's first connection
        bare_mail(smtp, leads[:50])
    for _ in range(repeats):
        with served("smtp") as smtp:
            bare.append(bare_mail(smtp, leads))
        with served("smtp") as smtp:
            agent.append(agent_mail(smtp, leads))
    return bare, agent


# -- P7 at 1M ------------------------------------------------------------------------------------

def memory_figures(n: int) -> tuple[float, float, float]:
    """Peak RSS (MB) of `agent poll` on a fresh ledger of an `n`-record view, its seconds, and the bare fetch's RSS."""
    with served("view", n) as url, scratch() as folder:
        bare, _ = bare_cli(folder, "fetch", url)
        write_config(folder, url, first_run="skip")
        ran = agent_cli(folder, "poll", SOURCE)
        assert summary(ran.out)["primed"] == n, ran.out
        return ran.rss_mb, ran.seconds, bare.rss_mb


# -- process start (informative) ---------------------------------------------------------------

def startup(repeats: int) -> tuple[list[float], list[float]]:
    with scratch() as folder:
        run_process([sys.executable, "-c", "pass"], folder)
        run_process([str(AGENT), "--help"], folder)
        bare = [run_process([sys.executable, "-c", "pass"], folder).seconds for _ in range(repeats)]
        agent = [run_process([str(AGENT), "--help"], folder).seconds for _ in range(repeats)]
    return bare, agent


# -- all of it -----------------------------------------------------------------------------------

IDS = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9")


def measure(quick: bool, repeats: int, want: set[str], log=print) -> tuple[list[Figure], dict]:
    n, new = (10_000, 1_000) if quick else (100_000, 4_000)
    # 200k of the 1M: the rate holds flat from the first tenth to the last (a disk-bound fsync per page), and
    # a whole million takes four minutes a side on a 2-core VM
    held, admitted = (50_000, 50_000) if quick else (1_000_000, 200_000)
    mails, big = (500, 100_000) if quick else (5_000, 1_000_000)
    figures: list[Figure] = []
    extra: dict = {"sizes": {"view": n, "new": new, "admit_held": held, "admit": admitted, "emails": mails, "memory_view": big}}
    clock = time.perf_counter()

    def done(what: str) -> None:
        log(f"  {what} measured ({time.perf_counter() - clock:.0f} s so far)", flush=True)

    no_dlt = "" if dlt_installed() else "dlt not installed (pip install -e '.[bench]')"
    if want & {"P1", "P2", "P4", "P5", "P7", "P8", "P9"}:
        runs = view_figures(n, new, repeats, 1, want)
        done("view (P1 P2 P4 P5 P8 P9)")
        size = human(n)
        fetch = "fetch+parse process"
        figures += [
            Figure("P1", f"`agent poll`, {size} new, fresh ledger, prime", fetch, runs.bare, runs.first, limit=2.0),
            Figure("P2", f"`agent poll` again, {size}, nothing new", fetch, runs.bare, runs.again, limit=1.25),
            Figure("P2", "the same vs dlt's incremental re-run", "dlt re-run", runs.dlt_again, runs.again, ratio_of="bare/agent",
                   op=">=", limit=1.5, missing=no_dlt),
        ]
        if runs.once1:
            figures += [
                Figure("P4", f"`agent run --once`, {human(new)} new, concurrency 1, instant sink", "fetch+serial POSTs", runs.post1,
                       runs.once1, limit=1.2),
                Figure("P5", "the same, concurrency 8, 10 ms sink", "fetch+8-thread POSTs", runs.post8, runs.once8, limit=1.0),
                Figure("P5", "concurrency 8 vs the agent's own concurrency 1, 10 ms sink", "agent, concurrency 1", runs.slow1,
                       runs.once8, ratio_of="bare/agent", op=">=", limit=5.0),
                Figure("P8", "ledger bytes per seen record, executions finished and pruned", "", [],
                       [runs.ledger_bytes["per_record"]], unit="B", ratio_of="agent", limit=250,
                       note=f"{runs.ledger_bytes['records']:,} records, file {runs.ledger_bytes['file_per_record']:.0f} B/record"),
            ]
            extra["ledger"] = runs.ledger_bytes
        figures.append(Figure("P9", f"dlt first load vs `agent poll` (P1), {size}", "dlt first load", runs.dlt_first, runs.first,
                              ratio_of="bare/agent", op=">=", limit=10.0, missing=no_dlt))
        extra["view_rss_mb"] = {"agent": runs.rss, "bare": runs.bare_rss}
        if "P7" in want:
            rss, seconds, bare_rss = memory_figures(big)
            done("memory (P7)")
            small = statistics.median(runs.rss)
            figures += [
                Figure("P7", f"peak RSS, `agent poll` of a {human(big)} view", "fetch+parse process", [bare_rss], [rss], unit="MB",
                       ratio_of="agent", limit=150, note=f"{seconds:.0f} s"),
                Figure("P7", f"peak RSS {human(big)} / peak RSS {size} (flat)", f"{size}", [small], [rss], unit="MB",
                       ratio_of="agent/bare", limit=1.25),
            ]
    if "P3" in want:
        bare, agent, detail = admit_figures(held, admitted)
        done("admission (P3)")
        figures.append(Figure("P3", f"admit {human(admitted)} into a ledger holding {human(held)} (records/s)", "executemany",
                              bare, agent, unit="rec/s", op=">=", limit=0.8,
                              note=f"blocks of {human(admitted // 10)}; the rows' JSON took {detail['json_dumps_s']:.1f} s, outside both"))
        extra["admit"] = detail
    if "P6" in want:
        bare, agent = mail_figures(mails, repeats)
        done("email (P6)")
        figures.append(Figure("P6", f"{human(mails)} emails to aiosmtpd, concurrency 1 (drain)", "EmailMessage+send_message",
                              bare, agent, op=">=", limit=0.8, ratio_of="bare/agent"))
    bare, agent = startup(10)
    figures.append(Figure("start", "`agent --help` (process start and imports)", "python -c pass", bare, agent, op="info",
                          note=f"+{statistics.median(agent) - statistics.median(bare):.2f} s"))
    figures.sort(key=lambda f: IDS.index(f.id) if f.id in IDS else len(IDS))  # stable: a target's rows stay in order
    return figures, extra


def machine() -> dict:
    return {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version, "cpus": os.cpu_count(),
            "system": platform.platform(), "load_before": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (10k view, 50k admit, 500 emails, 100k memory view)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure, medians shown (default: 3)")
    parser.add_argument("--only", default=",".join(IDS), help="comma-separated subset of P1..P9")
    parser.add_argument("--json", type=Path, default=Path("bench-targets.json"), help="where the figures go (default: ./bench-targets.json)")
    args = parser.parse_args(argv)
    if not AGENT.exists():
        sys.exit(f"no `agent` command beside {sys.executable}: install the project first (pip install -e .)")
    want = {w.strip().upper() for w in args.only.split(",")}
    started = time.perf_counter()
    info = machine()
    print(f"python {info['python']}, sqlite {info['sqlite']}, {info['cpus']} CPUs, load {info['load_before'][0]:.1f}; "
          f"{'quick' if args.quick else 'full'} sizes, {args.repeats} runs per figure (medians)", flush=True)
    figures, extra = measure(args.quick, args.repeats, want)
    took = time.perf_counter() - started
    info["load_after"], info["seconds"] = os.getloadavg(), took
    text = table(figures)
    print(f"\nall in {took:.0f} s; ratio as the target column says (agent/bare: lower is better)\n\n{text}")
    args.json.write_text(json.dumps({"machine": info, "quick": args.quick, "repeats": args.repeats,
                                     "figures": [f.as_json() for f in figures], "detail": extra, "table": text}, indent=2))
    print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()

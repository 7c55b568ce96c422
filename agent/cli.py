"""The command line: ``agent [--config agent.toml] COMMAND``.

Exit status: 0 ok; 1 some work failed in this run (a poll failed, a record was
quarantined, an execution failed or went dead); 2 bad config or usage
(nothing touched); 3 the ledger cannot be used (held by another agent,
damaged, unwritable). A stop (SIGTERM, SIGINT) before the agent runs exits 0.

Start-up is kept light: this module imports only the standard library's
cheapest parts, and each command imports what it needs when it runs (the
config models, the ledger, loguru), so `--help`, `--version` and `status`
start fast (bench/startup.py measures it).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from state.base import LedgerError
from agent.timing import utc_text as _when

if TYPE_CHECKING:
    from agent.config import Config
    from agent.secrets import Masker
    from state.base import Ledger

OK, FAILED, USAGE, LEDGER = 0, 1, 2, 3


class Usage(Exception):
    """A command-line mistake (exit 2)."""


class Printer:
    """What the CLI shows: every form of a configured secret masked; text values escaped onto one line, JSON terminal-safe."""

    def __init__(self, mask: Masker):
        from agent.logs import printable, terminal_json
        from agent.secrets import masked

        self.mask = mask
        self._printable, self._terminal_json, self._masked = printable, terminal_json, masked

    def text(self, value: Any) -> str:
        """A value as shown in a line for people: masked, on one line, nothing a terminal would interpret."""
        return self._printable(self.mask("" if value is None else str(value)))

    def json(self, value: Any, **options: Any) -> str:
        """A value as JSON text: masked string by string (so it stays valid JSON), safe on a terminal."""
        text = json.dumps(value, **options)
        if self.mask(text) != text:  # only then walk the value: most output holds no secret
            text = json.dumps(self._masked(value, self.mask), **options)
        return self._terminal_json(text)


def _printer(config: Config) -> Printer:
    from agent.secrets import Masker

    return Printer(Masker.of(config))


class _Version(argparse.Action):
    """--version: the installed package's version, looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the agent's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: str | None = None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("sync-agent")
        except PackageNotFoundError:
            found = "(not installed: pip install -e .)"
        print(f"agent {found}")
        parser.exit()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent", description="Polling sync agent: copies new and changed records from REST views into other systems, losing nothing and sending nothing twice.")
    p.add_argument("--version", action=_Version)
    p.add_argument("--config", default=None, help="config file (default: $AGENT_CONFIG, else ./agent.toml)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="poll every source now and on its schedule; deliver until SIGTERM/SIGINT/SIGHUP")
    run.add_argument("--once", action="store_true", help="poll every source once, deliver everything due, print a summary, exit")
    poll = sub.add_parser("poll", help="poll one source now (and deliver what it admitted)")
    poll.add_argument("source")
    poll.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                      help="a run parameter, {{ run.NAME }} in the source's params and url (repeatable); "
                           "a poll with parameters is an extra one: the cursor stays where it is")
    status = sub.add_parser("status", help="sources and flows at a glance; exit 1 when a source is stale, or work is dead or paused")
    status.add_argument("--json", action="store_true")
    ex = sub.add_parser("executions", help="list executions with their last error (or one with its attempts); "
                                          "`executions upgrade [ID…]` moves waiting work to the current flow version")
    ex.add_argument("id", nargs="*", metavar="ID | upgrade [ID…]",
                    help="show this execution's attempts; or `upgrade` with ids (or --flow, or nothing: all waiting work)")
    ex.add_argument("--status", help="only executions in this status; `quarantined`: records that could not be admitted")
    ex.add_argument("--flow")
    ex.add_argument("--record", metavar="KEY", help="only the executions of this record (its key: the submission id)")
    ex.add_argument("--entity", help="only the executions of this entity (or record key, for sources without `entity`)")
    ex.add_argument("--since", help="only executions created at or after this time (ISO 8601, e.g. 2026-11-01T00:00:00Z)")
    ex.add_argument("--limit", type=int, default=200, help="the newest N (default: 200)")
    ex.add_argument("--json", action="store_true")
    why = sub.add_parser("why", help="the whole story of one record: the poll that saw it, its executions and attempts, where it stands")
    why.add_argument("key", metavar="KEY", help="the record's key (its submission id), or its id")
    why.add_argument("--json", action="store_true")
    retry = sub.add_parser("retry", help="re-queue failed, dead or paused executions now (same idempotency key)")
    retry.add_argument("ids", nargs="*", type=int)
    retry.add_argument("--failed", action="store_true", help="re-queue every failed execution (with --dead: and every dead one)")
    retry.add_argument("--dead", action="store_true", help="re-queue every dead execution")
    retry.add_argument("--flow", help="with --failed / --dead: only this flow's")
    retry.add_argument("--since", help="with --failed / --dead: only those that failed or went dead at or after this time (ISO 8601)")
    retry.add_argument("--json", action="store_true")
    fail = sub.add_parser("fail", help="fail waiting (pending, retrying or paused) executions by hand; `retry` brings them back")
    fail.add_argument("ids", nargs="+", type=int)
    fail.add_argument("--reason", default="an operator gave up on it", help="kept as the execution's last error")
    fail.add_argument("--json", action="store_true")
    replay = sub.add_parser("replay", help="send finished executions again on purpose (new idempotency keys)")
    replay.add_argument("--flow", required=True)
    replay.add_argument("--since", help="only executions created at or after this time (ISO 8601, e.g. 2026-11-01T00:00:00Z)")
    replay.add_argument("--entity", help="only this entity (or record key, for sources without `entity`)")
    replay.add_argument("--yes", action="store_true", help="do not ask")
    test = sub.add_parser("test", help="dry run: a record through a flow without the ledger and without sending")
    test.add_argument("flow")
    test.add_argument("--record", required=True, type=Path, help="a JSON file holding one record (or a list of records)")
    test.add_argument("--json", action="store_true")
    actions = sub.add_parser("actions", help="list the action paths of the configured connectors and their input schemas")
    actions.add_argument("--json", action="store_true")
    action = sub.add_parser("action", help="one action by hand: `action run PATH --input FILE [--key K]`")
    action_sub = action.add_subparsers(dest="action_command", metavar="run", required=True)
    action_run = action_sub.add_parser("run", help="run one action once through its connector with a JSON input; records nothing in the ledger")
    action_run.add_argument("path", metavar="ACTION", help="an action path, e.g. 'crm > leads > upsert' (`agent actions` lists them)")
    action_run.add_argument("--input", required=True, type=Path, help='a JSON file holding the action\'s input, e.g. {"body": {...}}')
    action_run.add_argument("--key", help="the idempotency key (default: a fresh one, printed: give it again to repeat the call safely)")
    action_run.add_argument("--json", action="store_true", help="print the whole report (key, status, output, error) as JSON")
    validate = sub.add_parser("validate", help="check the config and that every source and sink can be reached")
    checks = validate.add_mutually_exclusive_group()
    checks.add_argument("--offline", action="store_true", help="check the config only")
    checks.add_argument("--connect", action="store_true",
                        help="log in for real: GET each view and API with its auth, log in to each mail server (STARTTLS verified); sends nothing")
    versions_ = sub.add_parser("config", help="the config versions the agent has run: history, show N, diff N M")
    versions_.add_argument("action", choices=("history", "show", "diff"))
    versions_.add_argument("numbers", nargs="*", type=int, metavar="N", help="show: a version (default: the newest); diff: two versions")
    versions_.add_argument("--json", action="store_true")
    prune = sub.add_parser("prune", help="apply [agent] retention now")
    prune.add_argument("--json", action="store_true")
    return p


def config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("AGENT_CONFIG") or "agent.toml")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # a stop before the agent's own handlers are in place: nothing was started, nothing is lost
        return OK


QUIET = {"status"}  # commands whose own code never logs: loguru is set up only if a library's log line needs it


def _main(argv: list[str] | None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as done:  # --help, --version or a usage mistake: argparse has said what there is to say
        return done.code if isinstance(done.code, int) else USAGE
    from agent import logs
    from agent.config import ConfigError, load
    from agent.logs import printable_lines

    try:
        config = load(config_path(args))
    except ConfigError as error:
        print(printable_lines(str(error)), file=sys.stderr)
        return USAGE
    out = _printer(config)
    logs.setup(config.agent.log_level, config.agent.log_format, sink=sys.stderr, mask=out.mask,  # today's stderr, which a caller may have redirected
               defer=args.command in QUIET)
    _collect_from_now_on()
    try:
        return COMMANDS[args.command](config, args)
    except ConfigError as error:
        print(printable_lines(out.mask(str(error))), file=sys.stderr)
        return USAGE
    except Usage as error:
        print(f"agent {args.command}: {out.text(error)}", file=sys.stderr)
        return USAGE
    except LedgerError as error:
        print(f"agent: {out.text(error)}", file=sys.stderr)
        return LEDGER


def _collect_from_now_on() -> None:
    """Turn the garbage collector back on if the `agent` command started with it off (agent/__main__.py).

    What start-up built (modules, classes, the config) lives as long as the process: frozen, no collection
    ever walks it again, in a short command or in months of `agent run` (the few hundred objects start-up
    left unreachable are frozen with it: some kB, once)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _agent(config: Config):
    from agent.process import Agent  # imported late: read-only commands need no connectors

    stopping = threading.Event()
    _on_stop(stopping)  # before anything starts: a SIGTERM during start-up still ends with exit 0
    return Agent(config, stopping=stopping)


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    agent = _agent(config)
    try:
        if args.once:
            return _once(agent, *agent.once(agent.poll_all))
        from agent.endpoint import serving  # late: only a running agent serves [agent] listen

        with serving(agent):  # a port in use is a config error: exit 2
            agent.run_forever()
        return OK
    finally:
        agent.close()


def cmd_poll(config: Config, args: argparse.Namespace) -> int:
    if args.source not in config.sources:
        raise Usage(f"unknown source {args.source!r} (known: {', '.join(config.sources) or 'none'})")
    run = _run_params(args.param)
    agent = _agent(config)
    try:
        return _once(agent, *agent.once(lambda: [agent.poll(args.source, run=run or None)]))
    finally:
        agent.close()


def _run_params(given: list[str]) -> dict[str, str]:
    """--param NAME=VALUE… as a table (a name given twice is a mistake, not a choice)."""
    run: dict[str, str] = {}
    for item in given:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise Usage(f"--param {item!r}: write NAME=VALUE, such as --param sku=123")
        if name.strip() in run:
            raise Usage(f"--param {name.strip()!r} is given twice")
        run[name.strip()] = value
    return run


def _on_stop(stopping: threading.Event) -> None:
    from loguru import logger

    def stop(signum, frame):
        stopping.set()  # first: whatever the main thread was doing, the stop is not lost
        try:
            logger.info("stopping on {}: finishing in-flight steps", signal.Signals(signum).name)
        except RuntimeError:  # the main thread was inside the logger itself (it is not re-entrant): the stop is not said
            pass

    # SIGHUP too: a closed terminal or a supervisor's "reload" must not kill a step between its send and its outcome
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)


def _once(agent, polls, drained) -> int:
    out = _printer(agent.config)
    waiting, paused = agent.waiting()
    failed_polls = [p for p in polls if p.error]
    summary = {
        "polled": len(polls), "failed_polls": len(failed_polls), "fetched": sum(p.fetched for p in polls),
        "new": sum(p.new for p in polls), "primed": sum(p.primed for p in polls), "quarantined": sum(p.quarantined for p in polls),
        "filtered": drained.filtered, "sent": drained.sent, "failed": drained.failed + drained.dead,
        "paused": paused, "waiting": waiting,
    }
    if sum(p.rekeyed for p in polls):  # only after a source's identity changed: seen under the new key, not sent
        summary["re-keyed"] = sum(p.rekeyed for p in polls)
    print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in summary.items()))
    for poll in failed_polls:
        print(f"  poll {out.text(poll.source)} failed: {out.text(poll.error)}")
    for error in drained.errors:
        print(f"  {out.text(error)}")
    found = sum(len(p.bad) for p in polls)  # quarantined for the first time in this run; the others were reported before
    if summary["quarantined"] > found:
        print(f"  {summary['quarantined'] - found} record(s) already quarantined by an earlier run are still in the view "
              "(`agent executions --status quarantined`); they do not fail this run")
    bad = failed_polls or found or drained.failed or drained.dead
    return FAILED if bad else OK


def _beside(config: Config) -> Ledger:
    """The ledger for an operator command: it works beside a running agent (no lock, no migration)."""
    from agent.secrets import Masker
    from state import open_ledger

    return open_ledger(config.ledger_location, reader=True, mask=Masker.of(config))




def cmd_status(config: Config, args: argparse.Namespace) -> int:
    from agent import health  # late, like the agent: read-only commands stay light

    now = time.time()
    out = _printer(config)
    with _beside(config) as ledger:
        report = health.assess(config, ledger, now)
    if args.json:
        print(out.json(report, indent=2))
    else:
        _print_status(report, out, now)
    return OK if report["healthy"] else FAILED


def _print_status(report: dict, out: Printer, now: float) -> None:
    version = report["config"]["version"]
    print(f"config: version {version} of {report['config']['versions']}" if version is not None
          else f"config: edited since the agent last ran ({report['config']['versions']} version(s) recorded; `agent config history`)")
    _print_agents(report["agents"], out, now, report["lease"])
    print("sources:")
    for name, s in report["sources"].items():
        state = "STALE" if s["stale"] else ("FAILING" if s["failing"] else "ok")
        print(f"  {out.text(name):<16} {state:<8} last poll {_when(s['last_poll'])}  last good {_when(s['last_success'])}  "
              f"cursor {out.text(s['cursor'] or '-')}  seen {s['seen']}  quarantined {s['quarantined']}")
        if s["last_error"]:
            print(f"  {'':<16} last error: {out.text(s['last_error'])}")
    print("flows:")
    _print_flows(report["flows"], out)
    print("connectors:")
    for name, c in report["connectors"].items():
        if c["reachable"]:
            print(f"  {out.text(name):<16} ok")
            continue
        state = "UNREACHABLE" + (" TOO LONG" if c["unreachable_too_long"] else "")
        print(f"  {out.text(name):<16} {state} since {_when(c['unreachable_since'])} ({now - c['unreachable_since']:.0f}s)  "
              f"waiting {c['waiting']}  last error: {out.text(c['last_error'])}")
    if not report["ledger"]["writable"]:
        print(f"ledger: NOT WRITABLE: {out.text(report['ledger']['problem'])}")
    print("health: ok" if report["healthy"] else "health: UNHEALTHY: " + "; ".join(out.text(r) for r in report["reasons"]))


def _print_flows(flows: dict[str, dict], out: Printer, parent: str | None = None, depth: int = 1) -> None:
    """Each flow's counts; a chained flow under the flow it runs after, indented, with `after NAME`."""
    for name, c in flows.items():
        after = c.get("after")
        if (after != parent) if parent is not None else (after in flows):
            continue  # not at this place of the tree (a top-level flow has a source, or an upstream not shown)
        indent = "  " * depth
        label = out.text(name) + (f"  after {out.text(parent)}" if parent is not None else "")
        width = max(26 - len(indent), 1)
        print(f"{indent}{label:<{width}} " + "  ".join(f"{k} {v}" for k, v in c.items() if k not in ("paused_because", "after")))
        if "paused_because" in c:
            print(f"{indent}{'':<{width}} PAUSED: {out.text(c['paused_because'])}")
        if depth <= len(flows):  # `after` cannot form a cycle (a config error), but a report is data: never loop
            _print_flows(flows, out, name, depth + 1)


def _print_agents(agents: list[dict], out: Printer, now: float, lease: float) -> None:
    """Every agent on this ledger in the last day: alive (heartbeat within its lease), silent (its work is taken over) or stopped."""
    print("agents:" if agents else "agents: none has run on this ledger in the last day")
    for a in agents:
        if a["stopped"] is not None:
            state = f"stopped {_when(a['stopped'])}"
        elif now - a["heartbeat"] > lease:
            state = f"SILENT for {now - a['heartbeat']:.0f}s (over the lease of {lease:g}s: its sources and work pass to other agents)"
        else:
            state = f"alive, heartbeat {now - a['heartbeat']:.0f}s ago"
        held = ", ".join(out.text(s) for s in a["sources"]) or "-"
        print(f"  {out.text(a['id'])}  {state}  started {_when(a['started'])}  sources {held}  running {a['running']}")


def _numbers(texts: list[str]) -> list[int]:
    try:
        return [int(text) for text in texts]
    except ValueError:
        raise Usage(f"execution ids are numbers, not {next(t for t in texts if not t.lstrip('-').isdigit())!r}") from None


def cmd_executions(config: Config, args: argparse.Namespace) -> int:
    out = _printer(config)
    if args.id and args.id[0] == "upgrade":
        return _upgrade(config, _numbers(args.id[1:]), args, out)
    if len(args.id) > 1:
        raise Usage("name one execution to show (or `executions upgrade ID…`)")
    one = _numbers(args.id)[0] if args.id else None
    _known_status(args.status)
    since = _parse_since(args.since)
    with _beside(config) as ledger:
        if one is not None:
            rows = ledger.executions(ids=[one])
            if not rows:
                raise Usage(f"no execution {one}")
            row = {**rows[0], "attempts_made": ledger.attempts_of(one)}
            print(out.json(row, indent=2, ensure_ascii=False) if args.json else _describe(row, out))
            return OK
        if args.status == "quarantined":
            rows = ledger.quarantined()
            if args.json:
                print(out.json(rows, indent=2, ensure_ascii=False))
            for r in [] if args.json else rows:
                print(f"{out.text(r['source']):<12} {_when(r['first_seen'])}  x{r['count']}  {out.text(r['page'])}: {out.text(r['reason'])}\n"
                      f"    {out.text(r['excerpt'])[:160]}")
            return OK
        rows = ledger.execution_list(status=args.status, flow=args.flow, key=args.record, entity=args.entity, since=since, limit=args.limit)
    if args.json:
        print(out.json(rows, indent=2, ensure_ascii=False))
        return OK
    _print_executions(rows, out)
    return OK


def _known_status(status: str | None) -> None:
    from state.base import STATUSES  # late: the parser is built without the ledger

    if status is not None and status not in STATUSES:
        raise Usage(f"--status {status!r} is not a status (known: {', '.join(STATUSES)})")


def _print_executions(rows: list[dict], out: Printer) -> None:
    """Newest first, one a line; the flow, record and entity columns fit their longest value, a longer one ends in '…'."""
    flows, keys, entities = (_column([out.text(r[name] or "-") for r in rows], title, most)
                             for name, title, most in (("flow", "flow", 24), ("key", "record", 40), ("entity", "entity", 24)))
    print(f"{'id':>6}  {'status':<10} {flows.pop(0)} {keys.pop(0)} {entities.pop(0)} {'step':>4} {'tries':>5}  {'next':<20} last error")
    for r, flow, key, entity in zip(rows, flows, keys, entities):
        print(f"{r['id']:>6}  {r['status']:<10} {flow} {key} {entity} {r['step']:>4} {r['attempts']:>5}  "
              f"{_when(r['next_at']) if r['status'] in ('retrying', 'paused') else '':<20} {out.text(r['last_error'])[:100]}")


def _column(texts: list[str], title: str, most: int) -> list[str]:
    """The title and the cells of a column as wide as its longest text (at most ``most``); a longer text is cut with '…'."""
    width = min(most, max([len(title), *map(len, texts)]))
    return [text.ljust(width) if len(text) <= width else text[:width - 1] + "…" for text in (title, *texts)]


def _upgrade(config: Config, ids: list[int], args: argparse.Namespace, out: Printer) -> int:
    """Move waiting work to the current flow version, mapping the step it stands at by its id."""
    from agent import versions

    current = versions.of(config)
    flows = {flow.name: flow for flow in config.flows}
    now = time.time()
    with _beside(config) as ledger:
        number = ledger.use_config(current.hash, current.text, current.sections, current.flows, now)
        rows = ledger.waiting_work(ids or None, args.flow)
        pinned: dict[int, dict] = {}
        moves, refused, already = [], [], []
        for row in rows:
            if row["version"] == number:
                already.append(row["id"])
                continue
            if row["version"] not in pinned:
                stored = ledger.config_version(row["version"]) if row["version"] is not None else None
                pinned[row["version"]] = {name: versions.flow_of(d) for name, d in (stored["flows"] if stored else {}).items()}
            plan = versions.plan_upgrade(row, pinned[row["version"]].get(row["flow"]), flows.get(row["flow"]))
            if isinstance(plan, str):
                refused.append({"id": row["id"], "version": row["version"], "why": plan})
            else:
                moves.append((row["id"], number, plan[0], plan[1]))
        moved = ledger.move_to_version(moves, now)
    missing = sorted(set(ids) - {row["id"] for row in rows})
    report = {"version": number, "moved": [m[0] for m in moves], "already": already, "refused": refused, "not_waiting": missing}
    if args.json:
        print(out.json(report, indent=2))
    else:
        print(f"moved {moved} execution(s) to config version {number}" + (f"; {len(already)} already on it" if already else ""))
        for item in refused:
            print(f"  execution {item['id']} stays on config version {item['version']}: {out.text(item['why'])}")
        if missing:
            print(f"  not waiting (left alone): {', '.join(map(str, missing))}")
    return FAILED if refused or missing else OK


def cmd_config(config: Config, args: argparse.Namespace) -> int:
    """The config versions the agent has run (secrets masked): history, show N, diff N M."""
    from agent import versions

    out = _printer(config)
    current = versions.of(config).hash
    with _beside(config) as ledger:
        rows = ledger.config_versions()
        if args.action == "history":
            return _history(rows, current, args, out)
        wanted = {"show": 1, "diff": 2}[args.action]
        numbers = args.numbers or ([rows[-1]["number"]] if rows and args.action == "show" else [])
        if len(numbers) != wanted:
            raise Usage(f"config {args.action} takes {'one version number' if wanted == 1 else 'two version numbers'} (see `agent config history`)")
        found = [ledger.config_version(n) for n in numbers]
    for number, row in zip(numbers, found):
        if row is None:
            raise Usage(f"no config version {number} (known: {', '.join(str(r['number']) for r in rows) or 'none yet'})")
    if args.action == "show":
        print(out.json({"number": found[0]["number"], "hash": found[0]["hash"], "text": found[0]["text"]}, indent=2) if args.json
              else out.mask(found[0]["text"]), end="" if not args.json else "\n")
        return OK
    change = versions.changes(found[0]["sections"], found[1]["sections"])
    diff = versions.text_diff(found[0]["text"], found[1]["text"], f"version {numbers[0]}", f"version {numbers[1]}")
    if args.json:
        print(out.json({"from": numbers[0], "to": numbers[1], "changes": change, "diff": diff}, indent=2))
    else:
        print(f"version {numbers[0]} -> {numbers[1]}: {versions.describe(change)}")
        print(out.mask(diff), end="")
    return OK


def _history(rows: list[dict], current: str, args: argparse.Namespace, out: Printer) -> int:
    from agent import versions

    listing, before = [], None
    for row in rows:
        change = versions.changes(before, row["sections"]) if before is not None else {}
        listing.append({"number": row["number"], "hash": row["hash"], "first_used": row["first_used"], "last_used": row["last_used"],
                        "current": row["hash"] == current, "changes": change})
        before = row["sections"]
    if args.json:
        print(out.json(listing, indent=2))
        return OK
    print(f"{'':1}{'version':>7}  {'hash':<12}  {'first used':<20}  {'last used':<20}  changes")
    for item in listing:
        what = versions.describe(item["changes"]) if item["number"] != listing[0]["number"] else "first version"
        print(f"{'*' if item['current'] else ' '}{item['number']:>7}  {item['hash'][:12]:<12}  {_when(item['first_used']):<20}  "
              f"{_when(item['last_used']):<20}  {out.text(what)}")
    if not any(item["current"] for item in listing):
        print("  (the config file as it is now has not been run yet: it becomes a version when the agent starts with it)")
    return OK


def _describe(row: dict, out: Printer) -> str:
    lines = [f"execution {row['id']}: {row['status']} (flow {out.text(row['flow'])}, source {out.text(row['source'])}, "
             f"record {out.text(row['key'])}, step {row['step']}, config version {row.get('version') or '-'})"]
    if row["last_error"]:
        lines.append(f"  last error: {out.text(row['last_error'])}")
    for a in row["attempts_made"]:
        code = f" [{a['status_code']}]" if a["status_code"] else ""
        lines.append(f"  step {a['step']} attempt {a['n']} at {_when(a['started'])}: {out.text(a['outcome'])}{code} {out.text(a['error'])}")
    for step, output in _step_outputs(row).items():
        lines.append(f"  step {out.text(step)} output: {out.json(output, ensure_ascii=False, default=str)[:500]}")
    return "\n".join(lines)


def _step_outputs(row: dict) -> dict[str, Any]:
    """The outputs the execution's steps kept (what later steps read as steps[i] or steps.<id>), by index."""
    context = row.get("context")
    if isinstance(context, str):
        try:
            context = json.loads(context)
        except ValueError:
            return {}
    return context.get("steps", {}) if isinstance(context, dict) else {}


def cmd_why(config: Config, args: argparse.Namespace) -> int:
    """The story of one record; exit 1 when the ledger does not know it."""
    from agent import why

    out = _printer(config)
    with _beside(config) as ledger:
        found = why.stories(ledger, list(config.sources), args.key)
    if args.json:
        print(out.json(found, indent=2, ensure_ascii=False))
    elif not found:
        print(f"record {out.text(args.key)}: not in the ledger — no poll of {', '.join(map(out.text, config.sources)) or 'any source'} "
              "has admitted it (see `agent executions --status quarantined`), or it was pruned")
    else:
        print("\n\n".join(why.describe(story, out.text) for story in found))
    return OK if found else FAILED


def cmd_retry(config: Config, args: argparse.Namespace) -> int:
    bulk = tuple(status for status in ("failed", "dead") if getattr(args, status))
    if args.ids and bulk:
        raise Usage("name execution ids or use --failed / --dead, not both")
    if (args.flow or args.since) and not bulk:
        raise Usage("--flow and --since narrow --failed or --dead; add one of them")
    if not args.ids and not bulk:
        raise Usage("name execution ids, or use --failed and/or --dead for every failed or dead one (narrowed by --flow, --since)")
    since = _parse_since(args.since)
    with _beside(config) as ledger:
        if args.flow:
            _known_flow(args.flow, config, ledger)
        found = ledger.requeue_matching(bulk, time.time(), flow=args.flow, since=since) if bulk else ledger.requeue(args.ids, time.time())
    missing = sorted(set(args.ids) - set(found))
    if args.json:
        print(json.dumps({"requeued": found, "left_alone": missing}))
    else:
        print(f"re-queued {len(found)} execution(s)" + (f"; not failed, dead or paused (left alone): {', '.join(map(str, missing))}" if missing else ""))
    return FAILED if missing else OK


def _known_flow(flow: str, config: Config, ledger: Ledger) -> None:
    """A flow named in the config, or one the ledger still holds work of (a flow since removed)."""
    known = sorted({f.name for f in config.flows} | set(ledger.counts()))
    if flow not in known:
        raise Usage(f"unknown flow {flow!r} (known: {', '.join(known) or 'none'})")


def cmd_fail(config: Config, args: argparse.Namespace) -> int:
    with _beside(config) as ledger:
        found = ledger.fail_by_hand(args.ids, time.time(), f"failed by hand: {args.reason}")
    missing = sorted(set(args.ids) - set(found))
    if args.json:
        print(json.dumps({"failed": found, "left_alone": missing}))
    else:
        print(f"failed {len(found)} execution(s)" + (f"; not pending, retrying or paused (left alone): {', '.join(map(str, missing))}" if missing else ""))
    return FAILED if missing else OK


def cmd_actions(config: Config, args: argparse.Namespace) -> int:
    """Every action path with its input schema (a body's JSON Schema included) and, for HTTP, its request(s)."""
    out = _printer(config)
    listing = {}
    for name, cfg in config.connectors.items():
        for action, model in cfg.actions().items():
            request = cfg.describe(action)
            listing[f"{name} > {action}"] = {**model.model_json_schema(), **({"request": request} if request else {})}
    if args.json:
        print(out.json(listing, indent=2, ensure_ascii=False))
        return OK
    for path, schema in listing.items():
        required = set(schema.get("required", []))
        fields = ", ".join(f"{k}{'*' if k in required else ''}" for k in schema.get("properties", {}))
        request = schema.get("request", {})
        shown = f"{request['request']}   " if "request" in request else ""
        print(out.text(f"{path:<36} {shown}{fields}" + (f" (schema {request['schema']})" if "schema" in request else "")))
        for label in ("lookup", "found", "create", "ok_status", "succeed_when"):
            if label in request:
                print(out.text(f"    {label:<13} {request[label]}"))
    print("(* = required)")
    return OK


def cmd_action(config: Config, args: argparse.Namespace) -> int:
    """`action run`: exit 0 when the call succeeded, 1 when it was made and did not, 2 when nothing could be sent."""
    from agent import manual

    out = _printer(config)
    try:
        result = manual.run(config, args.path, args.input, args.key)
    except manual.ManualError as error:
        raise Usage(str(error)) from None
    if args.json:
        print(out.json(result.report(), indent=2, ensure_ascii=False, default=str))
    elif result.succeeded:
        print(out.json(result.outcome.output, indent=2, ensure_ascii=False, default=str))
    else:
        o = result.outcome
        code = f" ({o.status_code})" if o.status_code else ""
        print(f"agent action run: {out.text(result.action)} {o.status}{code}: {out.text(o.error)}", file=sys.stderr)
    if result.fresh_key and not args.json:
        print(f"idempotency key: {result.key} (repeat this call safely with --key {result.key})", file=sys.stderr)
    return OK if result.succeeded else FAILED


def cmd_validate(config: Config, args: argparse.Namespace) -> int:
    from agent.process import build_plugins  # late: constructing plugins checks files such as ca_file

    build_plugins(config)
    out = _printer(config)
    print(f"{out.text(config.path)}: config ok — {len(config.sources)} source(s), {len(config.connectors)} connector(s), {len(config.flows)} flow(s)")
    for flow in config.flows:
        unnamed = [str(i) for i, step in enumerate(flow.steps) if step.kind == "action" and not step.id]
        if unnamed:
            print(f"  warning: flow {out.text(flow.name)}: action step(s) {', '.join(unnamed)} have no `id`: their idempotency keys are tied "
                  "to their position, and waiting work cannot follow them to a new version of the flow (give each step an id)")
    if args.offline:
        return OK
    from agent import validate

    problems = 0
    for check in (validate.logins if args.connect else validate.reachability)(config):
        problems += not check.ok
        print(f"  {out.text(check.where):<28} {out.text(check.target):<40} {out.text(check)}")
    return FAILED if problems else OK


def cmd_replay(config: Config, args: argparse.Namespace) -> int:
    if not any(flow.name == args.flow for flow in config.flows):
        raise Usage(f"unknown flow {args.flow!r} (known: {', '.join(f.name for f in config.flows) or 'none'})")
    since = _parse_since(args.since)
    with _beside(config) as ledger:
        ids = ledger.replayable(args.flow, since, args.entity)
        if not ids:
            print("nothing to replay")
            return OK
        if not args.yes:
            if not sys.stdin.isatty():
                raise Usage(f"{len(ids)} execution(s) would be sent again under new keys; add --yes to confirm")
            if input(f"send {len(ids)} execution(s) of {args.flow} again, under new idempotency keys? [y/N] ").strip().lower() not in ("y", "yes"):
                print("nothing replayed")
                return OK
        count = ledger.replay(ids, time.time())
    print(f"replaying {count} execution(s); the agent sends them on its next drain")
    return OK


def _parse_since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Usage(f"--since {text!r}: not a time; write ISO 8601 such as 2026-11-01T00:00:00Z") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def cmd_test(config: Config, args: argparse.Namespace) -> int:
    from agent.dryrun import dry_run

    flow = next((f for f in config.flows if f.name == args.flow), None)
    if flow is None:
        raise Usage(f"unknown flow {args.flow!r} (known: {', '.join(f.name for f in config.flows) or 'none'})")
    out = _printer(config)
    try:
        loaded = json.loads(args.record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise Usage(f"--record {args.record}: {error}") from None
    except RecursionError:
        raise Usage(f"--record {args.record}: nested too deeply to read (keep a record under a few hundred levels)") from None
    try:
        reports = [dry_run(config, flow, record) for record in (loaded if isinstance(loaded, list) else [loaded])]
        shown = out.json(reports, indent=2, ensure_ascii=False, default=str) if args.json else "\n\n".join(report_text(r, out) for r in reports)
    except RecursionError:  # a record just shallow enough to read can still be too deep to template or print
        raise Usage(f"--record {args.record}: nested too deeply to run through the flow and show (keep a record under a few hundred levels)") from None
    print(shown)
    return FAILED if any(r["status"] in ("failed", "bad record") for r in reports) else OK


def report_text(report: dict, out: Printer) -> str:
    lines = [f"flow {out.text(report['flow'])}, record {out.text(report['key'])}: {report['status']}"
             + (f" — {out.text(report['error'])}" if report.get("error") else "")]
    for step in report["steps"]:
        shown = out.json(step.get("output", step.get("send")), ensure_ascii=False, indent=2, default=str).replace("\n", "\n      ")
        verb = "would send" if "send" in step else "gives"
        lines.append(f"  step {step['index']} {step['kind']}{' ' + out.text(step['action']) if step.get('action') else ''}: {verb} {shown}")
        lines += _built_text(step.get("built"), out)
    return "\n".join(lines)


def _built_text(built: dict | None, out: Printer) -> list[str]:
    """The requests or the message a dry run built, as they would go out."""
    if not built:
        return []
    lines = []
    for request in built.get("requests", []):
        lines.append(f"    {out.text(request['method'])} {out.text(request['url'])}")
        lines += [f"      {out.text(name)}: {out.text(value)}" for name, value in request["headers"].items()]
        if request["body"] is not None:
            lines.append("      " + out.json(request["body"], ensure_ascii=False, default=str))
    if "note" in built:
        lines.append(f"    ({out.text(built['note'])})")
    if "headers" in built and "rcpt_to" in built:
        lines.append(f"    MAIL FROM {out.text(built['mail_from'])}, RCPT TO {out.text(', '.join(built['rcpt_to']))}")
        lines += [f"      {out.text(header)}" for header in built["headers"]]
    return lines


def cmd_prune(config: Config, args: argparse.Namespace) -> int:
    now = time.time()
    with _beside(config) as ledger:  # the running agent also prunes hourly
        removed = ledger.prune(now - config.agent.retention, config.windows(), now)
    print(json.dumps(removed) if args.json else ", ".join(f"{k}: {v} pruned" for k, v in removed.items()))
    return OK


COMMANDS = {
    "run": cmd_run, "poll": cmd_poll, "status": cmd_status, "executions": cmd_executions, "retry": cmd_retry, "fail": cmd_fail,
    "why": cmd_why, "action": cmd_action, "config": cmd_config, "actions": cmd_actions, "validate": cmd_validate, "prune": cmd_prune, "replay": cmd_replay, "test": cmd_test,
}

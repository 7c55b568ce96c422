"""The health rule, shared by `agent status` and the endpoint's GET /healthz: one verdict, one set of reasons.

Unhealthy when a source is stale (no good poll in three of its intervals), work
is dead, work is paused for the sinks' credentials or TLS, a connector has been
unreachable longer than ``[agent] unreachable_after``, or the ledger cannot be
written. Reasons carry names and counts, never an error text: /healthz shows
them to anyone who can reach it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `agent status` imports this module: only what it needs, when it needs it
    from agent.config import Config
    from state.base import Ledger

STALE_AFTER = 3  # intervals without a good poll


def unreachable_reason(connector: str) -> str:
    """How the error of every execution waiting for an unreachable connector begins (the flow runner writes it, status counts it)."""
    return f"connector {connector!r} is unreachable"


def assess(config: Config, ledger: Ledger, now: float) -> dict[str, Any]:
    """The status report (config, sources, flows, connectors, ledger) with ``healthy`` and its ``reasons``."""
    from agent import versions

    current = versions.of(config).hash
    recorded = ledger.config_versions()
    in_use = next((row["number"] for row in recorded if row["hash"] == current), None)
    reasons: list[str] = []
    report: dict[str, Any] = {"config": {"version": in_use, "versions": len(recorded)},
                              "sources": _sources(config, ledger.sources(), now, reasons),
                              "flows": _flows(config, ledger.counts(), ledger.pause_reasons(), reasons)}
    waiting = {name: ledger.count_paused(unreachable_reason(name)) for name in config.connectors}
    paused = sum(flow.get("paused", 0) for flow in report["flows"].values())
    if paused > sum(waiting.values()):  # paused for our credentials needs an operator at once; an unreachable sink only after a while
        reasons.append(f"{paused - sum(waiting.values())} execution(s) paused: a sink refused the agent's credentials or TLS")
    report["connectors"] = _connectors(config, ledger.unreachable(), waiting, now, reasons)
    report["agents"], report["lease"] = ledger.agents(now), config.agent.lease
    problem = None if config.ledger_is_url else ledger_problem(config.ledger_path)  # a database answered the reads above
    report["ledger"] = {"writable": problem is None, "problem": problem}
    if problem:
        reasons.append(f"the ledger cannot be written: {problem}")
    report["healthy"], report["reasons"] = not reasons, reasons
    return report


def interval(cfg: Any) -> float:
    """A source's poll interval in seconds (a daily `at` is a day)."""
    return cfg.every if not cfg.at else 86400.0


def _sources(config: Config, known: dict[str, dict], now: float, reasons: list[str]) -> dict[str, dict]:
    out = {}
    for name, cfg in config.sources.items():
        row = known.get(name, {})
        last_good = row.get("last_success")
        stale = last_good is None or now - last_good > STALE_AFTER * interval(cfg)
        if stale:
            reasons.append(f"source {name!r} is stale: " + ("no good poll yet" if last_good is None else
                           f"no good poll for {now - last_good:.0f}s (over {STALE_AFTER} intervals of {interval(cfg):g}s)"))
        out[name] = {"last_poll": row.get("last_poll"), "last_success": last_good, "cursor": row.get("value"),
                     "seen": row.get("seen", 0), "quarantined": row.get("quarantined", 0), "failing": bool(row.get("last_error")),
                     "last_error": row.get("last_error"), "stale": stale}
    return out


def _flows(config: Config, counts: dict[str, dict[str, int]], paused: dict[str, str], reasons: list[str]) -> dict[str, dict]:
    from state.base import FLOW_STATUSES  # the ledger is open already: no cost

    out = {}
    for flow in config.flows:
        c = counts.get(flow.name, {})
        out[flow.name] = {status: c.get(status, 0) for status in FLOW_STATUSES}
        out[flow.name]["after"] = flow.after  # a chained flow: the flow whose success starts it (None: it has a source)
        if flow.name in paused:
            out[flow.name]["paused_because"] = paused[flow.name]
        if c.get("dead"):
            reasons.append(f"flow {flow.name!r} has {c['dead']} dead execution(s)")
    return out


def _connectors(config: Config, down: dict[str, tuple[float, str]], waiting: dict[str, int], now: float, reasons: list[str]) -> dict[str, dict]:
    out = {}
    limit = config.agent.unreachable_after
    for name in config.connectors:
        since, why = down.get(name, (None, None))
        overdue = since is not None and now - since > limit
        if overdue:
            reasons.append(f"connector {name!r} unreachable for {now - since:.0f}s (over unreachable_after = {limit:g}s)")
        out[name] = {"reachable": since is None, "unreachable_since": since, "last_error": why,
                     "waiting": waiting[name], "unreachable_too_long": overdue}
    return out


def ledger_problem(path: Path) -> str | None:
    """Why the ledger file cannot be written now (a full disk, no write permission), or None."""
    try:
        if os.statvfs(path.parent).f_bavail == 0:
            return "the disk holding it is full"
    except OSError:
        pass  # statvfs is a hint; the access checks below decide
    if not os.access(path, os.W_OK):
        return "the file is not writable by this user" if path.exists() else "the file is missing"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return "its folder is not writable by this user (SQLite writes its -wal and -shm files there)"
    return None

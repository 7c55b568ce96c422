"""`agent why KEY`: the whole story of one record, from the poll that saw it to where its work stands now.

A record is looked up by its key (the submission id; ``id@updated`` or a
content hash where the source dedupes so) in every configured source, and
failing that by its id (under ``dedupe = "id+updated"`` an id has a key per
version). Its story::

    seen         the poll that first saw it; when a poll last showed it (refreshed at most hourly)
    executions   every execution of it, flow by flow, with each attempt
    stands       per flow, where its newest execution is, and what an operator can do about it
"""
from __future__ import annotations

from typing import Any, Callable

from state.base import Ledger
from agent.timing import utc_text as _when

DONE = {"succeeded": "delivered", "filtered": "filtered out: nothing to send", "superseded": "replaced by a newer version before it started"}


def stories(ledger: Ledger, sources: list[str], name: str) -> list[dict[str, Any]]:
    """The story of each record whose key (else whose id) is ``name``, in any of ``sources``."""
    told = [story for source in sources if (story := _story(ledger, source, name))]
    if not told:
        told = [story for source, key in ledger.keys_of_id(name) if source in sources and (story := _story(ledger, source, key))]
    return told


def _story(ledger: Ledger, source: str, key: str) -> dict[str, Any] | None:
    record = ledger.record(source, key)
    executions = ledger.executions_of(source, key)
    if record is None and not executions:
        return None
    return {
        "source": source, "key": key, "record": record,
        "entity": next((e["entity"] for e in executions if e["entity"]), None),
        "first_poll": ledger.poll_at(source, record["first_seen"]) if record else None,
        "executions": executions,
        "stands": _stands(executions),
    }


def _stands(executions: list[dict]) -> list[dict[str, Any]]:
    """Per flow, the newest execution (a queued call's own execution counts apart) and what it means."""
    newest: dict[tuple[str, int], dict] = {}
    for ex in executions:
        newest[(ex["flow"], ex["single"])] = ex  # oldest first: the last one kept is the newest
    return [{"flow": ex["flow"], "execution": ex["id"], "status": ex["status"], "says": _meaning(ex)} for ex in newest.values()]


def _meaning(ex: dict) -> str:
    status = ex["status"]
    if status in DONE:
        return DONE[status]
    if status == "running":
        return "being sent now"
    if status in ("failed", "dead"):
        return f"{status}: {ex['last_error'] or 'no error kept'} — re-queue it (same idempotency key) with `agent retry {ex['id']}`"
    why = f" (last error: {ex['last_error']})" if ex["last_error"] else ""
    return f"{status}: next try at {_when(ex['next_at'])}{why}"


def describe(story: dict[str, Any], text: Callable[[Any], str]) -> str:
    """The story as lines for people; ``text`` makes each value safe to show (masked, one line)."""
    record, poll = story["record"], story["first_poll"]
    facts = [f"source {text(story['source'])}"]
    if record and record["id"] != story["key"]:
        facts.append(f"id {text(record['id'])}")
    if record and record["version"]:
        facts.append(f"version {text(record['version'])}")
    if story["entity"]:
        facts.append(f"entity {text(story['entity'])}")
    lines = [f"record {text(story['key'])} ({', '.join(facts)})"]
    if record is None:
        lines.append("  seen: no longer in the ledger's seen keys (pruned after its source's window); its executions remain")
    else:
        by = (f" by poll {poll['id']} (started {_when(poll['started'])}: {poll['fetched']} fetched, {poll['new']} new, {poll['primed']} primed)"
              if poll else " (that poll's row has been pruned)")
        lines.append(f"  first seen {_when(record['first_seen'])}{by}; last shown by a poll at {_when(record['last_seen'] or record['first_seen'])}")
    if not story["executions"]:
        lines.append("  no executions: it was primed (first_run = \"skip\"), recognised after a re-keying, or its finished work was pruned")
    for ex in story["executions"]:
        kind = " (replay)" if ex["replay"] else " (queued call)" if ex["single"] else ""
        lines.append(f"  flow {text(ex['flow'])}, execution {ex['id']}{kind}: {ex['status']} at step {ex['step']}, created {_when(ex['created'])}")
        for a in ex["attempts_made"]:
            code = f" [{a['status_code']}]" if a["status_code"] else ""
            lines.append(f"    step {a['step']} attempt {a['n']} at {_when(a['started'])}: {text(a['outcome'])}{code} {text(a['error'] or '')}".rstrip())
    if story["stands"]:
        lines.append("  where it stands:")
        lines.extend(f"    flow {text(s['flow'])}: {text(s['says'])}" for s in story["stands"])
    return "\n".join(lines)



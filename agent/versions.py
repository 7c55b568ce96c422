"""Config versions: what the ledger keeps of each config the agent runs with.

A version is the file's content as written: ``${NAME}`` references stay
references, every literal secret becomes ``***`` (a line holding a secret in
a form that cannot be masked in place is left out), and two files that differ
only in comments or layout are the same version. With it the ledger keeps the
flow definitions, so work admitted under a version finishes on that version's
steps, templates and retry policies (connectors and sources always come from
the config in use: endpoints and credentials are fixed in place).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import tomllib
from dataclasses import dataclass
from typing import Any

from agent.config import Config, FlowConfig
from agent.secrets import SHORTEST, Masker, masked

LEFT_OUT = "# (a line holding a secret was left out of this version)"
SECTIONS = ("agent", "sources", "connectors", "flows")


@dataclass
class Version:
    hash: str
    text: str  # masked TOML, as the operator wrote it
    sections: dict[str, dict[str, str]]  # "sources" | "connectors" | "flows" | "agent" -> name -> content hash
    flows: dict[str, dict]  # flow name -> its definition (what pinned executions run)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=True, default=str).encode()).hexdigest()


def mask_text(text: str, secrets: list[str]) -> str:
    """The config text with every literal secret replaced by ``***``; a line still holding one is left out."""
    lines = text.splitlines()
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        escaped = json.dumps(secret)[1:-1]  # its TOML basic-string form when it holds quotes, backslashes or control characters
        for i, line in enumerate(lines):
            if secret not in line and escaped not in line:
                continue
            for form in (f'"{secret}"', f"'{secret}'", f'"{escaped}"', f"'''{secret}'''"):
                line = line.replace(form, '"***"')
            unmasked = len(secret) >= SHORTEST and (secret in line or escaped in line)  # a short one may be ordinary text
            lines[i] = LEFT_OUT if unmasked else line
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


def of(config: Config) -> Version:
    """The version of a loaded config."""
    text = mask_text(config.text, config.secrets)
    try:
        content = tomllib.loads(text)
    except tomllib.TOMLDecodeError:  # a left-out line broke the table it stood in: the masked text still identifies it
        content = {"text": text}
    sections: dict[str, dict[str, str]] = {"agent": {"agent": _digest(content.get("agent", {}))}}
    for name in ("sources", "connectors"):
        sections[name] = {key: _digest(table) for key, table in (content.get(name) or {}).items()} if isinstance(content.get(name), dict) else {}
    mask = Masker.of(config)
    flows = {flow.name: masked(flow.model_dump(mode="json"), mask) for flow in config.flows}
    sections["flows"] = {name: _digest(definition) for name, definition in flows.items()}
    return Version(_digest(content), text, sections, flows)


def flow_of(definition: dict) -> FlowConfig:
    """A pinned flow definition back as the model the runner uses."""
    return FlowConfig.model_validate(definition)


def changes(before: dict[str, dict[str, str]] | None, after: dict[str, dict[str, str]]) -> dict[str, dict[str, list[str]]]:
    """What changed from one version's sections to another's: section -> added / removed / edited names."""
    before = before or {}
    out: dict[str, dict[str, list[str]]] = {}
    for section in SECTIONS:
        old, new = before.get(section, {}), after.get(section, {})
        found = {"added": sorted(set(new) - set(old)), "removed": sorted(set(old) - set(new)),
                 "edited": sorted(k for k in set(old) & set(new) if old[k] != new[k])}
        if any(found.values()):
            out[section] = found
    return out


def describe(change: dict[str, dict[str, list[str]]]) -> str:
    """'flows: +b ~a; connectors: -mail' (empty: 'no change')."""
    parts = []
    for section, found in change.items():
        marks = [f"+{n}" for n in found["added"]] + [f"-{n}" for n in found["removed"]] + [f"~{n}" for n in found["edited"]]
        parts.append(f"{section}: {' '.join(marks)}")
    return "; ".join(parts) or "no change"


def text_diff(before: str, after: str, a: str, b: str) -> str:
    """A unified diff of two versions' masked texts."""
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), fromfile=a, tofile=b))


def plan_upgrade(row: dict, old: FlowConfig | None, new: FlowConfig | None) -> tuple[int, dict] | str:
    """Where a waiting execution stands in the current flow (step, context), or why it cannot move there.

    A step is matched by its `id`, so its idempotency key stays the same; an
    execution that has run nothing yet starts the current flow from the top."""
    if new is None:
        return f"flow {row['flow']!r} is not in the current config"
    context = json.loads(row["context"]) if isinstance(row["context"], str) else dict(row["context"])
    done = context.get("steps") or {}
    if row["step"] == 0 and row["attempts"] == 0 and not done and not row.get("single"):
        return 0, context
    if old is None:
        return f"its flow definition (config version {row['version']}) is not in the ledger"
    if row["step"] >= len(old.steps):
        return f"it stands past the last step of config version {row['version']}"
    step = old.steps[row["step"]]
    if not step.id:
        return (f"it stands at step {row['step']} ({step.kind}), which has no id in config version {row['version']}: "
                "it can only finish on that version (its key is tied to the step's position)")
    ids = {s.id: i for i, s in enumerate(new.steps) if s.id}
    if step.id not in ids:
        return f"step id {step.id!r} is not in the current flow {new.name!r}"
    moved = {}
    for index, output in done.items():  # earlier outputs follow their steps by id; those without one are left behind
        earlier = old.steps[int(index)] if int(index) < len(old.steps) else None
        if earlier is not None and earlier.id in ids:
            moved[str(ids[earlier.id])] = output
    return ids[step.id], {**context, "steps": moved}

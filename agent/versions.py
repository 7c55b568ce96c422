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

MASK = "***"
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
                line = line.replace(form, f'"{MASK}"')
            lines[i] = LEFT_OUT if secret in line or escaped in line else line
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


def _masked(value: Any, secrets: list[str]) -> Any:
    """A JSON-able value with every secret string inside replaced by ``***``."""
    text = json.dumps(value, ensure_ascii=False)
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(json.dumps(secret, ensure_ascii=False)[1:-1], MASK)
    return json.loads(text)


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
    flows = {flow.name: _masked(flow.model_dump(mode="json"), config.secrets) for flow in config.flows}
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

"""`agent action run PATH --input FILE [--key K]`: one action by hand, through the real connector, recorded nowhere.

The input file holds the action's input as `agent actions --json` describes
it (``{"body": {...}}`` for an http action; ``to``, ``subject``, ``text``… for
``message > send``). It is validated against the action's input model before
anything is sent, and the call is made once (no retries) with the given
idempotency key, or a fresh one the CLI prints: repeating the call with that
``--key`` is absorbed by a sink that honours keys. Nothing is written to the
ledger; the sink's own memory of keys (an outbox file, a Maildir) sees the
call like any other.

Exit status: 0 the call succeeded; 1 it was made and did not succeed (the
report's ``status`` says failed, retryable or paused); 2 nothing was sent
(an unknown action, an unreadable input file, input that does not fit, a bad key).
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from agent.config import ActionStep, Config
from sinks.base import Action, Outcome

KEY = re.compile(r"[A-Za-z0-9._+=-]{1,128}")  # what an HTTP header and a Message-ID (<key@domain>) both carry


class ManualError(Exception):
    """Nothing was sent: the action path, the input file, the input or the key is wrong (a usage error)."""


@dataclass
class Result:
    """One call made by hand: what ran, under which key, and its Outcome."""

    action: str
    key: str
    fresh_key: bool  # made up here, not given with --key: the operator needs to be told it
    outcome: Outcome

    @property
    def succeeded(self) -> bool:
        return self.outcome.status == "succeeded"

    def report(self) -> dict[str, Any]:
        o = self.outcome
        return {"action": self.action, "key": self.key, "status": o.status, "status_code": o.status_code, "output": o.output, "error": o.error}


def run(config: Config, path: str, input_file: Path, key: str | None = None) -> Result:
    """Validate the input, then run the action once through its connector; ManualError when nothing could be sent."""
    connector_name, action, model = resolve(config, path)
    data = read_input(input_file, model, path)
    if key is not None and not KEY.fullmatch(key):
        raise ManualError(f"--key {key!r}: use 1 to 128 letters, digits and . _ + = - (the key travels in a header and a Message-ID)")
    chosen = key or f"manual-{secrets.token_hex(16)}"
    connector = _connector(config, connector_name)
    try:
        outcome = connector.run(action, data, chosen)
    except Exception as error:  # a bug in the connector: reported like a failed call, never a traceback
        outcome = Outcome("failed", error=f"connector {connector_name!r} raised {type(error).__name__}: {str(error)[:300]}")
    finally:
        connector.close()
    return Result(f"{connector_name} > {action}", chosen, key is None, outcome)


def resolve(config: Config, path: str) -> tuple[str, Action, type[BaseModel]]:
    """(connector, action, input model) of an action path, or ManualError naming the known ones."""
    try:
        name, action = ActionStep.model_construct(action=path).target()
    except ValueError as error:
        raise ManualError(str(error)) from None
    if name not in config.connectors:
        raise ManualError(f"unknown connector {name!r} (known: {', '.join(config.connectors) or 'none'})")
    offered = config.connectors[name].actions()
    if action not in offered:
        raise ManualError(f"{name} has no action '{action}' (known: {', '.join(f'{name} > {a}' for a in offered)})")
    return name, action, offered[action]


def read_input(input_file: Path, model: type[BaseModel], path: str) -> dict[str, Any]:
    """The input file's JSON validated by the action's model (as the flow runner validates a rendered step)."""
    try:
        value = json.loads(input_file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ManualError(f"--input {input_file}: cannot read it ({error.strerror or error})") from None
    except (ValueError, RecursionError) as error:
        raise ManualError(f"--input {input_file}: not JSON ({error})") from None
    try:
        return model.model_validate(value).model_dump()
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in error.errors(include_url=False))
        raise ManualError(f"--input {input_file} does not fit '{path}': {problems} (`agent actions --json` shows its fields)") from None


def _connector(config: Config, name: str) -> Any:
    """The named connector, built as the agent builds it: its session carries the configured auth."""
    from agent.process import build_connector

    return build_connector(config, name)

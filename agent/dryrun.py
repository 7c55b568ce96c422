"""`agent test FLOW --record FILE`: a record through a flow, without the ledger and without sending."""
from __future__ import annotations

import time
from typing import Any

from agent.config import ActionStep, Config, FlowConfig
from agent.flows import FlowRunner
from agent.poller import BadRecord, identify
from sinks.base import Action, Outcome
from state.ledger import Execution


class DryRun:
    """Stands in for every connector: keeps what would be sent, sends nothing."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict, str]] = []

    def run(self, action: Action, data: dict[str, Any], key: str) -> Outcome:
        self.sent.append((str(action), data, key))
        return Outcome.ok({"dry_run": True})

    def close(self) -> None:
        pass


def dry_run(config: Config, flow: FlowConfig, record: Any) -> dict[str, Any]:
    """Each step's result for one record, as the agent would run it (max one pass through every step)."""
    source = config.sources[flow.source]
    try:
        item = identify(record, source)
    except BadRecord as error:
        return {"flow": flow.name, "key": None, "status": "bad record", "error": str(error), "steps": []}
    dry = DryRun()
    runner = FlowRunner(config, {name: dry for name in config.connectors}, clock=time.time, templates=config.templates)
    ex = Execution(0, flow.name, flow.source, item.key, item.entity, 0, 1, None, {"record": record, "cursor": None})
    while True:
        finish = runner.run(ex)
        if finish.status != "pending":
            break
        ex = Execution(0, flow.name, flow.source, item.key, item.entity, finish.step, 1, None, finish.context)
    return {"flow": flow.name, "key": item.key, "status": finish.status, "error": finish.error,
            "steps": _steps(flow, finish, dry)}


def _steps(flow: FlowConfig, finish, dry: DryRun) -> list[dict[str, Any]]:
    outputs, sent, out = finish.context.get("steps", {}), iter(dry.sent), []
    for index, step in enumerate(flow.steps):
        if str(index) not in outputs:
            break
        entry: dict[str, Any] = {"index": index, "kind": step.kind}
        if isinstance(step, ActionStep):
            action, data, key = next(sent, (step.action, None, None))
            entry.update(action=step.action, send=data, idempotency_key=key)
        else:
            entry["output"] = outputs[str(index)]
        out.append(entry)
    return out

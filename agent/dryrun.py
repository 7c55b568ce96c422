"""`agent test FLOW --record FILE`: a record through a flow, without the ledger and without sending.

Each action goes through its real connector's ``dry_run``: the same code as
a real send (schemas, address and header checks, path encoding, a lookup's
shape) up to the network, where it stops. So a dry run fails where the real
send would fail before sending, and shows the exact request or message the
real send makes. A connector without ``dry_run`` (a file, a mailbox) only
shows its validated input.
"""
from __future__ import annotations

import time
from typing import Any

from agent.config import ActionStep, Config, FlowConfig
from agent.flows import FlowRunner
from agent.poller import BadRecord, identify
from agent.templates import RenderError
from sinks.base import Action, Outcome
from state.base import Execution


class DryRun:
    """Stands in for one connector: its real ``dry_run`` builds what would be sent; nothing is sent."""

    def __init__(self, connector: Any, sent: list[tuple[str, dict, str, Outcome]]) -> None:
        self.connector = connector
        self.config = getattr(connector, "config", None)
        self.sent = sent

    def run(self, action: Action, data: dict[str, Any], key: str) -> Outcome:
        dry = getattr(self.connector, "dry_run", None)
        outcome = dry(action, data, key) if dry is not None else Outcome.ok({"dry_run": True})
        self.sent.append((str(action), data, key, outcome))
        return outcome

    def close(self) -> None:
        self.connector.close()


class _DryRunner(FlowRunner):
    """A FlowRunner whose actions have no real response: an `output` mapping that needs one says so instead of failing."""

    def _output(self, step: ActionStep, outcome: Outcome, values: dict) -> Any:
        try:
            return super()._output(step, outcome, values)
        except RenderError:
            if step.output is None:
                raise
            return {name: f"(the response's {name}: not known in a dry run)" for name in step.output}


def dry_run(config: Config, flow: FlowConfig, record: Any) -> dict[str, Any]:
    """Each step's result for one record, as the agent would run it (max one pass through every step)."""
    from agent.process import build_connector  # late: the process module is heavy, and only needed here to build connectors

    source = config.sources[flow.source]
    try:
        item = identify(record, source)
    except BadRecord as error:
        return {"flow": flow.name, "key": None, "status": "bad record", "error": str(error), "steps": []}
    sent: list[tuple[str, dict, str, Outcome]] = []
    connectors = {name: DryRun(build_connector(config, name), sent) for name in config.connectors}
    try:
        runner = _DryRunner(config, connectors, clock=time.time, templates=config.templates)
        ex = Execution(0, flow.name, flow.source, item.key, item.entity, 0, 1, None, {"record": record, "cursor": None})
        while True:
            finish = runner.run(ex)
            if finish.status != "pending":
                break
            ex = Execution(0, flow.name, flow.source, item.key, item.entity, finish.step, 1, None, finish.context)
    finally:
        for connector in connectors.values():
            connector.close()
    return {"flow": flow.name, "key": item.key, "status": finish.status, "error": finish.error,
            "steps": _steps(flow, finish, sent)}


def _steps(flow: FlowConfig, finish, sent: list) -> list[dict[str, Any]]:
    outputs, calls, out = finish.context.get("steps", {}), iter(sent), []
    for index, step in enumerate(flow.steps):
        if str(index) not in outputs:
            break
        entry: dict[str, Any] = {"index": index, "kind": step.kind}
        if isinstance(step, ActionStep):
            action, data, key, outcome = next(calls, (step.action, None, None, None))
            entry.update(action=step.action, send=data, idempotency_key=key)
            if outcome is not None and isinstance(outcome.output, dict) and "dry_run" not in outcome.output:
                entry["built"] = outcome.output  # the requests or the message, as the real connector built them
        else:
            entry["output"] = outputs[str(index)]
        out.append(entry)
    return out

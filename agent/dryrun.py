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
    """Each step's result for one record, as the agent would run it (max one pass through every step).

    A chained flow (``after``) starts from its upstream's dry run, as the agent starts it from the upstream's success."""
    return _dry(config, flow, record)[0]


def _dry(config: Config, flow: FlowConfig, record: Any) -> tuple[dict[str, Any], Any]:
    from agent.process import build_connector  # late: the process module is heavy, and only needed here to build connectors

    source_name = config.root_source(flow)
    try:
        item = identify(record, config.sources[source_name])
    except BadRecord as error:
        return {"flow": flow.name, "key": None, "status": "bad record", "error": str(error), "steps": []}, None
    start: dict[str, Any] = {"record": record, "cursor": None}
    if flow.after is not None:
        upstream = next(f for f in config.flows if f.name == flow.after)
        report, finish = _dry(config, upstream, record)
        entry = next((e for e in (finish.chain if finish else []) if e["flow"] == flow.name), None)
        if entry is None:
            return {"flow": flow.name, "key": item.key, "status": "not started",
                    "error": f"it runs after flow {upstream.name!r}, which came to {report['status']!r} in this dry run", "steps": []}, None
        start = entry["context"]
    sent: list[tuple[str, dict, str, Outcome]] = []
    connectors = {name: DryRun(build_connector(config, name), sent) for name in config.connectors}
    try:
        runner = _DryRunner(config, connectors, clock=time.time, templates=config.templates)
        ex = Execution(0, flow.name, source_name, item.key, item.entity, 0, 1, None, start)
        while True:
            finish = runner.run(ex)
            if finish.status != "pending":
                break
            ex = Execution(0, flow.name, source_name, item.key, item.entity, finish.step, 1, None, finish.context)
    finally:
        for connector in connectors.values():
            connector.close()
    return ({"flow": flow.name, "key": item.key, "status": finish.status, "error": finish.error,
             "steps": _steps(flow, finish, sent)}, finish)


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

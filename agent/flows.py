"""FlowRunner: take one claimed execution one action further.

``run(execution) -> Finish`` evaluates the pure steps (filter, map) and at
most ONE action step, because every action needs its own committed intent
(the claim) before it sends anything. Pure steps after a successful action
are evaluated in the same run, so their output is committed with it.
"""
from __future__ import annotations

import hashlib
import random
import threading
from typing import Any, Callable

from loguru import logger
from pydantic import ValidationError

from agent.config import ActionStep, Config, FilterStep, FlowConfig, MapStep
from agent.retry import RetryPolicy
from agent.templates import RenderError, Templates, split_outside_tags
from sinks.base import Action, Connector, Outcome
from state.ledger import Execution, Finish

PAUSE_PROBE = 60.0  # how often a paused connector is tried again


def idempotency_key(flow: str, step: int, source: str, key: str, replay: int = 0) -> str:
    """Stable across retries and restarts; a replay on purpose gets a new one."""
    text = "\x1f".join((flow, str(step), source, key) + ((f"replay-{replay}",) if replay else ()))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _resolve(config: Config, step: ActionStep) -> tuple[str, Action, type, RetryPolicy]:
    """What an action step calls, with what input model, under which retry policy."""
    connector, action = step.target()
    return connector, action, config.connectors[connector].actions()[action], RetryPolicy.from_config(step.retry)


class FlowRunner:
    def __init__(self, config: Config, connectors: dict[str, Connector], *, clock: Callable[[], float],
                 templates: Templates | None = None, rand: Callable[[], float] = random.random,
                 failpoint: Callable[[str], None] = lambda name: None):
        self.flows: dict[str, FlowConfig] = {flow.name: flow for flow in config.flows}
        self.targets = {  # (flow, step index) -> (connector, action, input model, retry policy), resolved once
            (flow.name, index): _resolve(config, step)
            for flow in config.flows for index, step in enumerate(flow.steps) if isinstance(step, ActionStep)
        }
        self.connectors = connectors
        self.templates = templates or Templates()
        self.clock = clock
        self.rand = rand
        self.failpoint = failpoint
        self.paused: dict[str, tuple[float, str]] = {}  # connector -> (probe time, why): one probe at a time reaches it
        self._lock = threading.Lock()
        self._resumed = False  # a paused connector answered again; read only through take_resumed(), under the lock

    def take_resumed(self) -> bool:
        """Whether a paused connector answered again since the last call; the agent then wakes the paused work."""
        with self._lock:  # read and reset as one: a worker's resume between the two would otherwise be lost
            resumed, self._resumed = self._resumed, False
        return resumed

    def run(self, ex: Execution) -> Finish:
        """Run an execution from its current step up to and including one action."""
        flow = self.flows.get(ex.flow)
        context = ex.context
        log = logger.bind(flow=ex.flow, source=ex.source, record=ex.key)
        if flow is None:
            return Finish("failed", ex.step, context, error=f"flow {ex.flow!r} is no longer in the config")
        index, attempt, spawn = ex.step, None, []
        while index < len(flow.steps):
            step = flow.steps[index]
            if ex.single and index != ex.step:
                break  # a queued call (wait_for_response = false) runs its own step only
            if isinstance(step, ActionStep) and attempt is not None:
                return Finish("pending", index, context, next_at=self.clock(), attempt=attempt, spawn=spawn)
            try:
                result = self._step(ex, flow, index, step, context, spawn, log)
            except RenderError as error:
                message = f"flow {ex.flow!r} step {index} ({step.kind}): {error}"
                log.warning("record {} failed: {}", ex.key, message)
                return Finish("failed", index, context, error=message, attempt=attempt, spawn=spawn)
            if isinstance(result, Finish):
                result.spawn = spawn
                return result
            attempt = result or attempt
            index += 1
        return Finish("succeeded", index, context, attempt=attempt, spawn=spawn)

    def _template_context(self, ex: Execution, context: dict) -> dict[str, Any]:
        steps = context.get("steps", {})
        size = max((int(k) for k in steps), default=-1) + 1
        return {
            "record": context.get("record"),
            "mapped": context.get("mapped"),
            "steps": [steps.get(str(i)) for i in range(size)],
            "source": ex.source,
            "flow": ex.flow,
            "cursor": context.get("cursor"),
            "now": self.clock(),
        }

    def _step(self, ex: Execution, flow: FlowConfig, index: int, step: Any, context: dict, spawn: list, log) -> Finish | dict | None:
        """Evaluate one step: a Finish ends this run; None (pure step) or an attempt (action done) goes on."""
        values = self._template_context(ex, context)
        if isinstance(step, FilterStep):
            if not self.templates.evaluate(step.when, values):
                log.debug("record {} filtered out by flow {!r} step {}", ex.key, flow.name, index)
                return Finish("filtered", index, context)
            context.setdefault("steps", {})[str(index)] = True
            return None
        if isinstance(step, MapStep):
            mapped = self.templates.render(step.fields, values)
            context["mapped"] = mapped
            context.setdefault("steps", {})[str(index)] = mapped
            return None
        return self._action(ex, index, step, context, values, spawn, log)

    def _inputs(self, step: ActionStep, model: type, values: dict) -> dict[str, Any]:
        """Render the action's input templates; HTML-ish fields marked `autoescape` are escaped."""
        data = {}
        for name, template in step.inputs.items():
            field = model.model_fields.get(name)
            extra = field.json_schema_extra if field and isinstance(field.json_schema_extra, dict) else {}
            if extra.get("addresses") and isinstance(template, str):
                template = split_outside_tags(template)  # one configured piece, one address: data cannot add one
            data[name] = self.templates.render(template, values, autoescape=bool(extra.get("autoescape")))
        if "body" in model.model_fields:
            if step.body == "mapped" or (step.body is None and values["mapped"] is not None):
                if values["mapped"] is None:
                    raise RenderError("body = 'mapped' but no map step ran before this action")
                data["body"] = values["mapped"]
            elif step.body is None:
                data["body"] = values["record"]
            else:
                data["body"] = self.templates.render(step.body, values)
        return data

    def _action(self, ex: Execution, index: int, step: ActionStep, context: dict, values: dict, spawn: list, log) -> Finish | dict | None:
        connector_name, action, model, _ = self.targets[(ex.flow, index)]
        if not step.wait_for_response and not ex.single:
            context.setdefault("steps", {})[str(index)] = {"queued": True}
            spawn.append({"step": index, "context": {**context, "steps": dict(context.get("steps", {}))}})
            now = self.clock()  # QUEUE_ACTION_SUCCESSFUL: the call itself runs as its own execution, with retries
            return {"step": index, "n": 1, "first": now, "started": now, "finished": now, "outcome": "queued",
                    "status_code": None, "error": None}
        try:
            data = model.model_validate(self._inputs(step, model, values)).model_dump()
        except ValidationError as error:
            raise RenderError("invalid input: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors(include_url=False))) from None
        held = self._held(connector_name)
        if held is not None:
            return Finish("paused", index, context, next_at=held[0], error=f"connector {connector_name!r} is paused: {held[1]}")
        key = idempotency_key(ex.flow, index, ex.source, ex.key, ex.replay)
        started = self.clock()
        try:
            outcome = self._call(self.connectors[connector_name], action, data, key)
        except Exception as error:  # a bug, ActionError included: fail this execution now, never retry it as if the network failed
            bug = f"connector {connector_name!r} raised {type(error).__name__}: {str(error)[:300]}"
            log.opt(exception=error).error("record {} failed: flow {!r} step {}: {}", ex.key, ex.flow, index, bug)
            attempt = self._attempt(ex, index, started, Outcome("failed", error=bug))
            return Finish("failed", index, context, error=f"flow {ex.flow!r} step {index} ({step.action}): {bug}", attempt=attempt)
        self._note(connector_name, outcome, log)
        if outcome.status == "succeeded":
            self.failpoint("after_send")
        return self._settle(ex, index, step, context, outcome, self._attempt(ex, index, started, outcome), log)

    def _attempt(self, ex: Execution, index: int, started: float, outcome: Outcome) -> dict:
        """The attempt row for one call of step `index`."""
        first_try = index != ex.step  # the claim began at an earlier (pure) step: this is the step's first attempt
        return {"step": index, "n": 1 if first_try else ex.attempts, "first": started if first_try else (ex.first_attempt or started),
                "started": started, "finished": self.clock(), "outcome": outcome.status,
                "status_code": outcome.status_code, "error": outcome.error}

    def _held(self, connector: str) -> tuple[float, str] | None:
        """(probe time, why) while a paused connector's probe time has not come."""
        with self._lock:
            held = self.paused.get(connector)
            if held is None or held[0] > self.clock():
                return held
            self.paused[connector] = (self.clock() + PAUSE_PROBE, held[1])  # this call is the probe; others keep waiting
            return None

    def _note(self, connector: str, outcome: Outcome, log) -> None:
        """Pause a connector on a credential/TLS problem; resume it when a probe gets through."""
        with self._lock:
            was = connector in self.paused
            if outcome.status == "paused":
                self.paused[connector] = (self.clock() + PAUSE_PROBE, outcome.error or "paused")
            elif was:
                del self.paused[connector]
                self._resumed = True
        if outcome.status == "paused" and not was:
            log.error("connector {!r} PAUSED: {} — nothing is sent to it and no attempt is spent; it is probed every {:.0f}s",
                      connector, outcome.error, PAUSE_PROBE)
        elif was and connector not in self.paused:
            log.warning("connector {!r} answers again: resumed", connector)

    @staticmethod
    def _call(connector: Connector, action: Action, data: dict, key: str) -> Outcome:
        """The connector's Outcome; an answer that is not one is a bug, raised like one."""
        outcome = connector.run(action, data, key)
        if not isinstance(outcome, Outcome):
            raise TypeError(f"run() returned {type(outcome).__name__}, not an Outcome")
        return outcome

    def _settle(self, ex: Execution, index: int, step: ActionStep, context: dict, outcome: Outcome, attempt: dict, log) -> Finish | dict:
        """Decide what an action's outcome means for the execution."""
        now = self.clock()
        where = f"flow {ex.flow!r} step {index} ({step.action})"
        if outcome.status == "succeeded":
            context.setdefault("steps", {})[str(index)] = outcome.output
            return attempt
        error = f"{where}: {outcome.error or outcome.status}"
        if outcome.status == "paused":
            return Finish("paused", index, context, next_at=now + PAUSE_PROBE, error=error, attempt=attempt)
        policy = self.targets[(ex.flow, index)][3]
        if outcome.status == "retryable" and policy.covers(outcome.condition, outcome.status_code):
            at = policy.next_time(attempt["n"], attempt["first"], now, outcome.retry_after, self.rand)
            if at is not None:
                log.warning("record {} will be retried in {:.0f}s (attempt {}): {}", ex.key, at - now, attempt["n"], error)
                return Finish("retrying", index, context, next_at=at, error=error, attempt=attempt)
            status = "dead"
            error = f"gave up after {attempt['n']} attempts: {error}"
        else:
            status = "failed"
        if step.proceed_on_failure:
            log.warning("record {} step {} failed, flow goes on (proceed_on_failure): {}", ex.key, index, error)
            context.setdefault("steps", {})[str(index)] = {"failed": True, "error": error}
            return attempt
        log.error("record {} {}: {}", ex.key, status, error)
        return Finish(status, index, context, error=error, attempt=attempt)

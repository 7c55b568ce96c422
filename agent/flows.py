"""FlowRunner: take one claimed execution one action further.

``run(execution) -> Finish`` evaluates the pure steps (filter, map) and at
most ONE action step, because every action needs its own committed intent
(the claim) before it sends anything. Pure steps after a successful action
are evaluated in the same run, so their output is committed with it.

A connector that cannot be used is held, one probe at a time reaching it,
the other executions waiting (``paused``) without spending attempts:

- paused: it refused our credentials or TLS; probed every PAUSE_PROBE seconds.
  The record a connector refused (403) just before it paused is put back with
  the paused ones once (``take_put_back``): the refusal was the connector's.
- unreachable: no connection could be made; probed after UNREACHABLE_PROBE
  seconds, doubling up to PAUSE_PROBE. Its waiting executions' error starts
  with ``unreachable_reason(connector)`` (agent.health), which is how `status` counts them.

An action's output is kept whole only when a later step of the flow mentions
``steps`` (or a flow chained after this one mentions ``upstream``); otherwise at
most OUTPUT_EXCERPT characters of it are stored.

Flow chaining: when an execution of flow A succeeds, its Finish carries one
``chain`` entry per flow that is ``after = "A"`` in the execution's pinned
config version; the ledger creates them in the transaction that records the
success. Each starts from A's record and cursor plus
``upstream = {"flow": "A", "steps": <A's step outputs>, "ids": <A's step ids>}``,
which templates see as ``upstream.flow`` and ``upstream.steps.<id>`` (or
``upstream.steps[0]``).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from loguru import logger
from pydantic import ValidationError

from agent.config import ActionStep, Config, FilterStep, FlowConfig, MapStep
from agent.health import unreachable_reason
from agent.retry import RetryPolicy
from agent.templates import RenderError, StepOutputs, Templates, split_outside_tags, templates_of
from sinks.base import Action, Connector, Outcome
from state.base import Execution, Finish
from agent.timing import utc_text as _when

PAUSE_PROBE = 60.0  # how often a paused connector is tried again
UNREACHABLE_PROBE = 5.0  # the first wait before an unreachable connector is tried again; it doubles up to PAUSE_PROBE
OUTPUT_EXCERPT = 4096  # characters of an action's output kept when no later step reads it
_STEPS = re.compile(r"(?<![\w.])steps\b")  # a template naming `steps` (an attribute `.steps` is something else)
_UPSTREAM = re.compile(r"(?<![\w.])upstream\b")  # a template of a chained flow naming its upstream's outputs


@dataclass
class Down:
    """An unreachable connector: since when, why, and when the next probe may reach it."""

    since: float
    why: str
    probe_at: float
    delay: float = UNREACHABLE_PROBE




def reads_steps(step: Any) -> bool:
    """Whether any template of a step mentions `steps` (the outputs of earlier steps)."""
    return any(_STEPS.search(template) for _, template, _ in templates_of(step))


def reads_upstream(flow: FlowConfig) -> bool:
    """Whether any template of a (chained) flow mentions `upstream` (the step outputs of the flow it runs after)."""
    return any(_UPSTREAM.search(template) for step in flow.steps for _, template, _ in templates_of(step))


def followers(flows: dict[str, FlowConfig], name: str) -> list[FlowConfig]:
    """The flows chained after flow ``name`` (``after = name``), in config order."""
    return [flow for flow in flows.values() if flow.after == name]


def _problem(error: dict) -> str:
    """One input validation error as 'field: message' (a schema's message names its field itself)."""
    where, message = ".".join(map(str, error["loc"])), error["msg"].removeprefix("Value error, ")
    return message if not where or message.startswith(where) else f"{where}: {message}"


def excerpt_of(output: Any) -> Any:
    """The output itself when small, else a short excerpt of its JSON that says how long it was."""
    if output is None or isinstance(output, (bool, int, float)):
        return output
    text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False, default=str)
    if len(text) <= OUTPUT_EXCERPT:
        return output
    return {"excerpt": text[:OUTPUT_EXCERPT], "length": len(text), "cut": "no later step reads this output"}


def idempotency_key(flow: str, step: int | str, source: str, key: str, replay: int = 0) -> str:
    """Stable across retries and restarts; a replay on purpose gets a new one. ``step``: the step's reference."""
    text = "\x1f".join((flow, str(step), source, key) + ((f"replay-{replay}",) if replay else ()))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def step_reference(step: Any, index: int) -> str:
    """What a step's idempotency key derives from: its `id`, or without one its position in the flow."""
    return f"id:{step.id}" if step.id else str(index)


def _resolve(config: Config, flow: FlowConfig, version: int | None, index: int, step: ActionStep) -> tuple[str, Action, type, RetryPolicy] | str:
    """What an action step calls, with what input model, under which retry policy; or why it cannot run any more."""
    connector, action = step.target()
    where = f"flow {flow.name!r} step {index} ({step.action})" + (f" of config version {version}" if version is not None else "")
    if connector not in config.connectors:
        return (f"{where}: connector {connector!r} is no longer in the config; put it back, "
                "or move the work to the current flow with `agent executions upgrade`")
    offered = config.connectors[connector].actions()
    if action not in offered:
        return (f"{where}: {connector} no longer offers '{action}'; put it back, "
                "or move the work to the current flow with `agent executions upgrade`")
    return connector, action, offered[action], RetryPolicy.from_config(step.retry)


class FlowRunner:
    def __init__(self, config: Config, connectors: dict[str, Connector], *, clock: Callable[[], float],
                 templates: Templates | None = None, rand: Callable[[], float] = random.random,
                 failpoint: Callable[[str], None] = lambda name: None, version: int | None = None):
        self.config = config
        self.version = version  # the config version in use; executions pinned to another run that version's flows
        self.versions: dict[int | None, dict[str, FlowConfig]] = {}
        self.targets: dict[tuple, Any] = {}  # (version, flow, step index) -> (connector, action, input model, retry policy) | why not
        self.read_later: dict[tuple, bool] = {}  # (version, flow, step index) -> whether a later step's templates mention `steps`
        self.add_version(None, {flow.name: flow for flow in config.flows})
        if version is not None:
            self.add_version(version, self.versions[None])
        self.connectors = connectors
        self.templates = templates or Templates()
        self.clock = clock
        self.rand = rand
        self.failpoint = failpoint
        self.paused: dict[str, tuple[float, str]] = {}  # connector -> (probe time, why): one probe at a time reaches it
        self.down: dict[str, Down] = {}  # unreachable connectors: one probe at a time tries them
        self._refused: dict[str, int] = {}  # connector -> the execution it last refused with 403, since its last success
        self._put_back: list[int] = []  # executions failed by a refusal that turned out to be the connector's
        self._put_back_once: set[int] = set()
        self._lock = threading.Lock()
        self._resumed = False  # a paused connector answered again; read only through take_resumed(), under the lock

    def add_version(self, version: int | None, flows: dict[str, FlowConfig]) -> None:
        """Know a config version's flows (resolved against today's connectors); call it before running its work."""
        self.versions[version] = flows
        for flow in flows.values():
            read_downstream = any(reads_upstream(after) for after in followers(flows, flow.name))
            for index, step in enumerate(flow.steps):
                self.read_later[(version, flow.name, index)] = read_downstream or any(reads_steps(later) for later in flow.steps[index + 1:])
                if isinstance(step, ActionStep):
                    self.targets[(version, flow.name, index)] = _resolve(self.config, flow, version, index, step)

    def knows(self, version: int | None) -> bool:
        return version in self.versions

    def take_resumed(self) -> bool:
        """Whether a paused connector answered again since the last call; the agent then wakes the paused work."""
        with self._lock:  # read and reset as one: a worker's resume between the two would otherwise be lost
            resumed, self._resumed = self._resumed, False
        return resumed

    def take_put_back(self) -> list[int]:
        """Executions to put back with the paused ones: their 403 came just before their connector paused."""
        with self._lock:
            taken, self._put_back = self._put_back, []
        return taken

    def unreachable(self) -> dict[str, tuple[float, str]]:
        """connector -> (unreachable since, why) for every connector that cannot be reached now."""
        with self._lock:
            return {name: (down.since, down.why) for name, down in self.down.items()}

    def restore_unreachable(self, known: dict[str, tuple[float, str]]) -> None:
        """Take over what an earlier run knew (since when a connector is unreachable); probe each at once."""
        with self._lock:
            for name, (since, why) in known.items():
                if name in self.connectors:
                    self.down[name] = Down(since, why, probe_at=self.clock())

    def run(self, ex: Execution) -> Finish:
        """Run an execution from its current step up to and including one action."""
        flows = self.versions.get(ex.version)
        flow = flows.get(ex.flow) if flows is not None else None
        context = ex.context
        log = logger.bind(flow=ex.flow, source=ex.source, record=ex.key)
        if flow is None:
            where = "the config" if ex.version in (None, self.version) else f"config version {ex.version}"
            return Finish("failed", ex.step, context, error=f"flow {ex.flow!r} is not in {where}; move the work with `agent executions upgrade` if the flow was renamed")
        index, attempt, spawn = ex.step, None, []
        while index < len(flow.steps):
            step = flow.steps[index]
            if ex.single and index != ex.step:
                break  # a queued call (wait_for_response = false) runs its own step only
            if isinstance(step, ActionStep) and attempt is not None:
                return Finish("pending", index, context, next_at=self.clock(), attempt=attempt, spawn=spawn)
            if isinstance(step, ActionStep) and (short := self._lease_too_short(ex, step)):
                log.warning("execution {}: {}; it goes back to be claimed again", ex.id, short)
                return Finish("pending", index, context, next_at=self.clock(), error=short, spawn=spawn)
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
        return Finish("succeeded", index, context, attempt=attempt, spawn=spawn, chain=self._chain(ex, flows, flow, context))

    @staticmethod
    def _chain(ex: Execution, flows: dict[str, FlowConfig], flow: FlowConfig, context: dict) -> list[dict]:
        """One new execution per flow chained after this one in the execution's config version (none for a queued call's own run)."""
        if ex.single:
            return []
        upstream = {"flow": flow.name, "steps": dict(context.get("steps", {})),
                    "ids": {step.id: i for i, step in enumerate(flow.steps) if step.id}}
        start = {"record": context.get("record"), "cursor": context.get("cursor"), "upstream": upstream}
        return [{"flow": after.name, "context": start} for after in followers(flows, flow.name)]

    def _lease_too_short(self, ex: Execution, step: ActionStep) -> str | None:
        """Why an action must not start now: less than its connector's timeout is left on the claim's lease."""
        try:
            timeout = getattr(self.connectors[step.target()[0]].config, "timeout", None)
        except (KeyError, ValueError, AttributeError):
            return None  # a bad target fails in the step itself, named
        left = ex.lease_deadline - time.monotonic()
        if isinstance(timeout, (int, float)) and left < timeout:
            return f"{max(left, 0):.1f}s left on its lease, less than the connector's timeout ({timeout:g}s): not started"
        return None

    def _template_context(self, ex: Execution, context: dict, flow: FlowConfig) -> dict[str, Any]:
        steps = context.get("steps", {})
        size = max((int(k) for k in steps), default=-1) + 1
        ids = {step.id: i for i, step in enumerate(flow.steps[:size]) if step.id}
        values = {
            "record": context.get("record"),
            "mapped": context.get("mapped"),
            "steps": StepOutputs([steps.get(str(i)) for i in range(size)], ids),  # steps[0], steps.<step id>
            "source": ex.source,
            "flow": ex.flow,
            "cursor": context.get("cursor"),
            "now": self.clock(),
        }
        upstream = context.get("upstream")
        if isinstance(upstream, dict):  # a chained flow: the outputs of the flow it ran after, as `upstream.steps.<id>`
            done = upstream.get("steps") or {}
            width = max((int(k) for k in done), default=-1) + 1
            values["upstream"] = {"flow": upstream.get("flow"),
                                  "steps": StepOutputs([done.get(str(i)) for i in range(width)], upstream.get("ids") or {})}
        return values

    def _step(self, ex: Execution, flow: FlowConfig, index: int, step: Any, context: dict, spawn: list, log) -> Finish | dict | None:
        """Evaluate one step: a Finish ends this run; None (pure step) or an attempt (action done) goes on."""
        values = self._template_context(ex, context, flow)
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
        target = self.targets[(ex.version, ex.flow, index)]
        if isinstance(target, str):  # a pinned step whose connector or action is gone
            log.error("record {} failed: {}", ex.key, target)
            return Finish("failed", index, context, error=target)
        connector_name, action, model, _ = target
        if not step.wait_for_response and not ex.single:
            context.setdefault("steps", {})[str(index)] = {"queued": True}
            spawn.append({"step": index, "context": {**context, "steps": dict(context.get("steps", {}))}})
            now = self.clock()  # QUEUE_ACTION_SUCCESSFUL: the call itself runs as its own execution, with retries
            return {"step": index, "n": 1, "first": now, "started": now, "finished": now, "outcome": "queued",
                    "status_code": None, "error": None}
        try:
            data = model.model_validate(self._inputs(step, model, values)).model_dump()
        except ValidationError as error:
            raise RenderError("invalid input: " + "; ".join(_problem(e) for e in error.errors(include_url=False))) from None
        held = self._held(connector_name)
        if held is not None:
            return Finish("paused", index, context, next_at=held[0], error=held[1])
        key = idempotency_key(ex.flow, step_reference(step, index), ex.source, ex.key, ex.replay)
        started = self.clock()
        try:
            outcome = self._call(self.connectors[connector_name], action, data, key)
        except Exception as error:  # a bug, ActionError included: fail this execution now, never retry it as if the network failed
            bug = f"connector {connector_name!r} raised {type(error).__name__}: {str(error)[:300]}"
            log.opt(exception=error).error("record {} failed: flow {!r} step {}: {}", ex.key, ex.flow, index, bug)
            attempt = self._attempt(ex, index, started, Outcome("failed", error=bug))
            return Finish("failed", index, context, error=f"flow {ex.flow!r} step {index} ({step.action}): {bug}", attempt=attempt)
        self._note(connector_name, outcome, ex, log)
        if outcome.status == "succeeded":
            self.failpoint("after_send")
        return self._settle(ex, index, step, context, values, outcome, self._attempt(ex, index, started, outcome), log)

    def _attempt(self, ex: Execution, index: int, started: float, outcome: Outcome) -> dict:
        """The attempt row for one call of step `index`."""
        first_try = index != ex.step  # the claim began at an earlier (pure) step: this is the step's first attempt
        return {"step": index, "n": 1 if first_try else ex.attempts, "first": started if first_try else (ex.first_attempt or started),
                "started": started, "finished": self.clock(), "outcome": outcome.status,
                "status_code": outcome.status_code, "error": outcome.error}

    def _held(self, connector: str) -> tuple[float, str] | None:
        """(probe time, error) while a held connector's probe time has not come; None lets this call through."""
        with self._lock:
            now = self.clock()
            down = self.down.get(connector)
            if down is not None:
                if down.probe_at > now:
                    return down.probe_at, f"{unreachable_reason(connector)} since {_when(down.since)}: {down.why}"
                down.delay = min(2 * down.delay, PAUSE_PROBE)
                down.probe_at = now + down.delay  # this call is the probe; the others wait, a little longer each time
                return None
            held = self.paused.get(connector)
            if held is None or held[0] > now:
                return None if held is None else (held[0], f"connector {connector!r} is paused: {held[1]}")
            self.paused[connector] = (now + PAUSE_PROBE, held[1])  # this call is the probe; others keep waiting
            return None

    def _note(self, connector: str, outcome: Outcome, ex: Execution, log) -> None:
        """Hold a connector that refused our credentials or cannot be reached; release it when a call gets through."""
        now = self.clock()
        with self._lock:
            was, was_down = connector in self.paused, connector in self.down
            if outcome.unreachable and outcome.status == "retryable":
                if not was_down:
                    self.down[connector] = Down(now, outcome.error or "unreachable", probe_at=now + UNREACHABLE_PROBE)
                return  # the connector line is the agent's, once per change; not one per record
            if was_down:
                del self.down[connector]  # whatever it answered, it was reached
                self._resumed = True
            self._note_refusal(connector, outcome, ex, was)
            if outcome.status == "paused":
                self.paused[connector] = (now + PAUSE_PROBE, outcome.error or "paused")
            elif was:
                del self.paused[connector]
                self._resumed = True
        if outcome.status == "paused" and not was:
            log.error("connector {!r} PAUSED: {} — nothing is sent to it and no attempt is spent; it is probed every {:.0f}s",
                      connector, outcome.error, PAUSE_PROBE)
        elif was and connector not in self.paused:
            log.warning("connector {!r} answers again: resumed", connector)

    def _note_refusal(self, connector: str, outcome: Outcome, ex: Execution, was_paused: bool) -> None:
        """Remember the last record a connector refused (403); when it then pauses, that record goes back with the others, once."""
        if outcome.status == "succeeded":
            self._refused.pop(connector, None)
        elif outcome.status == "failed" and outcome.status_code == 403:
            self._refused[connector] = ex.id
        elif outcome.status == "paused" and outcome.status_code == 403 and not was_paused:
            refused = self._refused.pop(connector, None)
            if refused is not None and refused != ex.id and refused not in self._put_back_once:
                self._put_back.append(refused)
                self._put_back_once.add(refused)  # once: a record forbidden for itself must still end as failed

    def _wait_for_reach(self, ex: Execution, index: int, connector: str, context: dict, attempt: dict, policy: RetryPolicy,
                        now: float) -> Finish | None:
        """Wait, without spending the attempt, for an unreachable connector's next probe; None once past the retry window."""
        if now - attempt["first"] > policy.window:
            return None  # an earlier try of this step may have reached the sink: past the window, the policy decides
        with self._lock:
            down = self.down.get(connector)
            probe_at, since, why = (down.probe_at, down.since, down.why) if down else (now + UNREACHABLE_PROBE, now, attempt["error"])
        return Finish("paused", index, context, next_at=probe_at, attempt=attempt,
                      error=f"{unreachable_reason(connector)} since {_when(since)}: {why}")

    def _output(self, step: ActionStep, outcome: Outcome, values: dict) -> Any:
        """What a succeeded action leaves to later steps: its `output` mapping rendered over the response, else the response."""
        if step.output is None:
            return outcome.output
        reply = outcome.reply
        return self.templates.render(step.output, {**values, "response": outcome.output, "status": outcome.status_code,
                                                   "headers": reply.headers if reply else {}})

    def _retry_when(self, step: ActionStep, outcome: Outcome, policy: RetryPolicy) -> bool:
        """Whether a failure is tried again: the `on` list names it (retryable ones), or `retry.when` holds on the raw result."""
        if outcome.status == "retryable" and policy.covers(outcome.condition, outcome.status_code):
            return True
        if not step.retry.when or outcome.status not in ("retryable", "failed"):
            return False
        reply = outcome.reply
        values = {"status": reply.status if reply else outcome.status_code, "headers": reply.headers if reply else {},
                  "body": reply.body if reply else None, "error": outcome.error}
        return bool(self.templates.evaluate(step.retry.when, values))

    @staticmethod
    def _call(connector: Connector, action: Action, data: dict, key: str) -> Outcome:
        """The connector's Outcome; an answer that is not one is a bug, raised like one."""
        outcome = connector.run(action, data, key)
        if not isinstance(outcome, Outcome):
            raise TypeError(f"run() returned {type(outcome).__name__}, not an Outcome")
        return outcome

    def _settle(self, ex: Execution, index: int, step: ActionStep, context: dict, values: dict, outcome: Outcome, attempt: dict,
                log) -> Finish | dict:
        """Decide what an action's outcome means for the execution."""
        now = self.clock()
        where = f"flow {ex.flow!r} step {index} ({step.action})"
        if outcome.status == "succeeded":
            try:
                output = self._output(step, outcome, values)
            except RenderError as error:  # sent and done: the work is not lost, but later steps cannot have what they need
                message = f"{where}: succeeded, but its output mapping failed: {error}"
                log.error("record {} failed: {}", ex.key, message)
                return Finish("failed", index, context, error=message, attempt=attempt)
            read_later = self.read_later[(ex.version, ex.flow, index)] and not ex.single
            context.setdefault("steps", {})[str(index)] = output if read_later else excerpt_of(output)
            return attempt
        error = f"{where}: {outcome.error or outcome.status}"
        if outcome.status == "paused":
            # after the others held meanwhile (their time is the probe's start + PAUSE_PROBE): the next probe is another record
            return Finish("paused", index, context, next_at=now + PAUSE_PROBE, error=error, attempt=attempt)
        connector_name, _, _, policy = self.targets[(ex.version, ex.flow, index)]
        if outcome.status == "retryable" and outcome.unreachable and policy.covers(outcome.condition, outcome.status_code):
            waiting = self._wait_for_reach(ex, index, connector_name, context, attempt, policy, now)
            if waiting is not None:
                return waiting
        try:
            again = self._retry_when(step, outcome, policy)
        except RenderError as failure:
            again, error = False, f"{error}; and retry.when {step.retry.when!r} failed: {failure}"
        if again:
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

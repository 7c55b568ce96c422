"""The connector contract: a Connector runs an action and returns an Outcome.

A connector is constructed from its validated ``Config`` plus injected I/O
(``session=`` for HTTP, ``smtp_factory=`` for SMTP, ``clock=``) and offers::

    run(action: Action, data: dict, key: str) -> Outcome
    close() -> None                  # release connections (optional work)
    dry_run(action, data, key) -> Outcome   # optional: build what run would send, send nothing

``dry_run`` goes through the same code as ``run`` (input checks, address
checks, header checks, URL encoding, a lookup's shape) and stops only before
the network: ``succeeded`` with ``output`` describing what would go out, or the
``failed`` Outcome that ``run`` would give before sending anything.

A connector whose config holds templates of its own (an HTTP action's path,
query, lookup, ``succeed_when``) asks for ``templates=`` in its constructor: a
``Renderer`` the agent injects, so that ``sinks`` knows nothing of the
template language. A template that fails raises ValueError naming the problem.

``data`` is the action's input, already rendered by the agent and validated
against the model that ``Config.actions()`` names for that action. ``key`` is
the step's idempotency key: stable across retries and restarts, it must reach
the sink (a header, a Message-ID, a marker in a file) so that a repeat is
absorbed there.

A connector never raises for a delivery problem and never returns ``False``:
it returns an Outcome whose ``status`` says what the caller does next::

    succeeded   done; ``output`` is kept for later steps
    failed      permanent (4xx, invalid address): do not retry
    retryable   timeout, connection error, 5xx, 408/425/429: retry by policy,
                ``retry_after`` (seconds) when the server said so
    paused      a credential or TLS problem (401/403, SMTP 535): the connector
                waits; no attempt is spent and nothing goes dead

``unreachable`` marks a retryable outcome whose connection could not even be
made (refused, unknown host, connect timeout): the agent then backs off the
whole connector, one probe at a time, instead of trying every record.

Errors (raised only at construction or for programming mistakes)::

    SinkError                base
    └── ActionError          an action path or input the connector cannot run
"""
from __future__ import annotations

import email.header
import re
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

from pydantic import BaseModel, ConfigDict


class SinkError(Exception):
    """Base of every error a sink raises."""


class ActionError(SinkError):
    """An action path or input this connector cannot run."""


@dataclass(frozen=True)
class Action:
    """The object and verb of an action path ``connector > object > verb``."""

    object: str
    verb: str

    def __str__(self) -> str:
        return f"{self.object} > {self.verb}"


@dataclass(frozen=True)
class Reply:
    """A server's answer as far as it was read: what ``succeed_when`` and ``retry.when`` look at."""

    status: int
    headers: dict[str, str]  # names in lower case
    body: Any  # the parsed JSON, else the text, else None


@dataclass
class Outcome:
    status: Literal["succeeded", "failed", "retryable", "paused"]
    output: Any = None
    error: str | None = None
    status_code: int | None = None  # HTTP status or SMTP reply code, when there was one
    retry_after: float | None = None  # seconds the server asked us to wait
    condition: str | None = None  # what went wrong, for retry `on`: "timeout", "connection", "5xx", "429", ...
    unreachable: bool = False  # no connection could be made (refused, DNS, connect timeout): nothing reached the sink
    reply: Reply | None = None  # the answer the outcome was judged on, when there was one

    @classmethod
    def ok(cls, output: Any = None, status_code: int | None = None) -> "Outcome":
        return cls("succeeded", output=output, status_code=status_code)


class Connector(Protocol):
    def run(self, action: Action, data: dict[str, Any], key: str) -> Outcome: ...

    def close(self) -> None: ...


class Renderer(Protocol):
    """The agent's templates, as a connector may use them (injected as ``templates=``).

    ``finalize`` is applied to every value an expression places in the text
    (how a URL template encodes data); ``evaluate`` runs a bare expression.
    Both raise ValueError for a template that fails for these values.
    """

    def render(self, template: Any, context: dict[str, Any], autoescape: bool = False,
               finalize: Callable[[Any], Any] | None = None) -> Any: ...

    def evaluate(self, expression: str, context: dict[str, Any]) -> Any: ...


from durations import seconds

Timeout = seconds(0.1, 3600)  # one exchange with a server: too short fails every call, over an hour is a hang


class ConnectorConfig(BaseModel):
    """Base of every connector's config model; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    kind: str

    @abstractmethod
    def actions(self) -> dict[Action, type[BaseModel]]:
        """Every action this connector offers with the pydantic model of its input."""

    def describe(self, action: Action) -> dict[str, Any]:
        """What an action does at the sink, for `agent actions` (an http action: its method and path template)."""
        return {}

    def templates(self) -> list[tuple[str, str, bool]]:
        """(key path under the connector's table, template, is_expression) of every template the table holds."""
        return []


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def header_safe(value: str) -> bool:
    """False when a header value holds a control character, raw or RFC 2047-encoded.

    Decoding the encoded words matters: Python 3.11.7 (CVE-2024-6923) lets an
    encoded newline in a Subject fold into a real header on output.
    """
    if _CONTROL.search(value):
        return False
    try:
        parts = email.header.decode_header(value)
    except Exception:  # a malformed encoded word is not safe to pass on
        return False
    for part, charset in parts:
        try:
            text = part.decode(charset or "latin-1", "replace") if isinstance(part, bytes) else part
        except LookupError:  # an encoded word in a charset Python does not know: not safe to pass on
            return False
        if _CONTROL.search(text):
            return False
    return True

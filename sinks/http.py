"""The ``http`` connector: actions on the objects of a REST API, one request per verb.

Config (``[connectors.NAME]``; the agent builds auth into the session)::

    kind = "http"
    base_url = "https://crm.example.invalid/api"
    idempotency_header = "Idempotency-Key"     # carries the step's key on every request
    timeout = "30s"
    headers = { X-Source = "sync-agent" }       # optional static headers
    [connectors.NAME.objects.leads]
    path = "/leads"
    key = "email"      # the body field that names a record there

Every action's input is ``{"body": ...}``. With P the object's path, K its key
field and k = body[K] (URL-encoded as one path segment)::

    create, send      POST P            (any object: no key needed)
    update, replace   PUT P/k           (only objects with a key, like all below)
    patch             PATCH P/k
    delete            DELETE P/k
    get               GET P/k           output = the response body
    upsert            GET P?K=k, then PATCH P/k if found, else POST P

An object may declare a JSON Schema for its body, and shape any verb, or
add new ones (``run``, ``cancel``, any name), under ``actions``::

    [connectors.NAME.objects.leads]
    path = "/leads"
    schema = "schemas/lead.json"     # JSON Schema (2020-12) of the body, relative to the config file
    [connectors.NAME.objects.leads.actions.upsert]
    lookup = { path = "/leads", query = { email = "eq.{{ body.email }}" }, found = "{{ response[0].id if response else '' }}" }
    method = "PATCH"                  # when found (default: the verb's method; PATCH for upsert)
    path = "/leads/{{ found }}"       # when found (default after a lookup: P/{{ found }})
    create = { method = "POST", path = "/leads" }   # when not found; without it, not found fails
    query = { fields = "id" }         # optional query parameters, templates
    body = { ... }                    # optional: a template for the JSON sent (default: the action's body)
    schema = "schemas/upsert.json"    # optional: this action's schema instead of the object's
    ok_status = [404]                 # answers that count as success (a delete of what is gone)
    succeed_when = "status < 300 and body.ok"   # judged on the final answer: status, headers, body, error
    [connectors.NAME.objects.jobs.actions.run]
    method = "POST"                   # a new verb needs a method and a path
    path = "/jobs/{{ body.id }}/run"

Templates there see ``body``, ``key`` (the idempotency key) and, after a
lookup, ``found``, ``response`` and ``status``; the agent injects the renderer
(``templates=``). Every value a template places in a path is one
percent-encoded segment (like HTML autoescaping): '', '.', '..' or a value
holding '/' fails the step naming the action and the value, so data never
changes the route; query values are sent as parameters, encoded too; a path
template starts with '/' and stays under base_url's origin. A shaped action
with a lookup sends the lookup and ``create`` under the step's key and the
request after a found lookup under ``KEY-update``, as the default upsert does.
A lookup answered 404 found nothing; any other failure of it ends the action
with its own outcome (``ok_status`` and ``succeed_when`` judge only the final
request). Every answer's status, headers (lower-case names) and body travel
in ``Outcome.reply`` for a step's ``retry.when``.

``dry_run`` sends the same requests into a transport that keeps them and
answers each with an empty 404 (a lookup then "finds nothing"), and reports
them: method, URL, headers (``Authorization`` hidden) and body.

A response or exception becomes an Outcome in one place, ``classify``::

    2xx                              succeeded  output = JSON body, else text, else None
    2xx with a body over 1 MB        failed     "response over 1 MB": read no further
    401, TLS failure                 paused     a credential or config problem
    403                              failed     this record is forbidden; but see below
    408, 425, 429, 5xx               retryable  with Retry-After when the server sent it
    timeout, connection error        retryable  ``unreachable`` when no connection was made
    3xx, other 4xx, unsendable       failed     redirects are not followed: fix base_url

A 403 that concerns one record fails that record; when two different records
are refused with 403 in a row, with no success in between, the refusal is the
credentials' (a token without the right scope) and the connector pauses.

``timeout`` is a deadline for the whole action (connect, send, headers and
body; both requests of an upsert): the body is streamed and the deadline
checked between chunks, each socket read waits at most the time left, and a
watchdog cuts the connection of a call still blocked at the deadline (a server
dripping its headers a byte at a time). Of a 2xx answer at most MAX_RESPONSE
bytes are read, of an error answer only enough for its excerpt.

requests and urllib3 are imported where a request is made, not with this
module: loading the config model (`agent status`) does not pay for them.
"""
from __future__ import annotations

import email.utils
import functools
import heapq
import io
import itertools
import json as jsonlib
import math
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, replace
from datetime import timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal
from urllib.parse import quote, urlsplit

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, PrivateAttr, ValidationInfo, WithJsonSchema,
                      create_model, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from sinks.base import Action, ActionError, ConnectorConfig, Outcome, Renderer, Reply, SinkError, Timeout, header_safe

if TYPE_CHECKING:
    import requests

METHODS = {
    "create": "POST",
    "send": "POST",
    "update": "PUT",
    "replace": "PUT",
    "patch": "PATCH",
    "delete": "DELETE",
    "get": "GET",
    "upsert": "GET",  # then PATCH or POST
}
DEFAULT_METHOD = {**METHODS, "upsert": "PATCH"}  # a shaped upsert: one request, or the one after its lookup
KEYED = {"update", "replace", "patch", "delete", "get", "upsert"}
WITHOUT_BODY = {"delete", "get"}
ERROR_CHARS = 300
MAX_RESPONSE = 1024 * 1024  # bytes of a 2xx answer read at most: a sink answering more fails the step
ERROR_READ = 16 * 1024  # bytes of an error answer read: enough for its excerpt
CHUNK = 64 * 1024
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)  # where a template's literal text is interrupted


class Body(BaseModel):
    """Input of create and send: any JSON value."""

    model_config = ConfigDict(extra="forbid")

    body: Any = Field(default_factory=dict)


class KeyedBody(BaseModel):
    """Input of the verbs that address one record: a JSON object holding the object's key field."""

    model_config = ConfigDict(extra="forbid")

    body: dict[str, Any]


class Schema:
    """A JSON Schema file that an action's body must match (draft 2020-12, unless the file's ``$schema`` names another)."""

    def __init__(self, file: str, document: Any):
        import jsonschema  # only where a schema is configured: 30 ms of every start otherwise

        self.file = file
        self.document = document
        cls = jsonschema.validators.validator_for(document, default=jsonschema.Draft202012Validator)
        self._validator = cls(document, format_checker=cls.FORMAT_CHECKER)

    def problems(self, value: Any, most: int = 5) -> list[str]:
        """What is wrong with ``value``, each naming the field and the rule; empty when it matches."""
        from jsonschema.exceptions import _WrappedReferencingError

        try:
            errors = sorted(self._validator.iter_errors(value), key=lambda e: [str(part) for part in e.absolute_path])
        except _WrappedReferencingError as error:  # a $ref the file cannot resolve
            return [f"the schema {self.file} cannot be applied ({error})"]
        return [f"{_field(error)}: {_cut(error.message)} (schema {self.file}, rule {error.validator})" for error in errors[:most]]


def _field(error: Any) -> str:
    """'body.items[2].email' for a jsonschema error's place in the body."""
    out = "body"
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def load_schema(value: Any, info: ValidationInfo) -> Schema:
    """A schema path (relative to the config file's folder, passed as ``base_dir`` in the validation context) read and checked."""
    if isinstance(value, Schema):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError("write the path of a JSON Schema file, relative to the config file: 'schemas/lead.json'")
    path = Path((info.context or {}).get("base_dir") or ".") / value
    try:
        document = jsonlib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"schema file {str(path)!r}: no such file; write the path of a JSON Schema file relative to the config file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"schema file {str(path)!r}: cannot be read ({getattr(error, 'strerror', None) or error})") from None
    except (ValueError, RecursionError) as error:
        raise ValueError(f"schema file {str(path)!r}: not JSON ({error})") from None
    import jsonschema

    cls = jsonschema.validators.validator_for(document, default=jsonschema.Draft202012Validator) if isinstance(document, dict) else jsonschema.Draft202012Validator
    try:
        cls.check_schema(document)
    except jsonschema.SchemaError as error:
        raise ValueError(f"schema file {str(path)!r}: not a valid JSON Schema: at {error.json_path}: {_cut(error.message)}") from None
    return Schema(value, document)


SchemaFile = Annotated[Any, PlainValidator(load_schema)]


def _method(value: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value) or not value.isalpha():
        raise ValueError(f"{value!r} is not an HTTP method; write one such as GET, POST, PUT, PATCH or DELETE")
    return value.upper()


def _path_template(value: str) -> str:
    """A path template: starts with '/'; its literal text holds no space, '?', '#' or '//' (data goes in through {{ }})."""
    literal = _TAG.sub("x", value) if isinstance(value, str) else ""
    if not isinstance(value, str) or not value.startswith("/") or not re.fullmatch(r"/[^\s?#]*", literal) or "//" in literal:
        raise ValueError(f"{value!r} is not a path template; write one that starts with '/', without spaces, '?', '#' or '//' "
                         "(put query parameters in `query`): '/leads/{{ found }}'")
    return value


Method = Annotated[str, AfterValidator(_method)]
PathTemplate = Annotated[str, AfterValidator(_path_template)]


class Exchange(BaseModel):
    """One request of an action as configured: method, path template, query templates, optional body template."""

    model_config = ConfigDict(extra="forbid")

    method: Method | None = None
    path: PathTemplate | None = None
    query: dict[str, Any] = Field(default_factory=dict)
    body: Any = None  # a template (table) for the JSON sent; None: the action's body (nothing for GET, DELETE, HEAD)


class Lookup(Exchange):
    """The request that finds the record first; ``found`` renders to its id there, or to '' when there is none."""

    found: str


class ActionShape(Exchange):
    """``[connectors.NAME.objects.OBJ.actions.VERB]``: how one verb talks to the API."""

    lookup: Lookup | None = None
    create: Exchange | None = None
    input_schema: SchemaFile = Field(None, alias="schema")
    succeed_when: str | None = None
    ok_status: list[Annotated[int, Field(ge=100, le=599)]] = Field(default_factory=list)

    @property
    def shaped(self) -> bool:
        """Whether it changes the request itself (not only how its answer is judged)."""
        return bool(self.method or self.path or self.query or self.body is not None or self.lookup)


class HttpObject(BaseModel):
    """One object of the API: its path under base_url, the field that names a record, its actions' shapes."""

    model_config = ConfigDict(extra="forbid")

    path: str
    key: str | None = None
    input_schema: SchemaFile = Field(None, alias="schema")
    actions: dict[str, ActionShape] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _plain_path(cls, value: str) -> str:
        if not re.fullmatch(r"/[^\s?#]*", value):
            raise ValueError(f"{value!r} is not a path; write one that starts with '/', without spaces, '?' or '#': '/leads'")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _complete_shapes(self) -> "HttpObject":
        for verb, shape in self.actions.items():
            problem = _shape_problem(verb, shape, self.key)
            if problem:
                raise ValueError(f"actions.{verb}: {problem}")
        return self

    def shape(self, verb: str) -> ActionShape:
        return self.actions.get(verb) or _PLAIN

    def schema_of(self, verb: str) -> Schema | None:
        return self.shape(verb).input_schema or self.input_schema

    def keyed(self, verb: str) -> bool:
        """Whether the verb's request addresses the record by the object's key field (body[key] in the path)."""
        shape = self.shape(verb)
        if shape.shaped and verb in METHODS:
            return verb not in ("create", "send") and shape.path is None and shape.lookup is None
        return verb in KEYED and not shape.shaped

    def offers(self, verb: str) -> bool:
        return verb in self.actions or verb not in KEYED or bool(self.key)


_PLAIN = ActionShape()
_VERB = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def _shape_problem(verb: str, shape: ActionShape, key: str | None) -> str | None:
    """Why a configured shape cannot make a request, or None."""
    if not _VERB.fullmatch(verb):
        return "a verb is a name of letters, digits, '_' and '-' that starts with a letter: 'run', 'cancel'"
    if verb not in METHODS and not shape.method:
        return f"'{verb}' is a new verb: give it a method (and a path): method = \"POST\", path = \"/jobs/{{{{ body.id }}}}/{verb}\""
    if verb not in METHODS and not shape.path and not shape.lookup:
        return f"'{verb}' is a new verb: give it a path, such as \"/jobs/{{{{ body.id }}}}/{verb}\""
    if shape.create and not shape.lookup:
        return "`create` is what runs when the lookup finds nothing: give a `lookup` too, or leave `create` out"
    if verb in KEYED and verb != "upsert" and shape.shaped and not (shape.path or shape.lookup or key):
        return f"'{verb}' addresses one record: give the object a key, or the action a path"
    if verb == "upsert" and shape.shaped and not (shape.path or shape.lookup or key):
        return "an upsert needs a lookup (lookup = { path = ..., query = ..., found = ... }), a path, or a key on the object"
    return None


class HttpConfig(ConnectorConfig):
    """The ``http`` connector's table; ``auth`` is taken out by the agent, which builds the session."""

    kind: Literal["http"] = "http"
    base_url: str
    idempotency_header: str = "Idempotency-Key"
    timeout: Timeout = 30.0
    headers: dict[str, str] = Field(default_factory=dict)
    objects: dict[str, HttpObject] = Field(min_length=1)
    _models: dict[Action, type[BaseModel]] | None = PrivateAttr(None)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise ValueError(f"{value!r} is not a base URL; write http(s)://host/prefix without '?' or '#': 'https://crm.example.invalid/api'")
        return value.rstrip("/")

    @field_validator("idempotency_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _TOKEN.fullmatch(value):
            raise ValueError(f"{value!r} is not a header name; use letters, digits and '-': 'Idempotency-Key'")
        return value

    @field_validator("headers")
    @classmethod
    def _safe_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _TOKEN.fullmatch(name) or not header_safe(text):
                raise ValueError(f"header {name!r}: names use letters, digits and '-'; values hold no control characters")
        return value

    def actions(self) -> dict[Action, type[BaseModel]]:
        """create and send for every object; the verbs that need k only where the object has a key; every configured verb."""
        if self._models is None:
            self._models = {
                Action(name, verb): _input_model(KeyedBody if obj.keyed(verb) else Body, obj.schema_of(verb))
                for name, obj in self.objects.items()
                for verb in [*METHODS, *(v for v in obj.actions if v not in METHODS)]
                if obj.offers(verb)
            }
        return self._models

    def describe(self, action: Action) -> dict[str, Any]:
        """The request(s) an action makes, as `agent actions` shows them: method, path template, query, lookup, schema."""
        obj = self.objects[action.object]
        return _describe(obj, action.verb)

    def templates(self) -> list[tuple[str, str, bool]]:
        """(key path, template, is_expression) of every template in this connector's table, to be compiled at load."""
        out = []
        for name, obj in self.objects.items():
            for verb, shape in obj.actions.items():
                where = f"objects.{name}.actions.{verb}"
                for part, exchange in (("", shape), (".lookup", shape.lookup), (".create", shape.create)):
                    if exchange is not None:
                        out += _exchange_templates(f"{where}{part}", exchange)
                if shape.lookup is not None:
                    out.append((f"{where}.lookup.found", shape.lookup.found, False))
                if shape.succeed_when:
                    out.append((f"{where}.succeed_when", shape.succeed_when, True))
        return out


def _input_model(base: type[BaseModel], schema: Schema | None) -> type[BaseModel]:
    """The action's input model: ``base``, with the body checked against ``schema`` when there is one."""
    if schema is None:
        return base

    def matches(value: Any) -> Any:
        problems = schema.problems(value)
        if problems:
            raise PydanticCustomError("json_schema", "; ".join(problems).replace("{", "{{").replace("}", "}}"))
        return value

    annotation = base.model_fields["body"].annotation
    body = Annotated[annotation, AfterValidator(matches), WithJsonSchema(schema.document)]
    return create_model(f"{base.__name__}Checked", __base__=base, body=(body, base.model_fields["body"]))


def _exchange_templates(where: str, exchange: Exchange) -> list[tuple[str, str, bool]]:
    out = [(f"{where}.path", exchange.path, False)] if exchange.path else []
    out += [(f"{where}.query.{name}", value, False) for name, value in exchange.query.items() if isinstance(value, str)]
    out += [(f"{where}.body{path}", value, False) for path, value in _strings(exchange.body)]
    return out


def _strings(value: Any, path: str = ""):
    """(place, text) of every string inside a template table."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")


def _describe(obj: HttpObject, verb: str) -> dict[str, Any]:
    shape = obj.shape(verb)
    schema = obj.schema_of(verb)
    out: dict[str, Any] = {}
    if shape.lookup is not None:
        out["lookup"] = _request_text(shape.lookup, "GET", obj.path)
        out["found"] = shape.lookup.found
    if not shape.shaped:
        item = f"{obj.path}/{{body.{obj.key}}}"
        default = {"create": f"POST {obj.path}", "send": f"POST {obj.path}", "upsert": f"GET {obj.path}?{obj.key}={{body.{obj.key}}}"}
        out["request"] = default.get(verb, f"{METHODS.get(verb)} {item}")
        if verb == "upsert":
            out["request"] += f"; then PATCH {item} if found, else POST {obj.path}"
    else:
        default_path = obj.path if verb in ("create", "send") else f"{obj.path}/{{{{ found }}}}" if shape.lookup else f"{obj.path}/{{body.{obj.key}}}"
        out["request"] = _request_text(shape, DEFAULT_METHOD.get(verb, "POST"), default_path)
        if shape.lookup is not None:
            out["request"] += " (when found)"
            out["create"] = _request_text(shape.create, "POST", obj.path) + " (when not found)" if shape.create else "none: not found fails"
    if shape.ok_status:
        out["ok_status"] = shape.ok_status
    if shape.succeed_when:
        out["succeed_when"] = shape.succeed_when
    if schema is not None:
        out["schema"] = schema.file
    return out


def _request_text(exchange: Exchange, method: str, path: str) -> str:
    query = "&".join(f"{name}={value}" for name, value in exchange.query.items())
    return f"{exchange.method or method} {exchange.path or path}" + (f"?{query}" if query else "")


def segment(value: Any) -> str:
    """A value a template places in a URL path: one percent-encoded segment; ValueError for '', '.', '..' or one holding '/'."""
    text = "" if value is None else str(value)
    if text.strip() in ("", ".", "..") or "/" in text:
        raise ValueError(f"{_cut(repr(text))} cannot be one path segment (it is empty, '.' or '..', or holds '/')")
    return quote(text, safe="")


class _Unsendable(Exception):
    """A request that cannot be made from this input; the message names the action's part and the value."""


class HttpConnector:
    """Runs actions against a REST API through an injected (authenticated) session; thread-safe.

    The session's connection pools are switched to connections the deadline watchdog can cut.
    """

    Config = HttpConfig

    def __init__(self, config: HttpConfig, *, session: requests.Session, clock: Callable[[], float], templates: Renderer | None = None):
        self.config = config
        self.session = session
        self.clock = clock
        self.templates = templates
        self._actions = config.actions()
        if templates is None and config.templates():
            raise SinkError("this http connector's actions hold templates, and no template renderer was given")
        self._refused: str | None = None  # the key of the last call refused with 403 since the last success
        self._lock = threading.Lock()
        _watch(session)

    def run(self, action: Action, data: dict[str, Any], key: str) -> Outcome:
        """Send the request(s) of `action` with `key` in the idempotency header; never raises for delivery."""
        if action not in self._actions:
            known = ", ".join(sorted(map(str, self._actions)))
            raise ActionError(f"{action}: not an action of this http connector (known: {known})")
        call = _Call(time.monotonic() + self.config.timeout)
        _current.call = call  # the connections this thread uses register with it, so the watchdog can cut them
        _WATCHDOG.watch(call)
        try:
            outcome = self._act(action, data.get("body", {}), key, call)
        finally:
            call.finish()
            _current.call = None
        return self._judge_refusal(outcome, key)

    def dry_run(self, action: Action, data: dict[str, Any], key: str) -> Outcome:
        """Everything run does up to the network: succeeded with the requests it would send, or the failure it meets first."""
        import requests

        recorder = _Recorder()
        with requests.Session() as session:
            session.auth, session.headers = self.session.auth, self.session.headers.copy()
            session.mount("http://", recorder)
            session.mount("https://", recorder)
            twin = HttpConnector(self.config, session=session, clock=self.clock, templates=self.templates)
            outcome = twin.run(action, data, key)
        if not recorder.sent:
            return outcome
        shape = self.config.objects[action.object].shape(action.verb)
        output: dict[str, Any] = {"requests": [_shown(request) for request in recorder.sent]}
        if shape.lookup is not None or (action.verb == "upsert" and not shape.shaped):
            output["note"] = "a dry run sends no lookup: what follows it is shown as if it found nothing"
        return Outcome.ok(output)

    def _act(self, action: Action, body: Any, key: str, call: _Call) -> Outcome:
        """The request(s) of one action, all within the call's deadline."""
        obj = self.config.objects[action.object]
        shape = obj.shape(action.verb)
        if shape.shaped or action.verb not in METHODS:
            try:
                return self._shaped(action, obj, shape, body, key, call)
            except _Unsendable as exc:
                return Outcome("failed", error=_cut(f"{action}: {exc}"), condition="input")
        if action.verb not in KEYED:
            return self._judge(shape, self._request("POST", obj.path, key, call, json=body))
        try:
            k = key_value(body, obj.key)
        except ValueError as exc:
            return Outcome("failed", error=f"{action}: {exc}", condition="input")
        item = f"{obj.path}/{quote(k, safe='')}"
        if action.verb == "upsert":
            return self._upsert(obj, shape, k, item, body, key, call)
        return self._judge(shape, self._request(METHODS[action.verb], item, key, call, json=None if action.verb in WITHOUT_BODY else body))

    def _shaped(self, action: Action, obj: HttpObject, shape: ActionShape, body: Any, key: str, call: _Call) -> Outcome:
        """An action shaped in the config: an optional lookup, then the request when found (or `create` when not)."""
        values: dict[str, Any] = {"body": body, "key": key}
        default_path: str | None
        if shape.lookup is not None:
            lookup = self._lookup(action, obj, shape.lookup, values, key, call)
            if isinstance(lookup, Outcome):
                return lookup
            if not lookup:
                if shape.create is None:
                    return Outcome("failed", error=f"{action}: the lookup found nothing and the action has no `create`", condition="lookup")
                return self._judge(shape, self._send(action, "create", shape.create, "POST", obj.path, values, body, key, call))
            values["found"] = lookup
            key, default_path = f"{key}-update", None  # derived and stable, as for the default upsert
        elif action.verb in ("create", "send"):
            default_path = obj.path
        elif shape.path is None:
            try:
                default_path = f"{obj.path}/{quote(key_value(body, obj.key), safe='')}"
            except ValueError as exc:
                raise _Unsendable(str(exc)) from None
        else:
            default_path = None
        if shape.lookup is not None and shape.path is None:
            try:
                default_path = f"{obj.path}/{segment(values['found'])}"
            except ValueError as exc:
                raise _Unsendable(f"lookup.found: {exc}") from None
        return self._judge(shape, self._send(action, "", shape, DEFAULT_METHOD.get(action.verb, "POST"), default_path, values, body, key, call))

    def _lookup(self, action: Action, obj: HttpObject, lookup: Lookup, values: dict, key: str, call: _Call) -> Outcome | Any:
        """The lookup's `found` (falsy: nothing found), or the Outcome that ends the action (the lookup failed)."""
        answer = self._send(action, "lookup", lookup, "GET", obj.path, values, None, key, call)
        if answer.status_code == 404:
            values.update(response=None, status=404)
            return ""
        if answer.status != "succeeded":
            return answer
        values.update(response=answer.output, status=answer.status_code)
        try:
            return self.templates.render(lookup.found, values)
        except ValueError as exc:
            return Outcome("failed", error=_cut(f"{action}: lookup.found {lookup.found!r}: {exc}"), status_code=answer.status_code,
                           condition="lookup", reply=answer.reply)

    def _send(self, action: Action, part: str, exchange: Exchange, method: str, default_path: str | None, values: dict,
              body: Any, key: str, call: _Call) -> Outcome:
        """Render one configured request (path values encoded, query values as parameters) and make it."""
        where = f"{part}." if part else ""
        method = exchange.method or method
        if exchange.path is not None:
            try:
                path = self.templates.render(exchange.path, values, finalize=segment)
            except ValueError as exc:
                raise _Unsendable(f"{where}path {exchange.path!r}: {exc}") from None
        else:
            path = default_path
        if not isinstance(path, str) or re.search(r"(^|/)\.{1,2}(/|$)", path) or "//" in path or not path.startswith("/"):
            raise _Unsendable(f"{where}path {exchange.path!r} renders to {_cut(repr(path))}, not a path of one-segment values")
        params = {}
        for name, template in exchange.query.items():
            try:
                params[name] = _query_value(self.templates.render(template, values) if self.templates else template)
            except ValueError as exc:
                raise _Unsendable(f"{where}query.{name}: {exc}") from None
        if exchange.body is not None:
            try:
                body = self.templates.render(exchange.body, values)
            except ValueError as exc:
                raise _Unsendable(f"{where}body: {exc}") from None
        elif part == "lookup" or method in ("GET", "DELETE", "HEAD"):
            body = None
        url = urlsplit(self.config.base_url + path)
        if (url.scheme, url.netloc) != self._origin:
            raise _Unsendable(f"{where}path {exchange.path!r} leaves {self.config.base_url}")
        return self._request(method, path, key, call, json=body, params=params or None)

    @property
    def _origin(self) -> tuple[str, str]:
        base = urlsplit(self.config.base_url)
        return base.scheme, base.netloc

    def _judge(self, shape: ActionShape, outcome: Outcome) -> Outcome:
        """An answer judged by the action's ok_status and succeed_when (the final request's, never a lookup's)."""
        reply = outcome.reply
        if reply is None:
            return outcome
        if reply.status in shape.ok_status:
            return Outcome.ok(reply.body, status_code=reply.status) if outcome.status != "succeeded" else outcome
        if not shape.succeed_when:
            return outcome
        values = {"status": reply.status, "headers": reply.headers, "body": reply.body, "error": outcome.error}
        try:
            good = self.templates.evaluate(shape.succeed_when, values)
        except ValueError as exc:
            return replace(outcome, status="failed", error=_cut(f"succeed_when {shape.succeed_when!r}: {exc}"), condition="succeed_when")
        if good:
            return outcome if outcome.status == "succeeded" else replace(Outcome.ok(reply.body, status_code=reply.status), reply=reply)
        if outcome.status != "succeeded":
            return outcome
        return replace(outcome, status="failed", output=None, condition="succeed_when",
                       error=_cut(f"HTTP {reply.status}, but succeed_when {shape.succeed_when!r} is false: {_excerpt_of(reply.body)}"))

    def _judge_refusal(self, outcome: Outcome, key: str) -> Outcome:
        """A 403 fails its record; a second record refused in a row, with no success between, pauses the connector."""
        with self._lock:
            if outcome.status == "succeeded":
                self._refused = None
            if outcome.status_code != 403 or outcome.status != "failed":
                return outcome
            alone = self._refused in (None, key)
            self._refused = key
        if alone:
            return outcome
        return replace(outcome, status="paused", error=_cut(f"two records refused in a row, check the permissions of the credentials: {outcome.error}"))

    def close(self) -> None:
        """Nothing to release: the session belongs to the agent, which closes it."""

    def _upsert(self, obj: HttpObject, shape: ActionShape, k: str, item: str, body: Any, key: str, call: _Call) -> Outcome:
        """GET P?K=k, then PATCH P/k when the record is there, else POST P."""
        lookup = self._request("GET", obj.path, key, call, params={obj.key: k})
        if lookup.status_code == 404:
            return self._judge(shape, self._request("POST", obj.path, key, call, json=body))
        if lookup.status != "succeeded":
            return lookup
        if isinstance(lookup.output, str):
            return Outcome("failed", error=f"GET {obj.path}: the lookup answered text, not JSON; check the object's path", status_code=lookup.status_code, condition="lookup")
        if found(lookup.output, obj.key, k):
            # A derived key, still stable across retries: when a create's answer was lost, the retry finds the
            # record and patches it; strict servers refuse one key reused for a different request.
            return self._judge(shape, self._request("PATCH", item, f"{key}-update", call, json=body))
        return self._judge(shape, self._request("POST", obj.path, key, call, json=body))

    def _request(self, method: str, path: str, key: str, call: _Call, *, json: Any = None, params: dict | None = None) -> Outcome:
        """One request to base_url + path within the call's deadline, its answer read up to a cap, classified."""
        what = f"{method} {path}"
        left = call.left()
        if left <= 0:
            return Outcome("retryable", error=f"{what}: timed out", condition="timeout")
        import requests
        import urllib3

        headers = {"Accept": "application/json", **self.config.headers, self.config.idempotency_header: key}
        try:
            response = self.session.request(
                method, self.config.base_url + path, params=params, json=json, headers=headers,
                timeout=(left, left), allow_redirects=False, stream=True,
            )
            result: Answer | BaseException = read_answer(response, call)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            result = exc
        outcome = classify(what, result, self.clock())
        if call.fired:  # the watchdog cut the connection: what was read may be cut short too (headers without their end)
            return Outcome("retryable", error=f"{what}: timed out", condition="timeout", unreachable=outcome.unreachable)
        return outcome


def key_value(body: Any, field: str) -> str:
    """The text of body[field], usable as one path segment; ValueError naming the field otherwise."""
    if not isinstance(body, dict) or field not in body:
        raise ValueError(f"the body has no field {field!r}, the object's key; add it to the body")
    value = body[field]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() in ("", ".", ".."):
        raise ValueError(f"body.{field} is {str(value)[:40]!r}; the object's key must be a non-empty string or an integer")
    return str(value)


def found(answer: Any, field: str, k: str) -> bool:
    """Whether a lookup's JSON shows the record: a non-empty object or list, unless every item names another key."""
    items = answer if isinstance(answer, list) else [answer] if isinstance(answer, dict) and answer else []
    keyed = [item for item in items if isinstance(item, dict) and field in item]
    # A server that ignores the query answers every record; only a match counts then.
    return len(keyed) < len(items) or any(str(item[field]).casefold() == k.casefold() for item in keyed)


@dataclass
class Answer:
    """A response as far as it was read: at most MAX_RESPONSE bytes of a 2xx body, ERROR_READ of another."""

    status_code: int
    reason: str
    headers: Any
    content: bytes
    encoding: str | None
    whole: bool  # the body was read to its end

    @property
    def text(self) -> str:
        try:
            return self.content.decode(self.encoding or "utf-8", "replace")
        except LookupError:  # a charset Python does not know
            return self.content.decode("utf-8", "replace")


def read_answer(response: requests.Response, call: _Call) -> Answer:
    """Read a streamed response up to its cap, checking the deadline between chunks; the connection is released or closed."""
    limit = MAX_RESPONSE if 200 <= response.status_code < 300 else ERROR_READ
    parts, size, whole = [], 0, True
    try:
        for chunk in response.iter_content(CHUNK):
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                whole = False
                break
            if call.left() <= 0:
                raise TimeoutError("the deadline passed while the body was read")
    finally:
        response.close()  # a body not read to its end closes the connection instead of returning it to the pool
    from requests.utils import get_encoding_from_headers

    encoding = get_encoding_from_headers(response.headers)
    return Answer(response.status_code, response.reason or "", response.headers, b"".join(parts)[:limit], encoding, whole)


def classify(what: str, result: Answer | BaseException, now: float) -> Outcome:
    """The one place where a response or a request exception becomes an Outcome."""
    import requests
    import urllib3

    # Every requests exception is an OSError too, so a bare socket error is told apart from them below.
    connection_errors = (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)
    if isinstance(result, (requests.exceptions.SSLError, ssl.SSLError)):
        return Outcome("paused", error=_cut(f"{what}: TLS failed ({reason(result)}); check the certificate or the URL"), condition="tls")
    if isinstance(result, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
        return Outcome("retryable", error=f"{what}: timed out", condition="timeout", unreachable=unreachable(result))
    if isinstance(result, connection_errors) or (isinstance(result, OSError) and not isinstance(result, requests.RequestException)):
        return Outcome("retryable", error=_cut(f"{what}: connection failed ({reason(result)})"), condition="connection", unreachable=unreachable(result))
    if isinstance(result, BaseException):
        return Outcome("failed", error=_cut(f"{what}: request not sent ({type(result).__name__}: {reason(result)})"), condition="request")
    code = result.status_code
    reply = Reply(code, {name.lower(): value for name, value in result.headers.items()}, response_body(result))
    if 200 <= code < 300 and not result.whole:
        return Outcome("failed", error=f"{what}: HTTP {code} with a response over 1 MB, not read further; the sink may have applied the request",
                       status_code=code, condition="response")
    if 200 <= code < 300:
        return replace(Outcome.ok(reply.body, status_code=code), reply=reply)
    if code == 401:
        status = "paused"
    elif code in (408, 425, 429) or code >= 500:
        status = "retryable"
    else:
        status = "failed"
    return Outcome(
        status,
        error=_cut(": ".join(filter(None, [what, f"HTTP {code} {result.reason or ''}".rstrip(), excerpt(result)]))),
        status_code=code,
        retry_after=retry_after(result.headers.get("Retry-After"), now),
        condition="5xx" if code >= 500 else str(code),
        reply=reply,
    )


def _query_value(value: Any) -> Any:
    """A rendered query value as a parameter (requests percent-encodes it); a table cannot be one."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return [_query_value(item) for item in value]
    if isinstance(value, dict):
        raise ValueError("renders to a table; a query parameter is text, a number or a list of them")
    return "" if value is None else str(value)


def _excerpt_of(body: Any, limit: int = 200) -> str:
    text = body if isinstance(body, str) else jsonlib.dumps(body, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


class _Recorder:
    """A transport (requests' adapter contract: send, close) that keeps each request and sends nothing: every answer is
    an empty 404 (a lookup that finds nothing)."""

    def __init__(self) -> None:
        self.sent: list[requests.PreparedRequest] = []

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None, verify: Any = True,
             cert: Any = None, proxies: Any = None) -> requests.Response:
        import requests

        self.sent.append(request)
        response = requests.Response()
        response.status_code, response.reason, response.url, response.request = 404, "Not Sent (dry run)", request.url, request
        response.raw = io.BytesIO(b"")
        return response

    def close(self) -> None:
        pass


_UNSHOWN = {"user-agent", "accept-encoding", "connection", "content-length"}


def _shown(request: requests.PreparedRequest) -> dict[str, Any]:
    """A request as a dry run shows it: method, URL, the headers the connector sets (credentials hidden), JSON body."""
    headers = {name: ("(set by auth)" if name.lower() == "authorization" else value)
               for name, value in request.headers.items() if name.lower() not in _UNSHOWN}
    body = request.body.decode("utf-8", "replace") if isinstance(request.body, bytes) else request.body
    try:
        body = jsonlib.loads(body) if body else None
    except ValueError:
        pass
    return {"method": request.method, "url": request.url, "headers": headers, "body": body}


def response_body(answer: Answer) -> Any:
    """The parsed JSON body, else its text, else None."""
    if not answer.content:
        return None
    try:
        return jsonlib.loads(answer.content)
    except ValueError:  # UnicodeDecodeError included
        return answer.text


def excerpt(answer: Answer, limit: int = 200) -> str:
    """The start of a response body on one line."""
    text = " ".join(answer.text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def unreachable(exc: BaseException) -> bool:
    """Whether the connection itself could not be made (refused, unknown host, connect timeout): nothing was sent."""
    import requests
    import urllib3

    no_connection = (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError, requests.ConnectTimeout,
                     ConnectionRefusedError, socket.gaierror)
    return any(isinstance(cause, no_connection) for cause in _causes(exc))


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date), None if absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - now
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _causes(exc: BaseException):
    """The exception, then each one it wraps (requests wraps urllib3 wraps socket errors); bounded in case of a cycle."""
    yield exc
    for _ in range(10):
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((arg for arg in exc.args if isinstance(arg, BaseException)), None) or exc.__cause__ or exc.__context__
        if not isinstance(inner, BaseException) or inner is exc:
            return
        exc = inner
        yield exc


def reason(exc: BaseException) -> str:
    """The innermost cause of a request exception, e.g. 'Connection refused', without the URL around it."""
    *_, exc = _causes(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _cut(text: str) -> str:
    """An error text no longer than ERROR_CHARS."""
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"


# --- the deadline watchdog ------------------------------------------------------------------------

_current = threading.local()  # .call: the _Call of the action this thread runs


class _Call:
    """One action's deadline and the connection it uses now; ``cut`` shuts that connection when time is up."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.conn: Any = None
        self.socks: list[socket.socket] = []  # kept: http.client drops conn.sock when an answer ends the connection, still reading it
        self.fired = False
        self.done = False
        self._lock = threading.Lock()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def finish(self) -> None:
        with self._lock:
            self.done = True

    def cut(self) -> None:
        """Shut the socket down: a read blocked on it returns at once, in the thread that waits."""
        with self._lock:
            if self.done:
                return
            self.fired = True
            socks = [*self.socks, getattr(self.conn, "sock", None)]  # the connection's own: a TLS handshake under way
        for sock in filter(None, socks):
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: an SSLSocket's would drop its TLS state
            except OSError:
                pass


class _Watchdog:
    """One daemon thread that cuts every call still running at its deadline."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, _Call]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._compact_at = 1024

    def watch(self, call: _Call) -> None:
        with self._wake:
            if len(self._due) >= self._compact_at:  # finished calls wait for their deadline in the heap: drop them now and then
                self._due = [entry for entry in self._due if not entry[2].done]
                heapq.heapify(self._due)
                self._compact_at = max(1024, 2 * len(self._due))
            heapq.heappush(self._due, (call.deadline, next(self._order), call))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="http-deadlines", daemon=True)
                self._thread.start()
            elif self._due[0][2] is call:
                self._wake.notify()

    def _run(self) -> None:
        with self._wake:
            while True:
                while self._due and self._due[0][2].done:
                    heapq.heappop(self._due)
                if not self._due:
                    self._wake.wait()
                    continue
                left = self._due[0][0] - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                heapq.heappop(self._due)[2].cut()


_WATCHDOG = _Watchdog()


class _Cuttable:
    """A urllib3 connection that registers itself and its socket with the calling thread's _Call at every step."""

    def connect(self) -> None:
        self._register()
        super().connect()  # type: ignore[misc]
        self._register()

    def request(self, *args: Any, **kwargs: Any) -> None:
        self._register()
        super().request(*args, **kwargs)  # type: ignore[misc]
        self._register()  # plain HTTP connects inside request()

    def getresponse(self) -> Any:
        self._register()
        return super().getresponse()  # type: ignore[misc]

    def _register(self) -> None:
        call = getattr(_current, "call", None)
        if call is None:
            return
        if call.fired:
            raise TimeoutError("the deadline passed")
        call.conn = self
        if self.sock is not None and self.sock not in call.socks:  # type: ignore[attr-defined]
            call.socks.append(self.sock)  # type: ignore[attr-defined]


@functools.cache
def _cuttable_pools() -> dict[str, type]:
    """urllib3's connection pools by scheme, on _Cuttable connections; made once, by the first connector (urllib3 comes with its session)."""
    import urllib3
    import urllib3.connection

    class _HTTPConnection(_Cuttable, urllib3.connection.HTTPConnection):
        pass

    class _HTTPSConnection(_Cuttable, urllib3.connection.HTTPSConnection):
        pass

    class _HTTPPool(urllib3.HTTPConnectionPool):
        ConnectionCls = _HTTPConnection

    class _HTTPSPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = _HTTPSConnection

    return {"http": _HTTPPool, "https": _HTTPSPool}


def _watch(session: requests.Session) -> None:
    """Let the watchdog cut the session's connections; its adapters keep their pool sizes and retries."""
    for adapter in session.adapters.values():
        manager = getattr(adapter, "poolmanager", None)
        if manager is not None:
            manager.pool_classes_by_scheme = dict(_cuttable_pools())

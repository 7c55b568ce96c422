"""The agent's configuration: one TOML file, validated by pydantic models.

``load(path)`` reads the file, substitutes ``${NAME}`` / ``${NAME:-default}``
from the environment, validates every table (sources and connectors through
the config model their ``kind`` registers) and checks the cross references
(a flow's source, an action's connector, object, verb and input fields).
Every problem becomes a ``ConfigError`` naming the file, the key path, the
bad value and what is allowed; the CLI prints it and exits 2.
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_serializer

import sinks
import sources
from sinks.base import Action
from agent.templates import TemplateSyntaxProblem, Templates
from sources.base import DAY, Seconds, seconds

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_USERINFO = re.compile(r"((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)[^\s'\"]*@")  # up to the token's last '@': a password may hold '/' or '@'
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class ConfigError(Exception):
    """The configuration is wrong; ``problems`` lists (key path, message) pairs."""

    def __init__(self, file: str, problems: list[tuple[str, str]]):
        self.file = file
        self.problems = [(path, _without_userinfo(msg)) for path, msg in problems]
        super().__init__("\n".join(f"{file}: {path}: {msg}" if path else f"{file}: {msg}" for path, msg in self.problems))


def _without_userinfo(text: str) -> str:
    """A message with the user and password of every URL in it replaced by ***: never echo a credential."""
    return _USERINFO.sub(r"\1***@", text)


Lease = seconds(1, DAY)  # renewed while a step runs; a zero lease means nothing
RetryDelay = seconds(0, DAY)
RetrySpan = seconds(0, 30 * DAY)  # max_interval and window: a month at most


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


TOKEN_LENGTH = 16  # the shortest [agent] listen_token


class AgentSection(Strict):
    ledger: str = "var/agent.db"  # a path: a SQLite file (one agent); a postgresql:// URL: a database several agents share
    log_level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    retention: Seconds = 30 * DAY
    concurrency: int = Field(4, ge=1, le=64)
    lease: Lease = 300.0
    unreachable_after: Seconds = 900.0  # `status` exits 1 once a connector has been unreachable this long
    listen: str | None = None  # "host:port" of the HTTP endpoint (health, metrics, runs on demand); a bare port: the loopback
    listen_token: SecretStr | None = None  # required as `Authorization: Bearer …` on everything but /healthz

    @field_validator("ledger", mode="before")
    @classmethod
    def _ledger(cls, value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if not isinstance(value, str) or not value.strip():
            raise ValueError("write a file path (e.g. 'var/agent.db') or a URL 'postgresql://user@host:5432/dbname'")
        if "://" in value and not value.lower().startswith(("postgresql://", "postgres://")):
            raise ValueError(f"{_without_userinfo(value)!r}: only postgresql:// URLs are ledgers; write a file path for SQLite")
        if value.lower().startswith(("postgresql://", "postgres://")):
            try:
                parts = urlsplit(value)
                parts.port  # noqa: B018 (raises on a bad port)
            except ValueError as error:
                raise ValueError(f"{_without_userinfo(value)!r} is not a URL ({error}); write 'postgresql://user@host:5432/dbname'") from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("listen", mode="before")
    @classmethod
    def _address(cls, value: Any) -> Any:
        return None if value is None else listen_address(value)

    @field_validator("listen_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        """A short bearer token can be guessed; the value itself is never echoed."""
        if value is not None and len(value.get_secret_value().strip()) < TOKEN_LENGTH:
            raise ValueError(f"is shorter than {TOKEN_LENGTH} characters (or empty: is its environment variable set?); "
                             "make one with `openssl rand -hex 16`")
        return value


def listen_address(value: Any) -> str:
    """'host:port' checked and normalised; a bare port (8787 or ':8787') listens on 127.0.0.1 only."""
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    host, _, port = text.rpartition(":")
    host = host.strip() or "127.0.0.1"
    wanted = "write host:port, such as '127.0.0.1:8787' (a bare port listens on the loopback only; '0.0.0.0:8787' on every address)"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} has no port from 1 to 65535; {wanted}")
    if any(c.isspace() or c in "/@?#" for c in host) or (":" in host and not (host.startswith("[") and host.endswith("]"))):
        raise ValueError(f"{value!r}: {host!r} is not a host name or address (write an IPv6 address in brackets: '[::1]:8787'); {wanted}")
    return f"{host}:{int(port)}"


class BasicAuth(Strict):
    kind: Literal["basic"]
    username: str
    password: SecretStr


class BearerAuth(Strict):
    kind: Literal["bearer"]
    token: SecretStr


class HeaderAuth(Strict):
    kind: Literal["header"]
    name: str
    value: SecretStr


class NoAuth(Strict):
    kind: Literal["none"] = "none"


Auth = Annotated[Union[BasicAuth, BearerAuth, HeaderAuth, NoAuth], Field(discriminator="kind")]

CONDITIONS = ("timeout", "connection", "4xx", "5xx")  # "4xx": SMTP temporary replies ("5xx" matches them too, deprecated)


class RetryConfig(Strict):
    on: list[Union[int, str]] = ["timeout", "connection", "5xx", "408", "425", "429"]
    attempts: int = Field(8, ge=1)
    interval: RetryDelay = 30.0
    backoff: Literal["fixed", "exponential"] = "exponential"
    max_interval: RetrySpan = 3600.0
    window: RetrySpan = 23 * 3600.0
    jitter: bool = True
    when: str | None = None  # a Jinja expression over status, headers, body, error: true retries (besides `on`)

    @field_validator("on")
    @classmethod
    def _conditions(cls, value: list[Union[int, str]]) -> list[str]:
        out = []
        for item in value:
            text = str(item).strip().lower()
            if text not in CONDITIONS and not (text.isdigit() and 100 <= int(text) <= 599):
                raise ValueError(f"{item!r} is not a retry condition; use {', '.join(CONDITIONS)} or an HTTP status code such as 429")
            out.append(text)
        return out


StepId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]  # a stable name: the step's idempotency key derives from it


class FilterStep(Strict):
    kind: Literal["filter"]
    id: StepId | None = None
    when: str


class MapStep(Strict):
    kind: Literal["map"]
    id: StepId | None = None
    fields: dict[str, Any]


class ActionStep(BaseModel):
    """An action step; keys other than the named ones are the action's input templates."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["action"]
    id: StepId | None = None
    action: str
    body: Any = None
    wait_for_response: bool = True
    proceed_on_failure: bool = False
    retry: RetryConfig = RetryConfig()
    output: dict[str, Any] | None = None  # what to keep of the result: { id = "{{ response.id }}" } -> steps.<id>.id

    @property
    def inputs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def target(self) -> tuple[str, Action]:
        """('connector', Action(object, verb)) parsed from 'connector > object > verb'."""
        parts = [p.strip() for p in self.action.split(">")]
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"{self.action!r} is not an action path; write 'connector > object > verb', e.g. 'crm > leads > upsert'")
        return parts[0], Action(parts[1], parts[2])


Step = Annotated[Union[FilterStep, MapStep, ActionStep], Field(discriminator="kind")]


class FlowConfig(Strict):
    name: str
    source: str | None = None  # where its records come from: a source's view ...
    after: str | None = None  # ... or another flow: this one starts for a record when that flow's execution of it succeeds
    steps: list[Step] = Field(min_length=1)

    @model_serializer(mode="wrap")
    def _without_unset_origin(self, handler: Any) -> Any:
        """A flow's stored definition names only the origin it has: a flow written before `after` existed keeps its digest."""
        data = handler(self)
        if isinstance(data, dict):
            for key in ("source", "after"):
                if data.get(key) is None:
                    data.pop(key, None)
        return data


class Settings(Strict):
    """The whole file; sources and connectors are validated per kind afterwards.

    A plain model, not pydantic-settings: the file is the only source (an environment variable changes the
    config only where the file says ${NAME}), so that library had every source turned off and cost 45 ms of start-up."""

    agent: AgentSection = AgentSection()
    sources: dict[str, dict[str, Any]] = {}
    connectors: dict[str, dict[str, Any]] = {}
    flows: list[FlowConfig] = []


class Config:
    """A validated configuration: settings plus typed sources, connectors and their auth."""

    def __init__(self, path: Path, settings: Settings):
        self.path = path
        self.base_dir = path.parent
        self.agent = settings.agent
        self.flows = settings.flows
        self.sources: dict[str, Any] = {}
        self.connectors: dict[str, Any] = {}
        self.auth: dict[str, Any] = {}  # "sources.NAME" / "connectors.NAME" -> Auth model
        self.secrets: list[str] = []
        self.text = ""  # the file as written (${NAME} references unresolved): what a config version records
        self.templates = Templates()  # compiled once while checking, reused by the running agent

    @property
    def ledger_is_url(self) -> bool:
        return self.agent.ledger.lower().startswith(("postgresql://", "postgres://"))

    @property
    def ledger_path(self) -> Path:
        """The SQLite ledger's file (a relative path is relative to the config file's folder)."""
        path = Path(self.agent.ledger)
        return path if path.is_absolute() else self.base_dir / path

    @property
    def ledger_location(self) -> str:
        """What ``state.open_ledger`` opens: the URL as written, or the file's path."""
        return self.agent.ledger if self.ledger_is_url else str(self.ledger_path)

    @property
    def ledger_shown(self) -> str:
        """The ledger as messages name it: a URL without its password."""
        if not self.ledger_is_url:
            return str(self.ledger_path)
        parts = urlsplit(self.agent.ledger)
        if parts.password is None:
            return self.agent.ledger
        return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()

    def windows(self) -> dict[str, float]:
        """source -> how far back its view reaches, for the sources that say (seen keys older than that may go)."""
        return {name: cfg.window for name, cfg in self.sources.items() if cfg.window}

    def flows_of(self, source: str) -> list[FlowConfig]:
        """The flows a source admits records for (a chained flow has no source: its upstream starts it)."""
        return [flow for flow in self.flows if flow.source == source]

    def root_source(self, flow: FlowConfig) -> str | None:
        """The source a flow's records come from: its own, or for a chained flow that of the first flow of its chain."""
        by_name, seen = {f.name: f for f in self.flows}, set()
        while flow.after is not None and flow.after in by_name and flow.name not in seen:
            seen.add(flow.name)
            flow = by_name[flow.after]
        return flow.source


def substitute(value: Any, where: str, problems: list[tuple[str, str]]) -> Any:
    """Replace ${NAME} and ${NAME:-default} in every string of a TOML tree."""
    if isinstance(value, dict):
        return {k: substitute(v, f"{where}.{k}" if where else k, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, default = match[1], match[2]
        if os.environ.get(name) or (name in os.environ and default is None):
            return os.environ[name]  # like the shell: an empty variable takes the default
        if default is not None:
            return default
        problems.append((where, f"environment variable {name} is not set (set it, or write ${{{name}:-default}})"))
        return ""

    return _ENV.sub(one, value)


_TAGS = {"filter", "map", "action", "basic", "bearer", "header", "none", "page", "offset", "cursor", "link", "next_url"}
_SECRET_KEYS = {"auth", "password", "token", "value", "listen_token"}


def key_path(loc: tuple, prefix: str = "") -> str:
    """('flows', 0, 'steps', 2, 'action') -> 'flows[0].steps[2].action'."""
    out, previous = prefix, None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TAGS and (isinstance(previous, int) or previous in ("auth", "paging")):
            pass  # pydantic's discriminator tag adds nothing to the path a user reads
        else:
            out += f".{part}" if out else str(part)
        previous = part
    return out


def problems_of(error: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> list[tuple[str, str]]:
    """Turn pydantic errors into (key path, message naming the bad value and what is allowed)."""
    out = []
    for item in error.errors(include_url=False):
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        msg = item["msg"].removeprefix("Value error, ")
        kind = item["type"]
        if kind == "extra_forbidden":
            allowed = sorted(_fields_at(model, loc[:-1])) if model else []
            msg = "unknown key (a typo?)" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
        elif kind == "union_tag_invalid":
            ctx = item.get("ctx", {})
            msg = f"unknown kind {ctx.get('tag')!r} (known: {ctx.get('expected_tags', '').replace(chr(39), '')})"
        elif kind == "missing":
            msg = "required key is missing"
        elif "input" in item and kind not in ("model_type", "dict_type"):
            shown = _show(item["input"], loc)
            msg = msg if shown in msg else f"{shown}: {msg}"
        out.append((key_path(loc, prefix), msg))
    return out


def _show(value: Any, loc: tuple) -> str:
    """The bad value as a user may see it: never a secret, never a whole table."""
    if any(str(part) in _SECRET_KEYS for part in loc):
        return "(secret)"
    if isinstance(value, dict):
        return f"a table with keys {', '.join(map(str, value)) or 'none'}"
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (through list, dict, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models(arg)]


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at ``loc`` inside ``model`` (following discriminator tags)."""
    current: list[type[BaseModel]] = [model]
    for part in loc:
        if isinstance(part, int) or not current:
            continue
        if part in _TAGS:
            tagged = [m for m in current if part in get_args(m.model_fields.get("kind").annotation if "kind" in m.model_fields else None)]
            current = tagged or current
            continue
        field = current[0].model_fields.get(part) if len(current) == 1 else next((m.model_fields[part] for m in current if part in m.model_fields), None)
        if field is None:
            return []
        current = _models(field.annotation)
    if len(current) != 1 or current[0].model_config.get("extra") != "forbid":
        return []
    return [field.alias or name for name, field in current[0].model_fields.items()]


def _forbid_with_allowed(model: type[BaseModel], data: dict, prefix: str, problems: list[tuple[str, str]],
                         context: dict[str, Any] | None = None) -> Any:
    """Validate ``data`` with ``model``; unknown keys name the keys the model allows."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as error:
        problems.extend(problems_of(error, prefix, model))
        return None


def load(path: Path | str) -> Config:
    """Read, substitute, validate and cross-check a config file."""
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(name, [("", "no such file (write one, or pass --config PATH / set AGENT_CONFIG)")]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(name, [("", f"cannot read: {error}")]) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(name, [("", f"not valid TOML: {error}")]) from None
    problems: list[tuple[str, str]] = []
    raw = substitute(raw, "", problems)
    if problems:
        raise ConfigError(name, problems)
    settings = _forbid_with_allowed(Settings, raw, "", problems)
    if settings is None:
        raise ConfigError(name, problems)
    config = Config(path.resolve(), settings)
    config.text = text
    if settings.agent.listen_token is not None:  # masked like every other secret: logs, output, config versions
        config.secrets.append(settings.agent.listen_token.get_secret_value())
    if config.ledger_is_url and urlsplit(settings.agent.ledger).password:  # better in PGPASSWORD, but never shown either way
        config.secrets.append(unquote(urlsplit(settings.agent.ledger).password))
        config.secrets.append(urlsplit(settings.agent.ledger).password)
    _load_plugins(config, "sources", settings.sources, sources.KINDS, sources.source_class, problems)
    _load_plugins(config, "connectors", settings.connectors, sinks.KINDS, sinks.connector_class, problems)
    if not problems:
        _check_connector_templates(config, problems)
        _check_flows(config, problems)
        _check_lease(config, problems)
    if problems:
        raise ConfigError(name, problems)
    return config


def _check_lease(config: Config, problems: list) -> None:
    """A step starts only while its connector's timeout fits in the lease left; renewals keep two thirds of it.

    Left unset, the lease grows to twice the longest timeout; written shorter than that, it is an error."""
    timeouts = {name: cfg.timeout for name, cfg in config.connectors.items() if isinstance(getattr(cfg, "timeout", None), (int, float))}
    if timeouts:
        name = max(timeouts, key=timeouts.get)
        if "lease" not in config.agent.model_fields_set:
            config.agent.lease = max(config.agent.lease, 2 * timeouts[name])
        elif config.agent.lease < 2 * timeouts[name]:
            problems.append(("agent.lease", f"{config.agent.lease:g}s is shorter than twice the longest connector timeout "
                                            f"(connectors.{name}.timeout = {timeouts[name]:g}s); make the lease at least "
                                            f"{2 * timeouts[name]:g}s or the timeout shorter"))


def _load_plugins(config: Config, section: str, tables: dict, kinds: dict, resolve, problems: list) -> None:
    """Validate each source or connector table with the model its `kind` registers."""
    target = getattr(config, section)
    for name, table in tables.items():
        where = f"{section}.{name}"
        table = dict(table)
        kind = table.get("kind")
        if kind not in kinds:
            shown = "missing" if kind is None else repr(kind)
            problems.append((f"{where}.kind", f"{shown}: unknown kind (known: {', '.join(kinds)})"))
            continue
        if "auth" in table:
            auth_table = table.pop("auth")
            auth = _validate_auth(auth_table, f"{where}.auth", problems)
            if auth is not None:
                _refuse_control_characters(auth, f"{where}.auth", problems)
                config.auth[where] = auth
                config.secrets.extend(s.get_secret_value() for s in auth.__dict__.values() if isinstance(s, SecretStr))
        model = resolve(kind).Config
        validated = _forbid_with_allowed(model, table, where, problems, {"base_dir": config.base_dir})  # files named in it: schemas
        if validated is not None:
            _refuse_control_characters(validated, where, problems)
            target[name] = validated
            config.secrets.extend(s.get_secret_value() for s in validated.__dict__.values() if isinstance(s, SecretStr))


def _refuse_control_characters(model: BaseModel, where: str, problems: list) -> None:
    """A secret goes into a header or a login as it is: a control character (a CRLF env file's \\r) would break it, or leak escaped."""
    for name, value in model.__dict__.items():
        if isinstance(value, SecretStr) and _CONTROL.search(value.get_secret_value()):
            problems.append((f"{where}.{name}", "contains a control character (a line end from a file saved with CRLF?); "
                                                "the value is not shown: write the secret on one line, without control characters"))


class _AuthHolder(Strict):
    auth: Auth


def _validate_auth(table: Any, where: str, problems: list) -> Any:
    try:
        return _AuthHolder.model_validate({"auth": table}).auth
    except ValidationError as error:
        problems.extend(problems_of(error, where.rsplit(".auth", 1)[0], _AuthHolder))
        return None


def _check_connector_templates(config: Config, problems: list) -> None:
    """The templates of connector tables (an http action's path, query, lookup, succeed_when) compile."""
    for name, cfg in config.connectors.items():
        for field, template, expression in cfg.templates():
            try:
                config.templates.check([(field, template, expression)])
            except TemplateSyntaxProblem as error:
                problems.append((f"connectors.{name}.{field}", str(error)))


def _check_flows(config: Config, problems: list) -> None:
    """Cross references: sources, connectors, action paths, input fields, templates."""
    templates = config.templates
    names = set()
    for i, flow in enumerate(config.flows):
        where = f"flows[{i}]"
        if flow.name in names:
            problems.append((f"{where}.name", f"{flow.name!r} is used by two flows; flow names must be unique"))
        names.add(flow.name)
        _check_origin(config, flow, where, problems)
        ids = [step.id for step in flow.steps if step.id is not None]
        for j, step in enumerate(flow.steps):
            if step.id is not None and ids.count(step.id) > 1:
                problems.append((f"{where}.steps[{j}].id", f"{step.id!r} names two steps of flow {flow.name!r}; step ids must be unique in a flow"))
        for j, step in enumerate(flow.steps):
            try:
                templates.check_step(step)
            except TemplateSyntaxProblem as error:
                problems.append((f"{where}.steps[{j}].{error.field}", str(error)))
            if isinstance(step, ActionStep):
                _check_action(config, step, f"{where}.steps[{j}]", problems)
    _check_chains(config, problems)


def _check_origin(config: Config, flow: FlowConfig, where: str, problems: list) -> None:
    """A flow takes its records from exactly one place: a source, or the flow it runs after."""
    if flow.source is not None and flow.after is not None:
        problems.append((where, f"flow {flow.name!r} has both source = {flow.source!r} and after = {flow.after!r}; "
                                "keep one: source (records from a view) or after (runs when that flow succeeds for a record)"))
    elif flow.source is None and flow.after is None:
        problems.append((where, f"flow {flow.name!r} has neither source nor after; write source = \"<source name>\" "
                                "(records from a view) or after = \"<flow name>\" (runs when that flow succeeds for a record)"))
    elif flow.source is not None and flow.source not in config.sources:
        problems.append((f"{where}.source", f"unknown source {flow.source!r} (known: {', '.join(config.sources) or 'none'})"))
    elif flow.after is not None and flow.after not in {f.name for f in config.flows}:
        known = [f.name for f in config.flows if f.name != flow.name]
        problems.append((f"{where}.after", f"unknown flow {flow.after!r} (known: {', '.join(known) or 'none'})"))


def _check_chains(config: Config, problems: list) -> None:
    """`after` must lead back to a flow with a source: a cycle would never start, so it is named, once."""
    index = {flow.name: i for i, flow in enumerate(config.flows)}
    after = {flow.name: flow.after for flow in config.flows if flow.after in index}
    reported: set[str] = set()
    for flow in config.flows:
        path, name = [], flow.name
        while name in after and name not in path and name not in reported:
            path.append(name)
            name = after[name]
        if name in path:  # came back to a flow of this walk: the cycle is path from there on
            cycle = path[path.index(name):]
            reported.update(cycle)
            first = min(cycle, key=index.get)  # named from its first flow in the file, whoever found it
            turned = cycle[cycle.index(first):] + cycle[:cycle.index(first)]
            problems.append((f"flows[{index[first]}].after", f"a cycle of after: {' -> '.join(turned + [first])}; "
                                                              "a chain of flows must start at a flow with a source"))


def _check_action(config: Config, step: ActionStep, where: str, problems: list) -> None:
    try:
        connector, action = step.target()
    except ValueError as error:
        problems.append((f"{where}.action", str(error)))
        return
    if connector not in config.connectors:
        problems.append((f"{where}.action", f"unknown connector {connector!r} (known: {', '.join(config.connectors) or 'none'})"))
        return
    offered = config.connectors[connector].actions()
    if action not in offered:
        known = ", ".join(f"{connector} > {a}" for a in offered)
        problems.append((f"{where}.action", f"{connector} has no action '{action}' (known: {known})"))
        return
    model = offered[action]
    given = set(step.inputs) | ({"body"} if step.body is not None else set())
    allowed = set(model.model_fields)
    for key in sorted(given - allowed):
        problems.append((f"{where}.{key}", f"unknown key for '{step.action}' (allowed: {', '.join(sorted(allowed | {'kind', 'id', 'action', 'wait_for_response', 'proceed_on_failure', 'retry', 'output'}))})"))
    for key, field in model.model_fields.items():
        if field.is_required() and key not in given and key != "body":
            problems.append((f"{where}.{key}", f"'{step.action}' needs this key"))
    try:  # rules about the input as a whole ("give text, html or both"), checked with stand-in values
        model.model_validate({key: "x" for key in given & allowed})
    except ValidationError as error:
        problems.extend((where, e["msg"].removeprefix("Value error, ")) for e in error.errors(include_url=False) if not e["loc"])

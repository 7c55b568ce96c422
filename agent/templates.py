"""Jinja templates for filters, maps and action inputs, in a sandbox with strict undefined.

Templates come only from the config; record values are data (a ``{{ ... }}``
inside a record field is printed, never evaluated). A template that is
exactly one ``{{ expression }}`` keeps its native type, so
``"{{ record.Amount }}"`` stays a number and ``"{{ record }}"`` a mapping.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Callable, Iterable

from jinja2 import StrictUndefined, TemplateSyntaxError, Undefined, UndefinedError
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import SandboxedEnvironment

_SINGLE = re.compile(r"^\s*\{\{(?P<expr>(?:(?!\{\{|\}\}|\{%|%\}).)*)\}\}\s*$", re.S)


class TemplateSyntaxProblem(ValueError):
    """A template in the config does not parse (a config error)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class RenderError(ValueError):
    """A template failed for this record: a missing field, a type error, a sandbox violation."""


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False, default=str)


class _Finalized(Exception):
    """A finalize function refused a value: its own message is the error, as it is."""


def _guarded(finalize: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def apply(value: Any) -> Any:
        try:
            return finalize(value)
        except ValueError as error:
            raise _Finalized(str(error)) from None

    return apply


def _environment(autoescape: bool, finalize: Callable[[Any], Any] | None = None) -> SandboxedEnvironment:
    env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=autoescape, keep_trailing_newline=True,
                               finalize=_guarded(finalize) if finalize else None)
    env.filters["tojson"] = _tojson  # readable JSON: no \\u escapes of umlauts in an email body
    return env


_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)


def split_outside_tags(template: str, sep: str = ",") -> list[str]:
    """'a@x, {{ record.Email }}' -> ['a@x', '{{ record.Email }}']: split on separators outside {{ }}, {% %}, {# #}."""
    pieces, start, pos = [], 0, 0
    while pos < len(template):
        tag = _TAG.match(template, pos)
        if tag:
            pos = tag.end()
        elif template[pos] == sep:
            pieces.append(template[start:pos])
            start = pos = pos + 1
        else:
            pos += 1
    pieces.append(template[start:])
    return [p.strip() for p in pieces if p.strip()]


class Templates:
    """Compiles (once) and renders config templates; ``autoescape`` for HTML fields.

    ``finalize`` (a function of the caller, such as the http connector's URL
    encoding) is applied to every value an expression places in the text; a
    ValueError it raises becomes the RenderError's message as it is.
    """

    def __init__(self) -> None:
        self._envs: dict[tuple, SandboxedEnvironment] = {}
        self._compile = lru_cache(maxsize=4096)(self._compile_uncached)

    def _env(self, autoescape: bool, finalize: Callable[[Any], Any] | None) -> SandboxedEnvironment:
        key = (autoescape, finalize)
        if key not in self._envs:  # a handful: two autoescape modes, a few finalize functions
            self._envs[key] = _environment(autoescape, finalize)
        return self._envs[key]

    def _compile_uncached(self, source: str, autoescape: bool, expression: bool, finalize: Callable[[Any], Any] | None = None):
        env = self._env(autoescape, finalize)
        if expression:
            return env.compile_expression(source, undefined_to_none=False)
        single = _SINGLE.match(source)
        if single and not autoescape and finalize is None:
            return env.compile_expression(single["expr"], undefined_to_none=False)
        return env.from_string(source).render

    def render(self, template: Any, context: dict[str, Any], autoescape: bool = False,
               finalize: Callable[[Any], Any] | None = None) -> Any:
        """Render a template string, or every string inside a table/list of templates."""
        if isinstance(template, dict):
            return {k: self.render(v, context, autoescape, finalize) for k, v in template.items()}
        if isinstance(template, list):
            return [self.render(v, context, autoescape, finalize) for v in template]
        if not isinstance(template, str) or not any(mark in template for mark in ("{{", "{%", "{#")):
            return template
        return self._run(self._compile(template, autoescape, False, finalize), context, template)

    def evaluate(self, expression: str, context: dict[str, Any]) -> Any:
        """Evaluate a bare Jinja expression (a filter's ``when``)."""
        return self._run(self._compile(expression, False, True), context, expression)

    @staticmethod
    def _run(compiled, context: dict[str, Any], source: str) -> Any:
        try:
            value = compiled(**context)
            if isinstance(value, Undefined):
                str(value)  # StrictUndefined raises here, naming the missing field
            return value
        except _Finalized as error:
            raise RenderError(str(error)) from None
        except UndefinedError as error:
            raise RenderError(f"missing field: {error.message}{_missing_hint(error.message or '', source, context)}") from None
        except SecurityError as error:
            raise RenderError(f"not allowed in a template: {error}") from None
        except (TemplateError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as error:
            raise RenderError(f"{type(error).__name__}: {error}") from None

    def check_step(self, step: Any) -> None:
        """Compile every template of a step now, so a syntax error is a config error."""
        when = getattr(getattr(step, "retry", None), "when", None)
        self.check([*templates_of(step), *([("retry.when", when, True)] if when else [])])

    def check(self, found: Iterable[tuple[str, str, bool]]) -> None:
        """Compile (field, template, is_expression) triples; TemplateSyntaxProblem names the first that does not parse."""
        for field, source, expression in found:
            try:
                self._compile(source, False, expression)
            except TemplateSyntaxError as error:
                raise TemplateSyntaxProblem(field, f"{source!r} is not a valid template: {error.message}") from None


_ABSENT = re.compile(r"has no attribute '(?P<name>[^']*)'")
_UNDEFINED = re.compile(r"^'(?P<name>[^']*)' is undefined$")


def _missing_hint(message: str, source: str, context: dict[str, Any]) -> str:
    """What to write instead: a default for a field that may be absent, the known names for a misspelt one."""
    if found := _UNDEFINED.match(message):
        return f" (known names: {', '.join(sorted(context))})" if found["name"] not in context else ""
    found = _ABSENT.search(message)
    if not found:
        return ""
    name = re.escape(found["name"])
    used = re.search(rf"[A-Za-z_][\w.]*(?:\.{name}\b|\[\s*['\"]{name}['\"]\s*\])", source)  # how the template reaches it
    example = used[0] if used else f"record.{found['name']}"
    return f" (if it may be absent, give it a default: {example} | default(''))"


def templates_of(step: Any):
    """(field, template, is_expression) for every template string in a step."""
    if step.kind == "filter":
        yield "when", step.when, True
        return
    tables = {"fields": step.fields} if step.kind == "map" else {**step.inputs, "body": step.body, "output": step.output}
    for name, value in tables.items():
        yield from _strings(name, value)


def _strings(path: str, value: Any):
    if isinstance(value, str):
        yield path, value, False
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(f"{path}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(f"{path}[{i}]", v)


class StepOutputs(list):
    """``steps`` in a template: earlier steps' outputs by index (``steps[0]``) and by step id (``steps.upsert``)."""

    def __init__(self, outputs: list[Any], ids: dict[str, int]):
        super().__init__(outputs)
        self._ids = ids

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, str):
            if item not in self._ids:
                raise KeyError(item)  # Jinja makes it undefined: a missing-field error naming it
            return super().__getitem__(self._ids[item])
        return super().__getitem__(item)

"""Durations in config files ('30s', '5m', '1h', '1d', or a number of seconds), bounded per key.

Shared by the leaf packages (sources and sinks validate their own configs): they import this, never each other."""
from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*")
DAY = 86400.0


def parse_seconds(value: Any) -> Any:
    """'30s' / '5m' / '1h' / '1d' / a number of seconds -> float seconds."""
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if (isinstance(value, str) and not match) or isinstance(value, bool):  # TOML's true would pass as 1 second
        raise ValueError(f"{value!r} is not a duration; write a number and a unit: '30s', '5m', '1h', '1d'")
    return float(match[1]) * _UNITS[match[2]] if match else value


def _span(value: float) -> str:
    """A duration as a config would write it: 0.1 -> '100ms', 86400 -> '1d'."""
    for unit in ("d", "h", "m", "s"):
        if value >= _UNITS[unit] and value % _UNITS[unit] == 0:
            return f"{value / _UNITS[unit]:g}{unit}"
    return f"{value * 1000:g}ms" if value else "0s"


def seconds(low: float, high: float) -> Any:
    """A duration type bounded to [low, high] seconds; NaN and the infinities are never inside."""

    def within(value: float) -> float:
        if not low <= value <= high:
            raise ValueError(f"must be between {_span(low)} and {_span(high)}")
        return value

    return Annotated[float, BeforeValidator(parse_seconds), AfterValidator(within)]

"""Named crash points, for fault tests only.

``AGENT_FAILPOINTS="after_send:0.2,inside_admit:0.1"`` makes the agent SIGKILL
itself at those points of the write path with those probabilities; with
``AGENT_FAILPOINTS_LOG=FILE`` each firing is appended to FILE first (so a
test can prove it reached every dangerous instant). Unset, every point is a
no-op function: they cost nothing in production.

Points: ``after_fetch`` (a page arrived, nothing admitted), ``inside_admit``
(records inserted, transaction not committed), ``after_claim`` (the intent is
committed, nothing sent), ``after_send`` (the sink accepted, the outcome is not
committed), ``inside_failure`` (recording a failed or retrying outcome, not
committed).
"""
from __future__ import annotations

import os
import random
import signal
from typing import Callable

POINTS = ("after_fetch", "inside_admit", "after_claim", "after_send", "inside_failure")


def noop(name: str) -> None:
    """The failpoint hook when none is configured."""


def parse(spec: str) -> dict[str, float]:
    """'after_send:0.2,inside_admit' -> {'after_send': 0.2, 'inside_admit': 1.0}."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, chance = part.partition(":")
        if name not in POINTS:
            raise ValueError(f"AGENT_FAILPOINTS: unknown point {name!r} (known: {', '.join(POINTS)})")
        out[name] = float(chance) if chance else 1.0
    return out


def from_env(environ=os.environ, rand: Callable[[], float] = random.random) -> Callable[[str], None]:
    """The hook for this process: ``noop`` unless AGENT_FAILPOINTS is set."""
    spec = environ.get("AGENT_FAILPOINTS")
    if not spec:
        return noop
    chances, log = parse(spec), environ.get("AGENT_FAILPOINTS_LOG")

    def hit(name: str) -> None:
        if rand() < chances.get(name, 0.0):
            if log:
                with open(log, "a") as f:
                    f.write(name + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

    return hit

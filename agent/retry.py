"""RetryPolicy: when to try a failed step again, and when to give up."""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Callable

from loguru import logger

from agent.config import RetryConfig


@dataclass(frozen=True)
class RetryPolicy:
    on: tuple[str, ...] = ("timeout", "connection", "5xx", "408", "425", "429")
    attempts: int = 8
    interval: float = 30.0
    backoff: str = "exponential"
    max_interval: float = 3600.0
    window: float = 23 * 3600.0
    jitter: bool = True

    @classmethod
    def from_config(cls, config: RetryConfig) -> "RetryPolicy":
        return cls(tuple(config.on), config.attempts, config.interval, config.backoff, config.max_interval, config.window, config.jitter)

    def covers(self, condition: str | None, status_code: int | None = None) -> bool:
        """True when the step's `on` list names this failure."""
        names = {condition or ""}
        if status_code is not None and 100 <= status_code <= 599:
            names |= {str(status_code), f"{status_code // 100}xx"}
        if names & set(self.on):
            return True
        if condition == "4xx" and "5xx" in self.on:  # SMTP temporary replies were called "5xx" before: still matched
            if self.on != RetryPolicy.on:  # a list someone wrote, not the default: tell them the new name
                _old_name(self.on)
            return True
        return False

    def next_delay(self, attempt: int, retry_after: float | None = None, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_interval)
        delay = self.interval * (2 ** min(attempt - 1, 64) if self.backoff == "exponential" else 1)  # capped: no overflow
        delay = min(delay, self.max_interval)
        if self.jitter:
            delay *= 0.5 + rand() / 2  # "equal jitter": never less than half, spreads a herd of retries
        return delay

    def next_time(self, attempt: int, first_attempt: float, now: float, retry_after: float | None = None,
                  rand: Callable[[], float] = random.random) -> float | None:
        """When to try again, or None to give up (attempts spent or past the window)."""
        if attempt >= self.attempts:
            return None
        at = now + self.next_delay(attempt, retry_after, rand)
        if at - first_attempt > self.window:
            return None
        return at


@functools.cache
def _old_name(on: tuple[str, ...]) -> None:
    """Say once per `on` list that "5xx" matched an SMTP temporary reply by its deprecated name."""
    logger.warning('retry on = {}: "5xx" matched an SMTP temporary reply (4xx) by its old name, which is deprecated; write "4xx"', list(on))

"""When each job of the run loop is due: `every` on a fixed grid, or daily `at` a wall-clock time in a zone.

Times are epoch seconds from the agent's injected clock, so the loop
(`Agent.tick(now)`) is driven by a fake clock in tests. Rules of the table:

- a job is due once however late the loop looks at it: missed slots are not
  replayed (after downtime or an overrunning poll, one run, not a burst);
- an `every` job keeps its grid: its next slot is the first one after its
  run finished, so the time a poll takes does not make the schedule drift;
- a daily job runs at its wall-clock time in its zone (the machine's when
  none is named): when the clocks go forward past it, it runs at the same
  distance after the gap (02:30 on a day without 02:30 runs at 03:30); when
  they go back, it runs at the first 02:30 only;
- a clock stepped backwards never delays a job by more than its rule would
  from the new time.

Not the `schedule` package: it reads `datetime.now()` itself (a clock can
only be faked by patching its module) and keeps next runs as naive local
wall time, so on a machine whose zone has daylight saving time a 5-minute
poll stalls for 65 minutes the night the clocks go back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone
from typing import Any, Callable, Union
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class Every:
    """Every `seconds`, on the grid of the job's first slot."""

    seconds: float

    def next(self, slot: float, now: float) -> float:
        """The first slot of the grid through `slot` later than both `slot` and `now`."""
        steps = max(1, math.floor((now - slot) / self.seconds) + 1)
        return slot + steps * self.seconds

    def first(self, now: float) -> float:
        """The next run counted from `now` (a job is never due later than this: see Timetable._clamp)."""
        return now + self.seconds


@dataclass(frozen=True)
class Daily:
    """Once a day at a wall-clock time in `zone` (None: the machine's zone)."""

    at: time
    zone: ZoneInfo | None = None

    @classmethod
    def of(cls, at: str, zone: str | None) -> "Daily":
        hour, minute, *second = (int(part) for part in at.split(":"))
        return cls(time(hour, minute, *second), ZoneInfo(zone) if zone else None)

    def next(self, slot: float, now: float) -> float:
        return self.first(max(slot, now))

    def first(self, now: float) -> float:
        """The first moment later than `now` the zone's clocks show `at` (fold 0: the earlier of a repeated hour)."""
        day = datetime.fromtimestamp(now, self.zone).date()
        while (moment := datetime.combine(day, self.at, tzinfo=self.zone).timestamp()) <= now:
            day += timedelta(days=1)  # today's time has passed (at most twice: a gap can push it past `now` too)
        return moment


Rule = Union[Every, Daily]


@dataclass
class Job:
    """One job of the table: its name (for the log), its rule, when it is due next and what it runs."""

    name: str
    rule: Rule
    at: float
    work: Callable[[], Any]


class Timetable:
    """The jobs of one run loop and when each is due; pure bookkeeping, the loop runs the jobs."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def add(self, name: str, rule: Rule, at: float, work: Callable[[], Any]) -> Job:
        job = Job(name, rule, at, work)
        self.jobs.append(job)
        return job

    def due(self, now: float) -> list[Job]:
        """The jobs due at `now`, the longest waiting first."""
        self._clamp(now)
        return sorted((job for job in self.jobs if job.at <= now), key=lambda job: job.at)

    def done(self, job: Job, started: float, finished: float) -> bool:
        """A job ran: due again at its rule's next slot after `finished`; whether it overran a slot (skipped, not queued)."""
        overran = job.rule.next(job.at, started) <= finished
        job.at = job.rule.next(job.at, finished)
        return overran

    def next_wake(self, now: float) -> float | None:
        """When the next job is due (maybe already), or None without jobs."""
        self._clamp(now)
        return min((job.at for job in self.jobs), default=None)

    def _clamp(self, now: float) -> None:
        """A clock stepped back must not hold a job longer than its rule would from now."""
        for job in self.jobs:
            job.at = min(job.at, job.rule.first(now))


def utc_text(ts: float | None) -> str:
    """An epoch time as people read it in listings and logs: '2026-11-30 04:25:00Z' ('-' for none)."""
    return "-" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")

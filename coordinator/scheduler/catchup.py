"""Catching a job up after an outage in bounded time: where to resume, which fires were skipped.

APScheduler 3 computes every fire between a job's ``next_run_time`` and now, one
trigger call each, on the event loop, before it coalesces them into one run. A
new leader continuing a fast job from a last fire days ago, or a leader whose
process was stopped for long, would block the loop for seconds or more (and a
blocked loop cannot renew the lease). :class:`CatchUpJobStore` moves such a job's
``next_run_time`` forward to the fire it should resume at before APScheduler
looks at it, and hands the fires it jumped over to the runner, which records the
latest of them as ``missed``.

Where a job resumes: with ``coalesce`` (the default), at the latest fire due;
without it, at the first fire still within ``misfire_grace_time`` (or the latest
fire due, if none is); without it and with no grace limit, nowhere else: every
fire is to run, and APScheduler walks them all.

Work, per scheduler wakeup:

- ``IntervalTrigger`` without jitter: arithmetic, a constant number of steps;
  the count of skipped fires is exact.
- Any other trigger: the fires are walked, at most :data:`SCAN_LIMIT` trigger
  calls for all jobs of the wakeup. When the gap is longer:

  - ``CronTrigger`` (whose next fire after any instant is the schedule's): the
    resume point and the latest skipped fires are found by probing back from
    now (at most :data:`SCAN_LIMIT` more calls per job); the count is then a
    lower bound, and the records say so ("one of at least N fires skipped").
  - other triggers: the walk goes on at the next wakeups, :data:`SCAN_LIMIT`
    calls at a time, with the loop running in between; the count is exact, but
    the job resumes only once the whole gap was walked.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.jobstores.memory import MemoryJobStore  # type: ignore[import-untyped]
from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped]

SCAN_LIMIT = 1000
"""Trigger calls one scheduler wakeup may spend walking skipped fires (about 10 ms of
cron); probing a cron job back from now may take as many again."""

_US = timedelta(microseconds=1)


@dataclass(frozen=True)
class Skipped:
    """Fires of one job that were jumped over without running, to be recorded ``missed``."""

    latest: tuple[datetime, ...]
    """The most recent of them, oldest first (at most the ``keep`` asked for)."""
    count: int
    """How many were skipped in all."""
    exact: bool
    """False when :attr:`count` is a lower bound (a long gap of a cron job)."""
    reason: str

    def describe(self) -> str:
        """The reason, with how many fires it covers: for the log and each record."""
        if self.count <= 1:
            return self.reason
        bound = "" if self.exact else "at least "
        return f"{self.reason} (one of {bound}{self.count} fires skipped)"

    def then(self, later: Skipped, keep: int) -> Skipped:
        """This and a later batch of the same job, as one."""
        return Skipped(
            latest=(*self.latest, *later.latest)[-keep:],
            count=self.count + later.count,
            exact=self.exact and later.exact,
            reason=later.reason,
        )


@dataclass
class _Walk:
    """Fires walked so far for one job (kept across wakeups for slow triggers)."""

    at: datetime
    """The next fire to walk."""
    latest: deque[datetime]
    count: int = 0


class CatchUpJobStore(MemoryJobStore):  # type: ignore[misc]
    """APScheduler's memory job store, with due jobs moved forward to where they resume.

    ``on_skipped(job_id, skipped)`` is called, during APScheduler's wakeup and
    before the job's fire is submitted, with the fires jumped over; ``keep`` is
    how many of the latest to list.
    """

    def __init__(self, on_skipped: Callable[[str, Skipped], None], keep: int) -> None:
        super().__init__()
        self._on_skipped = on_skipped
        self._keep = keep
        self._walks: dict[str, _Walk] = {}

    def forget(self) -> None:
        """Drop walks in progress (a new term sets every job's next fire again)."""
        self._walks.clear()

    def get_due_jobs(self, now: datetime) -> list[Any]:
        budget = [SCAN_LIMIT]
        return [job for job in super().get_due_jobs(now) if self._catch_up(job, now, budget)]

    def remove_job(self, job_id: str) -> None:
        self._walks.pop(job_id, None)
        super().remove_job(job_id)

    def remove_all_jobs(self) -> None:
        self._walks.clear()
        super().remove_all_jobs()

    # -- one job ----------------------------------------------------------------
    def _catch_up(self, job: Any, now: datetime, budget: list[int]) -> bool:
        """Move ``job`` to where it resumes; False while a long walk is still going."""
        first: datetime = job.next_run_time
        trigger = job.trigger
        walk = self._walks.get(job.id)
        if walk is None:
            following = trigger.get_next_fire_time(first, now)
            if following is None or following > now:
                return True  # one fire due: the usual case
        grace = job.misfire_grace_time
        if not job.coalesce and grace is None:
            return True  # every fire is to run (APScheduler walks them)
        cut = None if job.coalesce else now - timedelta(seconds=grace)
        reason = (
            "coalesced into a later fire"
            if job.coalesce
            else f"too late for misfire_grace_time={grace}s"
        )
        if isinstance(trigger, IntervalTrigger) and not trigger.jitter:
            resume, skipped = self._interval(trigger, first, now, cut, reason)
        else:
            walk = walk or _Walk(first, deque(maxlen=self._keep))
            found = self._walk(trigger, now, cut, walk, budget)
            if found is not None:
                self._walks.pop(job.id, None)
                resume = found
                skipped = Skipped(tuple(walk.latest), walk.count, True, reason)
            elif isinstance(trigger, CronTrigger):
                self._walks.pop(job.id, None)
                resume, skipped = self._probe(trigger, first, walk, now, cut, reason)
            else:
                self._walks[job.id] = walk
                self._move(job, walk.at)
                return False
        if resume != job.next_run_time:
            self._move(job, resume)
        if skipped.count:
            self._on_skipped(job.id, skipped)
        return True

    def _move(self, job: Any, to: datetime) -> None:
        job._modify(next_run_time=to)
        self.update_job(job)

    # -- strategies -------------------------------------------------------------
    def _interval(
        self, trigger: Any, first: datetime, now: datetime, cut: datetime | None, reason: str
    ) -> tuple[datetime, Skipped]:
        """Fires ``first + k * interval`` (what the trigger computes, in whole microseconds)."""
        step: timedelta = trigger.interval
        last = (now - first) // step
        if trigger.end_date is not None:
            last = max(0, min(last, (trigger.end_date - first) // step))
        resume = last if cut is None else min(last, max(0, -((first - cut) // step)))
        kept = range(max(0, resume - self._keep), resume)
        at = _stepper(first, step)
        return at(resume), Skipped(tuple(at(k) for k in kept), resume, True, reason)

    @staticmethod
    def _walk(
        trigger: Any, now: datetime, cut: datetime | None, walk: _Walk, budget: list[int]
    ) -> datetime | None:
        """Walk fires on from ``walk.at``; the resume fire, or None when the budget ran out."""
        while budget[0] > 0:
            if cut is not None and walk.at >= cut:
                return walk.at
            budget[0] -= 1
            following = trigger.get_next_fire_time(walk.at, now)
            if following is None or following > now:
                return walk.at
            walk.latest.append(walk.at)
            walk.count += 1
            walk.at = following
        return None

    def _probe(
        self,
        trigger: Any,
        first: datetime,
        walk: _Walk,
        now: datetime,
        cut: datetime | None,
        reason: str,
    ) -> tuple[datetime, Skipped]:
        """A cron job far behind: find the resume fire and the latest skipped ones by
        probing back from now. ``walk`` holds the fires walked from ``first`` so far."""
        start = walk.at  # a fire, not walked yet
        span = max(timedelta(seconds=1), (start - first) / max(1, walk.count) * (self._keep + 1))
        resume: datetime | None = None
        if cut is not None:
            at_cut = start if cut <= start else trigger.get_next_fire_time(cut - _US, now)
            if at_cut is not None and at_cut <= now:
                resume = at_cut
        if resume is None:
            latest, _, _ = _latest_before(trigger, start - _US, now + _US, now, 1, span)
            resume = latest[-1] if latest else start
        before, n, complete = _latest_before(trigger, start - _US, resume, now, self._keep, span)
        kept = (*walk.latest, *before)[-self._keep :]
        return resume, Skipped(kept, walk.count + n, complete, reason)


def _stepper(first: datetime, step: timedelta) -> Callable[[int], datetime]:
    """``k -> first + k * step`` on the absolute time line, in ``first``'s time zone (an aware
    datetime plus a timedelta is wall-clock arithmetic, which a DST change would shift)."""
    base = first.astimezone(UTC)
    return lambda k: (base + step * k).astimezone(first.tzinfo)


def _latest_before(
    trigger: Any,
    low: datetime,
    high: datetime,
    now: datetime,
    keep: int,
    span: timedelta,
) -> tuple[tuple[datetime, ...], int, bool]:
    """Up to ``keep`` latest fires of a cron ``trigger`` strictly between ``low`` and ``high``,
    searched in windows ending at ``high`` that grow from ``span``. Returns them (oldest
    first), how many fires the last window held, and whether that window reached ``low``
    (then that number is every fire between the two)."""
    calls = 0
    while True:
        start = low if span >= high - low else high - span
        found: deque[datetime] = deque(maxlen=keep)
        n = 0
        t = trigger.get_next_fire_time(start, now)
        calls += 1
        while t is not None and t < high and calls < SCAN_LIMIT:
            found.append(t)
            n += 1
            t = trigger.get_next_fire_time(t, now)
            calls += 1
        complete = start == low and (t is None or t >= high)
        if len(found) >= keep or start == low or calls >= SCAN_LIMIT:
            return tuple(found), n, complete
        span *= 4

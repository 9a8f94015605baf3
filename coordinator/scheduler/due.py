"""Runtime date jobs on the leader: only the next seconds of them, read from a Redis index.

Per-user reminders come in the hundreds of thousands, each firing once. Holding
each as an APScheduler job would make a new leader load them all before it
could fire any (about 18 s and 300 MB for 100,000 here). Instead a pending,
unpaused date job has an entry in a sorted set by its ``run_date``
(:meth:`coordinator.store.keys.Keys.due_dates`, kept by the same script that
stores the definition), and the leader reads from it only the entries due
within :data:`LOOKAHEAD_S`, every :data:`POLL_S`, with at most :data:`BATCH`
fires in the runner's hands at once (a backlog is read as it drains). It sets
a timer for each; a job added, replaced, paused or removed while due within
the lookahead is applied from its change notice
(:mod:`coordinator.scheduler.follower` calls :meth:`DueDates.update`).

Guarantees:

- **Once.** A timer hands the fire to the scheduler's
  :class:`~coordinator.scheduler.firing.FireRunner`; the claim script then takes
  the job's due entry, which must still hold exactly this ``run_date``, with its
  definition, which must still have the revision read. A fire of a job removed,
  paused or replaced in the meantime is refused inside Redis, whatever this
  process held.
- **Cost does not grow with pending jobs.** A new leader starts firing after one
  read (nothing to load); memory is O(jobs due within the lookahead).
- **A claimed fire that never started is handed back.** When the leader loses its
  term between the claim and the start (paused past its lease), the definition and
  due entry are put back (:meth:`coordinator.scheduler.runtime.RuntimeJobs.hand_back`)
  and the next leader runs the fire within its grace or records it ``missed``. Not
  if the id was changed meanwhile (added again: the newer job stands; removed or
  paused: as asked), nor after a minute: the fire is then recorded ``cancelled``.
  Likewise a fire whose claim the replicas did not confirm (``min_replicas``): this
  leader claims it again (see :mod:`coordinator.scheduler.firing`).
- **Late fires follow the misfire rule.** Entries that fell due while there was no
  leader are read first (oldest first) and run when within their
  ``misfire_grace_time``, or are recorded ``missed``; either way they leave.

Limits, said plainly:

- One leader fires them; throughput is its claim scripts and runs (about 3,000
  fires/s on 2 shared cores, see ``bench/README.md``). A backlog larger than
  what it fires within the grace time is recorded ``missed``, not run late.
- The timer fires on this process's wall clock (``time.time()``); a leader
  whose clock is ahead starts runs early by that much.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any, cast

from coordinator.clock import ms_to_datetime
from coordinator.errors import CoordinatorError
from coordinator.scheduler.firing import FireRunner
from coordinator.scheduler.runtime import RuntimeJob, TaskRegistry
from coordinator.store.codec import text
from coordinator.store.connection import RedisClient
from coordinator.store.keys import Keys
from coordinator.store.scripts import DUE_PRUNE

logger = logging.getLogger("coordinator.scheduler")

LOOKAHEAD_S = 2.0
"""Date jobs due within this many seconds are held (with a timer) by the leader."""
POLL_S = 1.0
"""How often the leader reads the due-dates index (sooner while a backlog drains)."""
BATCH = 1000
"""Most new entries taken from the index per read."""
BACKLOG_POLL_S = 0.02
"""Next read after one that filled its batch (a backlog is draining)."""


def runnable(job: RuntimeJob, tasks: TaskRegistry, default_grace: int) -> SimpleNamespace:
    """What the fire runner needs to run ``job``: its task (or a stand-in that fails
    with the lookup error, so the fire is recorded ``error``), args and grace."""
    try:
        func = tasks.get(job.task)
    except CoordinatorError as exc:
        func = missing_task(job.task, str(exc))
    return SimpleNamespace(
        id=job.id,
        func=func,
        args=job.args,
        kwargs=job.kwargs,
        misfire_grace_time=job.misfire_grace_time or default_grace,
    )


def parse_job(raw: bytes | str) -> RuntimeJob | None:
    """A stored definition, or ``None`` (logged) when it is not one (written by hand)."""
    try:
        return RuntimeJob.from_json(raw)
    except (ValueError, TypeError, KeyError) as exc:
        logger.warning("ignoring a runtime job definition that does not parse: %r", exc)
        return None


def missing_task(name: str, why: str) -> Callable[..., Any]:
    """Stands in for a task this process lacks: its fires are recorded as errors."""

    def missing(*args: Any, **kwargs: Any) -> None:
        raise LookupError(why)

    missing.__name__ = f"missing_task_{name}"
    return missing


class DueDates:
    """The leader's timers for runtime date jobs due soon (see module doc).

    Every method runs on the scheduler's event loop; :meth:`poll` and
    :meth:`update` are called by the one task that follows job changes, in order,
    so a read never overwrites a newer notice.
    """

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        runner: FireRunner,
        tasks: TaskRegistry,
        default_grace: int,
        hand_back: Callable[[RuntimeJob, str], Awaitable[bool]],
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._runner = runner
        self._tasks = tasks
        self._default_grace = default_grace
        self._hand_back = hand_back
        self._held: dict[str, tuple[RuntimeJob, asyncio.TimerHandle]] = {}
        self._claiming: dict[str, int] = {}
        """Fires handed to the runner whose claim is not decided yet, by job id."""
        self.polls = 0

    @property
    def held(self) -> int:
        """Date jobs with a timer set and not handed to the runner yet."""
        return len(self._held)

    async def poll(self) -> float:
        """Read the index up to now + :data:`LOOKAHEAD_S` and set timers for new
        entries; returns the seconds until the next read should happen."""
        claiming = sum(self._claiming.values())
        want = BATCH - claiming
        if want <= 0:
            return BACKLOG_POLL_S  # the runner has a batch of claims in hand: wait for it
        horizon = int((time.time() + LOOKAHEAD_S) * 1000)
        skip = len(self._held) + claiming
        entries = await self._redis.zrange(
            self._keys.due_dates(),
            "-inf",
            horizon,
            byscore=True,
            offset=0,
            num=skip + want,
            withscores=True,
        )
        self.polls += 1
        fresh = [
            (job_id, int(score))
            for job_id, score in ((text(m), s) for m, s in cast(list[tuple[bytes, float]], entries))
            if job_id not in self._held and job_id not in self._claiming
        ]
        if fresh:
            raws = await self._redis.hmget(self._keys.runtime_jobs(), [j for j, _ in fresh])
            stale = []
            for (job_id, due_ms), raw in zip(fresh, raws, strict=True):
                job = parse_job(raw) if raw is not None else None
                if job is None or job.due_ms != due_ms:
                    stale.append(job_id)  # changed since the read, or never a job
                else:
                    self._hold(job)
            if stale:
                keys = [self._keys.runtime_jobs(), self._keys.due_dates()]
                if removed := int(await DUE_PRUNE(self._redis, keys, stale)):
                    logger.warning(
                        "removed %d due-dates index entries without a matching job", removed
                    )
        return BACKLOG_POLL_S if len(entries) >= skip + want else POLL_S

    def update(self, job_id: str, job: RuntimeJob | None, paused: bool) -> None:
        """Apply a change notice: hold ``job`` if it is a pending date job due within
        the lookahead, else let go of ``job_id``."""
        horizon = (time.time() + LOOKAHEAD_S) * 1000
        if job is None or paused or job.due_ms is None or job.due_ms > horizon:
            self.drop(job_id)
            return
        held = self._held.get(job_id)
        if held is None or held[0].rev != job.rev:
            self._hold(job)

    def drop(self, job_id: str) -> None:
        held = self._held.pop(job_id, None)
        if held is not None:
            held[1].cancel()

    def clear(self) -> None:
        """Cancel every timer (leadership ended); fires already handed over go on."""
        for _, handle in self._held.values():
            handle.cancel()
        self._held.clear()

    def _hold(self, job: RuntimeJob) -> None:
        assert job.due_ms is not None
        self.drop(job.id)
        delay = max(0.0, job.due_ms / 1000 - time.time())
        handle = asyncio.get_running_loop().call_later(delay, self._fire, job.id)
        self._held[job.id] = (job, handle)

    def _fire(self, job_id: str) -> None:
        held = self._held.pop(job_id, None)
        if held is None:
            return
        job = held[0]
        assert job.due_ms is not None
        target = runnable(job, self._tasks, self._default_grace)
        target.final_rev = job.rev
        target.hand_back = functools.partial(self._hand_back, job)
        self._claiming[job_id] = self._claiming.get(job_id, 0) + 1

        def decided() -> None:
            left = self._claiming[job_id] - 1
            if left:
                self._claiming[job_id] = left
            else:
                del self._claiming[job_id]

        at = ms_to_datetime(job.due_ms)
        self._runner.spawn(self._runner.fire(target, [at], claimed=decided))

"""How one scheduled fire is claimed, run and recorded (the scheduler's executor).

APScheduler decides *when* a job is due; every due fire then goes through
:class:`FireRunner`, which APScheduler reaches through :class:`FencedExecutor`:

1. The fire must belong to this process's current term (local check).
2. ``claim_fire`` (one Lua script) checks inside Redis that the term's lease is
   still the current one, that ``job id + scheduled time`` was not claimed
   before (``SET NX``) and is newer than the job's last fire, then records it as
   the last fire. Only then does the job start. A paused old leader that wakes
   up claims nothing.
3. The run's outcome goes to the capped run history.

Fires too late for ``misfire_grace_time``, fires coalesced into a later one,
and fires skipped because the previous run was still going are claimed as
``missed`` (the same script writes their history record), so no later leader
runs them either.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from apscheduler.events import (  # type: ignore[import-untyped]
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MISSED,
    JobExecutionEvent,
)
from apscheduler.executors.base import BaseExecutor  # type: ignore[import-untyped]
from apscheduler.util import iscoroutinefunction_partial  # type: ignore[import-untyped]
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .election import LeaderElector, Term
from .keys import Keys
from .runs import RunHistory, RunRecord, RunStatus, dt_to_ms
from .scripts import CHECK, CLAIM_FIRE

logger = logging.getLogger("coordinator.scheduler")

MAX_MISSED_RECORDS = 20
"""At most this many ``missed`` records are written for one batch (after a long
outage only the most recent are recorded; the rest are counted in the log)."""

CLAIMED, NOT_LEADER, ALREADY = 1, 0, -1


class JobContext:
    """What a running job knows about its fire. Declare a parameter named ``ctx`` to get it.

    ``fencing_token`` identifies the leadership term that claimed this fire; pass
    it to downstream systems so they can reject writes from an older term.
    ``lost_leadership`` is set the moment this process's term ends (sync jobs
    can poll it; async jobs may also be cancelled, see ``cancel_on_revoke``).
    """

    __slots__ = (
        "_lease_key", "_lease_value", "_loop", "_redis",
        "fencing_token", "instance_id", "job_id", "lost_leadership", "scheduled_at",
    )  # fmt: skip

    def __init__(
        self,
        *,
        job_id: str,
        scheduled_at: datetime,
        fencing_token: int,
        instance_id: str,
        redis: Redis,
        lease_key: str,
        lease_value: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.job_id = job_id
        self.scheduled_at = scheduled_at
        self.fencing_token = fencing_token
        self.instance_id = instance_id
        self.lost_leadership = threading.Event()
        self._redis = redis
        self._lease_key = lease_key
        self._lease_value = lease_value
        self._loop = loop

    async def still_leader(self) -> bool:
        """Ask Redis whether the term that claimed this fire is still the current one.

        A server-side check: false for a paused old leader even before its own
        loop noticed. Raises ``redis`` errors when Redis is unreachable.
        """
        if self.lost_leadership.is_set():
            return False
        return bool(await CHECK(self._redis, [self._lease_key], [self._lease_value]))

    def still_leader_blocking(self, timeout: float = 5.0) -> bool:
        """:meth:`still_leader` for sync jobs (which run in a worker thread).

        Raises ``RuntimeError`` when called on the event loop's own thread (use
        ``await ctx.still_leader()`` there), ``TimeoutError`` after ``timeout``.
        """
        if threading.get_ident() == getattr(self._loop, "_thread_id", None):
            raise RuntimeError(
                "still_leader_blocking() would block the event loop; await still_leader()"
            )
        future = asyncio.run_coroutine_threadsafe(self.still_leader(), self._loop)
        return future.result(timeout)

    def __repr__(self) -> str:
        return (
            f"JobContext(job_id={self.job_id!r}, scheduled_at={self.scheduled_at.isoformat()}, "
            f"fencing_token={self.fencing_token})"
        )


@dataclass
class _Running:
    ctx: JobContext
    task: asyncio.Future[Any]
    cancellable: bool
    cancel_on_revoke: bool
    cancelled_by_revoke: bool = False


@dataclass
class FireStats:
    """Counters of this process's fires (for tests, metrics and benchmarks)."""

    claimed: int = 0
    refused_not_leader: int = 0
    refused_already_claimed: int = 0
    missed: int = 0
    cancelled: int = 0
    errors: int = 0
    ok: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    durations: deque[tuple[str, str, float]] = field(default_factory=lambda: deque(maxlen=1024))
    """(job id, status, seconds) of recent finished runs; drained by the metrics sampler."""


def wants_ctx(func: Callable[..., Any]) -> bool:
    try:
        return "ctx" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


class FireRunner:
    """Claims, runs and records fires for one :class:`LeaderScheduler` (see module doc)."""

    def __init__(
        self,
        redis: Redis,
        elector: LeaderElector,
        history: RunHistory,
        claim_ttl_ms: int,
        cancel_on_revoke: Callable[[str], bool],
    ) -> None:
        self._redis = redis
        self._elector = elector
        self._history = history
        self._keys: Keys = elector.keys
        self._lease_key = elector.keys.lease(elector.name)
        self._claim_ttl_ms = claim_ttl_ms
        self._cancel_on_revoke = cancel_on_revoke
        self.instance_id = elector.instance_id
        self.term: Term | None = None
        self.accepting = False
        self.last_seen: dict[str, datetime | None] = {}
        self.running: dict[tuple[str, int], _Running] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stats = FireStats()

    # -- terms ------------------------------------------------------------------
    def begin(self, term: Term, last_seen: dict[str, datetime | None]) -> None:
        self.last_seen = last_seen
        self.term = term
        self.accepting = True

    def current(self, term: Term) -> bool:
        return self.accepting and self.term is term and self._elector.term == term

    def revoke(self) -> None:
        """Stop starting fires at once; tell running jobs; cancel async ones if configured."""
        self.term = None
        for run in list(self.running.values()):
            run.ctx.lost_leadership.set()
            if run.cancellable and run.cancel_on_revoke and not run.task.done():
                run.cancelled_by_revoke = True
                run.task.cancel()

    async def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for fires in progress; True if none is left."""
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, timeout))
        return not any(not t.done() for t in self.tasks)

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- one batch of due fires -------------------------------------------------
    async def fire(self, job: Any, run_times: list[datetime]) -> list[Any]:
        """Handle APScheduler's due ``run_times`` of ``job``; return APScheduler events."""
        term = self.term
        if term is None or not self.current(term):
            return []
        now = datetime.now(UTC)
        missed = [
            (t, "coalesced: a later fire of the job ran instead")
            for t in self._skipped(job, run_times[0])
        ]
        due = []
        grace = job.misfire_grace_time
        for t in run_times:
            late = (now - t).total_seconds()
            if grace is not None and late > grace:
                missed.append((t, f"{late:.3f}s late, over misfire_grace_time={grace}s"))
            else:
                due.append(t)
        self.last_seen[job.id] = run_times[-1]
        events = await self.record_missed(job.id, missed, term)
        for t in due:
            if not self.current(term):
                break
            events.append(await self._run_one(job, t, term))
        return [e for e in events if e is not None]

    def _skipped(self, job: Any, first: datetime) -> list[datetime]:
        """Fires between the last one handled and ``first`` (coalesced away by APScheduler)."""
        prev = self.last_seen.get(job.id)
        if prev is None or getattr(job.trigger, "jitter", None):
            return []  # with jitter, recomputed times would not match the real ones
        out: list[datetime] = []
        now = datetime.now(UTC)
        t = job.trigger.get_next_fire_time(prev, now)
        while t is not None and t < first and len(out) < 100_000:
            out.append(t)
            t = job.trigger.get_next_fire_time(t, now)
        return out

    async def record_missed(
        self, job_id: str, missed: list[tuple[datetime, str]], term: Term | None = None
    ) -> list[Any]:
        """Claim ``missed`` fires as missed (each writes its history record)."""
        term = term or self.term
        if not missed or term is None:
            return []
        if len(missed) > MAX_MISSED_RECORDS:
            logger.warning(
                "%s: job %r missed %d fires; recording the last %d",
                self.instance_id, job_id, len(missed), MAX_MISSED_RECORDS,
            )  # fmt: skip
            missed = missed[-MAX_MISSED_RECORDS:]
        events = []
        for t, why in sorted(missed):
            record = RunRecord(
                job_id=job_id, scheduled_ms=dt_to_ms(t), status="missed",
                instance_id=self.instance_id, fencing_token=term.token, error=why,
            )  # fmt: skip
            if await self._claim(term, job_id, t, record) == CLAIMED:
                logger.warning("%s: job %r fire at %s missed: %s", self.instance_id, job_id, t, why)
                self._count("missed")
                events.append(JobExecutionEvent(EVENT_JOB_MISSED, job_id, "default", t))
        return events

    async def _claim(self, term: Term, job_id: str, t: datetime, missed: RunRecord | None) -> int:
        scheduled_ms = dt_to_ms(t)
        claim = json.dumps({"instance_id": self.instance_id, "fencing_token": term.token,
                            "claimed_ms": int(time.time() * 1000)})  # fmt: skip
        keys = [self._lease_key, self._keys.fire(job_id, scheduled_ms), self._keys.last_fire(),
                self._keys.runs()]  # fmt: skip
        args: list[str | int] = [term.lease_value, job_id, scheduled_ms, self._claim_ttl_ms, claim,
                "missed" if missed else "run", missed.to_json() if missed else "",
                self._history.cap]  # fmt: skip
        replicas = self._elector.settings.min_replicas
        try:
            if replicas:
                # A claim a failover can undo could run again on the next leader: count
                # it only once a replica has it (the fire is not run otherwise).
                reply, confirmed = await CLAIM_FIRE.call_replicated(
                    self._redis, keys, args, replicas, self._elector.settings.replica_timeout_ms
                )
                if confirmed < replicas:
                    logger.warning("%s: claim of %r at %s not replicated; not running it",
                                   self.instance_id, job_id, t)  # fmt: skip
                    return NOT_LEADER
            else:
                reply = await CLAIM_FIRE(self._redis, keys, args)
        except (RedisError, OSError) as exc:
            logger.warning("%s: cannot claim %r at %s (%s); not running it",
                           self.instance_id, job_id, t, exc)  # fmt: skip
            return NOT_LEADER
        code = int(reply[0])
        if code == NOT_LEADER:
            self.stats.refused_not_leader += 1
            logger.warning("%s: claim of %r at %s refused: lease %d is no longer current",
                           self.instance_id, job_id, t, term.token)  # fmt: skip
        elif code == ALREADY:
            self.stats.refused_already_claimed += 1
            logger.info("%s: %r at %s was already claimed", self.instance_id, job_id, t)
        else:
            self.stats.claimed += 1
        return code

    async def _run_one(self, job: Any, t: datetime, term: Term) -> Any:
        code = await self._claim(term, job.id, t, None)
        if code != CLAIMED:
            return None
        loop = asyncio.get_running_loop()
        ctx = JobContext(
            job_id=job.id, scheduled_at=t, fencing_token=term.token,
            instance_id=self.instance_id, redis=self._redis, lease_key=self._lease_key,
            lease_value=term.lease_value, loop=loop,
        )  # fmt: skip
        started = int(time.time() * 1000)
        if not self.current(term):
            await self._record(job.id, t, term, "cancelled", started,
                               "leadership lost between claim and start", True)  # fmt: skip
            return JobExecutionEvent(EVENT_JOB_ERROR, job.id, "default", t)
        kwargs = dict(job.kwargs)
        if wants_ctx(job.func):
            kwargs["ctx"] = ctx
        cancellable = bool(iscoroutinefunction_partial(job.func))
        call = functools.partial(job.func, *job.args, **kwargs)
        task: asyncio.Future[Any] = (
            asyncio.ensure_future(call())
            if cancellable
            else asyncio.ensure_future(asyncio.to_thread(call))
        )
        run = _Running(ctx, task, cancellable, self._cancel_on_revoke(job.id))
        key = (job.id, dt_to_ms(t))
        self.running[key] = run
        logger.info(
            "%s: running %r (scheduled %s, token %d)", self.instance_id, job.id, t, term.token
        )
        try:
            retval = await task
        except asyncio.CancelledError:
            await self._record(job.id, t, term, "cancelled", started,
                               "cancelled: leadership lost" if run.cancelled_by_revoke
                               else "cancelled: scheduler stopped", True)  # fmt: skip
            if not run.cancelled_by_revoke:
                raise
            return JobExecutionEvent(EVENT_JOB_ERROR, job.id, "default", t)
        except Exception as exc:
            logger.exception("%s: job %r (scheduled %s) raised", self.instance_id, job.id, t)
            await self._record(job.id, t, term, "error", started, f"{type(exc).__name__}: {exc}",
                               ctx.lost_leadership.is_set())  # fmt: skip
            return JobExecutionEvent(EVENT_JOB_ERROR, job.id, "default", t, exception=exc,
                                     traceback=traceback.format_exc())  # fmt: skip
        finally:
            self.running.pop(key, None)
        await self._record(job.id, t, term, "ok", started, None, ctx.lost_leadership.is_set())
        return JobExecutionEvent(EVENT_JOB_EXECUTED, job.id, "default", t, retval=retval)

    async def _record(
        self, job_id: str, t: datetime, term: Term, status: RunStatus, started: int,
        error: str | None, lost: bool,
    ) -> None:  # fmt: skip
        self._count(status)
        if status in ("ok", "error"):
            self.stats.durations.append((job_id, status, time.time() - started / 1000))
        record = RunRecord(
            job_id=job_id, scheduled_ms=dt_to_ms(t), status=status, instance_id=self.instance_id,
            fencing_token=term.token, started_ms=started, finished_ms=int(time.time() * 1000),
            error=error, lost_leadership=lost,
        )  # fmt: skip
        try:
            await asyncio.shield(self._history.append(record))
        except (RedisError, OSError) as exc:
            logger.warning("%s: could not record run of %r: %s", self.instance_id, job_id, exc)

    def _count(self, status: str) -> None:
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1
        if status in ("ok", "missed", "cancelled"):
            setattr(self.stats, status, getattr(self.stats, status) + 1)
        elif status == "error":
            self.stats.errors += 1


class FencedExecutor(BaseExecutor):  # type: ignore[misc]
    """APScheduler executor that hands every fire to a :class:`FireRunner`.

    Runs on the scheduler's event loop; async jobs run there, sync jobs in the
    loop's default thread pool. ``max_instances`` is honoured by APScheduler.
    """

    def __init__(self, runner: FireRunner) -> None:
        super().__init__()
        self._runner = runner

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        task = self._runner.spawn(self._runner.fire(job, run_times))
        task.add_done_callback(functools.partial(self._finished, job.id))

    def _finished(self, job_id: str, task: asyncio.Task[Any]) -> None:
        events: list[Any] = []
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:
                logger.error("fire of %r failed: %r", job_id, exc)
            else:
                events = task.result()
        with contextlib.suppress(Exception):
            self._run_job_success(job_id, events)

    def shutdown(self, wait: bool = True) -> None:
        """Fires are drained and cancelled by the scheduler's ``stop()``."""


def grace_default(lease_ttl: float, retry_period: float) -> int:
    """Default ``misfire_grace_time``: long enough for a crash failover to still run
    the fire that was due during the switch (lease TTL + one retry period, whole seconds)."""
    return max(1, int(-(-(lease_ttl + retry_period) // 1)))


def utc_from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)

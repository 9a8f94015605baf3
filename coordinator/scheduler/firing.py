"""How one scheduled fire is claimed, run and recorded (the scheduler's executor).

APScheduler decides *when* a job is due; every due fire then goes through
:class:`FireRunner`, which APScheduler reaches through :class:`FencedExecutor`:

1. The fire must belong to this process's current term (local check).
2. ``claim_fire`` (one Lua script) checks inside Redis that the term's lease is
   still the current one and that the scheduled time is later than the job's
   last claimed fire, then records it as the job's last fire. Only then does the
   job start. A paused old leader that wakes up claims nothing.
3. The run's outcome goes to the capped run history.

Fires too late for ``misfire_grace_time``, fires coalesced into a later one (see
:mod:`coordinator.scheduler.catchup`), and fires skipped because the previous
run was still going are claimed as ``missed`` (the same script writes their
history record), so no later leader runs them either.

Guarantees:

- **A fire is claimed at most once, for ever.** The claim record of a job is one
  field, its last claimed scheduled time (ms) in the ``last-fire`` hash: a claim
  must be strictly later, and moves it forward. So one (job id, scheduled time)
  is claimed once at most, whoever tries and whenever: a run, a ``missed``
  record, a new leader continuing after a failover, two schedulers that
  overlap for a moment, a paused old leader waking up (whose lease check fails
  first anyway). Redis keeps O(1) keys per job for it, however often it fires.
- **Claims of one job leave a process in scheduled-time order.** APScheduler
  submits a job's fires in that order; each batch (and each batch of ``missed``
  records) then waits for the job's *claim turn*, a FIFO lock, so the claims
  reach Redis in the same order even when runs overlap (``max_instances`` > 1).
  A run holds the turn only while a later fire of its own batch waits to be
  claimed after it (``coalesce=False`` catching up, one fire after the other).

Limits, said plainly:

- Ordering is the price of one key per job: a fire whose claim reaches Redis
  after a later fire of the same job was claimed is refused (``ALREADY``), not
  run and not recorded (logged, counted in ``refused_already_claimed``). The
  claim turn rules this out within one scheduler; it can happen only between
  two schedulers of one job id in one term (two ``LeaderScheduler`` objects on
  one elector).
- Deleting the ``last-fire`` hash, or losing it (``FLUSHALL``, a restore from an
  older snapshot, a failover that drops an unreplicated write when
  ``COORDINATOR_MIN_REPLICAS`` is 0), forgets the claims: times after what is
  left can be claimed again.
- A "run now" (a manual run outside the schedule) does not claim through this
  record: its time, now, is later than a scheduled fire that is due but not
  claimed yet, which would then be refused. It has a record of its own (a run
  request, taken by ``claim_run``; see :mod:`coordinator.scheduler.follower`).
- The claim also refuses the fires of a paused job (``PAUSED``), and removes a
  runtime date job's definition with its one fire. If the term is lost between
  that claim and the start, the date job is handed back for the next leader
  (``job.hand_back``, see :mod:`coordinator.scheduler.due`); any other job's fire
  is then recorded ``cancelled``: its claim record only moves forward.
- With ``COORDINATOR_MIN_REPLICAS``, a claim ``WAIT`` does not confirm is not run
  (``unreplicated``): a runtime date job's fire is handed back and claimed again,
  until a claim is confirmed or its grace runs out (then it is recorded ``missed``,
  a record the replicas may not have either); a recurring job's next fire comes as
  usual; a date job defined in code does not run (its claim record moved forward).
  While the replicas stay behind, each retry holds one of the Redis slots below for
  ``replica_timeout_ms`` (the ``WAIT``); retries of one fire back off to one a second.

Bursts and transient Redis errors:

- **A fire APScheduler submitted is never dropped silently.** Its claim and its
  history record wait for one of the runner's *Redis slots* (a semaphore well
  below the client's connection pool, :func:`redis_slots`), so any number of
  fires due at the same instant queue for Redis instead of exhausting the pool
  (redis-py's asyncio pool raises ``MaxConnectionsError`` at once when full,
  which also starved the elector's renewals). A fire that was due within its
  ``misfire_grace_time`` when submitted runs however long it queued.
- A claim that fails with a Redis error (pool full, timeout, connection reset) is
  retried with backoff while the term is current and the fire is within its
  ``misfire_grace_time`` (counted from its scheduled time); past that it is
  claimed as ``missed`` instead (retried while the term is current). Only when
  the term is lost is it given up, logged at ERROR and left to the next leader
  (a runtime date job keeps its definition until a claim removes it).
- A claim whose *reply* was lost (a timeout after Redis ran the script) is
  refused on retry (``ALREADY``) and not run: at most once comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
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
from redis.asyncio.cluster import RedisCluster

from coordinator.clock import datetime_to_ms, ms_to_datetime
from coordinator.election.elector import LeaderElector, Term
from coordinator.errors import REDIS_UNREACHABLE
from coordinator.scheduler.catchup import Skipped
from coordinator.scheduler.context import JobContext, wants_ctx
from coordinator.scheduler.runs import RunHistory, RunRecord, RunStatus
from coordinator.store.connection import PrimaryClients, RedisClient
from coordinator.store.keys import Keys
from coordinator.store.scripts import CLAIM_FIRE

logger = logging.getLogger("coordinator.scheduler")

MAX_MISSED_RECORDS = 20
"""At most this many ``missed`` records are written for one batch (after a long
outage only the most recent are recorded; each says how many fires it stands for)."""

CLAIMED, NOT_LEADER, ALREADY, PAUSED, GONE = 1, 0, -1, -2, -3
EXPIRED = -100
"""Local code (never from Redis): a run claim kept failing until the fire's grace expired."""
UNREPLICATED = -101
"""Local code: claimed on the primary, but ``WAIT`` did not confirm it; not run."""
UNREPLICATED_BACKOFF_MAX_S = 1.0
"""Most time between the claims of a fire whose claims the replicas did not confirm."""
UNREPLICATED_TRACKED_MAX = 10_000
"""Most fires whose unconfirmed claims are counted (for the backoff) at once; the
oldest is forgotten first (its next claim then backs off from the start). An entry goes
when its fire is claimed with confirmation, refused, recorded missed or given up."""

MAX_REDIS_SLOTS = 32
"""Upper bound of the Redis calls fires make at the same time (see :func:`redis_slots`)."""

RETRY_MIN_S, RETRY_MAX_S = 0.02, 0.5
"""Backoff between attempts of a claim or history write that failed for a Redis error."""
TAKEN_MARKER_MS = 60_000
"""How long a runtime date job's claimed fire can be handed back (see ``job_taken``)."""
HAND_BACK_RETRY_S = 10.0
"""How long a hand-back is retried through Redis errors."""


def redis_slots(redis: RedisClient) -> int:
    """How many claims and history writes one runner sends at once: a quarter of the
    client's connection pool (the rest is left to the elector, the follower, the API
    and the jobs themselves), at least 1, at most :data:`MAX_REDIS_SLOTS`."""
    if isinstance(redis, RedisCluster):  # a pool per node, each of this size
        pool_max = redis.connection_kwargs.get("max_connections")
    else:
        pool_max = getattr(getattr(redis, "connection_pool", None), "max_connections", None)
    if not isinstance(pool_max, int) or pool_max <= 0:
        return MAX_REDIS_SLOTS
    return max(1, min(MAX_REDIS_SLOTS, pool_max // 4))


@dataclass
class _Turn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


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
    refused_paused: int = 0
    refused_gone: int = 0
    """Date-job fires no longer pending at their time (removed, paused, replaced)."""
    claim_retries: int = 0
    """Claims and history writes sent again after a Redis error."""
    abandoned: int = 0
    """Fires given up unclaimed because the term was lost while Redis failed."""
    handed_back: int = 0
    """Runtime date-job fires claimed, then handed back unstarted (once per hand-back):
    the term was lost in between (the next leader runs them), or the replicas did not
    confirm the claim (this leader claims them again)."""
    unreplicated: int = 0
    """Claims written but not confirmed by ``WAIT`` on ``min_replicas`` replicas within
    ``replica_timeout_ms`` (their fires are not run)."""
    missed: int = 0
    cancelled: int = 0
    errors: int = 0
    ok: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    durations: deque[tuple[str, str, float]] = field(default_factory=lambda: deque(maxlen=1024))
    """(job id, status, seconds) of recent finished runs; drained by the metrics sampler."""


class FireRunner:
    """Claims, runs and records fires for one :class:`LeaderScheduler` (see module doc)."""

    def __init__(
        self,
        redis: RedisClient,
        elector: LeaderElector,
        history: RunHistory,
        cancel_on_revoke: Callable[[str], bool],
    ) -> None:
        self._redis = redis
        self._elector = elector
        self._history = history
        self._keys: Keys = elector.keys
        self._lease_key = elector.keys.lease(elector.name)
        self._cancel_on_revoke = cancel_on_revoke
        self._turns: dict[str, _Turn] = {}
        self._unreplicated: dict[tuple[str, datetime], int] = {}
        """Unconfirmed claims so far of each runtime date job's fire being retried (at most
        :data:`UNREPLICATED_TRACKED_MAX` fires, in the order of their latest claim)."""
        self._slots = asyncio.Semaphore(redis_slots(redis))
        self._primaries = PrimaryClients(redis, elector.settings.redis_url)
        """Where a claim runs when ``WAIT`` must follow it (on Cluster: the slot's primary)."""
        self.instance_id = elector.instance_id
        self.term: Term | None = None
        self.accepting = False
        self.skipped: dict[str, Skipped] = {}
        """Fires the job store jumped over, per job, until the job's next batch records them."""
        self.running: dict[tuple[str, int], _Running] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.claiming = 0
        """Claim scripts sent to Redis and not answered yet."""
        self.stats = FireStats()

    # -- terms ------------------------------------------------------------------
    def begin(self, term: Term) -> None:
        self.skipped.clear()
        self.term = term
        self.accepting = True

    def holds(self, term: Term) -> bool:
        """``term`` is still this process's (it may be stopping: claimed fires still run)."""
        return self.term is term and self._elector.term == term

    def current(self, term: Term) -> bool:
        """``term`` holds and new fires may be claimed (the scheduler is not stopping)."""
        return self.accepting and self.holds(term)

    def add_skipped(self, job_id: str, skipped: Skipped) -> None:
        """Called by the job store when it moves ``job_id`` past ``skipped`` fires."""
        earlier = self.skipped.get(job_id)
        self.skipped[job_id] = (
            earlier.then(skipped, MAX_MISSED_RECORDS) if earlier is not None else skipped
        )

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

    async def aclose(self) -> None:
        """Close the node clients claims opened (on Cluster with ``min_replicas``)."""
        await self._primaries.aclose()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- one batch of due fires -------------------------------------------------
    def submit(self, job: Any, run_times: list[datetime]) -> asyncio.Task[Any]:
        """Start handling a batch of due fires (called by APScheduler, in scheduled order)."""
        return self.spawn(self.fire(job, run_times, self.skipped.pop(job.id, None)))

    def submit_missed(self, job_id: str, run_times: list[datetime], why: str) -> None:
        """Record ``run_times`` (and fires skipped before them) as missed, in the job's turn."""
        self.spawn(self._missed_in_turn(job_id, run_times, why, self.skipped.pop(job_id, None)))

    @contextlib.asynccontextmanager
    async def _turn(self, job_id: str) -> AsyncIterator[None]:
        """Hold the job's claim turn: FIFO, taken in the order the batches were
        submitted. A turn no batch waits for is dropped (one per job id ever fired
        would add up with many date jobs)."""
        turn = self._turns.get(job_id)
        if turn is None:
            turn = self._turns[job_id] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if turn.users == 0:
                del self._turns[job_id]

    async def fire(
        self,
        job: Any,
        run_times: list[datetime],
        skipped: Skipped | None = None,
        *,
        claimed: Callable[[], None] | None = None,
    ) -> list[Any]:
        """Handle APScheduler's due ``run_times`` of ``job``; return APScheduler events.

        A runtime date job's one fire has ``job.final_rev`` (its definition's revision):
        it is claimed through its pending entry in the due-dates index, which must still
        hold this time and this revision (see :mod:`coordinator.scheduler.due`).
        ``claimed`` is called once every claim of the batch is decided, before any run.
        """
        try:
            term = self.term
            if term is None or not self.current(term):
                return []
            events, pending = await self._claim_batch(job, run_times, skipped, term)
        finally:
            if claimed is not None:
                claimed()
        if pending is not None:
            events.append(await self._start(job, pending, term))
        return [e for e in events if e is not None]

    async def _claim_batch(
        self, job: Any, run_times: list[datetime], skipped: Skipped | None, term: Term
    ) -> tuple[list[Any], datetime | None]:
        """Claim the batch in the job's turn; returns events and the fire left to start."""
        final_rev: str | None = getattr(job, "final_rev", None)
        pending: datetime | None = None  # claimed, not started yet
        async with self._turn(job.id):
            if not self.current(term):
                return [], None
            now = datetime.now(UTC)
            missed, due = [], []
            grace = job.misfire_grace_time
            for t in run_times:
                late = (now - t).total_seconds()
                if grace is not None and late > grace:
                    missed.append((t, f"{late:.3f}s late, over misfire_grace_time={grace}s"))
                else:
                    due.append(t)
            for t, _ in missed:  # a fire handed back until its grace ran out ends here
                self._unreplicated.pop((job.id, t), None)
            events = await self._record_missed(term, job.id, missed, skipped, final_rev)
            for t in due:
                if pending is not None:
                    # Catching up without coalescing: the fires run one after the other,
                    # and the turn is kept so no later fire is claimed before these.
                    events.append(await self._start(job, pending, term))
                    pending = None
                if not self.current(term):
                    break
                if tries := self._unreplicated.get((job.id, t), 0):
                    # Claimed before, unconfirmed, handed back: back off (module doc).
                    await asyncio.sleep(min(UNREPLICATED_BACKOFF_MAX_S, RETRY_MIN_S * 2**tries))
                    if not self.current(term):
                        break
                code = await self._claim(term, job.id, t, None, grace, final_rev)
                if code != UNREPLICATED:
                    self._unreplicated.pop((job.id, t), None)
                if code == CLAIMED:
                    pending = t
                elif code == UNREPLICATED:
                    await self._give_back_unreplicated(job, t, term)
                elif code == EXPIRED:
                    why = f"could not be claimed within misfire_grace_time={grace}s (Redis errors)"
                    events += await self._record_missed(term, job.id, [(t, why)], None, final_rev)
        return events, pending

    async def _missed_in_turn(
        self, job_id: str, run_times: list[datetime], why: str, skipped: Skipped | None
    ) -> None:
        term = self.term
        if term is None:
            return
        async with self._turn(job_id):
            if self.current(term):
                await self._record_missed(term, job_id, [(t, why) for t in run_times], skipped)

    async def _record_missed(
        self,
        term: Term,
        job_id: str,
        missed: list[tuple[datetime, str]],
        skipped: Skipped | None,
        final_rev: str | None = None,
    ) -> list[Any]:
        """Claim the latest ``MAX_MISSED_RECORDS`` of ``skipped`` and ``missed`` as missed
        (each claim writes its history record); the rest are counted in the log."""
        entries = list(missed)
        total, exact = len(missed), True
        if skipped is not None:
            why = skipped.describe()
            entries += [(t, why) for t in skipped.latest]
            total += skipped.count
            exact = skipped.exact
        if not entries:
            return []
        entries = sorted(entries)[-MAX_MISSED_RECORDS:]
        if total > len(entries):
            logger.warning(
                "%s: job %r missed %s%d fires; recording the last %d",
                self.instance_id,
                job_id,
                "" if exact else "at least ",
                total,
                len(entries),
            )
        events = []
        for t, why in entries:
            record = RunRecord(
                job_id=job_id,
                scheduled_ms=datetime_to_ms(t),
                status="missed",
                instance_id=self.instance_id,
                fencing_token=term.token,
                error=why,
            )
            if await self._claim(term, job_id, t, record, None, final_rev) == CLAIMED:
                logger.warning("%s: job %r fire at %s missed: %s", self.instance_id, job_id, t, why)
                self._count("missed")
                events.append(JobExecutionEvent(EVENT_JOB_MISSED, job_id, "default", t))
        return events

    async def _claim(
        self,
        term: Term,
        job_id: str,
        t: datetime,
        missed: RunRecord | None,
        grace: float | None = None,
        final_rev: str | None = None,
    ) -> int:
        """Claim ``t`` of ``job_id`` (as ``missed`` if a record is given) in one Redis slot.

        A Redis error is retried with backoff while the term is current and, for a run
        claim, while ``t`` is within ``grace`` (then :data:`EXPIRED`); once the term is
        lost the fire is given up (logged at ERROR, left to the next leader)."""
        delay = RETRY_MIN_S
        while True:
            try:
                async with self._slots:
                    self.claiming += 1
                    try:
                        return await self._claim_once(term, job_id, t, missed, final_rev)
                    finally:
                        self.claiming -= 1
            except REDIS_UNREACHABLE as exc:
                if self._elector.settings.min_replicas:
                    await self._primaries.forget()  # on Cluster: the slot may have moved
                if not self.current(term):
                    self.stats.abandoned += 1
                    logger.error(
                        "%s: cannot claim %r at %s (%r) and leadership is gone; "
                        "not running it, the next leader decides",
                        self.instance_id,
                        job_id,
                        t,
                        exc,
                    )
                    return NOT_LEADER
                late = (datetime.now(UTC) - t).total_seconds()
                if missed is None and grace is not None and late > grace:
                    logger.warning(
                        "%s: cannot claim %r at %s (%r); grace expired, recording it missed",
                        self.instance_id,
                        job_id,
                        t,
                        exc,
                    )
                    return EXPIRED
                self.stats.claim_retries += 1
                logger.info(
                    "%s: claim of %r at %s failed (%r); retrying in %.2fs",
                    self.instance_id,
                    job_id,
                    t,
                    exc,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX_S, delay * 2)

    async def _claim_once(
        self,
        term: Term,
        job_id: str,
        t: datetime,
        missed: RunRecord | None,
        final_rev: str | None,
    ) -> int:
        keys = [
            self._lease_key,
            self._keys.last_fire(),
            self._keys.runs(),
            self._keys.paused_jobs(),
            self._keys.runtime_jobs(),
            self._keys.due_dates(),
            self._keys.job_taken(job_id),
        ]
        args: list[str | int] = [
            term.lease_value,
            job_id,
            datetime_to_ms(t),
            "missed" if missed else "run",
            missed.to_json() if missed else "",
            self._history.cap,
            "0" if final_rev is None else "1",
            final_rev or "",
            # Outlives the WAIT, so an unconfirmed claim can always be handed back.
            max(TAKEN_MARKER_MS, 3 * self._elector.settings.replica_timeout_ms),
        ]
        replicas = self._elector.settings.min_replicas
        if replicas:
            # A claim a failover can undo could run again on the next leader: count
            # it only once a replica has it (the fire is not run otherwise).
            reply, confirmed = await CLAIM_FIRE.call_replicated(
                await self._primaries.client_for(self._lease_key),
                keys,
                args,
                replicas,
                self._elector.settings.replica_timeout_ms,
            )
            # A refused claim wrote nothing to confirm: its code stands.
            if confirmed < replicas and int(reply[0]) == CLAIMED:
                self.stats.unreplicated += 1
                tries = self._unreplicated.get((job_id, t), 0)
                logger.log(
                    logging.WARNING if tries == 0 else logging.DEBUG,
                    "%s: claim of %r at %s not confirmed by %d replica(s) within %d ms "
                    "(try %d); not running it",
                    self.instance_id,
                    job_id,
                    t,
                    replicas,
                    self._elector.settings.replica_timeout_ms,
                    tries + 1,
                )
                return UNREPLICATED
        else:
            reply = await CLAIM_FIRE(self._redis, keys, args)
        code = int(reply[0])
        if code == NOT_LEADER:
            self.stats.refused_not_leader += 1
            logger.warning(
                "%s: claim of %r at %s refused: lease %d is no longer current",
                self.instance_id,
                job_id,
                t,
                term.token,
            )
        elif code == PAUSED:
            self.stats.refused_paused += 1
            logger.info("%s: %r at %s not claimed: the job is paused", self.instance_id, job_id, t)
        elif code == GONE:
            self.stats.refused_gone += 1
            logger.info(
                "%s: %r at %s not claimed: the date job is no longer pending at that time",
                self.instance_id,
                job_id,
                t,
            )
        elif code == ALREADY:
            self.stats.refused_already_claimed += 1
            logger.warning(
                "%s: %r at %s not claimed: the job's last claimed fire is %s",
                self.instance_id,
                job_id,
                t,
                ms_to_datetime(int(reply[1])).isoformat(),
            )
        else:
            self.stats.claimed += 1
        return code

    async def run_claimed(self, job: Any, t: datetime, term: Term) -> Any:
        """Run a fire claimed outside the schedule (a run-now request) and record it.

        ``job`` needs ``id``, ``func``, ``args`` and ``kwargs``."""
        return await self._start(job, t, term)

    async def record_unrun(
        self, job_id: str, t: datetime, term: Term, status: RunStatus, why: str
    ) -> None:
        """Record a claimed fire that will not run (a run request that came too late)."""
        await self._record(job_id, t, term, status, int(time.time() * 1000), why, False)

    async def _start(self, job: Any, t: datetime, term: Term) -> Any:
        """Run a claimed fire and record its outcome."""
        loop = asyncio.get_running_loop()
        ctx = JobContext(
            job_id=job.id,
            scheduled_at=t,
            fencing_token=term.token,
            instance_id=self.instance_id,
            redis=self._redis,
            lease_key=self._lease_key,
            lease_value=term.lease_value,
            loop=loop,
        )
        started = int(time.time() * 1000)
        # Not current(): a scheduler that is stopping claims nothing new, but a fire
        # claimed while its lease still held runs (stop() drains it before releasing).
        if not self.holds(term):
            hand_back = getattr(job, "hand_back", None)
            if hand_back is not None:
                # Spawned, so stop()'s drain waits for it even if this task is cancelled.
                why = "leadership lost between claim and start"
                if await self._give_back(job.id, t, hand_back, term, why):
                    return None
            await self._record(
                job.id,
                t,
                term,
                "cancelled",
                started,
                "leadership lost between claim and start",
                True,
            )
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
        key = (job.id, datetime_to_ms(t))
        self.running[key] = run
        logger.info(
            "%s: running %r (scheduled %s, token %d)", self.instance_id, job.id, t, term.token
        )
        try:
            retval = await task
        except asyncio.CancelledError:
            await self._record(
                job.id,
                t,
                term,
                "cancelled",
                started,
                "cancelled: leadership lost"
                if run.cancelled_by_revoke
                else "cancelled: scheduler stopped",
                True,
            )
            if not run.cancelled_by_revoke:
                raise
            return JobExecutionEvent(EVENT_JOB_ERROR, job.id, "default", t)
        except Exception as exc:
            logger.exception("%s: job %r (scheduled %s) raised", self.instance_id, job.id, t)
            await self._record(
                job.id,
                t,
                term,
                "error",
                started,
                f"{type(exc).__name__}: {exc}",
                ctx.lost_leadership.is_set(),
            )
            return JobExecutionEvent(
                EVENT_JOB_ERROR,
                job.id,
                "default",
                t,
                exception=exc,
                traceback=traceback.format_exc(),
            )
        finally:
            self.running.pop(key, None)
        await self._record(job.id, t, term, "ok", started, None, ctx.lost_leadership.is_set())
        return JobExecutionEvent(EVENT_JOB_EXECUTED, job.id, "default", t, retval=retval)

    async def _give_back_unreplicated(self, job: Any, t: datetime, term: Term) -> None:
        """A runtime date job's fire whose claim ``WAIT`` did not confirm is handed back,
        so it is pending again: this leader claims it anew (waiting for the replicas
        again), until it is confirmed or its grace runs out (then recorded ``missed``).
        The claims of one fire after the first back off, up to
        :data:`UNREPLICATED_BACKOFF_MAX_S` apart (the fire is back in Redis meanwhile),
        so replicas that stay behind cost about one claim and one ``WAIT`` a second. A
        hand-back that fails records the fire ``cancelled``.
        Any other job's unconfirmed fire is skipped: a recurring job's next fire comes
        as usual, and a date job defined in code does not run."""
        hand_back = getattr(job, "hand_back", None)
        if hand_back is None:
            return
        tries = self._unreplicated.pop((job.id, t), 0) + 1
        while len(self._unreplicated) >= UNREPLICATED_TRACKED_MAX:
            # The oldest first: a fire whose job was removed meanwhile is never due again.
            del self._unreplicated[next(iter(self._unreplicated))]
        self._unreplicated[job.id, t] = tries
        why = "its claim was not confirmed by the replicas (COORDINATOR_MIN_REPLICAS)"
        if not await self._give_back(job.id, t, hand_back, term, why):
            await self._record(job.id, t, term, "cancelled", int(time.time() * 1000), why, False)

    async def _give_back(
        self,
        job_id: str,
        t: datetime,
        hand_back: Callable[[str], Awaitable[bool]],
        term: Term,
        why: str,
    ) -> bool:
        """:meth:`_hand_back` in a task of its own (:meth:`spawn`), so that ``stop()``'s
        drain waits for it even if the caller is cancelled; True if the fire went back."""
        return await asyncio.shield(
            self.spawn(self._hand_back(job_id, t, hand_back, term.lease_value, why))
        )

    async def _hand_back(
        self,
        job_id: str,
        t: datetime,
        hand_back: Callable[[str], Awaitable[bool]],
        lease_value: str,
        why: str,
    ) -> bool:
        """Give back a runtime date job's claimed, unstarted fire (see
        :meth:`coordinator.scheduler.runtime.RuntimeJobs.hand_back`); True if it went
        back. ``why`` is logged. A Redis error is retried with backoff for up to
        :data:`HAND_BACK_RETRY_S` (the hand-back is idempotent), then logged at ERROR:
        the fire does not run (when a lost term was ``why``, it is then recorded
        ``cancelled``, if Redis lets it, as any other job's would be)."""
        delay = RETRY_MIN_S
        deadline = time.monotonic() + HAND_BACK_RETRY_S
        while True:
            try:
                async with self._slots:
                    back = await hand_back(lease_value)
            except REDIS_UNREACHABLE as exc:
                if time.monotonic() >= deadline:
                    logger.error(
                        "%s: %r at %s not started (%s), and the fire could not be handed "
                        "back (%r): it will not run",
                        self.instance_id,
                        job_id,
                        t,
                        why,
                        exc,
                    )
                    return False
                self.stats.claim_retries += 1
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            if back:
                self.stats.handed_back += 1
                logger.warning(
                    "%s: %r at %s not started (%s); handed the fire back",
                    self.instance_id,
                    job_id,
                    t,
                    why,
                )
            return back

    async def _record(
        self,
        job_id: str,
        t: datetime,
        term: Term,
        status: RunStatus,
        started: int,
        error: str | None,
        lost: bool,
    ) -> None:
        self._count(status)
        if status in ("ok", "error"):
            self.stats.durations.append((job_id, status, time.time() - started / 1000))
        record = RunRecord(
            job_id=job_id,
            scheduled_ms=datetime_to_ms(t),
            status=status,
            instance_id=self.instance_id,
            fencing_token=term.token,
            started_ms=started,
            finished_ms=int(time.time() * 1000),
            error=error,
            lost_leadership=lost,
        )
        await asyncio.shield(self._append(record))

    async def _append(self, record: RunRecord) -> None:
        """Write a run record in a Redis slot; a Redis error is retried a few times
        (while this process holds the term), then logged: the run already happened."""
        delay = RETRY_MIN_S
        for attempt in range(5):
            try:
                async with self._slots:
                    await self._history.append(record)
                return
            except REDIS_UNREACHABLE as exc:
                if attempt == 4 or self.term is None:
                    logger.warning(
                        "%s: could not record run of %r: %r", self.instance_id, record.job_id, exc
                    )
                    return
                self.stats.claim_retries += 1
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX_S, delay * 2)

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
        task = self._runner.submit(job, run_times)
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

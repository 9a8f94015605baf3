"""LeaderScheduler: APScheduler 3.x jobs that run on the elected leader only, once per fire.

Declare the same jobs in code on every process; start the scheduler in each.
Only the process that holds the election's lease runs them; the others keep
their APScheduler paused::

    scheduler = LeaderScheduler(settings=CoordinatorSettings())

    @scheduler.job("interval", seconds=10, id="send-digest")
    async def send_digest(ctx: JobContext) -> None:
        await mailer.send(fencing_token=ctx.fencing_token)

    await scheduler.start()   # in the FastAPI lifespan, or `coordinator worker app.jobs:scheduler`
    ...
    await scheduler.stop()

Guarantees:

- **No fire runs twice, whatever the timing.** Every fire is claimed as
  ``job id + scheduled time`` by one Lua script that also checks, inside Redis,
  that this process's lease is the current one; a paused old leader that wakes
  up, or two schedulers that overlap for a moment, cannot both claim it. The
  scheduled time comes from the trigger, so it is the same on every process.
- **The schedule survives failover.** The last fire claimed per job lives in
  Redis; a new leader continues from it (interval jobs keep their phase, cron
  jobs continue after it, a date job that already fired does not fire again).
  A fire due during the switch runs once, late, if within the job's
  ``misfire_grace_time`` (default: lease TTL + retry period, rounded up to whole
  seconds); otherwise it is recorded as ``missed``. With ``coalesce`` (the
  default) a long outage yields one run, not a storm; the skipped fires are
  recorded as ``missed`` (at most 20 records per batch).
- **On losing leadership** no new fire starts (the scheduler pauses in the same
  step, and every claim re-checks the lease). Running jobs are told
  (``ctx.lost_leadership``); async jobs are cancelled when ``cancel_on_revoke``
  is set, else they finish and their record says ``lost_leadership``.
- **Run history** (capped, ``COORDINATOR_JOB_HISTORY``) in Redis:
  :meth:`LeaderScheduler.list_runs`.

Limits:

- A claim only fences the *start* of a run. A job still running when its term
  ends (a pause, a partition) keeps running unless it checks
  ``await ctx.still_leader()`` or passes ``ctx.fencing_token`` downstream.
- Jobs must be declared with the same id and trigger on every process. The
  default id is the function's ``module.qualname``; pass ``id=`` for lambdas,
  nested functions and several jobs of one function. A ``date`` trigger needs an
  explicit ``run_date`` (its default, "now", differs between processes).
- Interval jobs that never fired take their first phase from the process that
  leads first. Cron jobs follow the scheduler's ``timezone`` (UTC by default),
  so processes in different time zones agree.
- A run killed with its process has no history record (its claim still
  stops it from running anywhere else).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo
from typing import Any, TypeVar

from apscheduler.events import EVENT_JOB_MAX_INSTANCES  # type: ignore[import-untyped]
from apscheduler.jobstores.base import JobLookupError  # type: ignore[import-untyped]
from apscheduler.schedulers.asyncio import AsyncIOScheduler  # type: ignore[import-untyped]
from apscheduler.schedulers.base import STATE_RUNNING  # type: ignore[import-untyped]
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .connection import create_redis
from .election import LeaderElector
from .errors import ConfigurationError
from .firing import (
    FencedExecutor,
    FireRunner,
    FireStats,
    JobContext,
    grace_default,
    utc_from_ms,
    wants_ctx,
)
from .once import run_once
from .runs import RunHistory, RunRecord, ms_to_iso
from .settings import CoordinatorSettings, check_name

logger = logging.getLogger("coordinator.scheduler")

F = TypeVar("F", bound=Callable[..., Any])

_EXECUTOR = "coordinator"

__all__ = ["JobContext", "LeaderScheduler"]


class LeaderScheduler:
    """An APScheduler ``AsyncIOScheduler`` that runs jobs only while this process leads.

    ``redis`` and ``elector`` are used, not owned, when passed in: the caller
    starts and stops the elector and closes the client. When omitted, the
    scheduler builds them from ``settings`` and owns them (:meth:`start` starts
    them, :meth:`stop` stops and closes them).

    With ``settings.role == "api"`` the scheduler never campaigns and never runs
    a job; jobs are still listed by :meth:`list_jobs`.
    """

    def __init__(
        self,
        redis: Redis | None = None,
        settings: CoordinatorSettings | None = None,
        *,
        elector: LeaderElector | None = None,
        timezone: tzinfo = UTC,
        cancel_on_revoke: bool = False,
    ) -> None:
        self.settings = settings or (elector.settings if elector else CoordinatorSettings())
        self._owns_redis = redis is None
        self.redis: Redis = redis if redis is not None else create_redis(self.settings.redis_url)
        self._owns_elector = elector is None
        self.elector = elector or LeaderElector(self.redis, self.settings)
        self.keys = self.elector.keys
        self.history = RunHistory(self.redis, self.keys, self.settings.job_history)
        self.cancel_on_revoke = cancel_on_revoke
        self._job_cancel: dict[str, bool] = {}
        self._declared: dict[str, Any] = {}
        self._runner = FireRunner(
            self.redis,
            self.elector,
            self.history,
            self.settings.job_claim_ttl_s * 1000,
            lambda job_id: self._job_cancel.get(job_id, self.cancel_on_revoke),
        )
        self.apscheduler = AsyncIOScheduler(
            timezone=timezone,
            executors={_EXECUTOR: FencedExecutor(self._runner)},
            job_defaults={
                "misfire_grace_time": grace_default(
                    self.settings.lease_ttl, self.settings.retry_period
                ),
                "coalesce": True,
                "max_instances": 1,
            },
        )
        self.apscheduler.add_listener(self._on_max_instances, EVENT_JOB_MAX_INSTANCES)
        self.elector.add_observer(on_elected=self._on_elected, on_revoked=self._on_revoked)
        self._started = False

    # -- declaring jobs ---------------------------------------------------------
    def add_job(
        self,
        func: Callable[..., Any],
        trigger: str | Any,
        *,
        id: str | None = None,
        name: str | None = None,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        misfire_grace_time: int | object | None = ...,
        coalesce: bool | None = None,
        max_instances: int | None = None,
        cancel_on_revoke: bool | None = None,
        replace_existing: bool = True,
        **trigger_args: Any,
    ) -> Any:
        """Register a job: ``trigger`` is ``"interval"``, ``"cron"``, ``"date"`` or a trigger.

        ``trigger_args`` go to the trigger (``seconds=10``, ``hour="*/2"``,
        ``run_date=...``). ``misfire_grace_time`` is whole seconds or ``None``
        (no limit). A job that declares a parameter named ``ctx`` receives a
        :class:`JobContext`. Returns the APScheduler ``Job``.

        Raises:
            ConfigurationError: the id is missing or invalid (ids must be the same
                on every process), or a date trigger has no ``run_date``.
        """
        job_id = id or f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', '')}"
        try:
            check_name("job id", job_id)
        except ConfigurationError:
            raise ConfigurationError(
                f"job id {job_id!r} is not valid; pass id= with 1-128 characters from "
                "letters, digits and '._:-' (the same id on every process)"
            ) from None
        if trigger == "date" and "run_date" not in trigger_args:
            raise ConfigurationError(
                f"job {job_id!r}: a date trigger needs run_date= (its default, now, differs "
                "between processes, so the fire could not be claimed once)"
            )
        if wants_ctx(func):
            # Filled with the real JobContext at each fire; APScheduler checks the
            # signature against the arguments it is given.
            kwargs = {**(kwargs or {}), "ctx": None}
        options: dict[str, Any] = {}
        if misfire_grace_time is not ...:
            options["misfire_grace_time"] = misfire_grace_time
        if coalesce is not None:
            options["coalesce"] = coalesce
        if max_instances is not None:
            options["max_instances"] = max_instances
        if cancel_on_revoke is not None:
            self._job_cancel[job_id] = cancel_on_revoke
        job = self.apscheduler.add_job(
            func, trigger, args=args, kwargs=kwargs, id=job_id, name=name or job_id,
            executor=_EXECUTOR, replace_existing=replace_existing, **options, **trigger_args,
        )  # fmt: skip
        # APScheduler drops a job once its trigger is exhausted (a date job that
        # fired); the declared list keeps it, so every process lists the same jobs.
        self._declared[job_id] = job
        return job

    def job(self, trigger: str | Any, **options: Any) -> Callable[[F], F]:
        """Decorator form of :meth:`add_job`: ``@scheduler.job("cron", minute="*/5")``."""

        def register(func: F) -> F:
            self.add_job(func, trigger, **options)
            return func

        return register

    def remove_job(self, job_id: str) -> None:
        """Remove a job from this process (declare removals on every process)."""
        self._declared.pop(job_id, None)
        self._job_cancel.pop(job_id, None)
        with contextlib.suppress(JobLookupError):
            self.apscheduler.remove_job(job_id)

    # -- lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        """Start APScheduler (paused) and, if owned and the role campaigns, the elector.

        Idempotent. If the elector already leads, the scheduler takes over at once.
        """
        if self._started:
            return
        self._started = True
        if not self.apscheduler.running:
            self.apscheduler.start(paused=True)
        if not self.settings.campaigns:
            logger.info("%s: role %r: jobs are listed, never run here",
                        self.instance_id, self.settings.role)  # fmt: skip
            return
        if self._owns_elector:
            await self.elector.start()
        elif self.elector.term is not None:
            await self._on_elected(self.elector.term.token)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop starting fires, let running ones finish (up to ``timeout`` seconds),
        then end the term (owned elector: release the lease so another process
        leads at once) and cancel what is left. Closes what the scheduler owns.
        """
        if not self._started:
            return
        self._started = False
        self._runner.accepting = False
        self._pause()
        if not await self._runner.drain(timeout):
            logger.warning("%s: jobs still running after %.1fs; telling them to stop",
                           self.instance_id, timeout)  # fmt: skip
        if self._owns_elector:
            await self.elector.stop()
        self._runner.revoke()
        if not await self._runner.drain(min(timeout, 1.0)):
            for task in list(self._runner.tasks):
                task.cancel()
            await self._runner.drain(1.0)
        if self.apscheduler.running:
            self.apscheduler.shutdown(wait=False)
        if self._owns_redis:
            await self.redis.aclose()

    async def __aenter__(self) -> LeaderScheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- state ------------------------------------------------------------------
    @property
    def instance_id(self) -> str:
        return self.settings.instance_id

    @property
    def is_leading(self) -> bool:
        """True while this process's scheduler runs jobs (local belief; claims check Redis)."""
        term = self._runner.term
        return term is not None and self._runner.current(term)

    @property
    def stats(self) -> FireStats:
        """Counters of fires claimed, refused, run, missed on this process."""
        return self._runner.stats

    async def once(
        self, name: str, fn: Callable[[], Any], *, timeout: float | None = None, **options: Any
    ) -> Any:
        """Cluster-wide run-once on this Redis; see :func:`coordinator.once.run_once`."""
        return await run_once(self.redis, self.settings, name, fn, timeout=timeout, **options)

    async def list_jobs(self) -> list[dict[str, Any]]:
        """Registered jobs, JSON-ready (``GET /api/jobs``): id, name, trigger, next and last fire.

        ``next_fire_at`` is this scheduler's own while it leads, else computed from
        the last fire recorded in Redis; ``None`` when the job will not fire again.
        """
        try:
            raw = await self.redis.hgetall(self.keys.last_fire())
        except (RedisError, OSError):
            raw = {}
        last = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in raw.items()}
        now = datetime.now(UTC)
        leading = self.is_leading and self.apscheduler.state == STATE_RUNNING
        out = []
        scheduled = {job.id: job for job in self.apscheduler.get_jobs()}
        for job_id, declared in self._declared.items():
            job = scheduled.get(job_id, declared)
            prev_ms = last.get(job.id)
            if job_id not in scheduled:
                nxt = None  # exhausted here
            elif leading:
                nxt = getattr(job, "next_run_time", None)
            else:
                prev = utc_from_ms(prev_ms) if prev_ms is not None else None
                nxt = job.trigger.get_next_fire_time(prev, now)
            out.append({
                "id": job.id,
                "name": job.name,
                "trigger": str(job.trigger),
                "func": getattr(job, "func_ref", None),
                "next_fire_at": nxt.astimezone(UTC).isoformat() if nxt else None,
                "last_fire_at": ms_to_iso(prev_ms),
                "misfire_grace_time": getattr(job, "misfire_grace_time", None),
                "coalesce": getattr(job, "coalesce", None),
                "max_instances": getattr(job, "max_instances", None),
                "cancel_on_revoke": self._job_cancel.get(job.id, self.cancel_on_revoke),
            })  # fmt: skip
        return out

    async def list_runs(self, limit: int = 50, job_id: str | None = None) -> list[dict[str, Any]]:
        """Recent runs, newest first, JSON-ready (``GET /api/jobs/runs?limit=N``)."""
        return [r.as_dict() for r in await self.history.recent(limit, job_id)]

    async def recent_runs(self, limit: int = 50, job_id: str | None = None) -> list[RunRecord]:
        """Recent runs as :class:`~coordinator.runs.RunRecord` objects, newest first."""
        return await self.history.recent(limit, job_id)

    # -- election hooks ---------------------------------------------------------
    async def _on_elected(self, token: int) -> None:
        term = self.elector.term
        if not self._started or not self.settings.campaigns or term is None:
            return
        last_seen = await self._continue_schedule()
        self._runner.begin(term, last_seen)
        if self.apscheduler.running:
            self.apscheduler.resume()
        logger.info("%s: scheduler leading (token %d)", self.instance_id, token)

    async def _continue_schedule(self) -> dict[str, datetime | None]:
        """Set each job's next fire from the last fire recorded in Redis."""
        try:
            async with asyncio.timeout(max(0.2, self.settings.retry_period)):
                raw = await self.redis.hgetall(self.keys.last_fire())
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning("%s: cannot read last fires (%s); scheduling from now",
                           self.instance_id, exc)  # fmt: skip
            raw = {}
        last = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in raw.items()}
        now = datetime.now(UTC)
        seen: dict[str, datetime | None] = {}
        for job in self.apscheduler.get_jobs():
            prev = utc_from_ms(last[job.id]) if job.id in last else None
            seen[job.id] = prev
            job.modify(next_run_time=job.trigger.get_next_fire_time(prev, now))
        return seen

    async def _on_revoked(self, reason: str) -> None:
        self._pause()
        self._runner.revoke()
        logger.info("%s: scheduler paused: %s", self.instance_id, reason)

    def _pause(self) -> None:
        if self.apscheduler.running:
            self.apscheduler.pause()

    def _on_max_instances(self, event: Any) -> None:
        why = "the previous run was still going (max_instances reached)"
        missed = [(t, why) for t in event.scheduled_run_times]
        if missed:
            self._runner.last_seen[event.job_id] = max(t for t, _ in missed)
        self._runner.spawn(self._runner.record_missed(event.job_id, missed))

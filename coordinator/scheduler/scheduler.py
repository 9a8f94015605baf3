"""LeaderScheduler: APScheduler 3.x jobs that run on the elected leader only, once per fire.

Declare the same jobs in code on every process; start the scheduler in each.
Only the process that holds the election's lease runs them; the others keep
their APScheduler paused::

    scheduler = LeaderScheduler(settings=CoordinatorSettings())

    @scheduler.job("interval", seconds=10, id="send-digest")
    async def send_digest(ctx: JobContext) -> None:
        await mailer.send(fencing_token=ctx.fencing_token)

    await scheduler.start()  # in a FastAPI lifespan, or `coordinator worker MODULE:ATTR`
    ...
    await scheduler.stop()

Guarantees:

- **No fire runs twice, whatever the timing.** Every fire is claimed as
  ``job id + scheduled time`` by one Lua script that also checks, inside Redis,
  that this process's lease is the current one; a paused old leader that wakes
  up, or two schedulers that overlap for a moment, cannot both claim it. The
  scheduled time comes from the trigger, so it is the same on every process.
  A job's claims must come in increasing scheduled time: Redis keeps one field
  per job (its last claimed fire), not one key per fire; see
  :mod:`coordinator.scheduler.firing` for what that ordering costs.
- **The schedule survives failover.** The last fire claimed per job lives in
  Redis; a new leader continues from it (interval jobs keep their phase, cron
  jobs continue after it, a date job that already fired does not fire again).
  A fire due during the switch runs once, late, if within the job's
  ``misfire_grace_time`` (default: lease TTL + retry period, rounded up to whole
  seconds); otherwise it is recorded as ``missed``. With ``coalesce`` (the
  default) a long outage yields one run, not a storm; the skipped fires are
  recorded as ``missed`` (the latest 20, each saying how many were skipped),
  and finding them takes bounded work on the event loop
  (:mod:`coordinator.scheduler.catchup`).
- **On losing leadership** no new fire starts (the scheduler pauses in the same
  step, and every claim re-checks the lease). Running jobs are told
  (``ctx.lost_leadership``); async jobs are cancelled when ``cancel_on_revoke``
  is set, else they finish and their record says ``lost_leadership``.
- **Run history** (capped, ``COORDINATOR_JOB_HISTORY``) in Redis:
  :meth:`LeaderScheduler.list_runs`.
- **Runtime jobs** (:attr:`LeaderScheduler.runtime`,
  :mod:`coordinator.scheduler.runtime`): added, paused, resumed, run now and
  removed from any process, stored in Redis, applied by the leader at once and
  reloaded by every new leader; pause and resume work for code-declared jobs too.

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
- A fire claimed just before its leader is paused past its lease runs nowhere:
  the leader wakes up to a term that is over and records the fire
  ``cancelled`` ("leadership lost between claim and start"). A runtime date
  job's fire is the exception: it is handed back, and the next leader runs it
  within its grace or records it ``missed`` (unless the id changed meanwhile, or
  the leader woke after a minute; a recurring job's claim record only moves
  forward, so its fire cannot be handed back). A graceful stop runs the fires it
  already claimed (``stop()`` drains them before releasing).
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

from coordinator.clock import ms_to_datetime, ms_to_iso
from coordinator.election.elector import LeaderElector
from coordinator.errors import REDIS_UNREACHABLE, ConfigurationError
from coordinator.scheduler.catchup import CatchUpJobStore
from coordinator.scheduler.context import JobContext, wants_ctx
from coordinator.scheduler.firing import (
    MAX_MISSED_RECORDS,
    FencedExecutor,
    FireRunner,
    FireStats,
    grace_default,
)
from coordinator.scheduler.follower import RuntimeFollower
from coordinator.scheduler.once import run_once
from coordinator.scheduler.runs import RunHistory, RunRecord
from coordinator.scheduler.runtime import (
    MAX_ARGS_BYTES,
    MAX_RUNTIME_JOBS,
    RuntimeJobs,
    TaskRegistry,
)
from coordinator.settings import CoordinatorSettings, check_name
from coordinator.store.codec import text
from coordinator.store.connection import (
    RedisClient,
    check_client_matches,
    create_client,
)

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
    a job; jobs are still listed by :meth:`list_jobs`, and runtime jobs can be
    managed through :attr:`runtime` (the leader applies the changes).

    ``redis`` may be a ``RedisCluster`` from :func:`coordinator.create_client` when
    ``settings.redis_url`` names that cluster (a mismatch is a ``ConfigurationError``):
    every scheduler key is in the namespace's slot, and with ``min_replicas`` claims
    and their ``WAIT`` go to that slot's primary.

    ``max_runtime_jobs`` and ``max_runtime_args_bytes`` bound what callers can store
    (:class:`~coordinator.errors.JobLimitError`,
    :class:`~coordinator.errors.JobArgumentsTooLargeError`).
    """

    executor_name = _EXECUTOR

    def __init__(
        self,
        redis: RedisClient | None = None,
        settings: CoordinatorSettings | None = None,
        *,
        elector: LeaderElector | None = None,
        timezone: tzinfo = UTC,
        cancel_on_revoke: bool = False,
        max_runtime_jobs: int = MAX_RUNTIME_JOBS,
        max_runtime_args_bytes: int = MAX_ARGS_BYTES,
    ) -> None:
        self.settings = settings or (elector.settings if elector else CoordinatorSettings())
        self._owns_redis = redis is None
        if redis is not None:
            check_client_matches("LeaderScheduler", redis, self.settings.redis_url)
        self.redis: RedisClient = (
            redis if redis is not None else create_client(self.settings.redis_url)
        )
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
            lambda job_id: self._job_cancel.get(job_id, self.cancel_on_revoke),
        )
        self._jobstore = CatchUpJobStore(self._runner.add_skipped, MAX_MISSED_RECORDS)
        self.tasks = TaskRegistry()
        """Functions runtime jobs may name (:meth:`task`)."""
        self.runtime = RuntimeJobs(
            self.redis,
            self.keys,
            self.tasks,
            lambda: self._declared,
            grace_default(self.settings.lease_ttl, self.settings.retry_period),
            max_runtime_jobs=max_runtime_jobs,
            max_args_bytes=max_runtime_args_bytes,
        )
        """Runtime jobs: ``add_job``, ``remove_job``, ``pause_job``, ``resume_job``,
        ``run_job_now``, ``get_job``, ``list_jobs``, awaitable from any process."""
        self.runtime.list_all = self.list_jobs
        self._follower = RuntimeFollower(self)
        self.apscheduler = AsyncIOScheduler(
            timezone=timezone,
            jobstores={"default": self._jobstore},
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
            func,
            trigger,
            args=args,
            kwargs=kwargs,
            id=job_id,
            name=name or job_id,
            executor=_EXECUTOR,
            replace_existing=replace_existing,
            **options,
            **trigger_args,
        )
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

    def task(self, name: str) -> Callable[[F], F]:
        """Register a function that runtime jobs may name: ``@scheduler.task("remind")``.

        Register the same name on every process (the leader runs it). A task that
        declares a parameter named ``ctx`` receives a :class:`JobContext`; the others
        take the job's JSON ``args`` and ``kwargs``.
        """
        return self.tasks.task(name)

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
            logger.info(
                "%s: role %r: jobs are listed, never run here", self.instance_id, self.settings.role
            )
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
        await self._follower.stop()
        if not await self._runner.drain(timeout):
            logger.warning(
                "%s: jobs still running after %.1fs; telling them to stop",
                self.instance_id,
                timeout,
            )
        if self._owns_elector:
            await self.elector.stop()
        self._runner.revoke()
        if not await self._runner.drain(min(timeout, 1.0)):
            for task in list(self._runner.tasks):
                task.cancel()
            await self._runner.drain(1.0)
        if self.apscheduler.running:
            self.apscheduler.shutdown(wait=False)
        await self._runner.aclose()
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
        """Cluster-wide run-once on this Redis; see :func:`coordinator.scheduler.once.run_once`."""
        return await run_once(self.redis, self.settings, name, fn, timeout=timeout, **options)

    async def list_jobs(self) -> list[dict[str, Any]]:
        """Every job, JSON-ready (``GET /api/jobs``): code-declared ones (``source``
        ``"code"``) then runtime ones (``"runtime"``), each with ``id``, ``task``,
        ``trigger``, ``next_fire_at``, ``last_fire_at`` and ``paused``.

        ``next_fire_at`` is this scheduler's own while it leads, else computed from
        the last fire recorded in Redis; ``None`` when the job will not fire again
        or is paused. Without Redis, code-declared jobs only.
        """
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.keys.last_fire())
                pipe.smembers(self.keys.paused_jobs())
                raw, raw_paused = await pipe.execute()
        except REDIS_UNREACHABLE:
            raw, raw_paused = {}, None
        last = {text(k): int(v) for k, v in raw.items()}
        paused = {text(m) for m in raw_paused or ()}
        now = datetime.now(UTC)
        leading = self.is_leading and self.apscheduler.state == STATE_RUNNING
        out = []
        scheduled = {job.id: job for job in self.apscheduler.get_jobs()}
        for job_id, declared in self._declared.items():
            job = scheduled.get(job_id, declared)
            prev_ms = last.get(job.id)
            if job_id not in scheduled or job_id in paused:
                nxt = None  # exhausted here, or paused
            elif leading:
                nxt = getattr(job, "next_run_time", None)
            else:
                prev = ms_to_datetime(prev_ms) if prev_ms is not None else None
                nxt = job.trigger.get_next_fire_time(prev, now)
            out.append(
                {
                    "id": job.id,
                    "name": job.name,
                    "task": getattr(job, "func_ref", None),
                    "trigger": str(job.trigger),
                    "func": getattr(job, "func_ref", None),
                    "next_fire_at": nxt.astimezone(UTC).isoformat() if nxt else None,
                    "last_fire_at": ms_to_iso(prev_ms),
                    "misfire_grace_time": getattr(job, "misfire_grace_time", None),
                    "coalesce": getattr(job, "coalesce", None),
                    "max_instances": getattr(job, "max_instances", None),
                    "cancel_on_revoke": self._job_cancel.get(job.id, self.cancel_on_revoke),
                    "paused": job_id in paused,
                    "source": "code",
                }
            )
        if raw_paused is not None:
            with contextlib.suppress(*REDIS_UNREACHABLE):
                runtime = await self.runtime.runtime_entries(paused, last)
                if leading:
                    for entry in runtime:
                        held = scheduled.get(entry["id"])
                        nxt = getattr(held, "next_run_time", None) if held else None
                        if nxt is not None:
                            entry["next_fire_at"] = nxt.astimezone(UTC).isoformat()
                out += runtime
        return out

    async def list_runs(self, limit: int = 50, job_id: str | None = None) -> list[dict[str, Any]]:
        """Recent runs, newest first, JSON-ready (``GET /api/jobs/runs?limit=N``)."""
        return [r.as_dict() for r in await self.history.recent(limit, job_id)]

    async def recent_runs(self, limit: int = 50, job_id: str | None = None) -> list[RunRecord]:
        """Recent runs as :class:`~coordinator.scheduler.runs.RunRecord` objects, newest first."""
        return await self.history.recent(limit, job_id)

    # -- election hooks ---------------------------------------------------------
    async def _on_elected(self, token: int) -> None:
        term = self.elector.term
        if not self._started or not self.settings.campaigns or term is None:
            return
        self._jobstore.forget()
        self._runner.begin(term)
        # Runtime jobs and pauses load in the background (the elector waits for this
        # callback); give the first reconcile as long as reading last fires may take.
        self._follower.start(term)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.2, self.settings.retry_period)):
                await self._follower.subscribed.wait()
        await self._continue_schedule()
        if self.apscheduler.running:
            self.apscheduler.resume()
        logger.info("%s: scheduler leading (token %d)", self.instance_id, token)

    async def _continue_schedule(self) -> None:
        """Set each job's next fire from the last fire recorded in Redis (a fire long
        past when the job was idle for long: the job store catches it up)."""
        try:
            async with asyncio.timeout(max(0.2, self.settings.retry_period)):
                raw = await self.redis.hgetall(self.keys.last_fire())
        except REDIS_UNREACHABLE as exc:
            logger.warning(
                "%s: cannot read last fires (%s); scheduling from now", self.instance_id, exc
            )
            raw = {}
        last = {text(k): int(v) for k, v in raw.items()}
        now = datetime.now(UTC)
        paused = self._follower.paused
        for job in self.apscheduler.get_jobs():
            if job.id in paused:
                job.modify(next_run_time=None)
                continue
            prev = ms_to_datetime(last[job.id]) if job.id in last else None
            nxt = job.trigger.get_next_fire_time(prev, now)
            if nxt is None:  # a date job that fired already
                self.apscheduler.remove_job(job.id)
            else:
                job.modify(next_run_time=nxt)

    async def _on_revoked(self, reason: str) -> None:
        self._pause()
        self._follower.stop_nowait()
        self._runner.revoke()
        logger.info("%s: scheduler paused: %s", self.instance_id, reason)

    def _pause(self) -> None:
        if self.apscheduler.running:
            self.apscheduler.pause()

    def _on_max_instances(self, event: Any) -> None:
        why = "the previous run was still going (max_instances reached)"
        self._runner.submit_missed(event.job_id, list(event.scheduled_run_times), why)

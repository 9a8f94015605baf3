"""The leader's side of runtime jobs: apply every change at once, reload everything on election.

While a process leads, :class:`RuntimeFollower` holds one Pub/Sub subscription
to the namespace's job-change channel. Each time it (re)subscribes it
reconciles in full: every recurring runtime definition, every pause and every
pending run request is read from Redis and applied to APScheduler; date jobs
are read from their due-dates index only as they come due
(:mod:`coordinator.scheduler.due`). Then it applies notices as they come
(``job:<id>``: read that job again; ``run:<request>``: claim the request and
run it), in batches, in the order they arrived, and reads the due-dates index
between them, in the same task (so a read never overwrites a newer notice).

Guarantees:

- A change stored while the follower is subscribed is applied within the time
  of one Pub/Sub message and one Redis read. A change stored while it is not
  (no leader, a dropped connection) is applied by the full reconcile that
  follows every subscribe, so none is lost.
- Safety does not depend on any of this being quick: a paused job's fire, a
  removed job's fire and a run request are all refused or claimed inside Redis.

Limits, said plainly:

- Loading is O(recurring runtime jobs) on the event loop, in slices that
  yield between them; the leader serves and renews its lease meanwhile, and
  fires of jobs not loaded yet wait until they are (then follow the misfire
  and coalesce rules). Pending date jobs are not loaded at all.
- Data written before the due-dates index existed is indexed by the first
  leader of this version (one pass over every definition, each indexed only
  if unchanged since read; then the index's version key is set). A definition
  written later by a process of an older version (a rolling update) is indexed
  when its notice arrives; one whose notice was missed waits for a leader that
  runs the pass again (delete the version key to ask for one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from apscheduler.jobstores.base import JobLookupError as APJobLookupError  # type: ignore[import-untyped]
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped]
from redis.backoff import FullJitterBackoff

from coordinator.clock import datetime_to_ms, ms_to_datetime
from coordinator.election.elector import Term
from coordinator.errors import REDIS_UNREACHABLE, CoordinatorError
from coordinator.scheduler.context import wants_ctx
from coordinator.scheduler.due import DueDates, missing_task, parse_job, runnable
from coordinator.scheduler.runtime import RuntimeJob
from coordinator.scheduler.triggers import build_trigger, is_final
from coordinator.store.codec import text
from coordinator.store.connection import ready_for_pubsub, recover_topology
from coordinator.store.scripts import CLAIM_RUN, JOBS_INDEX
from coordinator.tasks import cancel_and_wait, report_end

if TYPE_CHECKING:
    from coordinator.scheduler.scheduler import LeaderScheduler

logger = logging.getLogger("coordinator.scheduler")

INDEX_VERSION = "1"
"""Value of the index's version key once a namespace's definitions are indexed."""
SLICE = 500
"""Jobs applied between two yields to the event loop."""


def resume_at(job: Any, last_ms: int | None, now: datetime) -> datetime | None:
    """Where a resumed job fires next: its next scheduled time at or after now. An
    interval job keeps its phase (counted from its last fire when there is one)."""
    trigger = job.trigger
    if isinstance(trigger, IntervalTrigger) and last_ms is not None:
        step = trigger.interval.total_seconds()
        last = ms_to_datetime(last_ms)
        k = max(1, math.ceil((now - last).total_seconds() / step))
        at: datetime = last + timedelta(seconds=k * step)
        if trigger.end_date is not None and at > trigger.end_date:
            return None
        return at
    nxt: datetime | None = trigger.get_next_fire_time(None, now)
    return nxt


class RuntimeFollower:
    """Applies runtime jobs and pauses to one :class:`LeaderScheduler` while it leads."""

    def __init__(self, scheduler: LeaderScheduler) -> None:
        self._scheduler = scheduler
        self._redis = scheduler.redis
        self._keys = scheduler.keys
        self._runtime = scheduler.runtime
        self.applied: dict[str, str] = {}
        """Recurring runtime job id -> revision, as held in APScheduler."""
        self.due = DueDates(
            self._redis,
            self._keys,
            scheduler._runner,
            self._runtime.tasks,
            self._runtime.default_grace,
            self._runtime.hand_back,
        )
        """Runtime date jobs due within the next seconds, with their timers."""
        self.paused: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        """Tasks of ended terms, cancelled and not yet ended."""
        self.subscribed = asyncio.Event()
        self.reconciles = 0
        self.indexed = 0
        """Definitions stored before the due-dates index that this process indexed."""

    # -- lifecycle ------------------------------------------------------------------
    def start(self, term: Term) -> None:
        """Follow changes for ``term`` (called on election)."""
        self.stop_nowait()
        self.subscribed = asyncio.Event()
        self._task = asyncio.create_task(self._follow(term), name="runtime-jobs")

    def stop_nowait(self) -> None:
        """Stop following now (the term ended). The task is cancelled, and kept until it
        has ended: :meth:`stop` waits for it, so it never outlives the scheduler (nor
        meets its Redis client closed), and how it ended is logged, never lost."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            self._stopping.add(task)
            task.add_done_callback(self._ended)
        self.due.clear()

    async def stop(self) -> None:
        """Stop following and wait until every follower task, this term's and any
        stopped before, has ended."""
        task, self._task = self._task, None
        self.due.clear()
        await cancel_and_wait(task, name="runtime-jobs")
        stopping, self._stopping = self._stopping, set()
        for old in stopping:
            await cancel_and_wait(old, name="runtime-jobs")

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task in self._stopping:  # else stop() waited for it and reported how it ended
            self._stopping.discard(task)
            report_end(task, "runtime-jobs")

    async def _follow(self, term: Term) -> None:
        backoff = FullJitterBackoff(cap=2.0, base=0.05)
        failures = 0
        who = self._scheduler.instance_id
        while self._scheduler._runner.holds(term):
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await ready_for_pubsub(self._redis)
                await pubsub.subscribe(self._keys.job_changes())
                await self.reconcile(term)
                self.subscribed.set()
                failures = 0
                next_poll = 0.0
                while self._scheduler._runner.holds(term):  # also if a cancel got lost
                    wait = min(5.0, max(0.0, next_poll - time.monotonic()))
                    message = await pubsub.get_message(timeout=wait)
                    batch = [] if message is None else [text(message["data"])]
                    while len(batch) < 1000:
                        more = await pubsub.get_message(timeout=0)
                        if more is None:
                            break
                        batch.append(text(more["data"]))
                    if batch:
                        await self._apply_notices(term, batch)
                    if time.monotonic() >= next_poll:
                        next_poll = time.monotonic() + await self.due.poll()
            except REDIS_UNREACHABLE as exc:
                self.subscribed.clear()
                logger.warning("%s: runtime job notices: %s; resubscribing", who, exc)
                await asyncio.sleep(backoff.compute(min(failures, 16)))
                failures += 1
                await recover_topology(self._redis)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]

    # -- applying -------------------------------------------------------------------
    async def reconcile(self, term: Term) -> None:
        """Read every recurring definition, pause and run request from Redis and apply
        them; date jobs are read from the due-dates index next (see module doc)."""
        keys = self._keys
        await self._index_unindexed()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.smembers(keys.recurring_jobs())
            pipe.smembers(keys.paused_jobs())
            pipe.hgetall(keys.last_fire())
            pipe.hkeys(keys.run_requests())
            raw_ids, raw_paused, raw_last, requests = await pipe.execute()
        ids = [text(m) for m in raw_ids]
        raws = await self._redis.hmget(keys.runtime_jobs(), ids) if ids else []
        self.paused = {text(m) for m in raw_paused}
        last = {text(k): int(v) for k, v in raw_last.items()}
        now = datetime.now(UTC)
        wanted: dict[str, RuntimeJob] = {}
        for i, raw in enumerate(raws):
            job = parse_job(raw) if raw is not None else None
            if job is not None and job.due_ms is None:
                wanted[job.id] = job
            if i % (SLICE * 4) == 0:
                await asyncio.sleep(0)
        for job_id in list(self.applied):
            if job_id not in wanted:
                self._drop(job_id)
        for i, job in enumerate(wanted.values()):
            self._apply(job, job.id in self.paused, last.get(job.id), now)
            if i % SLICE == SLICE - 1:
                await asyncio.sleep(0)
        for job_id in self._scheduler._declared:
            self._apply_pause(job_id, job_id in self.paused, last.get(job_id), now)
        self.due.clear()  # changes missed while unsubscribed: read the index afresh
        self.reconciles += 1
        logger.info(
            "%s: runtime jobs loaded: %d recurring (%d paused jobs, %d run requests)",
            self._scheduler.instance_id,
            len(wanted),
            len(self.paused),
            len(requests),
        )
        for request_id in requests:
            await self._run_request(term, text(request_id))

    async def _index_unindexed(self) -> None:
        """Index every definition stored before the due-dates index (see module doc),
        once per namespace: the pass ends by setting the index's version key."""
        keys = self._keys
        if await self._redis.exists(keys.jobs_index()):
            return
        count = 0
        async for raw_id, raw in self._redis.hscan_iter(keys.runtime_jobs(), count=1000):
            count += await self._index_one(text(raw_id), raw) is not None
        await self._redis.set(keys.jobs_index(), INDEX_VERSION)
        self.indexed += count
        logger.info(
            "%s: indexed %d runtime jobs stored before the due-dates index",
            self._scheduler.instance_id,
            count,
        )

    async def _index_one(self, job_id: str, raw: bytes) -> RuntimeJob | None:
        """Index one definition written without ``due_ms`` (before the index, or by a
        process of an older version during a rolling update); returns it as now stored,
        or ``None`` when it needs no indexing (or changed meanwhile: its change did)."""
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(data, dict) or "due_ms" in data:
            return None
        job = parse_job(raw)
        if job is None:
            return None
        due_ms = None
        if is_final(job.trigger):
            with contextlib.suppress(CoordinatorError):
                due_ms = datetime_to_ms(build_trigger(job.trigger).run_date)
            if due_ms is None:
                return None  # a trigger this version rejects: listed, never fired
        new = dataclasses.replace(job, due_ms=due_ms)
        keys = self._keys
        index_keys = [
            keys.runtime_jobs(),
            keys.paused_jobs(),
            keys.due_dates(),
            keys.recurring_jobs(),
        ]
        args: list[str | bytes] = [
            job_id,
            raw,
            new.to_json(),
            "" if due_ms is None else str(due_ms),
        ]
        return new if await JOBS_INDEX(self._redis, index_keys, args) else None

    async def _apply_notices(self, term: Term, notices: list[str]) -> None:
        ids: list[str] = []
        runs: list[str] = []
        for notice in notices:
            kind, _, value = notice.partition(":")
            if kind == "job" and value not in ids:
                ids.append(value)
            elif kind == "run":
                runs.append(value)
        if ids:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hmget(self._keys.runtime_jobs(), ids)
                pipe.smismember(self._keys.paused_jobs(), ids)
                pipe.hmget(self._keys.last_fire(), ids)
                raws, paused, lasts = await pipe.execute()
            now = datetime.now(UTC)
            for job_id, raw, is_paused, last in zip(ids, raws, paused, lasts, strict=True):
                last_ms = int(last) if last is not None else None
                if is_paused:
                    self.paused.add(job_id)
                else:
                    self.paused.discard(job_id)
                job = parse_job(raw) if raw is not None else None
                if raw is not None and (indexed := await self._index_one(job_id, raw)):
                    job = indexed  # written by an older version: indexed now
                self.due.update(job_id, job, bool(is_paused))
                if job is not None and job.due_ms is None:
                    self._apply(job, bool(is_paused), last_ms, now)
                elif job_id in self.applied:
                    self._drop(job_id)
                elif job is None:
                    self._apply_pause(job_id, bool(is_paused), last_ms, now)
        for request_id in runs:
            await self._run_request(term, request_id)

    def _apply(self, job: RuntimeJob, paused: bool, last_ms: int | None, now: datetime) -> None:
        """Hold a recurring runtime job in APScheduler (date jobs: :class:`DueDates`)."""
        aps = self._scheduler.apscheduler
        if self.applied.get(job.id) == job.rev and aps.get_job(job.id) is not None:
            self._apply_pause(job.id, paused, last_ms, now)
            return
        try:
            func = self._runtime.tasks.get(job.task)
            trigger = build_trigger(job.trigger)
        except CoordinatorError as exc:
            func, trigger = missing_task(job.task, str(exc)), build_trigger(job.trigger)
        prev = ms_to_datetime(last_ms) if last_ms is not None else None
        nxt = None if paused else trigger.get_next_fire_time(prev, now)
        if nxt is None and not paused:
            self._drop(job.id)  # past its end_date
            return
        kwargs = dict(job.kwargs)
        if wants_ctx(func):
            kwargs["ctx"] = None
        options: dict[str, Any] = {"coalesce": job.coalesce}
        if job.misfire_grace_time is not None:
            options["misfire_grace_time"] = job.misfire_grace_time
        aps.add_job(
            func,
            trigger,
            args=job.args,
            kwargs=kwargs,
            id=job.id,
            name=job.id,
            executor=self._scheduler.executor_name,
            replace_existing=True,
            next_run_time=nxt,
            **options,
        )
        self.applied[job.id] = job.rev

    def _apply_pause(self, job_id: str, paused: bool, last_ms: int | None, now: datetime) -> None:
        job = self._scheduler.apscheduler.get_job(job_id)
        if job is None:
            return
        if paused and job.next_run_time is not None:
            job.pause()
        elif not paused and job.next_run_time is None:
            job.modify(next_run_time=resume_at(job, last_ms, now))

    def _drop(self, job_id: str) -> None:
        self.applied.pop(job_id, None)
        with contextlib.suppress(APJobLookupError):
            self._scheduler.apscheduler.remove_job(job_id)

    # -- run now --------------------------------------------------------------------
    async def _run_request(self, term: Term, request_id: str) -> None:
        runner = self._scheduler._runner
        if not runner.current(term):
            return
        keys = [self._keys.lease(self._scheduler.elector.name), self._keys.run_requests()]
        try:
            reply = await CLAIM_RUN(self._redis, keys, [term.lease_value, request_id])
        except REDIS_UNREACHABLE as exc:
            logger.warning("%s: cannot claim run %s: %s", runner.instance_id, request_id, exc)
            return
        if int(reply[0]) != 1:
            return
        request = json.loads(reply[1])
        job_id = str(request["job_id"])
        at = ms_to_datetime(int(request["scheduled_ms"]))
        job = await self._job_for_run(job_id)
        grace = getattr(job, "misfire_grace_time", None) or self._runtime.default_grace
        late = (datetime.now(UTC) - at).total_seconds()
        if job is None:
            runner.spawn(runner.record_unrun(job_id, at, term, "missed", "the job was removed"))
        elif late > grace:
            why = f"run now waited {late:.3f}s for a leader, over misfire_grace_time={grace}s"
            runner.spawn(runner.record_unrun(job_id, at, term, "missed", why))
        else:
            runner.spawn(runner.run_claimed(job, at, term))

    async def _job_for_run(self, job_id: str) -> Any:
        """The function and arguments to run ``job_id`` with, or None if it is gone."""
        declared = self._scheduler._declared.get(job_id)
        if declared is not None:
            return declared
        held = self._scheduler.apscheduler.get_job(job_id)
        if held is not None:
            return held
        job = await self._runtime.definition(job_id)
        if job is None:
            return None
        return runnable(job, self._runtime.tasks, self._runtime.default_grace)

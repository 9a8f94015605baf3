"""Runtime jobs: added, paused, resumed, run and removed from any process, kept in Redis.

A job declared in code exists because every process declares it. A *runtime*
job exists because some process added it while serving a request ("remind this
user at 9:00"): its definition names a *task* (a function registered by name
on every process with ``@coordinator.task("remind")``) and carries JSON
``args``/``kwargs``. Nothing is pickled, and no import path ever comes from a
caller::

    @coordinator.task("remind")
    async def remind(message: str, ctx: JobContext) -> None: ...

    await coordinator.jobs.add_job("remind", {"type": "date", "run_date": "2026-11-23T18:00:00Z"},
                                   id="reminder-42", kwargs={"message": "hi"})

Guarantees:

- **A change is durable before the call returns.** One script stores it in
  Redis and publishes a notice; the leader applies it within milliseconds
  (:mod:`coordinator.scheduler.follower`), and a new leader loads every
  recurring definition and pause when it is elected and reads date jobs from
  their index as they come due (:mod:`coordinator.scheduler.due`), so nothing
  is lost across a failover or a restart of every process.
- **Every fire is claimed once**, by the same claim script as a code-declared
  job's, which also refuses the fires of a paused job (the pause holds from the
  moment it is stored, whatever the leader has heard) and, for a date job,
  removes the definition in the same step: a date job that fired, or was
  recorded ``missed``, leaves the job list.
- **Run now** stores a request; the leader claims it by taking it (its own
  record, never the job's last-fire field, so it cannot hold back a scheduled
  fire) and runs the job once, recorded in the run history like any run. It
  runs even while the job is paused.
- Pause and resume work for code-declared jobs too, and are persisted.

Limits, said plainly:

- A task must be registered under the same name on every process that may
  lead; a leader that lacks it records the job's fires as ``error``.
- A ``run_date`` in the past by at most the job's misfire grace time runs at
  once; older is refused (``InvalidJobError`` on ``trigger.run_date``, HTTP 422).
- A run-now request that waits longer than the job's misfire grace time for a
  leader is recorded ``missed``. A run-now does not count against
  ``max_instances``: it may overlap a scheduled run of the same job.
- Reusing the id of a removed *recurring* job continues from that id's last
  fire: a fire at or before it is never claimed again (the claim record
  outlives the job). A date job is claimed through its pending entry instead,
  so an id reused for a new date job fires again, once.
- Pending date jobs cost the leader nothing until their last seconds: they
  wait in a Redis sorted set, and the leader holds only those due within
  :data:`coordinator.scheduler.due.LOOKAHEAD_S` (see that module). Recurring
  runtime jobs are held by the leader, all of them.
- ``list_jobs`` reads every definition: with 100,000 runtime jobs it is a
  large answer.
"""

from __future__ import annotations

import inspect
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from coordinator.clock import datetime_to_ms, ms_to_datetime, ms_to_iso
from coordinator.errors import (
    ConflictingIdError,
    DeclaredJobError,
    InvalidJobError,
    JobArgumentsTooLargeError,
    JobLimitError,
    JobLookupError,
    TaskLookupError,
)
from coordinator.scheduler.context import wants_ctx
from coordinator.scheduler.triggers import build_trigger, is_final, normalize_trigger
from coordinator.settings import name_error
from coordinator.store.codec import text
from coordinator.store.connection import RedisClient
from coordinator.store.keys import Keys
from coordinator.store.scripts import JOB_CHANGE

F = TypeVar("F", bound=Callable[..., Any])

MAX_RUNTIME_JOBS = 1_000_000
"""Default most runtime jobs one namespace may hold."""
MAX_ARGS_BYTES = 16 * 1024
"""Default most bytes of a runtime job's ``args`` and ``kwargs``, as JSON."""
RESERVED_IDS = frozenset({"runs"})
"""Ids a runtime job cannot take (``GET /api/jobs/runs`` is the run history)."""


@dataclass(frozen=True)
class RuntimeJob:
    """A runtime job's stored definition (the value in the ``runtime_jobs`` hash)."""

    id: str
    task: str
    trigger: dict[str, Any]
    """The normalized trigger (:func:`coordinator.scheduler.triggers.normalize_trigger`)."""
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    misfire_grace_time: int | None = None
    """Seconds; ``None``: the scheduler's default."""
    coalesce: bool = True
    created_ms: int = 0
    rev: str = ""
    """Changes with every add or replace, so the leader knows a definition changed."""
    due_ms: int | None = None
    """A date job's ``run_date`` in epoch ms (its entry in the due-dates index);
    ``None`` for a recurring job."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> RuntimeJob:
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class TaskRegistry:
    """Functions runtime jobs may name, by task name (register the same on every process)."""

    def __init__(self) -> None:
        self._tasks: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, func: Callable[..., Any]) -> None:
        """Register ``func`` as ``name``; raises ``InvalidJobError`` for a bad name."""
        problem = name_error("task name", name)
        if problem is not None:
            raise InvalidJobError("task", problem)
        self._tasks[name] = func

    def task(self, name: str) -> Callable[[F], F]:
        """Decorator: ``@scheduler.task("remind")``."""

        def register(func: F) -> F:
            self.register(name, func)
            return func

        return register

    def get(self, name: str) -> Callable[..., Any]:
        """The task registered as ``name``; raises :class:`TaskLookupError`."""
        try:
            return self._tasks[name]
        except KeyError:
            raise TaskLookupError(name, list(self._tasks)) from None

    def names(self) -> list[str]:
        return sorted(self._tasks)


CodeJobs = Callable[[], Mapping[str, Any]]
"""Returns this process's code-declared APScheduler jobs by id."""
Lister = Callable[[], Any]


class RuntimeJobs:
    """The runtime job API; every method works from any process (the ``api`` role too).

    ``redis`` is used, not owned. ``code_jobs`` gives the jobs this process
    declares in code; ``list_all`` (set by the scheduler) lists code and runtime
    jobs together. Every method raises ``redis`` errors when Redis is unreachable.
    """

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        tasks: TaskRegistry,
        code_jobs: CodeJobs,
        default_grace: int,
        *,
        max_runtime_jobs: int = MAX_RUNTIME_JOBS,
        max_args_bytes: int = MAX_ARGS_BYTES,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.tasks = tasks
        self._code_jobs = code_jobs
        self.default_grace = default_grace
        self.max_runtime_jobs = max_runtime_jobs
        self.max_args_bytes = max_args_bytes
        self.list_all: Callable[[], Any] | None = None

    # -- checks -------------------------------------------------------------------
    def check_id(self, job_id: object) -> str:
        """Return ``job_id`` if valid, else raise :class:`InvalidJobError` on ``id``."""
        problem = name_error("job id", job_id)
        if problem is not None:
            raise InvalidJobError("id", problem)
        assert isinstance(job_id, str)
        if job_id in RESERVED_IDS:
            raise InvalidJobError("id", f"{job_id!r} is reserved; choose another id")
        return job_id

    def build(
        self,
        task: str,
        trigger: object,
        *,
        id: str | None = None,
        args: list[Any] | tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        misfire_grace_time: int | None = None,
        coalesce: bool = True,
        now: datetime | None = None,
        check_task: bool = True,
    ) -> RuntimeJob:
        """Check everything about a new runtime job and return its definition.

        Raises:
            InvalidJobError: naming the field (``id``, ``task``, ``trigger.*``, ``args``,
                ``kwargs``, ``misfire_grace_time``); :class:`TaskLookupError` for an
                unknown task; :class:`JobArgumentsTooLargeError`.
        """
        job_id = self.check_id(id if id is not None else f"job-{secrets.token_hex(8)}")
        if not isinstance(task, str):
            raise InvalidJobError("task", "must be the name of a registered task")
        func = self.tasks.get(task) if check_task else None
        if not isinstance(args, list | tuple):
            raise InvalidJobError("args", "must be a JSON array")
        kw = dict(kwargs or {})
        if not all(isinstance(k, str) for k in kw):
            raise InvalidJobError("kwargs", "must be a JSON object")
        if "ctx" in kw:
            raise InvalidJobError("kwargs", "'ctx' is reserved: the job's context is passed there")
        if misfire_grace_time is not None and (
            isinstance(misfire_grace_time, bool)
            or not isinstance(misfire_grace_time, int)
            or not 1 <= misfire_grace_time <= 7 * 86400
        ):
            raise InvalidJobError("misfire_grace_time", "must be whole seconds from 1 to 604800")
        try:
            encoded = json.dumps([list(args), kw], separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidJobError("kwargs", f"args and kwargs must be JSON: {exc}") from None
        if len(encoded.encode()) > self.max_args_bytes:
            raise JobArgumentsTooLargeError(len(encoded.encode()), self.max_args_bytes)
        try:
            if func is not None:
                bound = {**kw, "ctx": None} if wants_ctx(func) else kw
                inspect.signature(func).bind(*args, **bound)
        except TypeError as exc:
            raise InvalidJobError(
                "kwargs" if kw else "args", f"task {task!r} does not take them: {exc}"
            ) from None
        except ValueError:
            pass  # no signature to check (a builtin)
        now = now or datetime.now(UTC)
        grace = misfire_grace_time or self.default_grace
        stored = normalize_trigger(trigger, now, past_grace=grace)
        due_ms = datetime_to_ms(build_trigger(stored).run_date) if is_final(stored) else None
        return RuntimeJob(
            id=job_id,
            task=task,
            trigger=stored,
            args=list(args),
            kwargs=kw,
            misfire_grace_time=misfire_grace_time,
            coalesce=bool(coalesce),
            created_ms=round(now.timestamp() * 1000),
            rev=secrets.token_hex(6),
            due_ms=due_ms,
        )

    # -- changes ------------------------------------------------------------------
    async def add_job(
        self,
        task: str,
        trigger: object,
        *,
        id: str | None = None,
        args: list[Any] | tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        misfire_grace_time: int | None = None,
        coalesce: bool = True,
        replace: bool = False,
        check_task: bool = True,
    ) -> dict[str, Any]:
        """Add a runtime job (see :meth:`build` for the arguments); returns it as
        :meth:`get_job` would. With ``replace``, an existing runtime job of that id is
        replaced (and resumed). ``check_task=False`` stores a task name this process
        does not register (an operator tool): the leader records its fires as errors
        if it lacks the task too.

        Raises:
            InvalidJobError, TaskLookupError, JobArgumentsTooLargeError: bad input.
            ConflictingIdError: the id is taken (by a job declared in code, or by a
                runtime job without ``replace``).
            JobLimitError: the namespace holds ``max_runtime_jobs`` runtime jobs.
        """
        job = self.build(
            task,
            trigger,
            id=id,
            args=args,
            kwargs=kwargs,
            misfire_grace_time=misfire_grace_time,
            coalesce=coalesce,
            check_task=check_task,
        )
        if job.id in self._code_jobs():
            raise ConflictingIdError(job.id, declared_in_code=True)
        code = await self._change(
            "replace" if replace else "add",
            job.id,
            job.to_json(),
            due_ms="" if job.due_ms is None else str(job.due_ms),
        )
        if code == -1:
            raise ConflictingIdError(job.id)
        if code == -2:
            raise JobLimitError(self.max_runtime_jobs)
        return self.describe(job, paused=False, last_ms=None)

    async def remove_job(self, job_id: str) -> None:
        """Remove a runtime job everywhere; its pending fires never run.

        Raises:
            DeclaredJobError: the job is declared in code (pause it instead).
            JobLookupError: no runtime job has this id.
        """
        if job_id in self._code_jobs():
            raise DeclaredJobError(job_id)
        if await self._change("remove", self.check_id(job_id)) == 0:
            raise JobLookupError(job_id)

    async def pause_job(self, job_id: str) -> dict[str, Any]:
        """Pause a job (runtime or code-declared) on every process, until resumed.

        No fire of it is claimed from the moment this returns. Raises :class:`JobLookupError`.
        """
        if await self._change("pause", self.check_id(job_id)) == 0:
            raise JobLookupError(job_id)
        return await self.get_job(job_id)

    async def resume_job(self, job_id: str) -> dict[str, Any]:
        """Resume a paused job: it fires again at its next scheduled time after now (an
        interval job keeps its phase; fires that fell due while paused never run).

        Raises :class:`JobLookupError`.
        """
        if await self._change("resume", self.check_id(job_id)) == 0:
            raise JobLookupError(job_id)
        return await self.get_job(job_id)

    async def run_job_now(self, job_id: str) -> dict[str, Any]:
        """Ask the leader for one extra run of ``job_id`` now; returns ``{"job_id",
        "scheduled_at"}`` (the run's scheduled time in the history).

        The run is claimed once by the leader and recorded like any run; it runs even
        while the job is paused. Raises :class:`JobLookupError`.
        """
        job_id = self.check_id(job_id)
        now_ms = int(time.time() * 1000)
        request_id = f"{now_ms}-{secrets.token_hex(6)}"
        request = json.dumps({"job_id": job_id, "scheduled_ms": now_ms}, separators=(",", ":"))
        if await self._change("run", job_id, request, request_id=request_id) == 0:
            raise JobLookupError(job_id)
        return {"job_id": job_id, "scheduled_at": ms_to_iso(now_ms)}

    async def hand_back(self, job: RuntimeJob, lease_value: str) -> bool:
        """Put back a date job whose fire was claimed (under ``lease_value``) but never
        started: its leader lost the term in between, or the replicas did not confirm the
        claim (``min_replicas``). The definition and its due entry return as they were,
        with a change notice, so a leader (the next one, or this one again) runs the fire
        within its grace or records it ``missed``. Not counted against
        ``max_runtime_jobs`` (it held a place already).

        Only while the claim's taken marker (:meth:`Keys.job_taken`) is intact: after any
        change of the id (added again, removed, paused), a newer claim, or a minute, this
        returns False and changes nothing (the fire is over). Idempotent: a retry after
        a lost reply returns True again and puts nothing back twice. Raises ``redis``
        errors."""
        assert job.due_ms is not None, "only a date job's fire can be handed back"
        code = await self._change(
            "hand_back",
            job.id,
            job.to_json(),
            due_ms=str(job.due_ms),
            marker=f"{lease_value}|{job.rev}",
        )
        return code == 1

    async def _change(
        self,
        op: str,
        job_id: str,
        payload: str = "",
        request_id: str = "",
        due_ms: str = "",
        marker: str = "",
    ) -> int:
        keys = self._keys
        reply = await JOB_CHANGE(
            self._redis,
            [
                keys.runtime_jobs(),
                keys.paused_jobs(),
                keys.run_requests(),
                keys.due_dates(),
                keys.recurring_jobs(),
                keys.job_taken(job_id),
            ],
            [
                op,
                job_id,
                payload,
                keys.job_changes(),
                "1" if job_id in self._code_jobs() else "0",
                request_id,
                self.max_runtime_jobs,
                due_ms,
                marker,
            ],
        )
        return int(reply[0])

    # -- reading ------------------------------------------------------------------
    async def definitions(self) -> dict[str, RuntimeJob]:
        """Every runtime job's definition, by id (one ``HGETALL``)."""
        raw = await self._redis.hgetall(self._keys.runtime_jobs())
        return {text(k): RuntimeJob.from_json(v) for k, v in raw.items()}

    async def definition(self, job_id: str) -> RuntimeJob | None:
        raw = await self._redis.hget(self._keys.runtime_jobs(), job_id)
        return RuntimeJob.from_json(raw) if raw is not None else None

    async def paused_ids(self) -> set[str]:
        return {text(m) for m in await self._redis.smembers(self._keys.paused_jobs())}

    async def get_job(self, job_id: str) -> dict[str, Any]:
        """One job, code-declared or runtime, as ``GET /api/jobs`` lists it.

        Raises :class:`JobLookupError`.
        """
        job_id = self.check_id(job_id)
        if job_id in self._code_jobs() and self.list_all is not None:
            for entry in await self.list_all():
                if entry["id"] == job_id:
                    return dict(entry)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(self._keys.runtime_jobs(), job_id)
            pipe.sismember(self._keys.paused_jobs(), job_id)
            pipe.hget(self._keys.last_fire(), job_id)
            raw, paused, last = await pipe.execute()
        if raw is None:
            raise JobLookupError(job_id)
        return self.describe(
            RuntimeJob.from_json(raw), bool(paused), int(last) if last is not None else None
        )

    async def list_jobs(self) -> list[dict[str, Any]]:
        """Every job, code-declared then runtime (``GET /api/jobs``)."""
        if self.list_all is None:
            return await self.runtime_entries()
        return list(await self.list_all())

    async def runtime_entries(
        self, paused: set[str] | None = None, last: Mapping[str, int] | None = None
    ) -> list[dict[str, Any]]:
        """Every runtime job, described (sorted by id)."""
        definitions = await self.definitions()
        if paused is None:
            paused = await self.paused_ids()
        if last is None:
            raw = await self._redis.hgetall(self._keys.last_fire())
            last = {text(k): int(v) for k, v in raw.items()}
        return [
            self.describe(job, job_id in paused, last.get(job_id))
            for job_id, job in sorted(definitions.items())
        ]

    def describe(self, job: RuntimeJob, paused: bool, last_ms: int | None) -> dict[str, Any]:
        """A runtime job, JSON-ready; ``next_fire_at`` from the trigger and its last fire."""
        nxt = None
        trigger_text = job.trigger.get("type", "?")
        try:
            trigger = build_trigger(job.trigger)
            trigger_text = str(trigger)
            if not paused:
                # A date job's pending fire is its run_date (its claim leaves no last fire).
                prev = (
                    ms_to_datetime(last_ms) if last_ms is not None and job.due_ms is None else None
                )
                nxt = trigger.get_next_fire_time(prev, datetime.now(UTC))
        except InvalidJobError:
            pass
        return {
            "id": job.id,
            "name": job.id,
            "task": job.task,
            "trigger": trigger_text,
            "trigger_spec": job.trigger,
            "args": job.args,
            "kwargs": job.kwargs,
            "next_fire_at": nxt.astimezone(UTC).isoformat() if nxt else None,
            "last_fire_at": ms_to_iso(last_ms) if job.due_ms is None else None,
            "misfire_grace_time": job.misfire_grace_time or self.default_grace,
            "coalesce": job.coalesce,
            "paused": paused,
            "source": "runtime",
            "created_at": ms_to_iso(job.created_ms),
        }

"""``coordinator jobs list|add|pause|resume|run|remove``: runtime jobs from a shell.

Each command talks to Redis only (no server needed): it stores the change and the
leader applies it, as a change made through the HTTP routes. ``--json`` prints JSON.

Limits, said plainly: without ``--app MODULE:ATTR`` (the Coordinator or
LeaderScheduler your processes run) the command knows no tasks and no jobs declared
in code: ``add`` stores the task name unchecked, ``list`` shows runtime jobs only,
and a code-declared job can be paused, resumed or run only once it has fired (its
id is then in Redis).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from coordinator.errors import ConfigurationError
from coordinator.ops.cli_support import (
    AsJson,
    Namespace,
    RedisUrl,
    emit,
    fail,
    run,
    target_settings,
)
from coordinator.scheduler.firing import grace_default
from coordinator.scheduler.runtime import RuntimeJobs, TaskRegistry
from coordinator.store.codec import text
from coordinator.store.connection import RedisClient
from coordinator.store.keys import Keys

jobs_app = typer.Typer(help="Runtime jobs: list, add, pause, resume, run now, remove.")

AppTarget = Annotated[
    str | None,
    typer.Option(
        "--app",
        help="MODULE:ATTR of your Coordinator or LeaderScheduler, to check task names "
        "and know the jobs declared in code.",
        show_default=False,
    ),
]


def _jobs(redis: RedisClient, target: Any, app_target: str | None) -> RuntimeJobs:
    conf = target.settings
    if app_target:
        from coordinator.ops.worker import load_scheduler_target

        obj = load_scheduler_target(app_target)
        scheduler = getattr(obj, "scheduler", obj)
        runtime = getattr(scheduler, "runtime", None)
        if not isinstance(runtime, RuntimeJobs):
            raise ConfigurationError(f"{app_target!r} is not a Coordinator or LeaderScheduler")
        jobs = RuntimeJobs(
            redis,
            Keys(conf.namespace),
            runtime.tasks,
            lambda: scheduler._declared,
            runtime.default_grace,
        )
        return jobs
    known: set[str] = set()
    jobs = RuntimeJobs(
        redis,
        Keys(conf.namespace),
        TaskRegistry(),
        lambda: dict.fromkeys(known),
        grace_default(conf.lease_ttl, conf.retry_period),
    )
    jobs.code_ids = known  # type: ignore[attr-defined]
    return jobs


async def _known_code_ids(redis: RedisClient, jobs: RuntimeJobs, keys: Keys) -> None:
    """Without --app: ids that fired and are not runtime jobs count as code-declared."""
    known = getattr(jobs, "code_ids", None)
    if known is None:
        return
    fired = {text(k) for k in await redis.hkeys(keys.last_fire())}
    runtime = {text(k) for k in await redis.hkeys(keys.runtime_jobs())}
    known.update(fired - runtime)


def _job_line(job: dict[str, Any]) -> str:
    state = "paused" if job.get("paused") else f"next {job.get('next_fire_at') or '-'}"
    return f"{job['id']}  [{job.get('source', '?')}]  {job.get('task')}  {job['trigger']}  {state}"


@jobs_app.command("list")
def list_(
    app_target: AppTarget = None,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    json_: AsJson = False,
) -> None:
    """Every job: code-declared (with --app) and runtime."""
    target = target_settings(redis_url, namespace)

    async def work(redis: RedisClient) -> list[dict[str, Any]]:
        if app_target:
            from coordinator.ops.worker import load_scheduler_target

            obj = load_scheduler_target(app_target)
            scheduler = getattr(obj, "scheduler", obj)
            jobs = _jobs(redis, target, app_target)
            jobs.list_all = None
            code = [dict(j) for j in await _code_entries(scheduler, redis)]
            return code + await jobs.runtime_entries()
        return await _jobs(redis, target, None).runtime_entries()

    emit(
        {"jobs": run(target, work)},
        json_,
        lambda o: "\n".join(_job_line(j) for j in o["jobs"]) or "no jobs",
    )


async def _code_entries(scheduler: Any, redis: RedisClient) -> list[dict[str, Any]]:
    original = scheduler.redis
    scheduler.redis = redis
    try:
        return [j for j in await scheduler.list_jobs() if j.get("source") == "code"]
    finally:
        scheduler.redis = original


@jobs_app.command()
def add(
    task: Annotated[str, typer.Argument(help="Task name (registered on every process).")],
    trigger: Annotated[
        str, typer.Argument(help='Trigger as JSON, e.g. \'{"type": "interval", "seconds": 30}\'.')
    ],
    job_id: Annotated[str | None, typer.Option("--id", help="Job id; default: generated.")] = None,
    args: Annotated[str, typer.Option(help="JSON array of positional arguments.")] = "[]",
    kwargs: Annotated[str, typer.Option(help="JSON object of keyword arguments.")] = "{}",
    replace: Annotated[bool, typer.Option(help="Replace a runtime job of this id.")] = False,
    app_target: AppTarget = None,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    json_: AsJson = False,
) -> None:
    """Add a runtime job; the leader runs it (prints the job)."""
    target = target_settings(redis_url, namespace)
    try:
        spec, positional, named = json.loads(trigger), json.loads(args), json.loads(kwargs)
    except ValueError as exc:
        raise fail(f"trigger, --args and --kwargs must be JSON: {exc}", 2) from None

    async def work(redis: RedisClient) -> dict[str, Any]:
        jobs = _jobs(redis, target, app_target)
        return await jobs.add_job(
            task,
            spec,
            id=job_id,
            args=positional,
            kwargs=named,
            replace=replace,
            check_task=app_target is not None,
        )

    emit(run(target, work), json_, _job_line)


def _change(op: str, help_text: str) -> None:
    def command(
        job_id: Annotated[str, typer.Argument(help="Job id.")],
        app_target: AppTarget = None,
        redis_url: RedisUrl = None,
        namespace: Namespace = None,
        json_: AsJson = False,
    ) -> None:
        target = target_settings(redis_url, namespace)

        async def work(redis: RedisClient) -> Any:
            jobs = _jobs(redis, target, app_target)
            await _known_code_ids(redis, jobs, Keys(target.settings.namespace))
            if op == "pause":
                return await jobs.pause_job(job_id)
            if op == "resume":
                return await jobs.resume_job(job_id)
            if op == "run":
                return await jobs.run_job_now(job_id)
            await jobs.remove_job(job_id)
            return {"job_id": job_id, "removed": True}

        result = run(target, work)
        if op == "run":
            emit(result, json_, lambda o: f"{o['job_id']}: run requested at {o['scheduled_at']}")
        elif op == "remove":
            emit(result, json_, lambda o: f"{o['job_id']}: removed")
        else:
            emit(result, json_, _job_line)

    command.__doc__ = help_text
    jobs_app.command(op)(command)


_change("pause", "Pause a job on every process (no fire is claimed until resumed).")
_change("resume", "Resume a paused job at its next scheduled time.")
_change("run", "Run a job once now, on the leader (claimed and recorded like any run).")
_change("remove", "Remove a runtime job everywhere.")

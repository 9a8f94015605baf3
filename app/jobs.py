"""The demo's scheduled jobs, modelled on what real services run.

Each is declared on every process; only the leader runs it, once per fire, and
each publishes its run to the dashboard channel with the instance that ran it
and its fencing token.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query

from coordinator import Coordinator, JobContext
from coordinator.clock import datetime_to_ms

from .settings import DemoSettings


def _run_event(ctx: JobContext, summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "job_id": ctx.job_id,
        "scheduled_at": ctx.scheduled_at.astimezone(UTC).isoformat(),
        "instance_id": ctx.instance_id,
        "fencing_token": ctx.fencing_token,
        "summary": summary,
        "at": time.time(),
    }


RUN_DATA_TTL_S = 3600
"""How long the data a run published is kept for the dashboard's history rows."""


def _run_data_key(ns: str, job_id: str, scheduled_ms: int) -> str:
    return f"demo:{ns}:run-data:{job_id}:{scheduled_ms}"


def _ms(when: datetime | str | None) -> int | None:
    if when is None:
        return None
    if isinstance(when, str):
        when = datetime.fromisoformat(when.replace("Z", "+00:00"))
    return datetime_to_ms(when)


def register_jobs(coordinator: Coordinator, demo: DemoSettings) -> None:
    """Declare the demo jobs on ``coordinator``."""
    channel = demo.channel
    redis = coordinator.redis
    ns = coordinator.settings.namespace

    async def keep(ctx: JobContext, data: dict[str, Any]) -> None:
        """Keep what this run published, so history rows show it too (best effort)."""
        key = _run_data_key(ns, ctx.job_id, _ms(ctx.scheduled_at) or 0)
        await redis.set(key, json.dumps(data), ex=RUN_DATA_TTL_S)

    @coordinator.job("interval", seconds=demo.collect_every_s, id="collect-metrics")
    async def collect_metrics(ctx: JobContext) -> None:
        """Sample Redis's load, as a metrics collector would, and keep a short series."""
        info = await redis.info("stats")
        clients = await redis.info("clients")
        sample = {
            "ops_per_sec": int(info.get("instantaneous_ops_per_sec", 0)),
            "connected_clients": int(clients.get("connected_clients", 0)),
        }
        key = f"demo:{ns}:samples"
        await redis.lpush(key, f"{ctx.scheduled_at.timestamp():.0f}:{sample['ops_per_sec']}")
        await redis.ltrim(key, 0, 99)
        await keep(ctx, sample)
        await coordinator.publish(channel, _run_event(ctx, sample), event="job")

    @coordinator.job("cron", second=demo.report_cron_second, id="periodic-report")
    async def periodic_report(ctx: JobContext) -> None:
        """Summarise recent job runs, as a daily report would (every 30 s here)."""
        runs = await coordinator.scheduler.list_runs(limit=50)
        by_status: dict[str, int] = {}
        for run in runs:
            by_status[run["status"]] = by_status.get(run["status"], 0) + 1
        await keep(ctx, {"recent_runs": by_status})
        await coordinator.publish(channel, _run_event(ctx, {"recent_runs": by_status}), event="job")

    @coordinator.task("remind")
    async def remind(ctx: JobContext, message: str = "") -> None:
        """The task of runtime reminders (POST /api/jobs with "task": "remind"): every open
        dashboard shows it once, whichever worker added the job."""
        data = {"job_id": ctx.job_id, "message": message}
        await keep(ctx, {"message": message})
        await coordinator.publish(channel, data, event="reminder")

    @coordinator.job("interval", seconds=demo.cleanup_every_s, id="cleanup")
    async def cleanup(ctx: JobContext) -> None:
        """A slower housekeeping job; its blocking part runs in a thread."""
        removed = await asyncio.to_thread(_blocking_cleanup)
        if await ctx.still_leader():  # long jobs re-check before acting on results
            await keep(ctx, {"removed": removed})
            await coordinator.publish(channel, _run_event(ctx, {"removed": removed}), event="job")


def runs_router(coordinator: Coordinator) -> APIRouter:
    """``GET /api/demo/runs``: recent runs (``GET /api/jobs/runs``) with ``duration_ms`` and
    the ``data`` each run published, for the dashboard's history rows."""
    router = APIRouter(tags=["demo"])

    @router.get("/api/demo/runs", summary="Recent runs with their duration and published data")
    async def demo_runs(limit: int = Query(default=30, ge=1, le=200)) -> list[dict[str, Any]]:
        runs = await coordinator.scheduler.list_runs(limit=limit)
        ns = coordinator.settings.namespace
        async with coordinator.redis.pipeline(transaction=False) as pipe:
            for run in runs:
                pipe.get(_run_data_key(ns, run["job_id"], _ms(run["scheduled_at"]) or 0))
            stored = await pipe.execute() if runs else []
        out = []
        for run, raw in zip(runs, stored, strict=True):
            started, finished = _ms(run.get("started_at")), _ms(run.get("finished_at"))
            duration = finished - started if started is not None and finished is not None else None
            out.append({**run, "duration_ms": duration, "data": json.loads(raw) if raw else None})
        return out

    return router


def _blocking_cleanup() -> int:
    """Stands in for deleting expired rows with a blocking driver."""
    time.sleep(0.05)
    return 0

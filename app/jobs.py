"""The demo's scheduled jobs, modelled on what real services run.

Each is declared on every process; only the leader runs it, once per fire, and
each publishes its run to the dashboard channel with the instance that ran it
and its fencing token.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC
from typing import Any

from coordinator import Coordinator, JobContext

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


def register_jobs(coordinator: Coordinator, demo: DemoSettings) -> None:
    """Declare the demo jobs on ``coordinator``."""
    channel = demo.channel
    redis = coordinator.redis
    ns = coordinator.settings.namespace

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
        await coordinator.publish(channel, _run_event(ctx, sample), event="job")

    @coordinator.job("cron", second=demo.report_cron_second, id="periodic-report")
    async def periodic_report(ctx: JobContext) -> None:
        """Summarise recent job runs, as a daily report would (every 30 s here)."""
        runs = await coordinator.scheduler.list_runs(limit=50)
        by_status: dict[str, int] = {}
        for run in runs:
            by_status[run["status"]] = by_status.get(run["status"], 0) + 1
        await coordinator.publish(channel, _run_event(ctx, {"recent_runs": by_status}),
                                  event="job")  # fmt: skip

    @coordinator.job("interval", seconds=demo.cleanup_every_s, id="cleanup")
    async def cleanup(ctx: JobContext) -> None:
        """A slower housekeeping job; its blocking part runs in a thread."""
        removed = await asyncio.to_thread(_blocking_cleanup)
        if await ctx.still_leader():  # long jobs re-check before acting on results
            await coordinator.publish(channel, _run_event(ctx, {"removed": removed}),
                                      event="job")  # fmt: skip


def _blocking_cleanup() -> int:
    """Stands in for deleting expired rows with a blocking driver."""
    time.sleep(0.05)
    return 0

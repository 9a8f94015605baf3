"""Jobs for multi-process scheduler tests and the failover benchmark.

Used two ways:

- ``python -m coordinator.ops.cli worker tests.support.scheduler_jobs:build`` (a worker);
- ``python -m tests.support.scheduler_jobs`` (any role, as a web process would
  run it; with ``COORDINATOR_ROLE=api`` it must never run a job).

Settings come from ``COORDINATOR_*``. Test knobs: ``SCHED_TICK_S`` (interval of
the ``tick`` job), ``SCHED_EXTRA=1`` adds ``cron-sync`` (sync, every second),
``date-once`` (at ``SCHED_DATE_MS``) and ``boom`` (raises every second),
``SCHED_TICK_WORK_S`` (how long a tick works). Every job start and end is
printed as a JSON event with the wall clock (``wall``) and scheduled time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import UTC, datetime

from coordinator import JobContext, LeaderScheduler
from coordinator.clock import datetime_to_ms as dt_to_ms

from .procs import emit


def _started(ctx: JobContext) -> None:
    emit(
        "start",
        job=ctx.job_id,
        scheduled_ms=dt_to_ms(ctx.scheduled_at),
        token=ctx.fencing_token,
        instance_id=ctx.instance_id,
        wall=time.time(),
    )


def _ended(ctx: JobContext) -> None:
    emit(
        "end",
        job=ctx.job_id,
        scheduled_ms=dt_to_ms(ctx.scheduled_at),
        token=ctx.fencing_token,
        instance_id=ctx.instance_id,
        wall=time.time(),
        lost=ctx.lost_leadership.is_set(),
    )


async def tick(ctx: JobContext) -> None:
    _started(ctx)
    await asyncio.sleep(float(os.environ.get("SCHED_TICK_WORK_S", "0.05")))
    _ended(ctx)


def cron_sync(ctx: JobContext) -> None:
    _started(ctx)
    time.sleep(0.02)
    _ended(ctx)


async def date_once(ctx: JobContext) -> None:
    _started(ctx)
    _ended(ctx)


def boom(ctx: JobContext) -> None:
    _started(ctx)
    raise RuntimeError(f"boom at {ctx.scheduled_at.isoformat()}")


def build() -> LeaderScheduler:
    scheduler = LeaderScheduler()
    tick_s = float(os.environ.get("SCHED_TICK_S", "0.5"))
    grace = int(os.environ.get("SCHED_GRACE_S", "0")) or ...
    scheduler.add_job(tick, "interval", id="tick", seconds=tick_s, misfire_grace_time=grace)
    if os.environ.get("SCHED_EXTRA") == "1":
        scheduler.add_job(cron_sync, "cron", id="cron-sync", second="*")
        run_date = datetime.fromtimestamp(int(os.environ["SCHED_DATE_MS"]) / 1000, tz=UTC)
        scheduler.add_job(
            date_once, "date", id="date-once", run_date=run_date, misfire_grace_time=None
        )
        scheduler.add_job(boom, "interval", id="boom", seconds=1)

    instance = scheduler.instance_id
    scheduler.elector.add_observer(
        on_elected=lambda token: emit(
            "elected", token=token, instance_id=instance, wall=time.time()
        ),
        on_revoked=lambda reason: emit(
            "revoked", reason=reason, instance_id=instance, wall=time.time()
        ),
    )
    emit("ready", instance_id=instance, role=scheduler.settings.role)
    return scheduler


async def main() -> None:
    scheduler = build()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await scheduler.start()
    emit("started", instance_id=scheduler.instance_id)
    await stop.wait()
    await scheduler.stop()
    emit("stopped", instance_id=scheduler.instance_id, stats=scheduler.stats.by_status)


if __name__ == "__main__":
    asyncio.run(main())

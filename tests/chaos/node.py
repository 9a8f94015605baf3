"""Chaos child process: one LeaderScheduler node that records what it did.

Usage: ``python -m tests.chaos.node`` with ``REDIS_URL`` (usually a
:class:`~coordinator.testing.faults.TcpProxy` of this node's group),
``COORDINATOR_NAMESPACE``, ``COORDINATOR_INSTANCE_ID`` and the timing settings
in the environment; ``CHAOS_TICK_S`` is the interval of the ``tick`` job.

History lines (JSON on stdout, see :func:`tests.support.procs.emit`):
``ready``; ``elected`` / ``revoked`` with the term's fencing token (emitted
before the scheduler reacts, so a start after ``revoked`` is a real violation);
``start`` / ``end`` of every fire with its scheduled time and token (the task
``note``, which runtime jobs name, adds ``wall_ms``, the wall clock at the start);
``beat`` every 0.25 s (a node that stops beating without being paused hung);
``stopped`` on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from coordinator import CoordinatorSettings, JobContext, LeaderElector, LeaderScheduler
from coordinator.clock import datetime_to_ms as dt_to_ms
from coordinator.store.connection import create_redis

from ..support.procs import emit


async def main() -> None:
    settings = CoordinatorSettings()
    redis = create_redis(settings.redis_url)
    elector = LeaderElector(redis, settings)
    me = settings.instance_id
    term: list[int] = []

    def elected(token: int) -> None:
        term.append(token)
        emit("elected", token=token, instance_id=me)

    def revoked(reason: str) -> None:
        emit("revoked", token=term[-1] if term else None, reason=reason, instance_id=me)

    # Registered before the scheduler's own observer: this line is written first.
    elector.add_observer(on_elected=elected, on_revoked=revoked)
    scheduler = LeaderScheduler(redis, settings, elector=elector)

    async def tick(ctx: JobContext) -> None:
        emit(
            "start",
            job=ctx.job_id,
            scheduled_ms=dt_to_ms(ctx.scheduled_at),
            token=ctx.fencing_token,
            instance_id=me,
        )
        await asyncio.sleep(0.02)
        emit(
            "end",
            job=ctx.job_id,
            scheduled_ms=dt_to_ms(ctx.scheduled_at),
            token=ctx.fencing_token,
            instance_id=me,
        )

    @scheduler.task("note")
    async def note(ctx: JobContext, text: str = "") -> None:
        emit(
            "start",
            job=ctx.job_id,
            scheduled_ms=dt_to_ms(ctx.scheduled_at),
            wall_ms=time.time() * 1000,
            token=ctx.fencing_token,
            instance_id=me,
        )

    scheduler.add_job(tick, "interval", id="tick", seconds=float(os.environ["CHAOS_TICK_S"]))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await scheduler.start()
    await elector.start()
    emit("ready", instance_id=me)
    while not stop.is_set():
        emit("beat", instance_id=me, leader=elector.is_leader)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)
    await scheduler.stop(timeout=2)
    await elector.stop()
    await redis.aclose()
    emit("stopped", instance_id=me)


if __name__ == "__main__":
    asyncio.run(main())

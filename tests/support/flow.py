"""The whole library's Redis traffic in one in-process scenario, for connection tests.

Two :class:`Coordinator` s on one URL: election (acquire, renew, follower crash
checks, release and notice, handoff), a job fired and recorded, run-once,
runtime jobs (a date job fired once, a recurring one paused, resumed, run and
removed), publish, live subscribe and replay, presence and the status read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from coordinator import Coordinator, CoordinatorSettings, JobContext
from coordinator.ops.status import cluster_status
from coordinator.store.keys import Keys
from coordinator.testing import async_wait_until

FAST = {
    "lease_ttl_ms": 2000,
    "renew_interval_ms": 250,
    "renew_deadline_ms": 1500,
    "retry_period_ms": 250,
    "presence_interval_s": 0.5,
    "relay_keepalive_s": 1.0,
    "backoff_max_ms": 500,
}


def make_coordinator(url: str, namespace: str, name: str, **extra: Any) -> Coordinator:
    options = {**FAST, **extra}
    settings = CoordinatorSettings(
        redis_url=url, namespace=namespace, instance_id=f"{name}-{namespace}", **options
    )
    coordinator = Coordinator(settings, shutdown_timeout=2)
    coordinator.fires: list[tuple[str, int]] = []  # type: ignore[attr-defined]

    coordinator.notes: list[str] = []  # type: ignore[attr-defined]

    @coordinator.task("note")
    async def note(ctx: JobContext) -> None:
        coordinator.notes.append(ctx.job_id)  # type: ignore[attr-defined]

    @coordinator.job("interval", seconds=0.3, id="tick")
    async def tick(ctx: JobContext) -> None:
        coordinator.fires.append((ctx.instance_id, ctx.fencing_token))  # type: ignore[attr-defined]

    return coordinator


@asynccontextmanager
async def pair(url: str, namespace: str) -> AsyncIterator[tuple[Coordinator, Coordinator]]:
    a, b = make_coordinator(url, namespace, "a"), make_coordinator(url, namespace, "b")
    try:
        await a.start()
        await b.start()
        yield a, b
    finally:
        await a.stop()
        await b.stop()


async def leader_of(*coordinators: Coordinator, timeout: float = 15) -> Coordinator:
    async def one() -> Coordinator | None:
        leading = [c for c in coordinators if c.elector.is_leader]
        return leading[0] if len(leading) == 1 else None

    found: Coordinator = await async_wait_until(one, timeout, message="no single leader")
    return found


async def exercise(url: str, namespace: str) -> dict[str, Any]:
    """Run the scenario; returns what it saw (assertions are the caller's)."""
    async with pair(url, namespace) as (a, b):
        first = await leader_of(a, b)
        other = b if first is a else a
        await async_wait_until(lambda: first.fires, 10, message="the job never fired")  # type: ignore[attr-defined]
        once_result = await asyncio.gather(
            a.once("migrate", lambda: 42), b.once("migrate", lambda: 42)
        )
        await other.jobs.add_job("note", {"type": "date"}, id="remind")
        await other.jobs.add_job("note", {"type": "interval", "hours": 1}, id="hourly")
        await other.jobs.pause_job("hourly")
        await other.jobs.resume_job("hourly")
        await other.jobs.run_job_now("hourly")
        await async_wait_until(
            lambda: sorted(first.notes) == ["hourly", "remind"],  # type: ignore[attr-defined]
            10,
            message="the runtime jobs never ran",
        )
        await other.jobs.remove_job("hourly")
        await asyncio.wait_for(other.relay.wait_ready(10), 10)
        first_id = await first.publish("ops", {"n": 1})
        async with await other.relay.subscribe("ops", last_event_id="0-0") as sub:
            live_id = await first.publish("ops", {"n": 2})
            received = b""
            deadline = time.monotonic() + 10
            while live_id.encode() not in received and time.monotonic() < deadline:
                received += await asyncio.wait_for(anext(aiter(sub)), 10)
        # The last local client left: the relay unsubscribes (without losing its
        # connection), so Redis no longer sends the channel's events to this process.
        topic = Keys(namespace).channel_events("ops")

        async def unsubscribed() -> bool:
            return int((await other.redis.pubsub_numsub(topic))[0][1]) == 0

        await async_wait_until(unsubscribed, 10, message="the relay never unsubscribed")
        status = await cluster_status(other.redis, other.settings)
        runs = await other.scheduler.list_runs(10)
        # Graceful handoff: the leader releases, the other takes over at once.
        await first.stop()
        second = await leader_of(other)
        return {
            "first": first.settings.instance_id,
            "second": second.settings.instance_id,
            "once": once_result,
            "ids": (first_id, live_id),
            "received": received,
            "status": status,
            "runs": runs,
            "relay_reconnects": other.relay.stats.reconnects + first.relay.stats.reconnects,
        }

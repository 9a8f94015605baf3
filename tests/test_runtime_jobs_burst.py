"""A burst of runtime date jobs all due at the same instant, against a real Redis: every
fire runs exactly once (or is recorded ``missed``), none is silently lost, and every
definition leaves the ``{ns}:jobs`` hash with its fire."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from coordinator import CoordinatorSettings, JobContext, Keys, LeaderScheduler
from coordinator.scheduler.runs import RunHistory
from coordinator.testing import async_wait_until

from .support.timing import FAST

N = 2000


@pytest.fixture
async def scheduler(namespace: str, redis_client: Redis) -> AsyncIterator[LeaderScheduler]:
    settings = CoordinatorSettings(
        namespace=namespace, instance_id="leader", job_history=4 * N, **FAST
    )
    made = LeaderScheduler(redis_client, settings)
    yield made
    await made.stop(timeout=5)


async def test_burst_of_date_jobs_due_at_once_all_run_once(
    scheduler: LeaderScheduler,
    redis_client: Redis,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="coordinator")
    calls: list[str] = []

    @scheduler.task("note")
    async def note(ctx: JobContext) -> None:
        calls.append(ctx.job_id)

    await scheduler.start()
    await async_wait_until(
        lambda: scheduler.is_leading and scheduler._follower.subscribed.is_set(),
        10,
        message="the scheduler leads and follows runtime jobs",
    )
    run_date = datetime.now(UTC) + timedelta(seconds=4)
    trigger = {"type": "date", "run_date": run_date.isoformat()}
    ids = [f"burst-{i}" for i in range(N)]
    for start in range(0, N, 20):
        await asyncio.gather(
            *(scheduler.runtime.add_job("note", trigger, id=i) for i in ids[start : start + 20])
        )
    assert datetime.now(UTC) < run_date, "adding took longer than the lead time; raise it"

    keys = Keys(namespace)
    runs = RunHistory(redis_client, keys, 10 * N)

    async def settled() -> bool:
        return (
            len(calls) == N
            and await redis_client.hlen(keys.runtime_jobs()) == 0
            and len(await runs.recent(10 * N)) >= N
        )

    deadline = time.monotonic() + 20
    while not await settled():
        if time.monotonic() > deadline:
            failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            left = await redis_client.hlen(keys.runtime_jobs())
            pytest.fail(
                f"{len(calls)}/{N} ran, {left} definitions left; "
                f"stats {scheduler._runner.stats}; "
                f"first warnings: {failures[:5]} ({len(failures)} in all)"
            )
        await asyncio.sleep(0.05)

    assert sorted(calls) == sorted(ids), "each job ran exactly once"
    records = await runs.recent(10 * N)
    by_job: dict[str, list[Any]] = {}
    for r in records:
        by_job.setdefault(r.job_id, []).append(r.status)
    assert {j: s for j, s in by_job.items() if s != ["ok"]} == {}
    assert len(by_job) == N
    # A date job's claim takes its due entry: nothing is left behind per job.
    assert await redis_client.hlen(keys.last_fire()) == 0
    assert await redis_client.zcard(keys.due_dates()) == 0
    assert scheduler._runner._turns == {}
    assert not [r for r in caplog.records if "failed" in r.getMessage()]


async def test_burst_of_code_declared_jobs_due_at_once_all_run_once(
    scheduler: LeaderScheduler, redis_client: Redis, namespace: str
) -> None:
    """Code-declared jobs take the same claim path: 500 due at one instant all run."""
    n = 500
    calls: list[str] = []

    async def tick(ctx: JobContext) -> None:
        calls.append(ctx.job_id)

    run_date = datetime.now(UTC) + timedelta(seconds=3)
    ids = [f"code-{i}" for i in range(n)]
    for job_id in ids:
        scheduler.add_job(tick, "date", id=job_id, run_date=run_date)
    await scheduler.start()
    runs = RunHistory(redis_client, Keys(namespace), 10 * N)
    await async_wait_until(lambda: len(calls) == n, 20, message=f"{n} code jobs ran")

    async def recorded() -> int:
        return len(await runs.recent(10 * N))

    deadline = time.monotonic() + 10
    while await recorded() < n:
        assert time.monotonic() < deadline, "run records missing"
        await asyncio.sleep(0.05)
    assert sorted(calls) == sorted(ids)
    assert sorted(r.job_id for r in await runs.recent(10 * N) if r.status == "ok") == sorted(ids)

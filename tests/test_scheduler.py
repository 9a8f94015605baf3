"""LeaderScheduler, its claim script and run-once, in one process against a real Redis.

Multi-process scenarios (6 workers, SIGKILL, SIGSTOP, roles, run-once across
processes) are in test_scheduler_procs.py.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from coordinator import (
    ConfigurationError,
    CoordinatorSettings,
    JobContext,
    Keys,
    LeaderScheduler,
    OnceFailedError,
    RunRecord,
    run_once,
)
from coordinator.runs import RunHistory, dt_to_ms
from coordinator.scripts import CLAIM_FIRE
from coordinator.testing import async_wait_until

from .support.timing import FAST

Make = Callable[..., LeaderScheduler]


@pytest.fixture
async def make(namespace: str, redis_client: Redis) -> AsyncIterator[Make]:
    """Build schedulers on the shared Redis with fast timings; stopped after the test."""
    made: list[LeaderScheduler] = []

    def build(instance_id: str, **overrides: Any) -> LeaderScheduler:
        settings = CoordinatorSettings(
            namespace=namespace, instance_id=instance_id, **{**FAST, **overrides}
        )
        scheduler = LeaderScheduler(redis_client, settings)
        made.append(scheduler)
        return scheduler

    yield build
    for scheduler in made:
        await scheduler.stop(timeout=2)


async def runs(redis: Redis, namespace: str) -> list[RunRecord]:
    return await RunHistory(redis, Keys(namespace), 10_000).recent(10_000)


async def leader_of(*schedulers: LeaderScheduler, timeout: float = 10) -> LeaderScheduler:
    found: list[LeaderScheduler] = await async_wait_until(
        lambda: [s for s in schedulers if s.is_leading], timeout, message="a leading scheduler"
    )
    assert len(found) == 1
    return found[0]


async def assert_never(predicate: Callable[[], Any], seconds: float) -> None:
    """A condition that must stay false over a window (polled, not slept through)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not predicate()
        await asyncio.sleep(0.02)


# -- the claim script on its own --------------------------------------------------------------
async def test_claim_fire_script(redis_client: Redis, namespace: str) -> None:
    keys = Keys(namespace)
    lease = keys.lease("scheduler")
    await redis_client.set(lease, "term-1", px=5000)

    async def claim(value: str, ms: int, mode: str = "run") -> int:
        record = RunRecord("job", ms, "missed", "me", 1).to_json() if mode == "missed" else ""
        reply = await CLAIM_FIRE(
            redis_client,
            [lease, keys.fire("job", ms), keys.last_fire(), keys.runs()],
            [value, "job", ms, 60_000, "{}", mode, record, 3],
        )
        return int(reply[0])

    assert await claim("term-1", 1000) == 1
    assert await claim("term-1", 1000) == -1, "the same fire is never claimed twice"
    assert await claim("term-1", 500) == -1, "a fire older than the last one is refused"
    assert await claim("term-0", 2000) == 0, "an old term claims nothing"
    assert await redis_client.exists(keys.fire("job", 2000)) == 0
    assert int(await redis_client.hget(keys.last_fire(), "job")) == 1000  # type: ignore[misc]
    for ms in (3000, 4000, 5000, 6000):
        assert await claim("term-1", ms, "missed") == 1
    history = await RunHistory(redis_client, keys, 3).recent(10)
    assert [r.scheduled_ms for r in history] == [6000, 5000, 4000], "capped, newest first"
    assert all(r.status == "missed" for r in history)
    assert 0 < await redis_client.pttl(keys.fire("job", 1000)) <= 60_000


# -- jobs, triggers, context, history -------------------------------------------------------------
async def test_triggers_sync_async_errors_once_each(make: Make, redis_client: Redis,
                                                     namespace: str) -> None:  # fmt: skip
    seen: dict[str, list[JobContext]] = {}
    schedulers = [make("a"), make("b")]
    run_date = datetime.now(UTC) + timedelta(seconds=1.5)

    def record(ctx: JobContext) -> None:
        seen.setdefault(ctx.instance_id, []).append(ctx)

    for s in schedulers:

        @s.job("interval", seconds=0.2, id="async-tick")
        async def async_tick(ctx: JobContext) -> None:
            record(ctx)
            assert await ctx.still_leader()

        @s.job("cron", second="*", id="sync-cron")
        def sync_cron(ctx: JobContext) -> None:
            assert threading.current_thread() is not threading.main_thread()
            assert ctx.still_leader_blocking()
            record(ctx)

        s.add_job(lambda ctx: record(ctx), "date", id="date-once", run_date=run_date)
        s.add_job(lambda: 1 / 0, "interval", id="raises", seconds=0.3)
        await s.start()

    leader = await leader_of(*schedulers)
    token = leader.elector.term.token  # type: ignore[union-attr]

    async def done() -> bool:
        by_job: dict[str, int] = {}
        for r in await runs(redis_client, namespace):
            by_job[r.job_id] = by_job.get(r.job_id, 0) + 1
        return by_job.get("date-once", 0) >= 1 and by_job.get("sync-cron", 0) >= 2 \
            and by_job.get("raises", 0) >= 3  # fmt: skip

    await async_wait_until(done, 15, message="date, cron and raising jobs ran")
    history = await runs(redis_client, namespace)
    assert {r.instance_id for r in history} == {leader.instance_id}
    keys = [(r.job_id, r.scheduled_ms) for r in history]
    assert len(keys) == len(set(keys)), "no fire recorded twice"
    assert [r.scheduled_ms for r in history if r.job_id == "date-once"] == [dt_to_ms(run_date)]
    errors = [r for r in history if r.job_id == "raises"]
    assert all(r.status == "error" and "ZeroDivisionError" in (r.error or "") for r in errors)
    assert all(r.status == "ok" for r in history if r.job_id != "raises"), history
    cron = sorted(r.scheduled_ms for r in history if r.job_id == "sync-cron")
    assert all(ms % 1000 == 0 for ms in cron), "cron fires on whole seconds"
    assert all(r.fencing_token == token for r in history)
    contexts = seen[leader.instance_id]
    assert all(c.fencing_token == token for c in contexts)
    assert set(seen) == {leader.instance_id}

    jobs = {j["id"]: j for j in await leader.list_jobs()}
    assert set(jobs) == {"async-tick", "sync-cron", "date-once", "raises"}
    assert jobs["date-once"]["next_fire_at"] is None, "a date job that fired is done"
    assert jobs["async-tick"]["next_fire_at"] and jobs["async-tick"]["last_fire_at"]
    assert "interval" in jobs["async-tick"]["trigger"]
    follower = next(s for s in schedulers if s is not leader)
    assert {j["id"] for j in await follower.list_jobs()} == set(jobs)
    listed = await follower.list_runs(limit=3)
    assert len(listed) == 3
    for row in listed:
        assert {"job_id", "scheduled_at", "started_at", "finished_at", "instance_id",
                "fencing_token", "status"} <= set(row)  # fmt: skip


async def test_add_job_rejects_ids_that_differ_between_processes(make: Make) -> None:
    s = make("a")
    with pytest.raises(ConfigurationError, match="id="):
        s.add_job(lambda: None, "interval", seconds=1)
    with pytest.raises(ConfigurationError, match="run_date"):
        s.add_job(lambda: None, "date", id="no-date")


# -- fencing: a leader whose lease is gone claims nothing ----------------------------------------
async def test_stale_term_claims_nothing(make: Make, redis_client: Redis, namespace: str) -> None:
    # Slow renewals: after the lease is taken away the scheduler still believes it
    # leads for up to 4 s, so its claims reach Redis and must be refused there.
    s = make("old", lease_ttl_ms=10_000, renew_interval_ms=4000, renew_deadline_ms=8000)
    s.add_job(lambda: None, "interval", id="fast", seconds=0.1)
    await s.start()
    await leader_of(s)
    await async_wait_until(lambda: s.stats.ok >= 2, 10, message="runs as leader")
    await redis_client.set(Keys(namespace).lease("scheduler"), '{"fencing_token": "0"}', px=20_000)
    stolen_ms = int(time.time() * 1000)
    ok_before = s.stats.ok
    await async_wait_until(lambda: s.stats.refused_not_leader >= 3, 10,
                           message="claims refused by Redis")  # fmt: skip
    assert s.stats.ok <= ok_before + 1  # at most one claimed just before the swap
    late = [r for r in await runs(redis_client, namespace)
            if r.status == "ok" and (r.started_ms or 0) > stolen_ms + 50]  # fmt: skip
    assert late == []
    await async_wait_until(lambda: not s.elector.is_leader, 10, message="steps down at renewal")


async def test_losing_leadership_tells_running_jobs(make: Make, redis_client: Redis,
                                                    namespace: str) -> None:  # fmt: skip
    s = make("a")
    started: dict[str, JobContext] = {}
    observed: list[bool] = []
    at = datetime.now(UTC) + timedelta(seconds=0.3)

    async def long_async(ctx: JobContext) -> None:
        started["async"] = ctx
        await asyncio.sleep(30)

    def long_sync(ctx: JobContext) -> None:
        started["sync"] = ctx
        observed.append(ctx.still_leader_blocking())
        ctx.lost_leadership.wait(20)
        observed.append(ctx.still_leader_blocking())

    s.add_job(long_async, "date", id="long-async", run_date=at, cancel_on_revoke=True)
    s.add_job(long_sync, "date", id="long-sync", run_date=at)
    await s.start()
    await async_wait_until(lambda: len(started) == 2 and observed, 10, message="jobs started")
    await redis_client.delete(Keys(namespace).lease("scheduler"))  # the term ends under it

    async def recorded() -> list[RunRecord]:
        return [r for r in await runs(redis_client, namespace) if r.job_id.startswith("long")]

    await async_wait_until(lambda: _len_is(recorded, 2), 10, message="both runs recorded")
    by_job = {r.job_id: r for r in await recorded()}
    assert by_job["long-async"].status == "cancelled" and by_job["long-async"].lost_leadership
    assert by_job["long-sync"].status == "ok" and by_job["long-sync"].lost_leadership
    assert observed == [True, False]


async def _len_is(fetch: Callable[[], Any], n: int) -> bool:
    return len(await fetch()) == n


# -- continuity across leaders -------------------------------------------------------------------
async def test_new_leader_keeps_phase_and_coalesces(make: Make, redis_client: Redis,
                                                    namespace: str) -> None:  # fmt: skip
    keys = Keys(namespace)
    # A long outage of "digest" (every 1 s, 2 s grace): 30 fires were due meanwhile.
    outage_last = int(time.time() * 1000) - 30_500
    await redis_client.hset(keys.last_fire(), "digest", outage_last)  # type: ignore[misc]
    a = make("a")
    a.add_job(lambda: None, "interval", id="tick", seconds=0.3)
    a.add_job(lambda: None, "interval", id="digest", seconds=1, misfire_grace_time=2)
    await a.start()
    await async_wait_until(lambda: a.stats.ok >= 4, 10, message="a runs ticks")
    await a.stop()

    b = make("b")  # built later: its own interval trigger starts at another phase
    b.add_job(lambda: None, "interval", id="tick", seconds=0.3)
    b.add_job(lambda: None, "interval", id="digest", seconds=1, misfire_grace_time=2)
    await b.start()
    await async_wait_until(lambda: b.stats.ok >= 4, 10, message="b continues")
    await b.stop()

    history = await runs(redis_client, namespace)
    ticks = sorted((r.scheduled_ms, r.instance_id) for r in history if r.job_id == "tick")
    phase = ticks[0][0] % 300
    assert {ms % 300 for ms, _ in ticks} == {phase}, "b continued a's phase"
    assert {i for _, i in ticks} == {"a", "b"}
    steps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(ticks)]
    assert max(steps) <= 600, f"at most one tick missed across a graceful handoff: {steps}"
    digest = [r for r in history if r.job_id == "digest"]
    first_ok = min(r.scheduled_ms for r in digest if r.status == "ok")
    missed = [r for r in digest if r.status == "missed" and r.scheduled_ms < first_ok]
    assert len(missed) == 20, "the missed fires are recorded (capped), not run"
    assert (first_ok - outage_last) % 1000 == 0, "the interval keeps its phase"
    assert not [r for r in digest if r.status == "ok" and r.scheduled_ms < first_ok]


# -- roles --------------------------------------------------------------------------------------
async def test_api_role_never_runs_jobs(make: Make, redis_client: Redis, namespace: str) -> None:
    api, worker = make("api", role="api"), make("worker", role="worker")
    for s in (api, worker):
        s.add_job(lambda: None, "interval", id="tick", seconds=0.1)
    await api.start()
    await worker.start()
    await async_wait_until(lambda: worker.stats.ok >= 5, 10, message="the worker runs jobs")
    await worker.stop()  # the api process is now the only one left, and must not take over
    await assert_never(lambda: api.is_leading or api.elector.terms_won, seconds=1.0)
    assert api.stats.claimed == 0
    assert {r.instance_id for r in await runs(redis_client, namespace)} == {"worker"}
    assert [j["id"] for j in await api.list_jobs()] == ["tick"]


# -- run-once in one process ----------------------------------------------------------------------
async def test_run_once_shares_result_and_failure(redis_client: Redis, namespace: str) -> None:
    settings = CoordinatorSettings(namespace=namespace, instance_id="me", **FAST)
    calls: list[str] = []

    async def migrate() -> dict[str, int]:
        calls.append("migrate")
        await asyncio.sleep(0.2)
        return {"version": 42}

    results = await asyncio.gather(
        *(run_once(redis_client, settings, "migrate", migrate) for _ in range(4))
    )
    assert results == [{"version": 42}] * 4 and calls == ["migrate"]

    def broken() -> None:
        calls.append("broken")
        raise ValueError("column exists")

    for _ in range(2):
        with pytest.raises(OnceFailedError, match="column exists") as info:
            await run_once(redis_client, settings, "broken", broken)
        assert info.value.instance_id == "me"
    assert calls.count("broken") == 1, "a failure is remembered, not retried at once"
    with pytest.raises(ConfigurationError):
        await run_once(redis_client, settings, "bad name!", broken)

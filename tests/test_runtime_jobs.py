"""Runtime jobs in one process against a real Redis: several LeaderSchedulers (one may
be role ``api``) share a namespace, so adds and pauses cross "processes" through Redis
exactly as they do between workers. Multi-worker HTTP tests: test_runtime_jobs_workers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from coordinator import (
    CoordinatorSettings,
    JobContext,
    Keys,
    LeaderScheduler,
    RunRecord,
    create_client,
)
from coordinator.errors import (
    ConflictingIdError,
    DeclaredJobError,
    InvalidJobError,
    JobArgumentsTooLargeError,
    JobLimitError,
    JobLookupError,
    TaskLookupError,
)
from coordinator.scheduler.runs import RunHistory
from coordinator.store.scripts import CLAIM_FIRE, DUE_PRUNE
from coordinator.testing import RedisServer, async_wait_until
from coordinator.testing.topologies import RedisClusterServers

from .support.timing import FAST
from .support.topology import Topology, replicated_scheduler, url_of

Make = Callable[..., LeaderScheduler]


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat()


@pytest.fixture
async def make(namespace: str, request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """Schedulers with fast timings, each with the task ``note``, which appends (job
    id, scheduled time, token, instance, kwargs) to ``calls``: on the test's
    ``topology`` when it asks for one (one node, Sentinel, Cluster), else on the
    shared Redis."""
    made: list[LeaderScheduler] = []
    address, url = url_of(request)
    redis = create_client(address)

    def build(instance_id: str, calls: list[tuple[Any, ...]] | None = None, **kw: Any) -> Any:
        settings = CoordinatorSettings(
            namespace=namespace,
            instance_id=instance_id,
            **{**FAST, **url, **kw.pop("settings", {})},
        )
        scheduler = LeaderScheduler(redis, settings, **kw)
        sink = calls if calls is not None else []

        @scheduler.task("note")
        async def note(ctx: JobContext, text: str = "") -> None:
            sink.append((ctx.job_id, ctx.scheduled_at, ctx.fencing_token, ctx.instance_id, text))

        @scheduler.task("plain")
        def plain(a: int, b: int = 0) -> None:
            sink.append(("plain", a, b))

        made.append(scheduler)
        return scheduler

    yield build
    for scheduler in made:
        await scheduler.stop(timeout=2)
    await redis.aclose()


async def leader_of(*schedulers: LeaderScheduler, timeout: float = 10) -> LeaderScheduler:
    found: list[LeaderScheduler] = await async_wait_until(
        lambda: [s for s in schedulers if s.is_leading and s._follower.subscribed.is_set()],
        timeout,
        message="a leading scheduler following runtime jobs",
    )
    assert len(found) == 1
    return found[0]


async def history(redis: Redis, namespace: str) -> list[RunRecord]:
    return await RunHistory(redis, Keys(namespace), 10_000).recent(10_000)


async def test_date_job_added_on_api_process_runs_once_on_leader_and_leaves(
    make: Make, topology: Topology, namespace: str
) -> None:
    redis_client = topology.client
    calls: list[tuple[Any, ...]] = []
    leader = make("leader", calls)
    api = make("api", settings={"role": "api"})
    await leader.start()
    await api.start()
    await leader_of(leader)
    run_date = datetime.now(UTC) + timedelta(milliseconds=400)
    added = await api.runtime.add_job(
        "note", {"type": "date", "run_date": iso(run_date)}, id="remind-1", kwargs={"text": "hi"}
    )
    assert added["source"] == "runtime" and added["paused"] is False
    assert [j["id"] for j in await api.list_jobs()] == ["remind-1"]
    await async_wait_until(lambda: calls, 5, message="the date job ran")
    job_id, scheduled, token, instance, text = calls[0]
    assert (job_id, instance, text) == ("remind-1", "leader", "hi")
    assert abs((scheduled - run_date).total_seconds()) < 0.002

    async def ok_records() -> list[RunRecord]:
        return [r for r in await history(redis_client, namespace) if r.status == "ok"]

    deadline = time.monotonic() + 5
    while not await ok_records():
        assert time.monotonic() < deadline, "no run record"
        await asyncio.sleep(0.02)
    (record,) = await ok_records()
    assert (record.job_id, record.instance_id) == ("remind-1", "leader")
    assert record.fencing_token == token
    assert await api.list_jobs() == []
    with pytest.raises(JobLookupError):
        await api.runtime.get_job("remind-1")
    await asyncio.sleep(0.3)  # nothing more may come (a second run would be a bug)
    assert len(calls) == 1


async def test_interval_pause_resume_keeps_phase_run_now_and_remove(
    make: Make, topology: Topology, namespace: str
) -> None:
    redis_client = topology.client
    calls: list[tuple[Any, ...]] = []
    leader = make("leader", calls)
    api = make("api", settings={"role": "api"})
    await leader.start()
    await api.start()
    await leader_of(leader)
    start = datetime.now(UTC) + timedelta(milliseconds=300)
    await api.runtime.add_job(
        "note",
        {"type": "interval", "seconds": 0.2, "start_date": iso(start)},
        id="tick",
    )
    await async_wait_until(lambda: len(calls) >= 3, 5, message="three ticks")
    paused = await api.runtime.pause_job("tick")
    assert paused["paused"] is True and paused["next_fire_at"] is None
    await asyncio.sleep(0.05)  # a fire claimed before the pause may still be starting
    before = len(calls)
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:
        assert len(calls) == before, "a paused job fired"
        await asyncio.sleep(0.02)
    resumed = await api.runtime.resume_job("tick")
    assert resumed["paused"] is False
    await async_wait_until(lambda: len(calls) >= before + 2, 5, message="ticks after resume")
    for _, scheduled, *_ in calls:
        offset_ms = (scheduled - start).total_seconds() * 1000
        assert abs(offset_ms - round(offset_ms / 200) * 200) < 2, "off phase"
    # Run now: exactly one extra run, at the request's time (off the phase).
    ran = await api.runtime.run_job_now("tick")
    wanted = datetime.fromisoformat(ran["scheduled_at"])
    await async_wait_until(
        lambda: any(abs((c[1] - wanted).total_seconds()) < 0.0005 for c in calls), 5, message="run"
    )
    await api.runtime.remove_job("tick")
    await asyncio.sleep(0.05)
    after = len(calls)
    await asyncio.sleep(0.6)
    assert len(calls) == after, "a removed job fired"
    assert [j for j in await api.list_jobs() if j["id"] == "tick"] == []
    records = [r for r in await history(redis_client, namespace) if r.status == "ok"]
    keys = [(r.job_id, r.scheduled_ms) for r in records]
    assert len(keys) == len(set(keys)), "a fire ran twice"
    manual = [r for r in records if r.scheduled_ms == round(wanted.timestamp() * 1000)]
    assert len(manual) == 1 and manual[0].instance_id == "leader"


async def test_pause_of_code_job_is_cluster_wide_and_survives_failover(
    make: Make, topology: Topology, namespace: str
) -> None:
    calls: list[str] = []
    first, second = make("first"), make("second")
    for scheduler in (first, second):

        @scheduler.job("interval", seconds=0.2, id="code-tick")
        async def tick(ctx: JobContext) -> None:
            calls.append(ctx.instance_id)

    api = make("api", settings={"role": "api"})
    api.add_job(lambda: None, "interval", seconds=0.2, id="code-tick")
    await first.start()
    await leader_of(first)
    await second.start()
    await api.start()
    await async_wait_until(lambda: len(calls) >= 2, 5, message="code job ticks")
    assert (await api.runtime.pause_job("code-tick"))["paused"] is True
    await asyncio.sleep(0.05)
    before = len(calls)
    await first.stop()  # failover to second, which must load the pause
    await leader_of(second)
    await asyncio.sleep(0.6)
    assert len(calls) == before, "a paused code job fired"
    listed = {j["id"]: j for j in await api.list_jobs()}
    assert listed["code-tick"]["paused"] is True and listed["code-tick"]["source"] == "code"
    with pytest.raises(DeclaredJobError):
        await api.runtime.remove_job("code-tick")
    with pytest.raises(ConflictingIdError):
        await api.runtime.add_job("note", {"type": "interval", "seconds": 1}, id="code-tick")
    await api.runtime.resume_job("code-tick")
    await async_wait_until(lambda: len(calls) >= before + 2, 5, message="ticks after resume")
    assert set(calls[before:]) == {"second"}


async def test_full_restart_keeps_runtime_jobs_and_paused_state(make: Make) -> None:
    calls: list[tuple[Any, ...]] = []
    a = make("a", calls)
    await a.start()
    await leader_of(a)
    later = datetime.now(UTC) + timedelta(seconds=1.5)
    await a.runtime.add_job("note", {"type": "date", "run_date": iso(later)}, id="later")
    await a.runtime.add_job("note", {"type": "interval", "seconds": 0.2}, id="held")
    await a.runtime.pause_job("held")
    await a.stop()
    # Every process gone; new ones come up.
    b = make("b", calls)
    await b.start()
    await leader_of(b)
    listed = {j["id"]: j for j in await b.list_jobs()}
    assert set(listed) == {"later", "held"} and listed["held"]["paused"] is True
    await async_wait_until(lambda: [c for c in calls if c[0] == "later"], 5, message="date job")
    assert all(c[3] == "b" for c in calls) and not [c for c in calls if c[0] == "held"]


async def test_a_follower_stopped_with_its_term_has_ended_once_stop_returns(make: Make) -> None:
    """Losing the lease cancels the runtime-jobs follower without waiting for it (the
    elector's callback must not block); stopping then waits for it, so no follower task
    outlives the scheduler to meet its Redis client closed (a Sentinel failover chaos run
    caught one dying that way, its exception never retrieved)."""
    a = make("a")
    await a.start()
    await leader_of(a)
    a._follower.stop_nowait()  # what losing the lease does (LeaderScheduler._on_revoked)
    await a._follower.stop()
    alive = [t for t in asyncio.all_tasks() if t.get_name() == "runtime-jobs" and not t.done()]
    assert alive == []


async def test_run_request_waiting_for_a_leader_runs_once_when_one_is_elected(
    make: Make, topology: Topology, namespace: str
) -> None:
    redis_client = topology.client
    calls: list[tuple[Any, ...]] = []
    api = make("api", settings={"role": "api"})
    await api.start()
    await api.runtime.add_job("note", {"type": "interval", "hours": 1}, id="hourly")
    ran = await api.runtime.run_job_now("hourly")
    leader = make("leader", calls)
    await leader.start()
    await async_wait_until(lambda: calls, 5, message="the requested run")
    assert iso(calls[0][1]) == ran["scheduled_at"]
    assert await redis_client.hlen(Keys(namespace).run_requests()) == 0


async def test_bad_input_names_the_field(make: Make) -> None:
    s = make("s", settings={"role": "api"}, max_runtime_jobs=2, max_runtime_args_bytes=100)
    add = s.runtime.add_job
    soon = iso(datetime.now(UTC) + timedelta(hours=1))
    cases: list[tuple[Any, type[Exception], str]] = [
        (add("nope", {"type": "date"}), TaskLookupError, "task"),
        (add("note", {"type": "weekly"}), InvalidJobError, "trigger.type"),
        (add("note", "daily"), InvalidJobError, "trigger"),
        (add("note", {"type": "date", "run_date": "soon"}), InvalidJobError, "trigger.run_date"),
        (
            add("note", {"type": "date", "run_date": "2001-01-01T00:00:00Z"}),
            InvalidJobError,
            "trigger.run_date",
        ),
        (
            add("note", {"type": "date", "run_date": soon, "timezone": "Mars/Base"}),
            InvalidJobError,
            "trigger.timezone",
        ),
        (add("note", {"type": "interval", "seconds": -1}), InvalidJobError, "trigger.seconds"),
        (add("note", {"type": "interval"}), InvalidJobError, "trigger.seconds"),
        (add("note", {"type": "cron", "hour": "25"}), InvalidJobError, "trigger.hour"),
        (
            add("note", {"type": "cron", "minute": "*", "bogus": 1}),
            InvalidJobError,
            "trigger.bogus",
        ),
        (
            add("note", {"type": "date", "run_date": "0001-01-01T00:00:00+14:00"}),
            InvalidJobError,
            "trigger.run_date",
        ),
        (
            add("note", {"type": "date", "run_date": "9999-12-31T23:59:59-14:00"}),
            InvalidJobError,
            "trigger.run_date",
        ),
        (add("note", {"type": "interval", "weeks": 1e8}), InvalidJobError, "trigger.seconds"),
        (
            add("note", {"type": "interval", "seconds": 60, "start_date": "9995-01-01T00:00:00Z"}),
            InvalidJobError,
            "trigger.start_date",
        ),
        (add("note", {"type": "date"}, id="bad id!"), InvalidJobError, "id"),
        (add("note", {"type": "date"}, id="runs"), InvalidJobError, "id"),
        (
            add("note", {"type": "date"}, kwargs={"text": "x" * 200}),
            JobArgumentsTooLargeError,
            "kwargs",
        ),
        (add("note", {"type": "date"}, kwargs={"nope": 1}), InvalidJobError, "kwargs"),
        (add("plain", {"type": "date"}, args=[1, 2, 3]), InvalidJobError, "args"),
        (add("note", {"type": "date"}, kwargs={"ctx": 1}), InvalidJobError, "kwargs"),
        (
            add("note", {"type": "date"}, misfire_grace_time=0),
            InvalidJobError,
            "misfire_grace_time",
        ),
    ]
    for coro, error, field in cases:
        with pytest.raises(error) as caught:
            await coro
        assert getattr(caught.value, "field", None) == field, (field, caught.value)
        assert isinstance(caught.value, ValueError | LookupError)
    await add("note", {"type": "interval", "seconds": 5}, id="one")
    with pytest.raises(ConflictingIdError, match="replace"):
        await add("note", {"type": "interval", "seconds": 5}, id="one")
    await add("note", {"type": "interval", "seconds": 9}, id="one", replace=True)
    await add("note", {"type": "interval", "seconds": 5}, id="two")
    with pytest.raises(JobLimitError):
        await add("note", {"type": "interval", "seconds": 5}, id="three")
    for call in (
        s.runtime.pause_job,
        s.runtime.resume_job,
        s.runtime.run_job_now,
        s.runtime.remove_job,
        s.runtime.get_job,
    ):
        with pytest.raises(JobLookupError):
            await call("missing")


async def test_recent_past_run_date_runs_at_once(make: Make) -> None:
    calls: list[tuple[Any, ...]] = []
    leader = make("leader", calls)
    await leader.start()
    await leader_of(leader)
    past = datetime.now(UTC) - timedelta(milliseconds=500)
    await leader.runtime.add_job("note", {"type": "date", "run_date": iso(past)}, id="late")
    await async_wait_until(lambda: calls, 5, message="a slightly late date job runs")
    await leader.runtime.add_job("note", {"type": "date"}, id="now")  # no run_date: now
    await async_wait_until(lambda: len(calls) == 2, 5, message="a date job without run_date")


@pytest.mark.parametrize("change", ["none", "added-again", "removed"])
async def test_a_date_fire_claimed_by_a_leader_that_lost_its_term_is_handed_back(
    make: Make, topology: Topology, namespace: str, change: str
) -> None:
    """The leader claims a date job's fire, then loses its term before starting it (a
    pause past the lease, forced here right after the claim): the fire is not lost but
    handed back, and the next leader runs it once. If the id was added again in
    between, the newer job stands (it runs at its own time); if it was removed, nothing
    runs; either way the claimed fire is recorded ``cancelled``."""
    redis_client = topology.client
    calls: list[tuple[Any, ...]] = []
    first = make("first", calls)
    second = make("second", calls)
    await first.start()
    await leader_of(first)
    await second.start()
    runner = first._runner
    claim_once = runner._claim_once
    later = datetime.now(UTC) + timedelta(milliseconds=800)

    async def claim_then_lose_the_term(*args: Any, **kwargs: Any) -> int:
        code = await claim_once(*args, **kwargs)
        if code == 1 and args[1] == "r":
            if change == "added-again":
                trigger = {"type": "date", "run_date": iso(later)}
                await second.runtime.add_job("note", trigger, id="r", kwargs={"text": "2"})
            elif change == "removed":
                with pytest.raises(JobLookupError):  # the fire is in flight: no job to remove
                    await second.runtime.remove_job("r")
            runner.revoke()  # what the elector's loss does: no fire starts in this term
        return code

    runner._claim_once = claim_then_lose_the_term  # type: ignore[method-assign]
    soon = datetime.now(UTC) + timedelta(milliseconds=200)
    await second.runtime.add_job(
        "note",
        {"type": "date", "run_date": iso(soon)},
        id="r",
        kwargs={"text": "1"},
        misfire_grace_time=30,
    )
    await async_wait_until(
        lambda: runner.stats.handed_back + runner.stats.cancelled, 5, message="claimed, unstarted"
    )
    assert calls == []
    await first.stop(timeout=2)
    await leader_of(second)

    async def statuses() -> list[tuple[str, str]]:
        records = await history(redis_client, namespace)
        return sorted((r.instance_id, r.status) for r in records if r.job_id == "r")

    if change == "removed":
        await async_wait_until(
            lambda: second._follower.due.polls >= 2, 5, message="the next leader read the index"
        )
        assert calls == [] and await second.list_jobs() == []
        assert (runner.stats.handed_back, runner.stats.cancelled) == (0, 1)
        assert await statuses() == [("first", "cancelled")]
        return
    want = ["2"] if change == "added-again" else ["1"]
    await async_wait_until(lambda: [c[4] for c in calls] == want, 10, message="the run")
    (job_id, scheduled, _token, instance, _text) = calls[0]
    assert (job_id, instance) == ("r", "second")
    assert abs((scheduled - (later if want == ["2"] else soon)).total_seconds()) < 0.002

    async def recorded() -> bool:
        return ("second", "ok") in await statuses()

    await async_wait_until(recorded, 5, message="the run's record")
    if change == "added-again":
        assert (runner.stats.handed_back, runner.stats.cancelled) == (0, 1)
        assert await statuses() == [("first", "cancelled"), ("second", "ok")]
    else:
        assert (runner.stats.handed_back, runner.stats.cancelled) == (1, 0)
        assert await statuses() == [("second", "ok")]
    assert await second.list_jobs() == [], "a date job that ran leaves; nothing put back"
    assert len(calls) == 1


@contextlib.asynccontextmanager
async def unconfirmed_date_job(
    cluster: RedisClusterServers, namespace: str, grace: int
) -> AsyncIterator[tuple[LeaderScheduler, RedisServer, datetime, list[datetime]]]:
    """A leading :func:`replicated_scheduler` with its replica SIGSTOPped and a runtime
    date job ``d`` (task ``note``, ``misfire_grace_time=grace``) due 200 ms from now:
    yields the scheduler, the replica, the fire's time (in ms) and the times ``note``
    ran at."""
    calls: list[datetime] = []
    async with replicated_scheduler(cluster, namespace) as (s, replica):

        @s.task("note")
        async def note(ctx: JobContext) -> None:
            calls.append(ctx.scheduled_at)

        await s.start()
        await leader_of(s)
        replica.pause()
        at = datetime.now(UTC) + timedelta(milliseconds=200)
        at = at.replace(microsecond=at.microsecond // 1000 * 1000)  # kept in ms
        trigger = {"type": "date", "run_date": iso(at)}
        await s.runtime.add_job("note", trigger, id="d", misfire_grace_time=grace)
        yield s, replica, at, calls


async def run_statuses(redis: Redis, namespace: str, job_id: str) -> list[str]:
    """The statuses of ``job_id``'s recorded runs."""
    return [r.status for r in await history(redis, namespace) if r.job_id == job_id]


@pytest.mark.slow
async def test_an_unconfirmed_date_claim_is_handed_back_and_runs_once_confirmed(
    own_cluster: RedisClusterServers, namespace: str
) -> None:
    """With ``min_replicas=1`` and the namespace slot's replica SIGSTOPped, no claim of
    a runtime date job's fire is confirmed: each is handed back (the job stays pending,
    nothing runs, nothing is lost). Resumed within the job's grace, the replica confirms
    the next claim and the fire runs once."""
    async with unconfirmed_date_job(own_cluster, namespace, grace=60) as (s, replica, at, calls):
        runner, redis = s._runner, s.redis
        await async_wait_until(
            lambda: runner.stats.handed_back >= 3, 15, message="unconfirmed claims handed back"
        )
        assert calls == [] and runner.stats.unreplicated >= 3
        assert await run_statuses(redis, namespace, "d") == []
        replica.resume()
        await async_wait_until(lambda: calls, 15, message="the fire, once confirmed")
        assert calls == [at]
        recorded = await async_wait_until(
            lambda: run_statuses(redis, namespace, "d"), 5, message="its record"
        )
        assert recorded == ["ok"]
        assert await s.list_jobs() == []
        assert calls == [at], "ran once"


@pytest.mark.slow
async def test_a_date_fire_never_confirmed_is_recorded_missed_and_forgotten(
    own_cluster: RedisClusterServers, namespace: str
) -> None:
    """With the replica SIGSTOPped for good, a runtime date job's fire is handed back
    claim after claim until its grace (1 s) runs out; then it is recorded ``missed``,
    once, never run, and the leader no longer counts its unconfirmed claims (the count
    that sets its backoff is dropped with the fire, not kept for the process's life)."""
    async with unconfirmed_date_job(own_cluster, namespace, grace=1) as (s, _, at, calls):
        runner, redis = s._runner, s.redis
        await async_wait_until(
            lambda: ("d", at) in runner._unreplicated, 10, message="an unconfirmed claim"
        )
        recorded = await async_wait_until(
            lambda: run_statuses(redis, namespace, "d"), 15, message="the fire, missed"
        )
        assert recorded == ["missed"]
        assert ("d", at) not in runner._unreplicated
        assert calls == []
        assert runner.stats.unreplicated >= 1


async def test_a_hand_back_is_idempotent_and_refused_after_a_newer_claim(
    make: Make, redis_client: Redis, namespace: str
) -> None:
    """The hand-back script, on its own: a retry (the first reply lost) puts nothing back
    twice; once the next leader claims the fire again, a late retry of the first
    leader's hand-back is refused, so the fire cannot run twice; a marker older than
    its minute, or one the user's change deleted, refuses it too."""
    api = make("api", settings={"role": "api"})
    keys = Keys(namespace)
    lease = keys.lease("scheduler")
    run_ms = int(time.time() * 1000) + 3_600_000
    await api.runtime.add_job(
        "note",
        {"type": "date", "run_date": iso(datetime.fromtimestamp(run_ms / 1000, UTC))},
        id="d",
    )
    job = await api.runtime.definition("d")
    assert job is not None and job.due_ms is not None

    async def claim(lease_value: str, marker_ms: int = 60_000) -> int:
        await redis_client.set(lease, lease_value)
        all_keys = [lease, keys.last_fire(), keys.runs(), keys.paused_jobs()]
        all_keys += [keys.runtime_jobs(), keys.due_dates(), keys.job_taken("d")]
        args = [lease_value, "d", job.due_ms, "run", "", 100, "1", job.rev, marker_ms]
        return int((await CLAIM_FIRE(redis_client, all_keys, args))[0])

    assert await claim('{"v":1}') == 1
    assert await api.runtime.definition("d") is None
    assert await api.runtime.hand_back(job, '{"v":1}') is True
    assert await api.runtime.hand_back(job, '{"v":1}') is True  # a retry: no second copy
    assert await redis_client.zcard(keys.due_dates()) == 1
    assert await claim('{"v":2}') == 1  # the next leader takes it
    assert await api.runtime.hand_back(job, '{"v":1}') is False  # the late retry
    assert await api.runtime.definition("d") is None
    assert await api.runtime.hand_back(job, '{"v":2}') is True  # its own claim's marker
    await api.runtime.pause_job("d")
    assert await claim('{"v":3}') == -2  # paused: not claimed
    await api.runtime.resume_job("d")
    assert await claim('{"v":3}') == 1
    with pytest.raises(JobLookupError):
        await api.runtime.remove_job("d")  # in flight: gone for the user, and not put back
    assert await api.runtime.hand_back(job, '{"v":3}') is False
    await api.runtime.add_job(
        "note",
        {"type": "date", "run_date": iso(datetime.fromtimestamp(run_ms / 1000, UTC))},
        id="d",
    )
    job = await api.runtime.definition("d")
    assert job is not None
    assert await claim('{"v":4}', marker_ms=1) == 1

    async def expired() -> bool:
        return not await redis_client.exists(keys.job_taken("d"))

    await async_wait_until(expired, 5, message="the marker expired")
    assert await api.runtime.hand_back(job, '{"v":4}') is False


async def test_claim_refuses_paused_and_takes_a_date_job_once(
    redis_client: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    lease = keys.lease("leader")
    await redis_client.set(lease, '{"v":1}')
    await redis_client.hset(keys.runtime_jobs(), mapping={"d": '{"rev":"r1"}', "e": '{"rev":"r1"}'})
    await redis_client.zadd(keys.due_dates(), {"d": 1000, "e": 2000})
    await redis_client.sadd(keys.paused_jobs(), "p")
    all_keys = [
        lease,
        keys.last_fire(),
        keys.runs(),
        keys.paused_jobs(),
        keys.runtime_jobs(),
        keys.due_dates(),
    ]

    async def claim(job_id: str, ms: int, final: str, rev: str = "r1") -> list[Any]:
        args = ['{"v":1}', job_id, ms, "run", "", 100, final, rev]
        return list(await CLAIM_FIRE(redis_client, all_keys, args))

    assert (await claim("p", 1000, "0"))[0] == -2
    assert (await claim("e", 1000, "1"))[0] == -3  # not its run_date
    assert (await claim("d", 1000, "1", rev="r0"))[0] == -3  # replaced since read
    assert (await claim("d", 1000, "1"))[0] == 1
    assert not await redis_client.hexists(keys.runtime_jobs(), "d")
    assert await redis_client.zscore(keys.due_dates(), "d") is None
    assert not await redis_client.hexists(keys.last_fire(), "d")  # no claim record left
    assert (await claim("d", 1000, "1"))[0] == -3
    assert await redis_client.hexists(keys.runtime_jobs(), "e")


async def test_pending_date_jobs_wait_in_redis_and_the_leader_holds_only_the_next_seconds(
    make: Make, redis_client: Redis, namespace: str
) -> None:
    """3,000 reminders an hour away cost the leader nothing (not in APScheduler, no
    timer), on the first leader and on the next one; a job due soon among them runs
    once; a held job replaced with a new run_date runs once at the new time; a held job
    removed does not run; a fired date job's id can be used again."""
    calls: list[tuple[Any, ...]] = []
    first = make("first", calls)
    api = make("api", settings={"role": "api"})
    await first.start()
    await api.start()
    await leader_of(first)
    later = {"type": "date", "run_date": iso(datetime.now(UTC) + timedelta(hours=1))}
    for start in range(0, 3000, 20):
        await asyncio.gather(
            *(api.runtime.add_job("note", later, id=f"later-{i}") for i in range(start, start + 20))
        )
    now = datetime.now(UTC)
    soon, moved, gone = (now + timedelta(milliseconds=ms) for ms in (300, 600, 700))
    await api.runtime.add_job("note", {"type": "date", "run_date": iso(soon)}, id="soon")
    await api.runtime.add_job("note", {"type": "date", "run_date": iso(moved)}, id="moved")
    await api.runtime.add_job("note", {"type": "date", "run_date": iso(gone)}, id="gone")
    await async_wait_until(lambda: first._follower.due.held >= 2, 5, message="held: due soon")
    new_time = datetime.now(UTC) + timedelta(milliseconds=1200)
    await api.runtime.add_job(
        "note", {"type": "date", "run_date": iso(new_time)}, id="moved", replace=True
    )
    await api.runtime.remove_job("gone")
    await async_wait_until(
        lambda: {c[0] for c in calls} >= {"soon", "moved"}, 5, message="soon and moved ran"
    )
    ran = {c[0]: c[1] for c in calls}
    assert sorted(c[0] for c in calls) == ["moved", "soon"], "each once, 'gone' not at all"
    assert abs((ran["moved"] - new_time).total_seconds()) < 0.002, "at the new run_date"
    assert not [j for j in first.apscheduler.get_jobs() if j.id.startswith("later-")]
    assert first._follower.due.held == 0
    assert await redis_client.zcard(Keys(namespace).due_dates()) == 3000

    await api.runtime.add_job("note", {"type": "date"}, id="soon")  # the id, used again
    await async_wait_until(
        lambda: [c for c in calls if c[0] == "soon"][1:], 5, message="a reused id runs again"
    )
    await first.stop(timeout=2)
    second = make("second", calls)
    await second.start()
    await leader_of(second)
    await async_wait_until(lambda: second._follower.due.polls >= 2, 5, message="index read")
    assert second._follower.due.held == 0
    assert not [j for j in second.apscheduler.get_jobs() if j.id.startswith("later-")]
    assert len(await second.list_jobs()) == 3000
    assert len(calls) == 3


async def test_a_backlog_of_overdue_date_jobs_runs_once_when_a_leader_comes(
    make: Make, redis_client: Redis, namespace: str
) -> None:
    """2,500 date jobs fall due while no process leads: the next leader reads them in
    batches as its runner takes them, and runs each once, none missed."""
    calls: list[tuple[Any, ...]] = []
    api = make("api", settings={"role": "api"})
    await api.start()
    due = datetime.now(UTC) + timedelta(milliseconds=200)
    trigger = {"type": "date", "run_date": iso(due)}
    ids = [f"b-{i}" for i in range(2500)]
    for start in range(0, len(ids), 20):
        await asyncio.gather(
            *(
                api.runtime.add_job("note", trigger, id=i, misfire_grace_time=120)
                for i in ids[start : start + 20]
            )
        )
    await async_wait_until(lambda: datetime.now(UTC) > due, 30, message="all overdue")
    leader = make("leader", calls)
    await leader.start()
    await leader_of(leader)
    await async_wait_until(lambda: len(calls) >= len(ids), 60, message="the backlog ran")
    assert sorted(c[0] for c in calls) == sorted(ids), "each once"
    keys = Keys(namespace)
    await async_wait_until(
        lambda: leader._follower.due.held == 0 and not leader._runner.tasks, 10, message="settled"
    )
    assert await redis_client.zcard(keys.due_dates()) == 0
    assert await redis_client.hlen(keys.runtime_jobs()) == 0
    assert leader._runner.stats.missed == 0


async def test_a_date_job_added_again_while_its_run_goes_on_runs_once_more(
    make: Make, redis_client: Redis, namespace: str
) -> None:
    """A reminder that reschedules itself: the new add, due while the first run still
    goes on, runs once; nothing is left behind."""
    leader = make("leader")
    runs: list[int] = []
    finish = asyncio.Event()

    @leader.task("again")
    async def again(ctx: JobContext, n: int) -> None:
        runs.append(n)
        if n == 1:
            soon = iso(datetime.now(UTC) + timedelta(milliseconds=200))
            await leader.runtime.add_job(
                "again", {"type": "date", "run_date": soon}, id=ctx.job_id, kwargs={"n": 2}
            )
            await finish.wait()

    await leader.start()
    await leader_of(leader)
    await leader.runtime.add_job("again", {"type": "date"}, id="self", kwargs={"n": 1})
    await async_wait_until(lambda: runs == [1, 2], 10, message="the second add ran")
    finish.set()
    keys = Keys(namespace)

    async def settled() -> bool:
        return (
            not leader._runner.tasks
            and leader._follower.due.held == 0
            and await redis_client.zcard(keys.due_dates()) == 0
            and await redis_client.hlen(keys.runtime_jobs()) == 0
        )

    await async_wait_until(settled, 10, message="nothing left")
    assert runs == [1, 2]
    assert not await redis_client.hexists(keys.last_fire(), "self")


async def test_jobs_stored_before_the_due_dates_index_are_indexed_by_the_next_leader(
    make: Make, redis_client: Redis, namespace: str
) -> None:
    """Definitions written by an earlier version (no ``due_ms``, no index entries): the
    next leader indexes them once; a date job fires, a paused one waits and fires on
    resume, a recurring one is scheduled; a later leader finds nothing to index."""
    import json as json_

    calls: list[tuple[Any, ...]] = []
    leader = make("leader", calls)
    keys = Keys(namespace)
    at = iso(datetime.now(UTC) + timedelta(milliseconds=500))
    old = {
        "a": leader.runtime.build("note", {"type": "date", "run_date": at}, id="a"),
        "b": leader.runtime.build("note", {"type": "date", "run_date": at}, id="b"),
        "c": leader.runtime.build("note", {"type": "interval", "seconds": 3600}, id="c"),
    }

    def stored_before(job: Any) -> str:
        data = json_.loads(job.to_json())
        del data["due_ms"]
        return json_.dumps(data)

    await redis_client.hset(
        keys.runtime_jobs(), mapping={k: stored_before(j) for k, j in old.items()}
    )
    await redis_client.sadd(keys.paused_jobs(), "b", "declared-elsewhere")
    await leader.start()
    await leader_of(leader)
    assert leader._follower.indexed == 3
    assert await redis_client.zrange(keys.due_dates(), 0, -1) == [b"a"]
    assert await redis_client.smembers(keys.recurring_jobs()) == {b"c"}
    assert leader.apscheduler.get_job("c") is not None
    await async_wait_until(lambda: calls, 5, message="the old date job ran")
    await leader.runtime.resume_job("b")
    await async_wait_until(lambda: len(calls) == 2, 5, message="the resumed old date job ran")
    assert sorted(c[0] for c in calls) == ["a", "b"]
    # A process of the older version adds one during a rolling update: its notice
    # arrives, and the leader indexes it then.
    at = iso(datetime.now(UTC) + timedelta(milliseconds=300))
    late = leader.runtime.build("note", {"type": "date", "run_date": at}, id="d")
    await redis_client.hset(keys.runtime_jobs(), "d", stored_before(late))
    await redis_client.publish(keys.job_changes(), "job:d")
    await async_wait_until(lambda: len(calls) == 3, 5, message="the rolling-update job ran")
    assert calls[-1][0] == "d"
    assert await redis_client.hlen(keys.runtime_jobs()) == 1  # c
    await leader.stop(timeout=2)
    again = make("again", calls)
    await again.start()
    await leader_of(again)
    assert again._follower.indexed == 0


async def test_due_index_prune_keeps_entries_that_match_their_job(
    redis_client: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    await redis_client.hset(
        keys.runtime_jobs(),
        mapping={"match": '{"due_ms":1000}', "moved": '{"due_ms":3000}', "junk": "not json"},
    )
    await redis_client.zadd(
        keys.due_dates(), {"match": 1000, "moved": 2000, "junk": 1, "orphan": 5}
    )
    ids = ["match", "moved", "junk", "orphan", "absent"]
    assert await DUE_PRUNE(redis_client, [keys.runtime_jobs(), keys.due_dates()], ids) == 3
    assert await redis_client.zrange(keys.due_dates(), 0, -1) == [b"match"]


def test_cli_jobs_add_list_pause_resume_run_remove(redis_url: str, namespace: str) -> None:
    import json as json_

    from typer.testing import CliRunner

    from coordinator.ops.cli import app

    runner = CliRunner()
    where = ["--redis-url", redis_url, "--namespace", namespace]

    def cli(*argv: str) -> Any:
        result = runner.invoke(app, ["jobs", *argv, *where, "--json"])
        assert result.exit_code == 0, result.output
        return json_.loads(result.stdout)

    added = cli(
        "add",
        "note",
        '{"type": "interval", "seconds": 30}',
        "--id",
        "c1",
        "--kwargs",
        '{"text": "hi"}',
    )
    assert added["id"] == "c1" and added["kwargs"] == {"text": "hi"}
    assert [j["id"] for j in cli("list")["jobs"]] == ["c1"]
    assert cli("pause", "c1")["paused"] is True
    assert cli("resume", "c1")["paused"] is False
    assert cli("run", "c1")["job_id"] == "c1"
    assert cli("remove", "c1") == {"job_id": "c1", "removed": True}
    assert cli("list")["jobs"] == []
    missing = runner.invoke(app, ["jobs", "pause", "nope", *where])
    assert missing.exit_code == 1 and "no job with the id 'nope'" in missing.output
    bad = runner.invoke(app, ["jobs", "add", "note", '{"type": "weekly"}', *where])
    assert bad.exit_code == 2 and "trigger.type" in bad.output
    text = runner.invoke(app, ["jobs", "list", *where])
    assert text.exit_code == 0 and text.stdout.strip() == "no jobs"

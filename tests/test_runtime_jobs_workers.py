"""Runtime jobs over HTTP under ``uvicorn --workers 4`` on a real Redis.

Each request goes to a chosen worker (a keep-alive connection stays on one worker):
a job added, paused, run or removed through a worker that does not lead must take
effect on the leader, once. Runs are read from the Redis list the test app's task
writes (tests/support/runtime_app.py) and from ``GET /api/jobs/runs``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from .support.app_cluster import AppCluster
from .support.timing import FAST_ENV

pytestmark = pytest.mark.slow

APP = "tests.support.runtime_app:app"


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat()


async def calls(redis: Redis, namespace: str, job_id: str | None = None) -> list[dict[str, Any]]:
    out = [json.loads(x) for x in await redis.lrange(f"rt-calls:{namespace}", 0, -1)]
    return [c for c in out if job_id is None or c["job_id"] == job_id]


async def wait_calls(
    redis: Redis, namespace: str, job_id: str, n: int, timeout: float = 10
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = await calls(redis, namespace, job_id)
        if len(found) >= n:
            return found
        assert time.monotonic() < deadline, f"{job_id}: {len(found)} runs, wanted {n}"
        await asyncio.sleep(0.02)


async def pinned_clients(cluster: AppCluster) -> tuple[str, list[httpx.AsyncClient]]:
    """The leader's instance id, and one keep-alive client per non-leading worker."""
    deadline = time.monotonic() + 30
    while True:
        leader = (await cluster.get("/api/leader")).json()["leader"]
        if leader is not None:
            break
        assert time.monotonic() < deadline, "no leader"
        await asyncio.sleep(0.05)
    by_instance: dict[str, httpx.AsyncClient] = {}
    for _ in range(10):
        for client in await cluster.publishers(8):
            instance = (await client.get("/api/instance")).json()["instance_id"]
            if instance == leader["instance_id"] or instance in by_instance:
                await client.aclose()
            else:
                by_instance[instance] = client
        if len(by_instance) >= 3:
            break
    assert len(by_instance) >= 3, "could not reach three workers that do not lead"
    return leader["instance_id"], list(by_instance.values())


async def test_jobs_added_paused_run_and_removed_through_other_workers(
    redis_url: str, redis_client: Redis, namespace: str
) -> None:
    async with AppCluster(redis_url, namespace, 4, env=FAST_ENV, app=APP).running() as cluster:
        leader, (a, b, c, *_) = await pinned_clients(cluster)
        # A date job added through one worker runs once, on the leader, at its time.
        # At least a second ahead (whole seconds), so the job is still listed when the
        # other worker reads it back right after the add.
        run_date = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
        body = {
            "id": "remind-1",
            "task": "note",
            "trigger": {"type": "date", "run_date": iso(run_date)},
            "kwargs": {"text": "hi"},
        }
        response = await a.post("/api/jobs", json=body)
        assert response.status_code == 201, response.text
        assert response.json()["source"] == "runtime"
        assert (await b.get("/api/jobs/remind-1")).json()["task"] == "note"
        (run,) = await wait_calls(redis_client, namespace, "remind-1", 1)
        assert run["instance_id"] == leader and run["text"] == "hi"
        assert run["scheduled_ms"] == round(run_date.timestamp() * 1000)
        assert run["started_ms"] - run["scheduled_ms"] < 200, "the date job started late"
        listed = [j["id"] for j in (await c.get("/api/jobs")).json()]
        assert "remind-1" not in listed and "code-hourly" in listed
        assert (await c.get("/api/jobs/remind-1")).status_code == 404
        # An interval job added through another worker runs once per fire.
        start = datetime.now(UTC) + timedelta(milliseconds=500)
        body = {
            "id": "tick",
            "task": "note",
            "trigger": {"type": "interval", "seconds": 0.4, "start_date": iso(start)},
        }
        added = await b.post("/api/jobs", json=body)
        assert added.status_code == 201, added.text
        stored_start = datetime.fromisoformat(added.json()["trigger_spec"]["start_date"])
        await wait_calls(redis_client, namespace, "tick", 3)
        # Pause through a third worker: no fire while paused.
        response = await c.post("/api/jobs/tick/pause")
        assert response.status_code == 200 and response.json()["paused"] is True
        await asyncio.sleep(0.1)  # a fire claimed just before the pause may still start
        before = len(await calls(redis_client, namespace, "tick"))
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert len(await calls(redis_client, namespace, "tick")) == before, "fired paused"
            await asyncio.sleep(0.05)
        # Resume: fires again, on the same phase.
        response = await a.post("/api/jobs/tick/resume")
        assert response.status_code == 200 and response.json()["paused"] is False
        await wait_calls(redis_client, namespace, "tick", before + 2)
        # Run: exactly one extra run.
        response = await b.post("/api/jobs/tick/run")
        assert response.status_code == 202, response.text
        manual_ms = round(
            datetime.fromisoformat(response.json()["scheduled_at"]).timestamp() * 1000
        )
        deadline = time.monotonic() + 10
        while not [
            x
            for x in await calls(redis_client, namespace, "tick")
            if x["scheduled_ms"] == manual_ms
        ]:
            assert time.monotonic() < deadline, "the manual run never came"
            await asyncio.sleep(0.02)
        # DELETE stops it.
        assert (await c.delete("/api/jobs/tick")).status_code == 204
        await asyncio.sleep(0.1)
        after = len(await calls(redis_client, namespace, "tick"))
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert len(await calls(redis_client, namespace, "tick")) == after, "fired removed"
            await asyncio.sleep(0.05)
        ticks = await calls(redis_client, namespace, "tick")
        step_ms = 400
        start_ms = round(stored_start.timestamp() * 1000)
        scheduled = [t["scheduled_ms"] for t in ticks if t["scheduled_ms"] != manual_ms]
        assert all((ms - start_ms) % step_ms == 0 for ms in scheduled), "off phase"
        assert all(t["instance_id"] == leader for t in ticks)
        counts = Counter((t["job_id"], t["scheduled_ms"]) for t in ticks)
        assert max(counts.values()) == 1, "a fire ran twice"
        # The run history shows each run once, with instance and token.
        history = (await a.get("/api/jobs/runs", params={"limit": 1000})).json()
        ours = [r for r in history if r["job_id"] in ("tick", "remind-1") and r["status"] == "ok"]
        keyed = Counter((r["job_id"], r["scheduled_at"]) for r in ours)
        assert max(keyed.values()) == 1 and len(ours) == len(ticks) + 1
        assert all(r["instance_id"] == leader and r["fencing_token"] for r in ours)
        for client in (a, b, c):
            await client.aclose()


async def test_bad_input_is_a_4xx_naming_the_field(redis_url: str, namespace: str) -> None:
    async with (
        AppCluster(redis_url, namespace, 2, env=FAST_ENV, app=APP).running() as cluster,
        httpx.AsyncClient(base_url=cluster.base, timeout=10) as http,
    ):
        ok = {"task": "note", "trigger": {"type": "interval", "seconds": 60}}
        long_ago = "2001-01-01T00:00:00Z"
        cases: list[tuple[dict[str, Any], int, list[str]]] = [
            ({**ok, "task": "nope"}, 422, ["body", "task"]),
            ({**ok, "trigger": {"type": "weekly"}}, 422, ["body", "trigger", "type"]),
            (
                {**ok, "trigger": {"type": "cron", "hour": "25"}},
                422,
                ["body", "trigger", "hour"],
            ),
            (
                {
                    **ok,
                    "trigger": {
                        "type": "date",
                        "run_date": "2026-11-23T18:00:00Z",
                        "timezone": "Nowhere/City",
                    },
                },
                422,
                ["body", "trigger", "timezone"],
            ),
            (
                {**ok, "trigger": {"type": "date", "run_date": long_ago}},
                422,
                ["body", "trigger", "run_date"],
            ),
            ({**ok, "kwargs": {"text": "x" * 20000}}, 413, ["body", "kwargs"]),
            ({**ok, "id": "no spaces"}, 422, ["body", "id"]),
            ({**ok, "id": "runs"}, 422, ["body", "id"]),
            ({**ok, "kwargs": {"unknown": 1}}, 422, ["body", "kwargs"]),
            ({"trigger": {"type": "date"}}, 422, ["body", "task"]),
        ]
        for body, status, loc in cases:
            response = await http.post("/api/jobs", json=body)
            assert response.status_code == status, (body, response.text)
            assert response.json()["detail"][0]["loc"] == loc, response.text
        assert (await http.post("/api/jobs", content=b"{")).status_code == 422
        for raw, loc in (
            (b"1e999", ["body"]),
            (b'{"task": "note", "trigger": {"type": "interval", "seconds": 1e999}}', ["body"]),
            (b'{"task": "note", "trigger": {"type": "interval", "seconds": NaN}}', ["body"]),
            (
                b'{"task": "note", "trigger": {"type": "date"}, "coalesce": []}',
                ["body", "coalesce"],
            ),
            (b"[" * 50_000 + b"]" * 50_000, ["body"]),
        ):
            response = await http.post("/api/jobs", content=raw)
            assert response.status_code == 422, (raw[:60], response.text)
            assert response.json()["detail"][0]["loc"] == loc, response.text
        too_big = await http.post("/api/jobs", content=b'{"args": "' + b"x" * 200_000 + b'"}')
        assert too_big.status_code == 413, too_big.text
        response = await http.get("/api/jobs/bad%20id")
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["path", "job_id"]
        assert (await http.get("/api/jobs/missing")).status_code == 404
        assert (await http.post("/api/jobs/missing/run")).status_code == 404
        assert (await http.delete("/api/jobs/missing")).status_code == 404
        assert (await http.delete("/api/jobs/code-hourly")).status_code == 409
        assert (await http.post("/api/jobs", json={**ok, "id": "code-hourly"})).status_code == 409
        assert (await http.post("/api/jobs", json={**ok, "id": "dup"})).status_code == 201
        assert (await http.post("/api/jobs", json={**ok, "id": "dup"})).status_code == 409
        replaced = await http.post("/api/jobs", json={**ok, "id": "dup", "replace": True})
        assert replaced.status_code == 201
        assert (await http.get("/api/jobs/runs?limit=3")).status_code == 200
        paused = await http.post("/api/jobs/code-hourly/pause")
        assert paused.status_code == 200 and paused.json()["paused"] is True


async def test_full_restart_keeps_runtime_jobs_and_paused_state(
    redis_url: str, redis_client: Redis, namespace: str
) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=30)
    async with (
        AppCluster(redis_url, namespace, 2, env=FAST_ENV, app=APP).running() as cluster,
        httpx.AsyncClient(base_url=cluster.base, timeout=10) as http,
    ):
        for i in range(20):
            body = {
                "id": f"j{i}",
                "task": "note",
                "trigger": {"type": "date", "run_date": iso(soon)},
            }
            assert (await http.post("/api/jobs", json=body)).status_code == 201
        body = {"id": "held", "task": "note", "trigger": {"type": "interval", "seconds": 0.3}}
        assert (await http.post("/api/jobs", json=body)).status_code == 201
        assert (await http.post("/api/jobs/held/pause")).status_code == 200
        assert (await http.post("/api/jobs/code-hourly/pause")).status_code == 200
    # Every process has exited; a new server starts on the same Redis.
    async with AppCluster(redis_url, namespace, 2, env=FAST_ENV, app=APP).running() as cluster:
        jobs = {j["id"]: j for j in (await cluster.get("/api/jobs")).json()}
        assert {f"j{i}" for i in range(20)} | {"held", "code-hourly"} == set(jobs)
        assert jobs["held"]["paused"] and jobs["code-hourly"]["paused"]
        assert not jobs["j0"]["paused"] and jobs["j0"]["next_fire_at"] is not None
        await asyncio.sleep(0.9)
        assert await calls(redis_client, namespace, "held") == []

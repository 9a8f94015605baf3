"""Runtime jobs under leader faults: 2 groups x 2 scheduler nodes (``tests.chaos.node``,
which registers the task ``note``) lead; 2 ``uvicorn`` workers of
``tests.support.runtime_app`` with ``COORDINATOR_ROLE=api`` (processes that never lead)
take the changes over HTTP. Each round adds date jobs (due before, during and after
the fault; long and short grace), an interval job, pauses and removes some, then
SIGKILLs or SIGSTOPs the leader while more date jobs are added that fall due during
the switch. The checker then requires: no fire twice, no definition lost, each date
job run once within its grace or recorded ``missed`` (only with a grace shorter than
the failover), nothing started after its pause or removal, and the final job list
exactly what should remain.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis as redis_sync

from coordinator import Keys

from ..support.app_cluster import AppCluster
from ..support.procs import wait_for
from .checker import check, measure, runtime_missed
from .conftest import record
from .nodes import FAILOVER_LIMIT_S, NodeCluster

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

LONG_GRACE = 20
SHORT_GRACE = 1


def iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


class Driver:
    """Changes runtime jobs through the api workers and records each acknowledged one."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.ops: list[dict[str, Any]] = []
        self.date_jobs: list[str] = []
        self.stopped: set[str] = set()

    async def add_date(self, job: str, in_s: float, grace: int) -> None:
        run_ms = round(time.time() * 1000 + in_s * 1000)
        trigger = {"type": "date", "run_date": iso(run_ms)}
        await self._add(job, trigger, grace, "date", run_ms)
        self.date_jobs.append(job)

    async def add_interval(self, job: str, seconds: float) -> None:
        await self._add(job, {"type": "interval", "seconds": seconds}, LONG_GRACE, "interval", 0)

    async def _add(self, job: str, trigger: dict[str, Any], grace: int, kind: str, ms: int) -> None:
        body = {"id": job, "task": "note", "trigger": trigger, "misfire_grace_time": grace}
        response = await self.http.post("/api/jobs", json=body)
        assert response.status_code == 201, response.text
        self.ops.append(
            {"op": "add", "job": job, "t": time.monotonic(), "type": kind}
            | {"run_ms": ms, "grace_s": grace}
        )

    async def change(self, op: str, job: str) -> None:
        if op == "remove":
            response = await self.http.delete(f"/api/jobs/{job}")
            assert response.status_code == 204, response.text
        else:
            response = await self.http.post(f"/api/jobs/{job}/{op}")
            assert response.status_code == 200, response.text
        self.ops.append({"op": op, "job": job, "t": time.monotonic()})
        self.stopped.add(job)


def unsettled(c: NodeCluster, url: str, namespace: str, jobs: list[str]) -> list[str]:
    """The date jobs that have neither started nor been recorded missed."""
    started = {e["job"] for e in c.starts()}
    client = redis_sync.Redis.from_url(url, socket_timeout=5)
    try:
        runs = [json.loads(r) for r in client.lrange(Keys(namespace).runs(), 0, -1)]
    finally:
        client.close()
    missed = {r["job_id"] for r in runs if r["status"] == "missed"}
    return [j for j in jobs if j not in started and j not in missed]


def job_state(url: str, namespace: str, jobs: list[str], ops: list[dict[str, Any]]) -> str:
    """What Redis and the driver know of ``jobs``: for a failure message."""
    keys = Keys(namespace)
    client = redis_sync.Redis.from_url(url, socket_timeout=5, decode_responses=True)
    try:
        lines = []
        for job in jobs:
            definition = client.hget(keys.runtime_jobs(), job)
            due = client.zscore(keys.due_dates(), job)
            runs = [r for r in client.lrange(keys.runs(), 0, -1) if f'"{job}"' in r]
            added = [o for o in ops if o["job"] == job]
            lines.append(
                f"{job}: ops={added} definition={definition} due_index={due} runs={runs} "
                f"now_ms={round(time.time() * 1000)}"
            )
        return "\n".join(lines)
    finally:
        client.close()


async def test_runtime_jobs_under_sigkill_and_sigstop(
    redis_server: Any, namespace: str, chaos_rounds: int
) -> None:
    c = NodeCluster(redis_server.port, namespace)
    api = AppCluster(
        redis_server.url,
        namespace,
        workers=2,
        app="tests.support.runtime_app:app",
        env={"COORDINATOR_ROLE": "api"},
    )
    faults = [c.sigkill_leader, c.sigstop_leader] * chaos_rounds
    listed: list[str] = []
    try:
        await asyncio.to_thread(c.wait_ready)
        async with (
            api.running(),
            httpx.AsyncClient(base_url=api.base, timeout=10) as http,
        ):
            d = Driver(http)
            for r, fault in enumerate(faults):
                await asyncio.to_thread(c.wait_ticks, 3)
                await d.add_interval(f"i{r}", 0.5)
                if r:
                    await d.change("remove", f"i{r - 1}")
                for k in range(6):
                    await d.add_date(f"r{r}-due{k}", 0.3 + 0.5 * k, LONG_GRACE)
                for k in range(3):
                    await d.add_date(f"r{r}-short{k}", 0.5 + k, SHORT_GRACE)
                for k in range(2):
                    await d.add_date(f"r{r}-paused{k}", 2 + k, LONG_GRACE)
                    await d.change("pause", f"r{r}-paused{k}")
                await d.add_date(f"r{r}-removed", 2, LONG_GRACE)
                await d.change("remove", f"r{r}-removed")
                # The fault, with date jobs added while it lasts (due during the switch).
                faulting = asyncio.create_task(asyncio.to_thread(fault))
                k = 0
                while not faulting.done():
                    grace = LONG_GRACE if k % 2 == 0 else SHORT_GRACE
                    await d.add_date(f"r{r}-during{k}", 0.2, grace)
                    k += 1
                    await asyncio.wait({faulting}, timeout=0.2)
                await faulting
            await asyncio.to_thread(c.wait_ticks, 3)
            due = [j for j in d.date_jobs if j not in d.stopped]
            try:
                await asyncio.to_thread(
                    wait_for,
                    lambda: not unsettled(c, redis_server.url, namespace, due),
                    LONG_GRACE + FAILOVER_LIMIT_S,
                    "every date job run or recorded missed",
                    c.all,
                )
            except AssertionError as timeout:
                left = unsettled(c, redis_server.url, namespace, due)
                state = job_state(redis_server.url, namespace, left, d.ops)
                raise AssertionError(f"never settled:\n{state}\n{timeout}") from None
            jobs = (await http.get("/api/jobs")).json()
            listed = [j["id"] for j in jobs if j["source"] == "runtime"]
    finally:
        c.stop()
    history = c.history(redis_server.url)
    history.runtime_ops = d.ops
    history.runtime_listed = listed
    violations = check(history, FAILOVER_LIMIT_S)
    measured = measure(history)
    adds = sum(1 for o in d.ops if o["op"] == "add")
    record("scheduler: runtime jobs, sigkill + sigstop", len(faults), measured, len(violations))
    print(
        f"runtime jobs: {adds} added, {len(d.stopped)} paused or removed, "
        f"{runtime_missed(history)} date jobs recorded missed; {measured}"
    )
    assert violations == [], "\n".join(violations)

"""The demo app (``app.main:app``, built on ``Coordinator``) on a real Redis Cluster
(3 primaries + 3 replicas) with 3 uvicorn workers: the HTTP contract as on one node.

One leader; a broadcast reaches SSE clients on every worker, in order, and a client
resuming with Last-Event-ID gets the rest; a runtime job added on one worker runs once;
shared state written on one worker is read on every other; a session made on one worker
is live on the others and ends everywhere; the ``coordinator`` command reads the status
over every primary. Failover of a shard under the relay and the election is covered by
tests/test_relay_cluster.py and tests/test_election_cluster.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis as redis_sync

from coordinator.testing import async_wait_until

from .support.app_cluster import AppCluster, wait_messages
from .support.pinned import Pinned, close_all, pin_workers
from .test_ops_connections import cluster_acl_line

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]

WORKERS = 3


@dataclass
class Demo:
    cluster: AppCluster
    url: str
    namespace: str
    pinned: dict[str, list[Pinned]]
    user: str
    ports: list[int]

    @property
    def workers(self) -> list[Pinned]:
        return [group[0] for group in self.pinned.values()]


# The limits on (high enough never to refuse these tests) and WAIT for a replica, so
# their commands run under the ACL too.
LIMITS_ENV = {
    "COORDINATOR_PUBLISH_RATE_PER_CLIENT": "1000",
    "COORDINATOR_PUBLISH_BURST": "1000",
    "COORDINATOR_SSE_MAX_CONNECTIONS_PER_CLIENT": "100",
    "COORDINATOR_MIN_REPLICAS": "1",  # publishes, claims and state writes WAIT
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def demo(cluster_url: str) -> AsyncIterator[Demo]:
    """The demo, connected as an ACL user given README's Redis Cluster line on every
    node (the session's cluster: the user is this module's own)."""
    namespace = f"ac{uuid.uuid4().hex[:8]}"
    user, password = f"app{uuid.uuid4().hex[:6]}", "s3cret"
    for port in _ports(cluster_url):
        with redis_sync.Redis(port=port, decode_responses=True) as admin:
            line = cluster_acl_line(user, password, namespace)
            # The demo's own keys (its jobs' data), as any app adds its own.
            admin.execute_command("ACL", "SETUSER", *line, f"~demo:{namespace}:*")
    seeds = cluster_url.split("://", 1)[1]
    url = f"redis+cluster://{user}:{password}@{seeds}"
    cluster = AppCluster(url, namespace, workers=WORKERS, env=LIMITS_ENV, app="app.main:app")
    async with cluster.running():
        pinned = await pin_workers(cluster.base, WORKERS)
        try:
            yield Demo(cluster, url, namespace, pinned, user, _ports(cluster_url))
        finally:
            await close_all(pinned)


def _ports(url: str) -> list[int]:
    return [int(seed.rsplit(":", 1)[1]) for seed in url.split("://", 1)[1].split(",")]


def refused(user: str, ports: list[int]) -> list[dict[str, Any]]:
    """What ``ACL LOG`` on every node says ``user`` was refused (redis-py tries
    ``CLIENT SETINFO`` and ignores a refusal)."""
    found = []
    for port in ports:
        with redis_sync.Redis(port=port, decode_responses=True) as admin:
            for entry in admin.acl_log(count=128):
                if entry.get("username") == user and "setinfo" not in str(entry):
                    found.append({"node": port, **entry})
    return found


async def test_one_leader_every_worker_agrees(demo: Demo) -> None:
    async def agreed() -> set[str] | None:
        seen = set()
        for worker in demo.workers:
            leader = (await worker.get("/api/leader")).json()["leader"]
            if leader is None:
                return None
            seen.add(leader["instance_id"])
        return seen if len(seen) == 1 else None

    seen = await async_wait_until(agreed, 20, message="one leader named by every worker")
    assert seen
    (leader,) = seen
    leading = [(await w.get("/api/instance")).json()["is_leader"] for w in demo.workers]
    assert leading.count(True) == 1 and leader in demo.pinned


async def test_a_broadcast_reaches_every_worker_in_order_and_resumes(demo: Demo) -> None:
    channel = "orders-" + uuid.uuid4().hex[:6]
    path = f"/api/channels/{channel}/events"
    clients = await demo.cluster.clients(path, WORKERS, min_instances=WORKERS)
    publishers = await demo.cluster.publishers(WORKERS)
    try:
        ids = []
        for n in range(30):
            event_id, _ = await demo.cluster.publish(publishers[n % WORKERS], channel, {"n": n})
            ids.append(event_id)
        await wait_messages(clients, 30)
        for client in clients:
            got = [json.loads(e.data)["n"] for e in client.of("message")]
            assert got == list(range(30)), (client.instance, got)
        resumed = await demo.cluster.clients(path, 1, min_instances=1, last_event_id=ids[9])
        await wait_messages(resumed, 20)
        assert [json.loads(e.data)["n"] for e in resumed[0].of("message")] == list(range(10, 30))
    finally:
        for client in [*clients, *locals().get("resumed", [])]:
            await client.close()
        for publisher in publishers:
            await publisher.aclose()


async def test_a_runtime_job_added_on_one_worker_runs_once(demo: Demo) -> None:
    job_id = "remind-" + uuid.uuid4().hex[:6]
    run_date = (datetime.now(UTC) + timedelta(milliseconds=500)).isoformat()
    body = {
        "id": job_id,
        "task": "remind",
        "trigger": {"type": "date", "run_date": run_date},
        "kwargs": {"message": "on a cluster"},
    }
    added = await demo.workers[-1].request("POST", "/api/jobs", json=body)
    assert added.status_code == 201, added.text

    async def ran() -> list[dict[str, Any]]:
        runs = (await demo.workers[0].get("/api/jobs/runs?limit=200")).json()
        return [r for r in runs if r["job_id"] == job_id]

    (run,) = await async_wait_until(ran, 20, message="the job's run record")
    assert run["status"] == "ok"
    for worker in demo.workers:
        assert (await worker.get(f"/api/jobs/{job_id}")).status_code == 404, "a run date job leaves"
    assert (await demo.workers[1].request("POST", "/api/jobs", json={"id": 1})).status_code == 422


async def test_shared_state_written_on_one_worker_is_read_on_every_other(demo: Demo) -> None:
    key = "plan-" + uuid.uuid4().hex[:6]
    first = await demo.workers[0].put(f"/api/state/{key}", json={"value": {"tier": "gold"}})
    assert first.status_code == 200, first.text
    version = first.json()["version"]

    async def everywhere() -> bool:
        for worker in demo.workers:
            response = await worker.get(f"/api/state/{key}")
            if response.status_code != 200 or response.json()["version"] < version:
                return False
        return True

    await async_wait_until(everywhere, 10, message="the value on every worker")
    stale = await demo.workers[1].put(f"/api/state/{key}", json={"value": 1, "version": 0})
    assert stale.status_code == 409, stale.text


async def test_a_session_made_on_one_worker_is_live_everywhere_and_ends_everywhere(
    demo: Demo,
) -> None:
    made = await demo.workers[0].request("POST", "/api/session", json={"user": "ada"})
    assert made.status_code == 200, made.text
    # The cookie as a browser sends it (per-request cookies= is deprecated in httpx).
    cookie = {"Cookie": "; ".join(f"{k}={v}" for k, v in made.cookies.items())}
    demo.workers[0].client.cookies.clear()
    for worker in demo.workers:
        seen = await worker.get("/api/session", headers=cookie)
        assert seen.status_code == 200 and seen.json()["user"] == "ada", seen.text
    ended = await demo.workers[1].request("DELETE", "/api/session", headers=cookie)
    assert ended.status_code == 204, ended.text
    for worker in demo.workers:
        assert (await worker.get("/api/session", headers=cookie)).status_code == 401


async def test_the_coordinator_command_reads_the_status_over_every_primary(demo: Demo) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "coordinator.ops.cli", "status", "--json"],
        env={**os.environ, "REDIS_URL": demo.url, "COORDINATOR_NAMESPACE": demo.namespace},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["leader"] is not None, status
    assert "orders-" in json.dumps(status), "the channel streams of every shard are listed"


async def test_every_worker_still_answers_and_the_acl_refused_nothing(demo: Demo) -> None:
    """Last in the module: every worker still answers (nothing crashed meanwhile), and
    nothing the app and the command did above was refused by README's ACL line."""
    for worker in demo.workers:
        assert (await worker.get("/healthz")).status_code == 200
    async with httpx.AsyncClient(base_url=demo.cluster.base) as client:
        assert (await client.get("/readyz")).status_code == 200
    assert refused(demo.user, demo.ports) == []

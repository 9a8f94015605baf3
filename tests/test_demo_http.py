"""The demo's HTTP contract (shared/DESIGN.md), end to end against 4 real uvicorn workers."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from .support.app_cluster import AppCluster
from .support.sse_client import SSEClient

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

DEMO_ENV = {
    "DEMO_COLLECT_EVERY_S": "1",
    "DEMO_CLEANUP_EVERY_S": "2",
    "DEMO_REPORT_CRON_SECOND": "*/3",
    "COORDINATOR_RELAY_MAX_EVENT_BYTES": "2048",
}
LEADER_FIELDS = {
    "instance_id",
    "hostname",
    "pid",
    "fencing_token",
    "acquired_at",
    "renewed_at",
    "ttl_ms",
}
RUN_FIELDS = {
    "job_id",
    "scheduled_at",
    "started_at",
    "finished_at",
    "instance_id",
    "fencing_token",
    "status",
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def demo(redis_url: str) -> AsyncIterator[AppCluster]:
    import uuid

    cluster = AppCluster(
        redis_url, f"demo{uuid.uuid4().hex[:8]}", workers=4, env=DEMO_ENV, app="app.main:app"
    )
    async with cluster.running():
        yield cluster


async def every_worker(demo: AppCluster, path: str) -> dict[str, dict[str, Any]]:
    """The JSON answer of ``path`` from each of the 4 workers, by instance."""
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 30
    while len(seen) < demo.workers:
        response = await demo.get(path)
        assert response.status_code == 200, response.text
        seen[response.headers["x-coordinator-instance"]] = response.json()
        assert time.monotonic() < deadline, f"only reached {sorted(seen)}"
    return seen


async def test_health_and_instance(demo: AppCluster) -> None:
    assert (await demo.get("/healthz")).status_code == 200
    ready = await demo.get("/readyz")
    assert ready.status_code == 200 and ready.json()["relay"] == "subscribed"
    instances = await every_worker(demo, "/api/instance")
    for instance_id, body in instances.items():
        assert set(body) == {"instance_id", "pid", "hostname", "is_leader"}
        assert body["instance_id"] == instance_id
    assert len({b["pid"] for b in instances.values()}) == 4


async def test_exactly_one_leader_and_it_is_reported(demo: AppCluster) -> None:
    deadline = time.monotonic() + 20
    while True:
        leader = (await demo.get("/api/leader")).json()["leader"]
        instances = await every_worker(demo, "/api/instance")
        leaders = [i for i, b in instances.items() if b["is_leader"]]
        if leader and leaders == [leader["instance_id"]]:
            break
        assert time.monotonic() < deadline, (leader, leaders)
        await asyncio.sleep(0.1)
    assert set(leader) == LEADER_FIELDS
    assert isinstance(leader["fencing_token"], int) and 0 < leader["ttl_ms"] <= 5000


async def test_jobs_and_runs(demo: AppCluster) -> None:
    jobs = (await demo.get("/api/jobs")).json()
    assert isinstance(jobs, list)
    assert {j["id"] for j in jobs} == {"collect-metrics", "periodic-report", "cleanup"}
    for job in jobs:
        assert job["trigger"] and "next_fire_at" in job
    deadline = time.monotonic() + 30
    while True:
        runs = (await demo.get("/api/jobs/runs?limit=5")).json()
        if len(runs) == 5:
            break
        assert time.monotonic() < deadline, runs
        await asyncio.sleep(0.2)
    for run in runs:
        assert set(run) >= RUN_FIELDS, run
    started = [r["started_at"] for r in runs]
    assert started == sorted(started, reverse=True)  # newest first
    scheduled = [(r["job_id"], r["scheduled_at"]) for r in runs]
    assert len(set(scheduled)) == len(scheduled)  # each fire once


@pytest.mark.parametrize("query", ["limit=0", "limit=5000", "limit=abc"])
async def test_runs_bad_limit_is_422(demo: AppCluster, query: str) -> None:
    response = await demo.get(f"/api/jobs/runs?{query}")
    assert response.status_code == 422 and "limit" in response.text


async def test_publish_and_stream(demo: AppCluster) -> None:
    client = SSEClient("127.0.0.1", demo.port, "/api/channels/contract/events")
    await client.connect()
    assert client.status == 200
    assert client.headers["content-type"].startswith("text/event-stream")
    assert client.headers["x-coordinator-instance"]
    client.start()
    async with httpx.AsyncClient(base_url=demo.base) as http:
        response = await http.post(
            "/api/channels/contract/events", json={"event": "message", "data": {"n": 1}}
        )
        assert response.status_code == 202, response.text
        event_id = response.json()["id"]
        assert re.fullmatch(r"\d+-\d+", event_id)
    deadline = time.monotonic() + 10
    while not client.of("message"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    message = client.of("message")[0]
    assert message.id == event_id and message.json() == {"n": 1}
    await client.close()


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/channels/ok/events", b'{"event": "message", "data": "' + b"x" * 4000 + b'"}', 413),
        ("/api/channels/ok/events", b"{not json", 422),
        ("/api/channels/ok/events", b'{"event": "message"}', 422),
        ("/api/channels/ok/events", b'{"event": "", "data": 1}', 422),
        ("/api/channels/bad%20name/events", b'{"data": 1}', 422),
        ("/api/channels/" + "c" * 200 + "/events", b'{"data": 1}', 422),
    ],
)
async def test_publish_bad_input(demo: AppCluster, path: str, body: bytes, status: int) -> None:
    async with httpx.AsyncClient(base_url=demo.base) as http:
        response = await http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert "detail" in response.json()


@pytest.mark.parametrize("resume", ["garbage", "12-x", "-1-0", "9" * 40 + "-0"])
async def test_stream_bad_last_event_id_is_400(demo: AppCluster, resume: str) -> None:
    response = await demo.get(f"/api/channels/ok/events?last_event_id={resume}")
    assert response.status_code == 400, response.text
    assert "Last-Event-ID" in response.json()["detail"]


async def test_dashboard_page(demo: AppCluster) -> None:
    response = await demo.get("/")
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    assert response.headers["x-coordinator-instance"] in response.text
    assert "EventSource" in response.text


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one aggregated series (0 when absent)."""
    pattern = (
        rf"^{re.escape(name)}(?:\{{{labels}[^}}]*\}})? (\S+)$"
        if labels
        else (rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$")
    )
    return sum(float(v) for v in re.findall(pattern, text, re.M))


async def test_metrics_aggregate_all_workers(demo: AppCluster) -> None:
    await every_worker(demo, "/api/instance")  # every worker has started and sampled
    deadline = time.monotonic() + 15
    while True:
        text = (await demo.get("/metrics")).text
        leaders = re.findall(r'^coordinator_is_leader\{[^}]*pid="(\d+)"[^}]*\} (\S+)$', text, re.M)
        if len(leaders) == 4 and sum(float(v) for _, v in leaders) == 1.0:
            break
        assert time.monotonic() < deadline, text[:3000]
        await asyncio.sleep(0.2)
    assert re.search(r"^coordinator_elections_total \d", text, re.M)

    # Per-channel clients and deliveries, summed over the workers that serve them.
    clients = await demo.clients("/api/channels/metered/events", 8, min_instances=3)
    publishers = await demo.publishers(2)
    for n in range(3):
        await demo.publish(publishers[n % 2], "metered", n)
    deadline = time.monotonic() + 20
    while True:
        text = (await demo.get("/metrics")).text
        if (
            metric(text, "coordinator_sse_channel_clients", 'channel="metered"') == 8
            and metric(text, "coordinator_relay_events_delivered_total") >= 24
            and metric(text, "coordinator_relay_delivery_lag_seconds_count") >= 9
            and metric(text, "coordinator_job_duration_seconds_count", 'job_id="collect-metrics"')
            > 0
            and metric(text, "coordinator_renew_latency_seconds_count") > 0
        ):
            break
        assert time.monotonic() < deadline, text[-4000:]
        await asyncio.sleep(0.2)
    assert metric(text, "coordinator_relay_events_published_total") >= 3
    assert 0 < metric(text, "coordinator_lease_remaining_seconds") <= 5
    assert "coordinator_renew_failures_total" in text
    for client in clients:
        await client.close()
    for publisher in publishers:
        await publisher.aclose()


async def test_unknown_path_is_404(demo: AppCluster) -> None:
    assert (await demo.get("/api/nothing")).status_code == 404


async def test_openapi_describes_the_event_stream(demo: AppCluster) -> None:
    schema = await demo.get("/openapi.json")
    assert schema.status_code == 200, schema.text
    stream = schema.json()["paths"]["/api/channels/{channel}/events"]["get"]
    assert "text/event-stream" in stream["responses"]["200"]["content"]

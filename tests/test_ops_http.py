"""The demo under operator settings: bearer-token channel policy (403, nothing leaks),
per-client limits (429), JSON logs that never show the Redis password, and
``/api/leader`` with only the contract's fields. One uvicorn worker, so
per-process limits are exact."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from coordinator.testing import DockerRedisServer, RedisServer, owned_redis

from .support.app_cluster import HOST, AppCluster
from .support.procs import Proc
from .support.sse_client import SSEClient

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

PASSWORD = "Redis-pw-7731-secret"
PUBLISH_TOKEN = "tok-publish-123"
SUBSCRIBE_TOKEN = "tok-subscribe-456"
MAX_STREAMS = 3
ENV = {
    "COORDINATOR_LOG_FORMAT": "json",
    "COORDINATOR_LOG_LEVEL": "INFO",
    "DEMO_PUBLISH_TOKEN": PUBLISH_TOKEN,
    "DEMO_SUBSCRIBE_TOKEN": SUBSCRIBE_TOKEN,
    "COORDINATOR_SSE_MAX_CONNECTIONS_PER_CLIENT": str(MAX_STREAMS),
    "COORDINATOR_PUBLISH_RATE_PER_CLIENT": "5",
    "COORDINATOR_PUBLISH_BURST": "5",
}
AUTH = {"authorization": f"Bearer {PUBLISH_TOKEN}"}


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer | DockerRedisServer]:
    with owned_redis(extra_args=["--requirepass", PASSWORD]) as owned:
        yield owned


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def demo(server: RedisServer | DockerRedisServer) -> AsyncIterator[AppCluster]:
    url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
    cluster = AppCluster(url, f"ops{uuid.uuid4().hex[:8]}", workers=1, env=ENV, app="app.main:app")
    async with cluster.running(exit_codes=(0, -15)):
        yield cluster
    assert "stepped down" in cluster.proc.stderr_tail(), cluster.proc.stderr_tail()


def stream(demo: AppCluster, channel: str, token: str | None = SUBSCRIBE_TOKEN) -> SSEClient:
    query = f"?access_token={token}" if token else ""
    return SSEClient(HOST, demo.port, f"/api/channels/{channel}/events{query}")


async def post(
    demo: AppCluster,
    channel: str,
    data: Any,
    headers: dict[str, str] | None = None,
    source: str | None = None,
) -> httpx.Response:
    """POST one event; ``source``: the local address to connect from (another client)."""
    transport = httpx.AsyncHTTPTransport(local_address=source) if source else None
    async with httpx.AsyncClient(base_url=demo.base, timeout=10, transport=transport) as http:
        return await http.post(
            f"/api/channels/{channel}/events", json={"data": data}, headers=headers or {}
        )


async def test_denied_requests_get_403_and_nothing_leaks(demo: AppCluster) -> None:
    for token in (None, "wrong"):
        denied = await stream(demo, "secure", token).connect()
        assert denied.status == 403 and b"not allowed to subscribe" in denied.body
    client = await stream(demo, "secure").connect()
    assert client.status == 200
    client.start()
    try:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": PUBLISH_TOKEN}):
            response = await post(demo, "secure", {"leak": True}, headers)
            assert response.status_code == 403, response.text
            assert "not allowed to publish" in response.json()["detail"]
        ok = await post(demo, "secure", {"leak": False}, AUTH)
        assert ok.status_code == 202, ok.text
        deadline = time.monotonic() + 10
        while not client.of("message"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert [m.json() for m in client.of("message")] == [{"leak": False}]
        assert client.of("message")[0].id == ok.json()["id"]
    finally:
        await client.close()
    replay = await stream(demo, "secure").connect()  # history holds only the allowed event
    assert replay.status == 200
    await replay.close()


async def test_streams_per_client_limit_is_429(demo: AppCluster) -> None:
    async def open_streams(n: int) -> list[SSEClient]:
        return [await stream(demo, f"lim{i}").connect() for i in range(n)]

    clients: list[SSEClient] = []
    deadline = time.monotonic() + 15
    try:
        while True:  # streams of earlier tests may still be closing on the server
            clients = await open_streams(MAX_STREAMS)
            if all(c.status == 200 for c in clients):
                break
            for c in clients:
                await c.close()
            assert time.monotonic() < deadline, [c.status for c in clients]
            await asyncio.sleep(0.1)
        over = await stream(demo, "lim-over").connect()
        assert over.status == 429
        assert b"COORDINATOR_SSE_MAX_CONNECTIONS_PER_CLIENT" in over.body
        await clients.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the slot is freed when the server sees the disconnect
            again = await stream(demo, "lim-again").connect()
            clients.append(again)
            if again.status == 200:
                break
            assert again.status == 429 and time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        for c in clients:
            await c.close()


async def test_leader_and_instance_show_only_the_contract(demo: AppCluster) -> None:
    deadline = time.monotonic() + 15
    while (leader := (await demo.get("/api/leader")).json()["leader"]) is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert set(leader) == {
        "instance_id",
        "hostname",
        "pid",
        "fencing_token",
        "acquired_at",
        "renewed_at",
        "ttl_ms",
    }
    for path in ("/api/leader", "/api/instance", "/readyz", "/healthz", "/api/jobs", "/metrics"):
        body = (await demo.get(path)).text
        assert PASSWORD not in body and "client_id" not in body and "redis://" not in body


async def test_metrics_of_the_one_process(demo: AppCluster) -> None:
    deadline = time.monotonic() + 15
    while True:
        response = await demo.get("/metrics")
        assert response.status_code == 200, response.text
        leaders = re.findall(r"^coordinator_is_leader\{[^}]*\} (\S+)$", response.text, re.M)
        up = re.findall(r"^coordinator_relay_up\{[^}]*\} (\S+)$", response.text, re.M)
        if leaders == ["1.0"] and up == ["1.0"]:
            break
        assert time.monotonic() < deadline, response.text
        await asyncio.sleep(0.1)
    assert response.headers["content-type"].startswith("text/plain")
    assert re.search(r"^coordinator_elections_total [1-9]", response.text, re.M)


async def test_publish_rate_per_client_is_429_with_retry_after(demo: AppCluster) -> None:
    # A client address of its own: the other tests' publishes (from 127.0.0.1) count
    # against theirs, cluster-wide, and must not eat this one's burst.
    source = "127.0.0.77"
    codes = []
    limited = None
    for n in range(12):
        response = await post(demo, "rate", n, AUTH, source=source)
        codes.append(response.status_code)
        if response.status_code == 429:
            limited = response
    assert codes.count(202) >= 5 and limited is not None, codes
    assert int(limited.headers["retry-after"]) >= 1
    assert "COORDINATOR_PUBLISH_RATE_PER_CLIENT" in limited.json()["detail"]
    await asyncio.sleep(int(limited.headers["retry-after"]))  # as the server asks
    assert (await post(demo, "rate", "later", AUTH, source=source)).status_code == 202


async def test_logs_are_json_lines_without_the_password(demo: AppCluster) -> None:
    lines = [line for line in demo.proc.stderr_lines if line.strip()]
    assert PASSWORD not in "\n".join(lines)
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and all(r["instance_id"] for r in records)
    assert any(r.get("term") and "elected leader" in r["message"] for r in records), records
    assert any(r.get("channel") == "secure" and "denied" in r["message"] for r in records)


async def test_wrong_password_is_logged_without_it(server: RedisServer | DockerRedisServer) -> None:
    url = f"redis://:wrong-{PASSWORD}@127.0.0.1:{server.port}/0"
    proc = Proc(
        "uvicorn",
        "app.main:app",
        "--port",
        "0",
        "--log-level",
        "warning",
        env={
            "REDIS_URL": url,
            "COORDINATOR_LOG_FORMAT": "json",
            "COORDINATOR_NAMESPACE": f"ops{uuid.uuid4().hex[:8]}",
        },
    )
    try:
        deadline = time.monotonic() + 30
        while "AuthenticationError" not in "\n".join(proc.stderr_lines):
            assert proc.alive and time.monotonic() < deadline, proc.stderr_tail()
            await asyncio.sleep(0.1)
    finally:
        proc.terminate(20)
    text = "\n".join(proc.stderr_lines)
    assert PASSWORD not in text
    assert all(json.loads(line) for line in proc.stderr_lines if line.startswith("{"))

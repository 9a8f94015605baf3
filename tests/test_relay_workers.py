"""The relay across real uvicorn workers and real sockets: fan-out, reconnect to another
worker, Redis restart, CLIENT KILL, a client that never reads, bad input."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from coordinator import CoordinatorSettings
from coordinator.testing import async_wait_until

from .support.app_cluster import HOST, AppCluster, wait_messages
from .support.sse_client import SSEClient
from .test_relay import kill_listeners_and_publish

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def assert_exact(client: SSEClient, expected: list[Any]) -> None:
    """The client's messages are exactly ``expected``, with strictly increasing ids."""
    messages = client.of("message")
    assert [m.json()["seq"] for m in messages] == expected, client.instance
    ids = [tuple(map(int, m.id.split("-"))) for m in messages if m.id]
    assert len(ids) == len(messages) and ids == sorted(set(ids))


@pytest.fixture
async def cluster(redis_url: str, namespace: str) -> AsyncIterator[AppCluster]:
    app = AppCluster(redis_url, namespace, workers=4)
    async with app.running():
        yield app


async def test_fanout_1000_events_40_clients_on_4_workers(cluster: AppCluster) -> None:
    clients = await cluster.clients("/api/channels/fanout/events", 40, min_instances=3)
    publishers = await cluster.publishers()
    used: set[str] = set()
    try:
        for seq in range(1000):
            _, instance = await cluster.publish(
                publishers[seq % len(publishers)], "fanout", {"seq": seq}
            )
            used.add(instance)
        await wait_messages(clients, 1000, timeout=60)
        await asyncio.sleep(0.2)  # anything extra (a duplicate) would have arrived by now
        for client in clients:
            assert_exact(client, list(range(1000)))
        assert len({c.instance for c in clients}) >= 3
        assert len(used) >= 2, "events were published through one worker only"
    finally:
        for client in clients:
            await client.close()
        for publisher in publishers:
            await publisher.aclose()


async def test_reconnect_with_last_event_id_to_another_worker(cluster: AppCluster) -> None:
    path = "/api/channels/resume/events"
    [first] = await cluster.clients(path, 1, min_instances=1)
    [publisher] = await cluster.publishers(1)
    for seq in range(50):
        await cluster.publish(publisher, "resume", {"seq": seq})
    await wait_messages([first], 50)
    await first.close()
    assert_exact(first, list(range(50)))
    for seq in range(50, 80):  # missed while disconnected
        await cluster.publish(publisher, "resume", {"seq": seq})

    second = None
    for _ in range(50):
        candidate = await SSEClient(
            HOST, cluster.port, path, last_event_id=first.last_event_id
        ).connect()
        if candidate.instance != first.instance:
            second = candidate.start()
            break
        await candidate.close()
    assert second is not None, "never reached another worker"
    await wait_messages([second], 30)
    for seq in range(80, 100):  # then live
        await cluster.publish(publisher, "resume", {"seq": seq})
    await wait_messages([second], 50)
    await asyncio.sleep(0.1)
    assert_exact(second, list(range(50, 100)))
    assert second.retry == 1000
    await second.close()
    await publisher.aclose()


async def test_bad_input_gets_4xx_never_500(cluster: AppCluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.base, timeout=10) as http:
        cases = [
            (await http.post("/api/channels/bad%20name/events", json={"data": 1}), 422, "channel"),
            (await http.post("/api/channels/-x/events", json={"data": 1}), 422, "channel"),
            (await http.post("/api/channels/ok/events", content=b"{not json"), 422, "JSON"),
            (await http.post("/api/channels/ok/events", content=b"\xff\xfe"), 422, "JSON"),
            (await http.post("/api/channels/ok/events", json=[1]), 422, "object"),
            (await http.post("/api/channels/ok/events", json={"evnt": 1}), 422, "data"),
            (
                await http.post("/api/channels/ok/events", json={"event": "a b", "data": 1}),
                422,
                "event",
            ),
            (
                await http.post("/api/channels/ok/events", json={"event": "reset", "data": 1}),
                422,
                "reserved",
            ),
            (await http.post("/api/channels/ok/events", json={"data": "x" * 70_000}), 413, "limit"),
            (await http.post("/api/channels/ok/events", content=b"[" * 2_000_000), 413, "body"),
            (await http.get("/api/channels/bad%20name/events"), 422, "channel"),
            (
                await http.get("/api/channels/ok/events", headers={"Last-Event-ID": "garbage"}),
                400,
                "Last-Event-ID",
            ),
            (await http.get("/api/channels/ok/events?last_event_id=1-2-3"), 400, "Last-Event-ID"),
            (
                await http.get("/api/channels/ok/events", headers={"Last-Event-ID": "9" * 8000}),
                400,
                "Last-Event-ID",
            ),
        ]
    for response, status, word in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert word in response.json()["detail"], response.text
        assert response.headers["x-coordinator-instance"]


async def test_redis_restart_mid_stream(redis_server: Any, namespace: str) -> None:
    app = AppCluster(redis_server.url, namespace, workers=4)
    clients: list[SSEClient] = []
    try:
        await app.wait_ready()
        clients = await app.clients("/api/channels/restart/events", 8, min_instances=2)
        publishers = await app.publishers(2)
        ids: dict[int, str] = {}
        for seq in range(40):
            ids[seq], _ = await app.publish(publishers[seq % 2], "restart", {"seq": seq})
        await wait_messages(clients, 40)
        redis_server.restart()  # empty: no persistence
        for seq in range(40, 80):
            ids[seq], _ = await app.publish(publishers[seq % 2], "restart", {"seq": seq})
        await wait_messages(clients, 80, timeout=60)  # live delivery resumed by itself
        for client in clients:
            assert_exact(client, list(range(80)))
        await app.stats(until=lambda s: s["ready"] and s["reconnects"] >= 1)

        # Reconnect with ids from before and after the restart: every retained event.
        old = await SSEClient(
            HOST, app.port, "/api/channels/restart/events", last_event_id=ids[10]
        ).connect()
        recent = await SSEClient(
            HOST, app.port, "/api/channels/restart/events", last_event_id=ids[60]
        ).connect()
        for client in (old, recent):
            client.start()
        await wait_messages([old], 40)
        await wait_messages([recent], 19)
        await asyncio.sleep(0.1)
        assert_exact(old, list(range(40, 80)))  # what the restarted Redis retained
        assert_exact(recent, list(range(61, 80)))
        clients += [old, recent]
        for publisher in publishers:
            await publisher.aclose()

        # Shutdown with open streams: prompt, clean, every stream ended.
        code, took = app.stop()
        assert code == 0, app.proc.stderr_tail()
        assert took < 15, f"uvicorn took {took:.1f}s to stop with open SSE streams"
        await async_wait_until(
            lambda: all(c.ended for c in clients), 10, message="streams still open after shutdown"
        )
    finally:
        for client in clients:
            await client.close()
        app.stop()


async def test_client_kill_pubsub_recovers_and_backfills(redis_server: Any, namespace: str) -> None:
    app = AppCluster(redis_server.url, namespace, workers=4)
    try:
        await app.wait_ready()
        clients = await app.clients("/api/channels/kill/events", 8, min_instances=2)
        [publisher] = await app.publishers(1)
        for seq in range(10):
            await app.publish(publisher, "kill", {"seq": seq})
        conf = CoordinatorSettings(redis_url=redis_server.url, namespace=namespace)
        # Published in the same transaction as the kill: no listener is subscribed.
        await kill_listeners_and_publish(redis_server.url, conf, "kill", {"seq": 10})
        for seq in range(11, 20):
            await app.publish(publisher, "kill", {"seq": seq})
        await wait_messages(clients, 20)
        await asyncio.sleep(0.1)
        for client in clients:
            assert_exact(client, list(range(20)))
        stats = await app.stats(until=lambda s: s["ready"] and s["reconnects"] >= 1)
        serving = {c.instance for c in clients}
        assert all(stats[i]["backfilled_events"] >= 1 for i in serving), stats
        for client in clients:
            await client.close()
        await publisher.aclose()
    finally:
        app.stop()


async def test_client_that_never_reads_is_cut_others_unaffected(
    redis_url: str, namespace: str
) -> None:
    app = AppCluster(redis_url, namespace, workers=1, env={"COORDINATOR_RELAY_CLIENT_QUEUE": "32"})
    path = "/api/channels/slow/events"
    good: list[SSEClient] = []
    slow = socket.socket()
    try:
        await app.wait_ready()
        good = await app.clients(path, 4, min_instances=1)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect((HOST, app.port))
        slow.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += slow.recv(1)  # headers only; the body is never read
        assert head.startswith(b"HTTP/1.1 200")
        await app.stats(until=lambda s: s["subscribers"] == 5)

        [publisher] = await app.publishers(1)
        padding = "x" * 4000
        published = 0
        dropped_at = None
        while published < 3000:
            await app.publish(
                publisher, "slow", {"seq": published, "t": time.monotonic(), "pad": padding}
            )
            published += 1
            if published % 20 == 0:
                stats = (await app.get("/relay/stats")).json()
                if stats["clients_dropped"]:
                    dropped_at = published
                    break
        assert dropped_at is not None, "the client that never reads was never cut"
        # The others were never held back: they have everything published so far...
        await wait_messages(good, dropped_at, timeout=20)
        for seq in range(dropped_at, dropped_at + 20):  # ...and keep receiving.
            await app.publish(publisher, "slow", {"seq": seq, "t": time.monotonic()})
        await wait_messages(good, dropped_at + 20)
        for client in good:
            assert_exact(client, list(range(dropped_at + 20)))
        stats = (await app.get("/relay/stats")).json()
        assert stats["clients_dropped"] == 1 and stats["subscribers"] == 4, stats

        # The cut connection ends: reading it now yields a truncated stream, then EOF.
        slow.setblocking(False)
        loop = asyncio.get_running_loop()
        received = b""
        async with asyncio.timeout(20):
            while chunk := await loop.sock_recv(slow, 65536):
                received += chunk
        seen = received.count(b"\nevent: message\n")
        assert 0 < seen < dropped_at, (seen, dropped_at)
        lags = sorted(m.t - m.json()["t"] for c in good for m in c.of("message"))
        print(
            f"good clients' publish-to-receive latency: p50 {lags[len(lags) // 2] * 1000:.1f} "
            f"ms, max {lags[-1] * 1000:.1f} ms; slow client cut after {seen} events"
        )
        await publisher.aclose()
    finally:
        slow.close()
        for client in good:
            await client.close()
        app.stop()

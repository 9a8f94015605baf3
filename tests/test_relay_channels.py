"""Per-channel subscriptions: a process hears only the channels its clients watch.

Against a real Redis server: ``PUBSUB NUMSUB`` shows who listens, one Pub/Sub
connection carries every channel, joins and leaves racing with a steady stream
of publishes lose and duplicate nothing, and a listener or publisher of the
version before (one namespace-wide channel) still interoperates during a
rolling update.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import pytest

from coordinator import EventRelay, RedisUnavailableError, create_redis
from coordinator.relay.events import EventId, parse_event_id
from coordinator.store.keys import Keys
from coordinator.testing import async_wait_until

from .test_relay import Reader, running, settings

# The publish script of the version before per-channel subscriptions, verbatim: it
# published every channel's events on the namespace channel only.
OLD_PUBLISH = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*',
  'event', ARGV[3], 'data', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('PUBLISH', ARGV[1],
  '1\\n' .. ARGV[2] .. '\\n' .. id .. '\\n' .. ARGV[3] .. '\\n' .. ARGV[4])
return id
"""


async def numsub(client: Any, *names: str) -> dict[str, int]:
    reply = await client.pubsub_numsub(*names)
    return {name.decode(): int(count) for name, count in reply}


async def test_listens_only_while_a_local_client_watches(redis_url: str, namespace: str) -> None:
    keys = Keys(namespace)
    client = create_redis(redis_url)
    conf = settings(redis_url, namespace)
    try:
        async with running(conf) as relay:
            a, b = keys.channel_events("a"), keys.channel_events("b")
            assert await numsub(client, a, b) == {a: 0, b: 0}
            first = await relay.subscribe("a")
            second = await relay.subscribe("a")
            others = [await relay.subscribe(f"c{i}") for i in range(50)]
            assert await numsub(client, a, b) == {a: 1, b: 0}
            listening = await client.pubsub_channels(keys.channel_events("*"))
            assert len(listening) == 51
            # One Pub/Sub connection carries all of them.
            name = f"coordinator-relay:{conf.instance_id}"
            pubsub_clients = [
                c for c in await client.client_list(_type="pubsub") if c["name"] == name
            ]
            assert len(pubsub_clients) == 1
            assert int(pubsub_clients[0]["sub"]) == 51 + 2  # + the namespace channel, marker

            # An event of a channel nobody here watches is not even sent to this process.
            received = relay.stats.events_received
            await relay.publish("b", 1)
            reader = Reader(first)
            await relay.publish("a", 2)
            await reader.wait_count(1)
            assert relay.stats.events_received == received + 1
            assert reader.data() == [2]

            await first.aclose()
            assert (await numsub(client, a))[a] == 1  # `second` still watches
            await second.aclose()
            for sub in others:
                await sub.aclose()

            async def quiet() -> bool:
                return not await client.pubsub_channels(keys.channel_events("*"))

            await async_wait_until(quiet, 10, message="UNSUBSCRIBE after the last client left")
            assert relay.ready
            assert (
                int(
                    next(c for c in await client.client_list(_type="pubsub") if c["name"] == name)[
                        "sub"
                    ]
                )
                == 2
            )
    finally:
        await client.aclose()


async def test_join_and_leave_races_lose_and_duplicate_nothing(
    redis_url: str, namespace: str
) -> None:
    """A publisher (another process's relay) sends 0, 1, 2, ... without pause; the
    reader here keeps leaving and rejoining with Last-Event-ID, after 0 to 3 loop turns,
    and every other round a subscriber that gives up first, so SUBSCRIBE and UNSUBSCRIBE
    race in every order. Every event arrives exactly once, in order; snapshot
    subscribers (no id) see a gap-free run."""
    conf = settings(redis_url, namespace)
    rng = random.Random(7)
    async with running(conf) as publisher, running(conf) as relay:
        stop = asyncio.Event()
        published: list[str] = []

        async def publish() -> None:
            n = 0
            while not stop.is_set():
                published.append(await publisher.publish("race", n))
                n += 1
                if n % 4 == 0:
                    await asyncio.sleep(0.001)

        task = asyncio.create_task(publish())
        try:
            await async_wait_until(lambda: len(published) >= 5, 10)
            received: list[int] = []
            last_id: str | None = published[-1]
            start = len(published)  # the value of the first event after last_id
            snapshot_runs = 0
            for round_ in range(150):
                if round_ % 2:
                    # A first subscriber that gives up before Redis confirms: SUBSCRIBE,
                    # UNSUBSCRIBE, then ours, SUBSCRIBE again, all in flight at once.
                    early = asyncio.create_task(relay.subscribe("race"))
                    for _ in range(rng.randint(1, 3)):
                        await asyncio.sleep(0)
                    early.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        (await early).close("closed")
                    for _ in range(rng.randint(0, 3)):
                        await asyncio.sleep(0)  # let the UNSUBSCRIBE go out, or not
                sub = await relay.subscribe("race", last_event_id=last_id)
                reader = Reader(sub)
                await reader.wait_count(rng.randint(1, 6))
                await sub.aclose()
                await reader.task
                received += reader.data()
                last_id = reader.ids()[-1]
                for _ in range(rng.randint(0, 3)):
                    await asyncio.sleep(0)
                if round_ % 10 == 9:
                    # A subscriber without an id starts at the tip: no gap after it.
                    snap = await relay.subscribe("race")
                    snap_reader = Reader(snap)
                    await snap_reader.wait_count(5)
                    await snap.aclose()
                    await snap_reader.task
                    got = snap_reader.data()
                    assert got == list(range(got[0], got[0] + len(got))), got
                    snapshot_runs += 1
            assert received == list(range(start, start + len(received)))
            assert snapshot_runs == 15
        finally:
            stop.set()
            await task


async def test_older_version_listener_and_publisher_interoperate(
    redis_url: str, namespace: str
) -> None:
    """During a rolling update: events cross between versions both ways, and the
    namespace channel goes quiet once no listener of the older version is left."""
    keys = Keys(namespace)
    conf = settings(redis_url, namespace)
    client = create_redis(redis_url)
    old_listener = create_redis(redis_url).pubsub()
    try:
        async with running(conf) as relay:
            reader = Reader(await relay.subscribe("mixed"))

            # A publisher of the older version: only the namespace channel.
            old_id = await client.eval(
                OLD_PUBLISH,
                1,
                keys.stream("mixed"),
                keys.events(),
                "mixed",
                "message",
                '"from-old"',
                conf.relay_history,
                conf.relay_stream_ttl_s,
            )
            await reader.wait_count(1)
            assert reader.events[0][0] == old_id.decode()

            # A listener of the older version hears new publishes while it is subscribed.
            await old_listener.subscribe(keys.events())
            assert (await old_listener.get_message(timeout=5))["type"] == "subscribe"
            new_id = await relay.publish("mixed", "from-new")
            message = await old_listener.get_message(timeout=5)
            assert message is not None and message["type"] == "message"
            assert message["data"].split(b"\n")[2].decode() == new_id
            await reader.wait_count(2)
            # The current relay heard it twice (its channel and the namespace channel)
            # and passed it on once.
            assert reader.data() == ["from-old", "from-new"]

            # With no older listener left, nothing more goes to the namespace channel:
            # a raw listener that counts as current (it also holds the marker) hears none.
            await old_listener.unsubscribe(keys.events())
            await old_listener.subscribe(keys.events(), keys.relay_listeners())
            for _ in range(3):
                await old_listener.get_message(timeout=5)  # unsubscribe, 2 x subscribe
            legacy = (await numsub(client, keys.events()))[keys.events()]
            assert legacy == (await numsub(client, keys.relay_listeners()))[keys.relay_listeners()]
            last = await relay.publish("mixed", "only-current")
            await reader.wait_count(3)
            assert reader.ids()[-1] == last
            assert await old_listener.get_message(timeout=0.5) is None
            assert parse_event_id(last) > EventId(0, 0)
    finally:
        await old_listener.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()


async def test_a_subscribe_waiting_for_redis_ends_at_once_when_the_relay_stops(
    redis_server: Any, namespace: str
) -> None:
    """Redis paused (CLIENT PAUSE, on the test's own server): a first subscriber of a
    channel waits for its SUBSCRIBE to be confirmed. Stopping the relay ends that wait
    at once with RedisUnavailableError, not after relay_subscribe_timeout_s, so a
    server shutting down is not held up."""
    conf = settings(redis_server.url, namespace, relay_subscribe_timeout_s=20)
    relay = EventRelay(conf)
    await relay.start()
    client = create_redis(redis_server.url)
    try:
        await relay.wait_ready(10)
        await client.execute_command("CLIENT", "PAUSE", 4000, "ALL")
        pending = asyncio.create_task(relay.subscribe("paused"))
        await async_wait_until(lambda: "paused" in relay._waiters, 5)
        loop = asyncio.get_running_loop()
        stopping = asyncio.create_task(relay.stop())
        started = loop.time()
        with pytest.raises(RedisUnavailableError, match=r"stopped|not running"):
            await asyncio.wait_for(pending, 3)
        assert loop.time() - started < 1.0
        await stopping
        assert not relay._waiters
    finally:
        await client.execute_command("CLIENT", "UNPAUSE")
        await client.aclose()
        await relay.stop()


async def test_an_acl_without_pubsub_numsub_fails_publish_clearly_and_writes_nothing(
    redis_url: str, namespace: str
) -> None:
    """The upgrade mistake the README warns of: the user lacks ``+pubsub|numsub``.
    Publish raises RedisUnavailableError naming the ACL (HTTP 503, not 500), and the
    stream holds nothing, so a retry cannot duplicate the event."""
    from .test_ops_connections import acl_line

    admin = create_redis(redis_url)
    user = f"u-{namespace}"
    line = acl_line(user, "pw", namespace).replace(" +pubsub|numsub", "")
    await admin.execute_command("ACL", "SETUSER", *line.split())
    host_port = redis_url.split("://", 1)[1]
    conf = settings(f"redis://{user}:pw@{host_port}", namespace)
    relay = EventRelay(conf)
    try:
        with pytest.raises(RedisUnavailableError, match="ACL"):
            await relay.publish("denied", 1)
        assert await admin.xlen(Keys(namespace).stream("denied")) == 0
    finally:
        await relay.stop()
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.aclose()

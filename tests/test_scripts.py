"""Each election Lua script on its own, against a real Redis."""

from __future__ import annotations

import json

import pytest
from redis.asyncio import Redis

from coordinator import Keys, create_redis
from coordinator.store.scripts import ACQUIRE, CHECK, READ_LEASE, RELEASE, RENEW, LuaScript
from coordinator.testing import RedisServer


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace)


async def acquire(redis: Redis, keys: Keys, who: str, ttl: int = 5000) -> list[object]:
    return list(
        await ACQUIRE(redis, [keys.lease("e"), keys.fencing("e")], [ttl, who, "host", 123, 42])
    )


async def test_acquire_seeds_token_from_server_clock(redis_client: Redis, keys: Keys) -> None:
    seconds, micros = await redis_client.time()
    won, value = await acquire(redis_client, keys, "a")
    assert won == 1
    lease = json.loads(value)  # type: ignore[arg-type]
    assert lease["instance_id"] == "a" and lease["client_id"] == 42 and lease["pid"] == 123
    token = int(lease["fencing_token"])
    assert token > (seconds * 1000 + micros // 1000) * 1000  # seeded from TIME ms * 1000
    assert 0 < await redis_client.pttl(keys.lease("e")) <= 5000


async def test_acquire_when_held_returns_holder(redis_client: Redis, keys: Keys) -> None:
    _, value = await acquire(redis_client, keys, "a")
    won, current, role = await acquire(redis_client, keys, "b")
    assert won == 0 and current == value and role == 0


async def heir_acquire(redis: Redis, keys: Keys, who: str, host: str) -> list[object]:
    heir = json.dumps({"instance_id": who, "hostname": host})
    return list(
        await ACQUIRE(
            redis,
            [keys.lease("e"), keys.fencing("e"), keys.heir("e")],
            [5000, who, host, 1, 1, heir, 2000, keys.election_notices("e")],
        )
    )


async def test_heir_role_taken_kept_moved_off_the_leaders_host_and_freed_by_winning(
    redis_client: Redis, keys: Keys
) -> None:
    assert (await heir_acquire(redis_client, keys, "lead", "h1"))[0] == 1
    assert (await heir_acquire(redis_client, keys, "f1", "h1"))[2] == 1  # vacant: taken
    assert (await heir_acquire(redis_client, keys, "f1", "h1"))[2] == 1  # kept
    assert 1000 < await redis_client.pttl(keys.heir("e")) <= 2000
    assert (await heir_acquire(redis_client, keys, "f3", "h1"))[2] == 0  # same host: no
    assert (await heir_acquire(redis_client, keys, "f2", "h2"))[2] == 1  # another host: yes
    assert (await heir_acquire(redis_client, keys, "f1", "h1"))[2] == 0
    assert (await heir_acquire(redis_client, keys, "f3", "h3"))[2] == 0  # f2 is off-host
    await redis_client.delete(keys.lease("e"))
    async with redis_client.pubsub() as pubsub:
        await pubsub.subscribe(keys.election_notices("e"))
        await pubsub.get_message(timeout=1)
        assert (await heir_acquire(redis_client, keys, "f2", "h2"))[0] == 1  # the heir wins
        assert await redis_client.get(keys.heir("e")) is None
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    assert message is not None and message["data"] == b"heir vacant"


async def test_renew_announces_a_vacant_heir_role(redis_client: Redis, keys: Keys) -> None:
    _, value = await acquire(redis_client, keys, "a")
    heir_keys = [keys.lease("e"), keys.heir("e")]
    async with redis_client.pubsub() as pubsub:
        await pubsub.subscribe(keys.election_notices("e"))
        await pubsub.get_message(timeout=1)
        await redis_client.set(keys.heir("e"), "x")
        args = [value, 5000, keys.election_notices("e")]
        assert await RENEW(redis_client, heir_keys, args) == 1
        assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2) is None
        await redis_client.delete(keys.heir("e"))
        assert await RENEW(redis_client, heir_keys, args) == 1
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    assert message is not None and message["data"] == b"heir vacant"


async def test_tokens_strictly_increase(redis_client: Redis, keys: Keys) -> None:
    tokens = []
    for who in "abcde":
        _, value = await acquire(redis_client, keys, who)
        tokens.append(int(json.loads(value)["fencing_token"]))  # type: ignore[arg-type]
        await redis_client.delete(keys.lease("e"))
    assert tokens == sorted(tokens) and len(set(tokens)) == 5


async def test_renew_only_with_exact_value(redis_client: Redis, keys: Keys) -> None:
    _, value = await acquire(redis_client, keys, "a", ttl=1000)
    assert await RENEW(redis_client, [keys.lease("e")], [value, 60000]) == 1
    assert await redis_client.pttl(keys.lease("e")) > 50000
    assert await RENEW(redis_client, [keys.lease("e")], [b"other", 60000]) == 0


async def test_release_is_compare_and_delete_with_notice(redis_client: Redis, keys: Keys) -> None:
    _, value = await acquire(redis_client, keys, "a")
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(keys.election_notices("e"))
    await pubsub.get_message(timeout=1)  # subscribe confirmation
    assert (
        await RELEASE(
            redis_client, [keys.lease("e")], [b"not-mine", keys.election_notices("e"), "x"]
        )
        == 0
    )
    assert await redis_client.exists(keys.lease("e"))
    assert (
        await RELEASE(
            redis_client, [keys.lease("e")], [value, keys.election_notices("e"), "released"]
        )
        == 1
    )
    assert not await redis_client.exists(keys.lease("e"))
    message = await pubsub.get_message(timeout=2)
    assert message is not None and message["data"] == b"released"
    await pubsub.aclose()


async def test_check_and_read_lease(redis_client: Redis, keys: Keys) -> None:
    value, pttl, now = await READ_LEASE(redis_client, [keys.lease("e")])
    assert value is None and pttl == -2 and now > 0
    _, lease = await acquire(redis_client, keys, "a")
    assert await CHECK(redis_client, [keys.lease("e")], [lease]) == 1
    assert await CHECK(redis_client, [keys.lease("e")], [lease + b"x"]) == 0  # type: ignore[operator]
    value, pttl, _ = await READ_LEASE(redis_client, [keys.lease("e")])
    assert value == lease and 0 < pttl <= 5000


async def test_script_reloads_after_script_flush(redis_server: RedisServer, keys: Keys) -> None:
    redis = create_redis(redis_server.url)  # an owned server: SCRIPT FLUSH touches no one else
    await acquire(redis, keys, "a")
    await redis.script_flush()
    _, value, *_ = await acquire(redis, keys, "b")  # NOSCRIPT -> EVAL, transparently
    assert json.loads(value)["instance_id"] == "a"  # type: ignore[arg-type]
    await redis.aclose()


def test_includes_are_prepended() -> None:
    script = LuaScript("renew", includes=["lease_lib"])
    assert script.source.index("local function lease_is_current") < script.source.index("PEXPIRE")

"""SharedState in one test process against real Redis servers: several SharedStates (each on
its own relay, as separate processes would be), compare-and-set, propagation, staleness and
reload after CLIENT KILL and after a Redis restart that lost the data, typed keys, watchers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel
from redis.asyncio import Redis

from coordinator import (
    CoordinatorSettings,
    EventRelay,
    InvalidStateError,
    RedisUnavailableError,
    SharedState,
    StateConflictError,
    StateTooLargeError,
    create_redis,
)
from coordinator.state.values import decode_message
from coordinator.store.keys import Keys
from coordinator.store.scripts import STATE_SET
from coordinator.testing import async_wait_until


def settings(url: str, namespace: str, **overrides: Any) -> CoordinatorSettings:
    values: dict[str, Any] = {
        "redis_url": url,
        "namespace": namespace,
        "relay_keepalive_s": 1.0,
        "backoff_max_ms": 300,
    }
    values.update(overrides)
    return CoordinatorSettings(**values)


class Process:
    """What one process has: a Redis client, a relay, and a SharedState on them."""

    def __init__(self, conf: CoordinatorSettings, name: str) -> None:
        self.conf = conf.model_copy(update={"instance_id": name})
        self.redis = create_redis(conf.redis_url)
        self.relay = EventRelay(self.conf, self.redis)
        self.state = SharedState(self.conf, self.redis, self.relay)

    async def start(self) -> Process:
        await self.relay.start()
        await self.state.wait_fresh(10)
        return self

    async def stop(self) -> None:
        await self.relay.stop()
        await self.state.stop()
        await self.redis.aclose()


@contextlib.asynccontextmanager
async def processes(conf: CoordinatorSettings, n: int) -> AsyncIterator[list[Process]]:
    procs = [Process(conf, f"p{i}") for i in range(n)]
    try:
        await asyncio.gather(*(p.start() for p in procs))
        yield procs
    finally:
        for proc in procs:
            await proc.stop()


async def write_while_listeners_killed(
    redis: Redis, conf: CoordinatorSettings, key: str, value: Any
) -> int:
    """CLIENT KILL TYPE pubsub and a state write in one transaction: the change is announced
    while no listener is subscribed, so only a reload can bring it. Returns its version."""
    keys = Keys(conf.namespace)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        pipe.eval(
            STATE_SET.source,
            1,
            keys.state(),
            key,
            "",
            json.dumps(value),
            conf.state_max_keys,
            keys.state_changes(),
            "test",
        )
        killed, reply = await pipe.execute()
    assert killed >= 1
    return int(reply[1])


async def test_set_get_and_compare_and_set(redis_url: str, namespace: str) -> None:
    async with processes(settings(redis_url, namespace), 1) as [p]:
        assert p.state.get("flag") is None and not p.state.stale
        first = await p.state.set("flag", {"on": True}, version=0)
        assert (first.key, first.value, first.version) == ("flag", {"on": True}, 1)
        assert p.state.get("flag") == first  # read-your-writes, from memory
        with pytest.raises(StateConflictError) as conflict:
            await p.state.set("flag", {"on": False}, version=0)  # 0: only if absent
        assert conflict.value.current == 1 and "version 1, not 0" in str(conflict.value)
        second = await p.state.set("flag", {"on": False}, version=1)
        assert second.version == 2
        with pytest.raises(StateConflictError):
            await p.state.set("flag", "late", version=1)
        third = await p.state.set("flag", None)  # no version: unconditional
        assert third.version == 3 and p.state.value("flag", "default") is None
        assert p.state.value("missing", "default") == "default"
        assert set(p.state.items()) == {"flag"}


async def test_a_change_reaches_every_process(redis_url: str, namespace: str) -> None:
    async with processes(settings(redis_url, namespace), 3) as procs:
        writer, *readers = procs
        for n in range(1, 21):
            await writer.state.set("counter", n)
            for reader in readers:
                entry = await reader.state.wait_for("counter", n, timeout=2)
                assert entry.value == n and not reader.state.stale
        assert all(p.state.reloads == 1 for p in procs)  # the initial load only


async def test_concurrent_updates_from_three_processes_count_exactly(
    redis_url: str, namespace: str
) -> None:
    async with processes(settings(redis_url, namespace), 3) as procs:

        async def bump(proc: Process, times: int) -> None:
            for _ in range(times):
                await proc.state.update("hits", lambda v: (v or 0) + 1, attempts=200)

        await asyncio.gather(*(bump(p, 30) for p in procs for _ in range(2)))
        for proc in procs:
            entry = await proc.state.wait_for("hits", 180, timeout=5)
            assert entry.value == 180 and entry.version == 180


class Probe:
    """Records what a SharedState says of ``key`` at each of its listener's callbacks and at
    every change of its memory: (event, stale, version held)."""

    def __init__(self, state: SharedState, key: str) -> None:
        self.state = state
        self.key = key
        self.seen: list[tuple[str, bool, int]] = []
        for name in ("lost", "subscribed", "_install", "_apply"):
            original = getattr(state, name)
            setattr(state, name, self._wrap(name, original))

    def _wrap(self, name: str, original: Any) -> Any:
        def wrapped(*args: Any) -> Any:
            result = original(*args)
            entry = self.state.get(self.key)
            self.seen.append((name, self.state.stale, entry.version if entry else 0))
            return result

        return wrapped

    def count(self, name: str) -> int:
        return sum(1 for event, _, _ in self.seen if event == name)

    def fresh_versions_after(self, name: str) -> list[int]:
        """Versions held while fresh, after the last ``name`` callback."""
        last = max(i for i, (event, _, _) in enumerate(self.seen) if event == name)
        return [v for _, stale, v in self.seen[last:] if not stale]


async def test_listener_killed_is_stale_then_reloads_what_it_missed(
    redis_server: Any, namespace: str
) -> None:
    conf = settings(redis_server.url, namespace)
    async with processes(conf, 2) as [a, b]:
        await a.state.set("k", "before")
        await b.state.wait_for("k", 1, 2)
        probe = Probe(b.state, "k")
        version = await write_while_listeners_killed(a.redis, conf, "k", "missed")
        assert version == 2
        entry = await b.state.wait_for("k", 2, timeout=15)  # only the reload can bring it
        assert entry.value == "missed"
        await b.state.wait_fresh(5)
        # Stale from the moment the listener was lost, holding the old value meanwhile...
        assert probe.seen[0] == ("lost", True, 1), probe.seen
        assert probe.count("subscribed") == 1 and probe.count("_install") == 1
        # ...and once fresh again (after resubscribing), never older than the write.
        assert probe.fresh_versions_after("subscribed") == [2], probe.seen
        assert not b.state.stale and b.state.reloads == 2 and b.relay.stats.reconnects == 1


async def test_never_fresh_with_a_value_older_than_the_resubscribe(
    redis_server: Any, namespace: str
) -> None:
    """A change published after the listener resubscribed but before the reload read the
    hash is held and applied by version: the reload cannot take it back."""
    conf = settings(redis_server.url, namespace)
    async with processes(conf, 2) as [a, b]:
        await a.state.set("k", 0)
        await b.state.wait_for("k", 1, 2)
        probe = Probe(b.state, "k")
        for round_ in range(5):
            probe.seen.clear()
            missed = await write_while_listeners_killed(a.redis, conf, "k", f"missed-{round_}")
            # Race writes against the reconnect and the reload.
            written = [missed]
            while probe.count("_install") == 0:
                written.append((await a.state.set("k", round_)).version)
                await asyncio.sleep(0.001)
            # At the resubscribe Redis held at least `missed`: nothing older is fresh after.
            assert all(v >= missed for v in probe.fresh_versions_after("subscribed")), probe.seen
            latest = (await a.state.set("k", f"final-{round_}")).version
            entry = await b.state.wait_for("k", latest, 5)
            assert entry.value == f"final-{round_}" and not b.state.stale
            raw = await a.redis.hget(Keys(namespace).state(), "k")
            assert raw is not None and int(raw.split(b"\n")[0]) == entry.version


async def test_redis_restart_without_data_starts_a_new_epoch(
    redis_server: Any, namespace: str
) -> None:
    conf = settings(redis_server.url, namespace)
    async with processes(conf, 2) as [a, b]:
        for n in range(5):
            await a.state.set("k", n)
        await b.state.wait_for("k", 5, 2)
        old_epoch = b.state.epoch
        redis_server.restart()  # empty: versions start again from 1

        async def write() -> bool:
            try:
                await a.state.set("k", "after")
                return True
            except RedisUnavailableError:
                return False

        await async_wait_until(write, 15, interval=0.05)
        # b holds version 5 from before; the new "after" is version 1 of a new epoch.
        entry = await async_wait_until(
            lambda: (e := b.state.get("k")) is not None and e.value == "after" and e, 15
        )
        assert entry.version == 1 and b.state.epoch not in (None, old_epoch)
        await b.state.wait_fresh(5)


async def test_new_epoch_without_a_reconnect_reloads(redis_url: str, namespace: str) -> None:
    """The hash deleted behind the processes' backs (FLUSHALL, a key eviction): the next write
    carries a new epoch, and a process holding newer versions of the old one reloads."""
    async with processes(settings(redis_url, namespace), 2) as [a, b]:
        for n in range(3):
            await a.state.set("k", n)
            await a.state.set("other", n)
        await b.state.wait_for("other", 3, 2)
        await a.redis.delete(Keys(namespace).state())
        await a.state.set("k", "new")
        entry = await async_wait_until(
            lambda: (e := b.state.get("k")) is not None and e.value == "new" and e, 5
        )
        assert entry.version == 1
        await b.state.wait_fresh(5)
        assert b.state.get("other") is None  # gone from Redis, gone here


async def test_bad_input_is_refused_before_redis(redis_url: str, namespace: str) -> None:
    conf = settings(redis_url, namespace, state_max_value_bytes=100, state_max_keys=2)
    async with processes(conf, 1) as [p]:
        for key in ("", "bad key", "-x", "k" * 200, "a\nb"):
            with pytest.raises(InvalidStateError, match="state key"):
                await p.state.set(key, 1)
        for value in (float("nan"), {1, 2}, "\ud800"):
            with pytest.raises(InvalidStateError, match="not JSON"):
                await p.state.set("k", value)
        with pytest.raises(StateTooLargeError, match="COORDINATOR_STATE_MAX_VALUE_BYTES"):
            await p.state.set("k", "x" * 200)
        for version in (-1, 2**53, True, 1.5, "1"):
            with pytest.raises(InvalidStateError, match="version"):
                await p.state.set("k", 1, version=version)  # type: ignore[arg-type]
        await p.state.set("one", 1)
        await p.state.set("two", 2)
        with pytest.raises(StateTooLargeError, match="COORDINATOR_STATE_MAX_KEYS"):
            await p.state.set("three", 3)
        assert (await p.state.set("two", 22)).version == 2  # existing keys still change


class Flags(BaseModel):
    dark: bool = False
    beta_users: list[str] = []


async def test_typed_keys(redis_url: str, namespace: str) -> None:
    async with processes(settings(redis_url, namespace), 2) as [a, b]:
        flags = a.state.typed("flags", Flags)
        assert flags.get() is None and flags.version == 0
        await flags.set(Flags(dark=True, beta_users=["ann"]), version=0)
        remote = b.state.typed("flags", Flags)
        await b.state.wait_for("flags", 1, 2)
        first = remote.get()
        assert first == Flags(dark=True, beta_users=["ann"])
        assert remote.get() is first  # validated once per version
        await remote.update(lambda f: (f or Flags()).model_copy(update={"dark": False}))
        await a.state.wait_for("flags", 2, 2)
        assert flags.get() == Flags(dark=False, beta_users=["ann"])
        await a.state.set("flags", {"dark": "not a bool at all"})
        await b.state.wait_for("flags", 3, 2)
        with pytest.raises(InvalidStateError, match=r"'flags'.*Flags"):
            remote.get()


async def test_watchers_see_every_change_and_overflow_is_said(
    redis_url: str, namespace: str
) -> None:
    async with processes(settings(redis_url, namespace), 2) as [a, b]:
        async with b.state.watch(["w"]) as changes, b.state.watch(max_queued=3) as small:
            for n in range(5):
                await a.state.set("w", n)
            await a.state.set("ignored", 1)
            got = []
            async for change in changes:
                got.append((change.key, change.current.version if change.current else 0))
                if len(got) == 5:
                    break
            assert got == [("w", v) for v in range(1, 6)]
            first = await asyncio.wait_for(small.__anext__(), 2)
            assert first.key == "*" and first.current is None  # fell behind: re-read
        local = a.state.watch(["w"])
        await a.state.set("w", "mine")
        change = await asyncio.wait_for(local.__anext__(), 2)
        assert change.source == "local" and change.previous_version == 5
        local.close()
        assert [c async for c in local] == []
        # A writer's own announcement may arrive before the reply to its write: it is
        # still its own change.
        mine = a.state.watch(["race"])
        own = f"1\n{a.state.epoch}\n{a.conf.instance_id}\nrace\n1\n7".encode()
        a.state.message(own)
        change = await asyncio.wait_for(mine.__anext__(), 2)
        assert (change.source, change.origin, change.current) == (
            "local",
            a.conf.instance_id,
            a.state.get("race"),
        )
        mine.close()


async def test_writes_need_redis_reads_do_not(redis_server: Any, namespace: str) -> None:
    conf = settings(redis_server.url, namespace)
    async with processes(conf, 1) as [p]:
        await p.state.set("k", "kept")
        redis_server.kill()
        assert p.state.value("k") == "kept"
        with pytest.raises(RedisUnavailableError, match="could not write state key 'k'"):
            await p.state.set("k", "lost")
        await async_wait_until(lambda: p.state.stale, 10)
        assert p.state.status.startswith("stale: listener down")
        assert p.state.value("k") == "kept"  # still served, flagged stale
        redis_server.start()  # empty


def test_change_message_format() -> None:
    message = decode_message(b'1\n171.2\nhost-1-ab\nk\n7\n{"a":[1,"x\\ny"]}')
    assert (message.epoch, message.origin, message.key, message.version) == (
        "171.2",
        "host-1-ab",
        "k",
        7,
    )
    assert json.loads(message.value_json) == {"a": [1, "x\ny"]}
    for bad in (b"", b"2\ne\no\nk\n1\n1", b"1\ne\no\nk\nx\n1", b"1\ne\no\nk\n1"):
        with pytest.raises(ValueError):
            decode_message(bad)


async def test_a_change_from_another_epoch_heard_while_reloading_is_read_again(
    redis_url: str, namespace: str
) -> None:
    async with processes(settings(redis_url, namespace), 1) as [p]:
        await p.state.set("k", "current")
        reloads = p.state.reloads
        p.state.lost("test")  # as the listener does; the relay itself stays up
        p.state.message(b'1\n1.1\nsomeone\nk\n9\n"from a lost lifetime"')
        p.state.subscribed()
        await p.state.wait_fresh(5)
        await async_wait_until(lambda: p.state.reloads == reloads + 2 and not p.state.stale, 5)
        entry = p.state.get("k")
        assert entry is not None and (entry.value, entry.version) == ("current", 1)

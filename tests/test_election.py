"""LeaderElector in one process against real redis-server processes.

Multi-process scenarios (kill, pause, many electors) are in test_election_procs.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from coordinator import CoordinatorSettings, LeaderElector, create_client, create_redis
from coordinator.election.lease import parse_lease
from coordinator.testing import async_wait_until, owned_redis

from .support.timing import FAST
from .support.topology import Topology


class Recorder:
    """Collects one elector's callbacks."""

    def __init__(self) -> None:
        self.elected: list[int] = []
        self.revoked: list[str] = []

    def on_elected(self, token: int) -> None:
        self.elected.append(token)

    async def on_revoked(self, reason: str) -> None:
        await asyncio.sleep(0)  # async callbacks are awaited
        self.revoked.append(reason)


Make = Callable[..., tuple[LeaderElector, Recorder]]


@pytest.fixture
async def make(namespace: str) -> AsyncIterator[Make]:
    """Build electors with fast timings; all are stopped after the test."""
    made: list[LeaderElector] = []

    def build(
        redis: Redis | Topology, instance_id: str, **overrides: object
    ) -> tuple[LeaderElector, Recorder]:
        if isinstance(redis, Topology):
            redis, overrides = redis.client, {"redis_url": redis.url, **overrides}
        settings = CoordinatorSettings(
            namespace=namespace, instance_id=instance_id, **{**FAST, **overrides}
        )  # type: ignore[arg-type]
        rec = Recorder()
        elector = LeaderElector(
            redis, settings, on_elected=rec.on_elected, on_revoked=rec.on_revoked
        )
        made.append(elector)
        return elector, rec

    yield build
    for elector in made:
        await elector.stop()


def leaders(electors: list[LeaderElector]) -> list[LeaderElector]:
    return [e for e in electors if e.is_leader]


async def test_single_elector_leads_and_reports(topology: Topology, make: Make) -> None:
    elector, rec = make(topology, "solo")
    await elector.start()
    term = await elector.wait_for_leadership(timeout=5)
    assert rec.elected == [term.token] and elector.token == term.token
    assert await elector.check()
    info = await elector.leader()
    assert info is not None
    assert info.instance_id == "solo" and info.fencing_token == term.token
    assert 0 < info.ttl_ms <= 1500 and info.renewed_at >= info.acquired_at
    public = info.as_dict()
    assert set(public) == {
        "instance_id",
        "hostname",
        "pid",
        "fencing_token",
        "acquired_at",
        "renewed_at",
        "ttl_ms",
    }
    # renewals keep the lease alive well past its TTL
    first = info.renewed_at
    await async_wait_until(lambda: _renewed_after(elector, first), timeout=5)
    await asyncio.sleep(0)
    assert elector.is_leader and await elector.check()


def test_renewal_estimate_never_precedes_acquisition() -> None:
    """PTTL is whole milliseconds: right after acquiring, the estimate from it can
    land 1 ms before ``acquired_at`` (a CI run saw 06:27:25.370 < .371)."""
    value = json.dumps(
        {"instance_id": "a", "fencing_token": 7, "acquired_at": 1_000, "ttl_ms": 1500}
    )
    info = parse_lease(value, pttl_ms=1498, now_ms=1_000)
    assert info.renewed_at == info.acquired_at and info.ttl_ms == 1498
    later = parse_lease(value, pttl_ms=1500, now_ms=2_000)
    assert (later.renewed_at - info.acquired_at).total_seconds() == 1.0


async def _renewed_after(elector: LeaderElector, when: object) -> bool:
    info = await elector.leader()
    return info is not None and info.renewed_at > when  # type: ignore[operator]


async def test_graceful_release_hands_over_at_once(topology: Topology, make: Make) -> None:
    pairs = [make(topology, f"e{i}") for i in range(3)]
    electors = [e for e, _ in pairs]
    for e in electors:
        await e.start()
    await async_wait_until(lambda: len(leaders(electors)) == 1, timeout=5)
    old = leaders(electors)[0]
    old_token = old.token
    assert old_token is not None
    started = time.monotonic()
    await old.stop()
    rest = [e for e in electors if e is not old]
    # Followers campaign on the release notice, not after retry_period (300 ms).
    await async_wait_until(lambda: len(leaders(rest)) == 1, timeout=2, interval=0.002)
    handoff = time.monotonic() - started
    new = leaders(rest)[0]
    assert new.token is not None and new.token > old_token
    assert not old.is_leader and pairs[electors.index(old)][1].revoked == ["released"]
    assert handoff < 1.0, f"handoff took {handoff:.3f}s"


SLOW = {
    "lease_ttl_ms": 10000,
    "renew_interval_ms": 2000,
    "renew_deadline_ms": 8000,
    "retry_period_ms": 8000,
}


async def test_a_waiting_follower_campaigns_on_the_release_notice(
    topology: Topology, make: Make
) -> None:
    """A follower that is not the heir polls only every 10 retry periods (80 s here):
    it takes over within a second of a graceful release only if the notice reached
    it (the notice listener works on this topology)."""
    pairs = [make(topology, f"e{i}", **SLOW) for i in range(3)]
    electors = [e for e, _ in pairs]
    for e in electors:
        await e.start()
    await async_wait_until(
        lambda: len(leaders(electors)) == 1 and len(heirs(electors)) == 1, 10, message="roles"
    )
    leader, heir = leaders(electors)[0], heirs(electors)[0]
    waiting = next(e for e in electors if e is not leader and e is not heir)
    channel = leader.keys.election_notices(leader.name)
    await async_wait_until(
        lambda: _all(waiting.stats.campaigns >= 1, topology.listeners(channel), 3),
        10,
        message="every elector listens for notices and has campaigned",
    )
    await heir.stop(release=False)  # gone without a word: only the notice can wake `waiting`
    started = time.monotonic()
    await leader.stop()
    await async_wait_until(lambda: waiting.is_leader, 5, interval=0.005, message="took over")
    assert time.monotonic() - started < 1.0


async def test_lease_lost_is_noticed_and_revoked(topology: Topology, make: Make) -> None:
    elector, rec = make(topology, "a", retry_period_ms=900)
    await elector.start()
    term = await elector.wait_for_leadership(timeout=5)
    # Someone overwrites the lease (an operator, a split brain after failover).
    await topology.client.set(elector.keys.lease(elector.name), b'{"instance_id":"x"}', px=60000)
    await async_wait_until(lambda: rec.revoked, timeout=3)
    assert rec.revoked == ["lease lost"] and not elector.is_leader
    assert elector.term is None and not await elector.check()
    assert term.token == rec.elected[0]


async def test_paused_redis_makes_leader_step_down_before_ttl(make: Make) -> None:
    with owned_redis() as server:
        redis = create_redis(server.url, socket_timeout=0.5)
        a, rec_a = make(redis, "a")
        b, _ = make(redis, "b")
        await a.start()
        await a.wait_for_leadership(timeout=5)
        await b.start()
        server.pause()
        paused = time.monotonic()
        try:
            await async_wait_until(lambda: not a.is_leader, timeout=5)
            stepped = time.monotonic() - paused
            # No renewal for renew_deadline (1.0 s): gone before the 1.5 s TTL could end.
            assert stepped < 1.5, stepped
            await async_wait_until(lambda: rec_a.revoked, timeout=3)
            assert rec_a.revoked[0] == "renew deadline exceeded"
            assert not b.is_leader  # nobody can win while Redis is unreachable
        finally:
            server.resume()
        await async_wait_until(lambda: a.is_leader or b.is_leader, timeout=10)
        assert len(leaders([a, b])) == 1
        await redis.aclose()


async def test_restart_with_data_loss_keeps_tokens_increasing(make: Make) -> None:
    with owned_redis() as server:
        redis = create_redis(server.url, socket_timeout=1)
        electors = [make(redis, f"e{i}")[0] for i in range(2)]
        for e in electors:
            await e.start()
        await async_wait_until(lambda: leaders(electors), timeout=5)
        before = leaders(electors)[0].token
        assert before is not None
        old_pid = server.pid
        server.restart()  # empty: the lease and the fencing counter are gone
        assert server.pid != old_pid
        await async_wait_until(
            lambda: any(e.is_leader and (e.token or 0) > before for e in electors),
            timeout=15,
        )
        # The old leader may still believe it leads until its next renewal, but
        # Redis already refuses its term: it can claim nothing.
        for e in leaders(electors):
            assert await e.check() == ((e.token or 0) > before)
        await async_wait_until(lambda: len(leaders(electors)) == 1, timeout=5)
        assert (leaders(electors)[0].token or 0) > before
        await redis.aclose()


async def test_killed_leader_connection_triggers_takeover(topology: Topology, make: Make) -> None:
    a, rec_a = make(topology, "a")
    b, _ = make(topology, "b")
    await a.start()
    term = await a.wait_for_leadership(timeout=5)
    await b.start()
    # The lease names a's lease connection; cut it, as a crash would.
    await topology.kill_client(term.client_id, a.keys.lease(a.name))
    await async_wait_until(lambda: b.is_leader, timeout=5)
    assert (b.token or 0) > term.token
    await async_wait_until(lambda: rec_a.revoked, timeout=5)
    assert rec_a.revoked[0] in {"lease lost", "connection replaced"}


async def _all(campaigned: bool, listeners: Awaitable[int], expected: int) -> bool:
    return await listeners >= expected and campaigned  # always awaited


def heirs(electors: list[LeaderElector]) -> list[LeaderElector]:
    return [e for e in electors if e.is_heir and not e.is_leader]


async def test_one_heir_watches_the_holder_and_is_replaced_when_it_goes(
    topology: Topology, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """Of four followers exactly one is the heir; it is replaced at once when it stops,
    and within one renew interval of its key expiring when it vanishes; a crash of
    the leader is then found by the heir's connection check, not by the lease TTL."""
    caplog.set_level(logging.INFO, logger="coordinator.election")
    own = create_client(topology.url)  # the leader's own connections, closed as by a crash
    leader, leader_rec = make(Topology(topology.url, own), "lead")
    await leader.start()
    term = await leader.wait_for_leadership(timeout=5)
    followers = [make(topology, f"e{i}")[0] for i in range(4)]
    for e in followers:
        await e.start()
    await async_wait_until(lambda: len(heirs(followers)) == 1, 5, message="one heir")
    heir = heirs(followers)[0]
    heir_value = await topology.client.get(leader.keys.heir(leader.name))
    assert json.loads(heir_value)["instance_id"] == heir.instance_id
    await heir.stop()  # resigns: a notice, another follower takes the role
    rest = [e for e in followers if e is not heir]
    await async_wait_until(lambda: len(heirs(rest)) == 1, 5, message="a new heir after a stop")
    heir = heirs(rest)[0]
    await heir.stop(release=False)  # vanishes: its key expires, the leader announces it
    rest = [e for e in rest if e is not heir]
    await async_wait_until(lambda: len(heirs(rest)) == 1, 5, message="a new heir after expiry")
    heir = heirs(rest)[0]
    assert leader_rec.revoked == []  # no heir ever deposed the live leader
    await leader.stop(release=False)  # the lease stays until its TTL...
    await own.aclose()  # ...and the leader's connections close
    await async_wait_until(lambda: len(leaders(rest)) == 1, 5, message="a follower took over")
    assert (leaders(rest)[0].token or 0) > term.token
    # The lease was deleted for the lost connection (the heir's check), not left to expire.
    found = f"{heir.instance_id}: holder {leader.instance_id} (token {term.token}) lost its"
    assert [r for r in caplog.records if r.getMessage().startswith(found)]


async def test_an_heir_on_the_leaders_host_gives_way_to_a_follower_on_another(
    topology: Topology, make: Make
) -> None:
    leader, _ = make(topology, "lead")
    local, _ = make(topology, "local")
    remote, _ = make(topology, "remote")
    leader.hostname = local.hostname = "host-a"
    remote.hostname = "host-b"
    await leader.start()
    await leader.wait_for_leadership(timeout=5)
    await local.start()
    await async_wait_until(lambda: local.is_heir, 5, message="the only follower is heir")
    await remote.start()
    await async_wait_until(
        lambda: remote.is_heir and not local.is_heir, 10, message="the remote follower is heir"
    )


async def test_failing_callback_does_not_stop_the_elector(
    topology: Topology, namespace: str
) -> None:
    calls: list[int] = []

    def broken(token: int) -> None:
        calls.append(token)
        raise RuntimeError("observer bug")

    settings = CoordinatorSettings(
        namespace=namespace, instance_id="a", redis_url=topology.url, **FAST
    )  # type: ignore[arg-type]
    elector = LeaderElector(topology.client, settings, on_elected=broken)
    async with elector:
        await elector.wait_for_leadership(timeout=5)
        await asyncio.sleep(0.7)  # two renewals
        assert elector.is_leader and calls


def test_bad_election_name_rejected(namespace: str) -> None:
    from coordinator import ConfigurationError

    with pytest.raises(ConfigurationError, match="election name"):
        LeaderElector(create_redis("redis://127.0.0.1:1/0"), CoordinatorSettings(), name="a b")

"""Leader election on Redis Cluster when the primary of the namespace's slot dies.

Three electors (each with its own cluster client) lead and claim "fires" the way
the scheduler does: the claim script checks the caller's lease and moves the job's
last fire forward, and ``WAIT 1`` confirms it reached a replica. The primary that
holds the election's slot is SIGKILLed under them. The contract: one leader at a
time in Redis (never two terms current at once, no tick claimed twice, claims in
token order, a new term with a higher token after the failover), and claiming
resumes on the promoted replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from coordinator import CoordinatorSettings, LeaderElector, create_client
from coordinator.errors import REDIS_UNREACHABLE
from coordinator.store.connection import create_node_client, refresh_slot_map
from coordinator.store.scripts import CLAIM_FIRE
from coordinator.testing import async_wait_until, wait_until
from coordinator.testing.topologies import RedisClusterServers

from .support.timing import FAST

pytestmark = pytest.mark.timeout(240)

TICK_MS = 50


class Claimer:
    """Claims one tick per ``TICK_MS`` while its elector leads, through the fire-claim
    script with ``WAIT 1`` on the primary of the election's slot."""

    def __init__(self, elector: LeaderElector, cluster: RedisCluster, url: str) -> None:
        self.elector, self.cluster, self.url = elector, cluster, url
        self.claims: list[tuple[int, int]] = []  # (tick ms, token), confirmed by a replica
        self._nodes: dict[str, Redis] = {}
        keys = elector.keys
        self._keys = [keys.lease(elector.name), f"{keys.prefix}test-fires", f"{keys.prefix}test-h"]

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            term = self.elector.term
            if term is not None:
                tick = int(time.time() * 1000) // TICK_MS * TICK_MS
                try:
                    node = self.cluster.get_node_from_key(self._keys[0])
                    assert node is not None
                    if node.name not in self._nodes:
                        self._nodes[node.name] = create_node_client(
                            self.url, node.host, int(node.port)
                        )
                    (claimed, *_), confirmed = await CLAIM_FIRE.call_replicated(
                        self._nodes[node.name],
                        self._keys,
                        [term.lease_value, "tick", tick, "run", "", 10, "0", ""],
                        1,
                        500,
                    )
                    if claimed == 1 and confirmed >= 1:
                        self.claims.append((tick, term.token))
                except REDIS_UNREACHABLE:
                    await asyncio.sleep(0.05)
                    with contextlib.suppress(*REDIS_UNREACHABLE):
                        await refresh_slot_map(self.cluster)
            await asyncio.sleep(TICK_MS / 1000 / 2)

    async def close(self) -> None:
        for client in self._nodes.values():
            await client.aclose()


async def _current_terms(electors: list[LeaderElector], expected: int) -> bool:
    """Whether ``expected`` electors' terms are current in Redis (never more than one)."""
    held = [e.instance_id for e in electors if await e.check()]
    assert len(held) <= 1, f"two terms current at once: {held}"
    return len(held) == expected


async def test_namespace_primary_killed_under_the_election(
    own_cluster: RedisClusterServers, namespace: str
) -> None:
    url = own_cluster.url
    clients = [create_client(url) for _ in range(3)]
    electors = [
        LeaderElector(
            client,
            CoordinatorSettings(namespace=namespace, instance_id=f"e{i}", redis_url=url, **FAST),  # type: ignore[arg-type]
        )
        for i, client in enumerate(clients)
    ]
    claimers = [Claimer(e, c, url) for e, c in zip(electors, clients, strict=True)]
    stop = asyncio.Event()
    for e in electors:
        await e.start()
    tasks = [asyncio.create_task(c.run(stop)) for c in claimers]
    try:
        await async_wait_until(lambda: sum(len(c.claims) for c in claimers) >= 20, 30)
        await async_wait_until(lambda: any(e.is_leader for e in electors), 10)
        first = next(e for e in electors if e.is_leader)
        old_token = first.token
        assert old_token is not None
        lease_key = first.keys.lease(first.name)
        old, new = await asyncio.to_thread(own_cluster.kill_primary_of, lease_key)
        killed_at = time.monotonic()
        # A leader again, on the promoted replica, with a higher token.
        await async_wait_until(
            lambda: any((e.token or 0) > old_token for e in electors),
            30,
            message="no new term after the failover",
        )
        elected_after = time.monotonic() - killed_at
        # WAIT 1 needs a replica: the killed node comes back as the new primary's.
        await asyncio.to_thread(own_cluster.nodes[old].start)
        await asyncio.to_thread(wait_until, own_cluster.healthy, 60, 0.1)
        before = sum(len(c.claims) for c in claimers)
        await async_wait_until(
            lambda: sum(len(c.claims) for c in claimers) >= before + 20,
            60,
            message="claims did not resume after the failover",
        )
        # In Redis, exactly one of them holds the current lease.
        await async_wait_until(lambda: _current_terms(electors, 1), 10, message="one term")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for e in electors:
            await e.stop()
        for claimer in claimers:
            await claimer.close()
        for client in clients:
            await client.aclose()
    assert old != new
    claims = sorted(claim for c in claimers for claim in c.claims)
    ticks = [tick for tick, _ in claims]
    assert len(ticks) == len(set(ticks)), "a tick was claimed twice"
    tokens = [token for _, token in claims]
    assert tokens == sorted(tokens), "a lower token claimed after a higher one"
    assert len(set(tokens)) >= 2 and tokens[-1] > old_token
    print(f"a new term {elected_after:.2f}s after the promotion")

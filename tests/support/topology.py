"""One Redis of the contract suites, by topology (one node, Sentinel, Cluster).

A test asks for the ``topology`` fixture (``tests/conftest.py``) to run once per
topology, as APScheduler 4 runs one contract suite per data store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from coordinator import CoordinatorSettings, Keys, LeaderScheduler, create_client
from coordinator.testing import RedisServer
from coordinator.testing.topologies import RedisClusterServers

from .timing import FAST


@dataclass
class Topology:
    """One Redis of the contract suite: its URL and a client of it (a RedisCluster on
    Cluster)."""

    url: str
    client: Redis | RedisCluster

    async def kill_client(self, client_id: int, key: str) -> None:
        """CLIENT KILL on the node that holds ``key`` (connection ids are per node)."""
        if isinstance(self.client, RedisCluster):
            node = self.client.get_node_from_key(key)
            await self.client.execute_command("CLIENT", "KILL", "ID", client_id, target_nodes=node)
        else:
            await self.client.client_kill_filter(_id=client_id)

    async def listeners(self, channel: str) -> int:
        """Pub/Sub subscribers of ``channel``, over every node on Cluster (classic
        Pub/Sub subscriptions are per node)."""
        if isinstance(self.client, RedisCluster):
            total = 0
            for node in self.client.get_nodes():
                reply = await self.client.execute_command(
                    "PUBSUB", "NUMSUB", channel, target_nodes=node
                )
                total += int(reply[1])
            return total
        return int((await self.client.pubsub_numsub(channel))[0][1])


def url_of(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """For a ``make`` fixture: the URL of the test's ``topology`` when it asks for one,
    else of the shared Redis; and the settings that name it (``redis_url``)."""
    if "topology" in request.fixturenames:
        url: str = request.getfixturevalue("topology_url")
        return url, {"redis_url": url}
    shared: str = request.getfixturevalue("redis_url")
    return shared, {}


@asynccontextmanager
async def replicated_scheduler(
    cluster: RedisClusterServers, namespace: str
) -> AsyncIterator[tuple[LeaderScheduler, RedisServer]]:
    """A scheduler on ``cluster`` whose claims need one replica (``min_replicas=1``,
    ``WAIT`` up to 300 ms), not started, and the replica of the primary that holds the
    namespace's slot (pause it to leave claims unconfirmed). After: the replica resumed,
    the scheduler stopped, its client closed."""
    redis = create_client(cluster.url)
    settings = CoordinatorSettings(
        redis_url=cluster.url,
        namespace=namespace,
        instance_id="a",
        **{**FAST, "min_replicas": 1, "replica_timeout_ms": 300},
    )
    scheduler = LeaderScheduler(redis, settings)
    replica: RedisServer | None = None
    try:
        port = await asyncio.to_thread(cluster.primary_of, Keys(namespace).last_fire())
        replica = cluster.nodes[await asyncio.to_thread(cluster.replica_of, port)]
        yield scheduler, replica
    finally:
        if replica is not None:
            replica.resume()
        await scheduler.stop(timeout=2)
        await redis.aclose()

"""One Redis of the contract suites, by topology (one node, Sentinel, Cluster).

A test asks for the ``topology`` fixture (``tests/conftest.py``) to run once per
topology, as APScheduler 4 runs one contract suite per data store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster


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

"""Shared fixtures. Redis servers come from the opt-in coordinator.testing.plugin,
under the short names this suite uses (``redis_url``: shared; ``redis_server``:
owned by one test, killable; ``redis_client``)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from coordinator.store.connection import cluster_unsupported_reason, create_client
from coordinator.testing import DockerRedisServer, RedisServer
from coordinator.testing.servers import binary_only_reason
from coordinator.testing.topologies import RedisClusterServers, SentinelCluster

from .support.topology import Topology

pytest_plugins = ["coordinator.testing.plugin"]


def pytest_addoption(parser: pytest.Parser) -> None:
    # Here, not in tests/chaos/conftest.py, so `./run test --chaos-rounds 5` works too.
    group = parser.getgroup("chaos")
    group.addoption(
        "--chaos-rounds", type=int, default=1, help="repeat each chaos fault N times (default 1)"
    )
    group.addoption(
        "--chaos-seed",
        type=int,
        default=None,
        help="seed of the random fault mixes (default: random, printed)",
    )


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses, so tests on a shared Redis never collide."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def redis_url(coordinator_redis_url: str) -> str:
    return coordinator_redis_url


@pytest.fixture
def redis_server(
    coordinator_redis_server: RedisServer | DockerRedisServer,
) -> RedisServer | DockerRedisServer:
    return coordinator_redis_server


@pytest.fixture
def redis_client(coordinator_redis_client: Redis) -> Redis:
    return coordinator_redis_client


@pytest.fixture(scope="session")
def sentinel_url() -> Iterator[str]:
    """A primary, a replica and three Sentinels shared by the session (never failed over:
    tests that fail one over start their own)."""
    reason = binary_only_reason("a Sentinel topology")
    if reason:
        pytest.skip(reason)
    with SentinelCluster() as sentinels:
        yield sentinels.url


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """A Redis Cluster (3 primaries, 3 replicas) shared by the session (never failed
    over: tests that kill or move anything start their own)."""
    reason = binary_only_reason("a Redis Cluster") or cluster_unsupported_reason()
    if reason:
        pytest.skip(reason)
    with RedisClusterServers() as cluster:
        yield cluster.url


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterServers]:
    """A cluster this test alone owns: kill and move freely."""
    reason = binary_only_reason("a Redis Cluster") or cluster_unsupported_reason()
    if reason:
        pytest.skip(reason)
    with RedisClusterServers() as cluster:
        yield cluster


@pytest.fixture(params=["single", "sentinel", "cluster"])
def topology_url(request: pytest.FixtureRequest) -> str:
    """The contract suite's Redis, once per topology: one node, Sentinel, Cluster
    (as APScheduler 4 runs one contract suite per data store)."""
    name = {"single": "redis_url", "sentinel": "sentinel_url", "cluster": "cluster_url"}
    url: str = request.getfixturevalue(name[request.param])
    return url


@pytest.fixture
async def topology(topology_url: str) -> AsyncIterator[Topology]:
    """A client of :func:`topology_url` (see ``tests/support/topology.py``)."""
    client = create_client(topology_url)
    yield Topology(topology_url, client)
    await client.aclose()

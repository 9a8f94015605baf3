"""Shared fixtures. Redis servers come from the opt-in coordinator.testing.plugin,
under the short names this suite uses (``redis_url``: shared; ``redis_server``:
owned by one test, killable; ``redis_client``)."""

from __future__ import annotations

import uuid

import pytest
from redis.asyncio import Redis

from coordinator.testing import DockerRedisServer, RedisServer

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

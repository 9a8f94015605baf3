"""Test tools for code built on coordinator: real Redis servers and a fault proxy.

Nothing here is loaded unless imported. The pytest fixtures are opt-in: add
``pytest_plugins = ["coordinator.testing.plugin"]`` to a ``conftest.py`` (or
run ``pytest -p coordinator.testing.plugin``); see :mod:`coordinator.testing.plugin`.

- :class:`RedisServer`: a ``redis-server`` process this test owns (kill, pause,
  resume, restart with or without its data);
- :func:`owned_redis`: a server the caller owns (a process, or a container:
  ``COORDINATOR_TEST_REDIS=docker`` makes it always a container);
- :class:`TcpProxy`: delay, blackhole or cut the connections to a server;
- :func:`wait_until`, :func:`async_wait_until`: wait on a condition with a deadline.
"""

from coordinator.testing.faults import TcpProxy
from coordinator.testing.servers import (
    DockerRedisServer,
    DockerUnavailable,
    RedisBinaryNotFound,
    RedisServer,
    async_wait_until,
    binary_only_reason,
    die_with_parent,
    docker_available,
    docker_unavailable_reason,
    find_redis_server,
    free_port,
    owned_redis,
    start_owned_redis,
    wait_until,
)

__all__ = [
    "DockerRedisServer",
    "DockerUnavailable",
    "RedisBinaryNotFound",
    "RedisServer",
    "TcpProxy",
    "async_wait_until",
    "binary_only_reason",
    "die_with_parent",
    "docker_available",
    "docker_unavailable_reason",
    "find_redis_server",
    "free_port",
    "owned_redis",
    "start_owned_redis",
    "wait_until",
]

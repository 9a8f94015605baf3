"""pytest fixtures for real Redis servers. Opt-in: nothing loads this by itself.

Turn it on in a ``conftest.py``::

    pytest_plugins = ["coordinator.testing.plugin"]

or on the command line with ``pytest -p coordinator.testing.plugin``.

Fixtures, named for the library so they never shadow a project's own:

- ``coordinator_redis_url`` (session): ``REDIS_URL`` if set (never stopped),
  else a throwaway server started for the session;
- ``coordinator_redis_server`` (function): a server this test alone owns, to
  kill, pause and restart (:class:`~coordinator.testing.RedisServer`);
- ``coordinator_redis_client`` (function): an async client on
  ``coordinator_redis_url``, closed after the test.

With ``COORDINATOR_TEST_REDIS=docker`` every server these fixtures (and
:func:`~coordinator.testing.owned_redis`) start is a Redis container; the run stops
at once with one message if no Docker engine answers.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from coordinator.store.connection import create_redis
from coordinator.testing.servers import (
    DockerRedisServer,
    RedisServer,
    docker_unavailable_reason,
    owned_redis,
    redis_test_mode,
)


def pytest_configure(config: pytest.Config) -> None:
    """Stop before any test when containers were asked for and none can be had."""
    try:
        mode = redis_test_mode()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    if mode == "docker":
        reason = docker_unavailable_reason()
        if reason:
            raise pytest.UsageError(
                f"COORDINATOR_TEST_REDIS=docker asks for Redis containers, but {reason}. "
                "Start a Docker engine, or unset COORDINATOR_TEST_REDIS"
            )


@pytest.fixture(scope="session")
def coordinator_redis_url() -> Iterator[str]:
    """A Redis shared by the session: ``REDIS_URL``, or a throwaway server."""
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    with owned_redis() as server:
        yield server.url


@pytest.fixture
def coordinator_redis_server() -> Iterator[RedisServer | DockerRedisServer]:
    """A Redis owned by this test alone: kill, pause and restart it freely."""
    with owned_redis() as server:
        yield server


@pytest.fixture
async def coordinator_redis_client(coordinator_redis_url: str) -> AsyncIterator[Redis]:
    """An async client on :func:`coordinator_redis_url`, closed after the test."""
    client = create_redis(coordinator_redis_url)
    try:
        yield client
    finally:
        await client.aclose()

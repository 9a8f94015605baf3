"""Regression tests for violations the chaos suite found (fast; not marked ``chaos``).

1. Burst of publishes during a Sentinel failover: publishes the old primary
   acknowledged after the replica's promotion vanished, and no client could be told
   (no ``reset`` is possible for events Redis forgot). Fix: ``COORDINATOR_MIN_REPLICAS``
   makes a publish (and a fire claim) count only once ``WAIT`` saw a replica take it.
   The chaos scenario ``test_burst_of_publishes_during_sentinel_failover`` runs with it.
"""

from __future__ import annotations

import pytest

from coordinator import CoordinatorSettings, EventRelay
from coordinator.errors import RedisUnavailableError
from coordinator.testing.topologies import SentinelCluster


def conf(url: str, namespace: str, **values: object) -> CoordinatorSettings:
    return CoordinatorSettings(redis_url=url, namespace=namespace, **values)  # type: ignore[arg-type]


async def test_unreplicated_publish_is_refused(redis_url: str, namespace: str) -> None:
    relay = EventRelay(conf(redis_url, namespace, min_replicas=1, replica_timeout_ms=50))
    try:
        with pytest.raises(RedisUnavailableError, match="0 of 1 replicas confirmed"):
            await relay.publish("c", {"n": 1})
    finally:
        await relay.stop()


async def test_replicated_publish_is_acknowledged(namespace: str) -> None:
    with SentinelCluster() as sentinel:
        relay = EventRelay(conf(sentinel.url, namespace, min_replicas=1))
        try:
            assert "-" in await relay.publish("c", {"n": 1})
            assert "-" in await relay.publish("c", {"n": 2})  # the script is cached now
        finally:
            await relay.stop()

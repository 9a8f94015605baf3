"""Scheduler chaos: 2 groups x 2 scheduler nodes, each group behind its own TCP proxy to
an owned redis-server, under kills, pauses, partitions, cuts, data-loss restarts and a
Sentinel failover, one fault kind a scenario and in seeded random mixes. After each run
the checker goes over every node's history and the run history in Redis.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from coordinator.testing.topologies import SentinelCluster

from .checker import check, measure
from .conftest import record
from .nodes import FAILOVER_LIMIT_S, NodeCluster

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]


def run_and_check(
    c: NodeCluster, scenario: str, rounds: int, url: str, faults: list[Callable[[], Any]]
) -> None:
    try:
        c.wait_ready()
        for fault in faults:
            c.wait_ticks(3)
            fault()
        c.wait_ticks(3)
    finally:
        c.stop()
    history = c.history(url)
    violations = check(history, FAILOVER_LIMIT_S)
    measured = measure(history)
    record(scenario, rounds, measured, len(violations))
    print(f"{scenario}: {measured}")
    assert violations == [], "\n".join(violations)


FAULTS = ("sigkill", "sigstop", "partition", "cut", "redis-restart")


def fault_fn(c: NodeCluster, kind: str, server: Any) -> Callable[[], Any]:
    return {
        "sigkill": c.sigkill_leader,
        "sigstop": c.sigstop_leader,
        "partition": c.partition_leader,
        "cut": c.cut_connections,
        "redis-restart": lambda: c.restart_redis(server),
    }[kind]


@pytest.mark.parametrize("kind", FAULTS)
def test_scheduler_fault(kind: str, redis_server: Any, namespace: str, chaos_rounds: int) -> None:
    c = NodeCluster(redis_server.port, namespace)
    run_and_check(
        c,
        f"scheduler: {kind}",
        chaos_rounds,
        redis_server.url,
        [fault_fn(c, kind, redis_server)] * chaos_rounds,
    )


def test_scheduler_random_mix(
    redis_server: Any, namespace: str, chaos_rounds: int, chaos_seed: int
) -> None:
    rng = random.Random(chaos_seed)
    kinds = [rng.choice(FAULTS) for _ in range(4 * chaos_rounds)]
    print(f"mix (seed {chaos_seed}): {kinds}")
    c = NodeCluster(redis_server.port, namespace)
    run_and_check(
        c,
        "scheduler: random mix",
        len(kinds),
        redis_server.url,
        [fault_fn(c, k, redis_server) for k in kinds],
    )


def test_scheduler_sentinel_failover(namespace: str, chaos_rounds: int) -> None:
    """1 primary, 1 replica, 3 Sentinels; the nodes connect through Sentinel; SENTINEL
    FAILOVER while they run (the fencing counter and claims live on the replica too)."""
    with SentinelCluster() as sentinel:
        # Claims count once a replica has them (WAIT): a failover cannot undo a claim.
        c = NodeCluster(
            None, namespace, direct_url=sentinel.url, env={"COORDINATOR_MIN_REPLICAS": "1"}
        )
        from .checker import Fault

        def failover() -> None:
            start = time.monotonic()
            sentinel.failover()
            c.wait_ticks(2)
            c.faults.append(
                Fault("sentinel-failover", start, time.monotonic(), displaces_leader=False)
            )

        port = sentinel.primary_port()
        run_and_check(
            c,
            "scheduler: sentinel failover",
            chaos_rounds,
            f"redis://127.0.0.1:{port}/0",
            [failover] * chaos_rounds,
        )

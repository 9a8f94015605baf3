"""Leader election across real OS processes: many electors, SIGKILL, SIGSTOP, SIGTERM."""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Iterator

import pytest
import redis as redis_sync

from coordinator import Keys
from coordinator.testing import owned_redis

from .support.procs import Proc, stop_all, wait_for
from .support.timing import FAST_ENV

pytestmark = pytest.mark.slow


class Cluster:
    """N elector processes on one Redis."""

    def __init__(self, url: str, namespace: str, n: int) -> None:
        self.url = url
        self.namespace = namespace
        self.procs = [self.spawn(f"p{i}") for i in range(n)]
        wait_for(lambda: all(p.of("ready") for p in self.procs), 60, "electors ready", self.procs)

    def spawn(self, instance_id: str) -> Proc:
        return Proc(
            "tests.support.elector_proc",
            self.url,
            self.namespace,
            instance_id,
            env=FAST_ENV,
            name=instance_id,
        )

    def believers(self, procs: list[Proc] | None = None) -> list[Proc]:
        """Processes whose last event says they lead."""
        out = []
        for p in procs or self.procs:
            terms = [e for e in p.events if e["event"] in ("elected", "revoked")]
            if terms and terms[-1]["event"] == "elected" and p.alive:
                out.append(p)
        return out

    def leader(self, among: list[Proc] | None = None) -> Proc:
        """The one process that believes it leads, once exactly one does.

        Two may believe at once for up to ``renew_deadline`` (a leader whose lease
        vanished, in a Redis restart say, learns it at its next renewal; its claims
        already fail inside Redis). Two for longer than the deadline fail the test.
        """
        found = wait_for(
            lambda: (b := self.believers(among)) and len(b) == 1 and b,
            10,
            "exactly one leader",
            self.procs,
        )
        return found[0]

    def holder(self) -> str | None:
        client = redis_sync.Redis.from_url(self.url)
        try:
            raw = client.get(Keys(self.namespace).lease("scheduler"))
        finally:
            client.close()
        if raw is None:
            return None
        import json

        return str(json.loads(raw)["instance_id"])


@pytest.fixture
def cluster_factory(namespace: str) -> Iterator[object]:
    made: list[Cluster] = []

    def make(url: str, n: int) -> Cluster:
        cluster = Cluster(url, namespace, n)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        stop_all(cluster.procs)


def intervals(procs: list[Proc]) -> list[tuple[float, float, str, int]]:
    """(start, end, process, token) of every term a process believed it held."""
    out = []
    for p in procs:
        start: dict[str, float] | None = None
        token = 0
        for e in p.events:
            if e["event"] == "elected":
                start, token = {"t": e["t"]}, int(e["token"])
            elif e["event"] == "revoked" and start is not None:
                out.append((start["t"], e["t"], p.name, token))
                start = None
        if start is not None:
            out.append((start["t"], float("inf"), p.name, token))
    return sorted(out)


def test_eight_processes_one_leader_for_twenty_seconds(redis_url: str, cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster: Cluster = cluster_factory(redis_url, 8)
    cluster.leader()
    samples = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        believers = cluster.believers()
        holder = cluster.holder()
        assert len(believers) == 1, [p.name for p in believers]
        assert holder == believers[0].name
        samples += 1
        time.sleep(0.1)
    assert samples > 50
    # No two terms ever overlapped, on any process's own clock (monotonic is system-wide).
    terms = intervals(cluster.procs)
    for (_s1, e1, *_), (s2, _e2, *_) in itertools.pairwise(terms):
        assert s2 >= e1, terms


def test_sigkill_leader_new_leader_within_two_seconds(redis_url: str, cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster: Cluster = cluster_factory(redis_url, 3)
    old = cluster.leader()
    old_token = int(old.of("elected")[-1]["token"])
    killed_at = time.monotonic()
    old.kill()
    rest = [p for p in cluster.procs if p is not old]
    new = cluster.leader(rest)
    elected = new.of("elected")[-1]
    assert int(elected["token"]) > old_token
    failover = elected["t"] - killed_at
    assert failover < 2.0, f"failover took {failover:.2f}s"


def test_graceful_release_across_processes(redis_url: str, cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster: Cluster = cluster_factory(redis_url, 3)
    old = cluster.leader()
    assert old.terminate() == 0
    revoked = old.of("revoked")[-1]
    assert revoked["reason"] == "released"
    rest = [p for p in cluster.procs if p is not old]
    new = cluster.leader(rest)
    handoff = new.of("elected")[-1]["t"] - revoked["t"]
    # Followers campaign on the release notice; 200 ms is the target (measured in
    # bench/failover.py), asserted generously here for loaded CI machines.
    assert handoff < 1.0, f"handoff took {handoff:.3f}s"


def test_sigstop_past_lease_then_sigcont(redis_url: str, cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster: Cluster = cluster_factory(redis_url, 3)
    old = cluster.leader()
    old_token = int(old.of("elected")[-1]["token"])
    old.signal(signal.SIGSTOP)
    try:
        rest = [p for p in cluster.procs if p is not old]
        # The paused process still "believes" (it cannot run); ask the others.
        new = wait_for(
            lambda: [p for p in rest if p in cluster.believers(rest)],
            10,
            "a new leader while the old one is paused",
            cluster.procs,
        )[0]
        assert int(new.of("elected")[-1]["token"]) > old_token
    finally:
        old.signal(signal.SIGCONT)
    # On waking it steps down by its own clock, and Redis confirms its term is over.
    wait_for(lambda: old.of("server_check"), 10, "old leader's server-side check", [old])
    assert old.of("revoked")[-1]["reason"] in {"renew deadline exceeded", "lease lost"}
    check = old.of("server_check")[-1]
    assert check["token"] == old_token and check.get("current") is False
    assert cluster.believers() == [new]


def test_leadership_survives_redis_restart_with_new_higher_token(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    with owned_redis() as server:
        cluster: Cluster = cluster_factory(server.url, 3)
        leader = cluster.leader()
        highest = max(int(e["token"]) for p in cluster.procs for e in p.of("elected"))
        server.restart()
        wait_for(
            lambda: any(int(e["token"]) > highest for p in cluster.procs for e in p.of("elected")),
            15,
            "a new term after the restart",
            cluster.procs,
        )
        new = cluster.leader()
        assert int(new.of("elected")[-1]["token"]) > highest
        assert leader.alive
        stop_all(cluster.procs)

"""Leader failover across real processes: graceful handoff and crash (SIGKILL).

    python -m bench failover [--trials 20] [--followers 2] [--fast] [--cluster]

Prints p50/p95/p99/max in ms for each kind, and the Redis commands per second
of a leader with 1, 10 and 100 idle followers (``--cost-followers``). Uses the
library's default timings unless ``--fast`` (lease 1.5 s, retry 0.3 s). Each
run uses a redis-server it starts; with ``--cluster``, a Redis Cluster of 3 primaries
and 3 replicas it starts (commands are then counted on the primaries, where the
election's slot and every node's share of the cluster's own chatter are).
Times are taken on the system-wide monotonic clock in each process:
handoff = old leader's "revoked" -> new leader's "elected";
crash = SIGKILL sent -> new leader's "elected".
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path

import redis as redis_sync

from coordinator.testing import RedisServer
from coordinator.testing.topologies import RedisClusterServers
from tests.support.procs import Proc, stop_all, wait_for
from tests.support.timing import FAST_ENV

from ._stats import summarize

RESULTS = Path(__file__).parent / "results"


class Group:
    def __init__(self, url: str, env: dict[str, str]) -> None:
        self.url = url
        self.env = env
        self.namespace = f"bench{uuid.uuid4().hex[:8]}"
        self.procs: list[Proc] = []
        self.count = 0

    def spawn(self) -> Proc:
        self.count += 1
        proc = Proc(
            "tests.support.elector_proc",
            self.url,
            self.namespace,
            f"p{self.count}",
            env=self.env,
            name=f"p{self.count}",
        )
        self.procs.append(proc)
        wait_for(lambda: proc.of("ready"), 60, "elector ready", [proc])
        return proc

    def live(self) -> list[Proc]:
        return [p for p in self.procs if p.alive]

    def leader(self, among: list[Proc]) -> Proc:
        def find() -> Proc | None:
            for p in among:
                terms = [e for e in p.events if e["event"] in ("elected", "revoked")]
                if terms and terms[-1]["event"] == "elected":
                    return p
            return None

        found = wait_for(find, 30, "a leader", among)
        assert isinstance(found, Proc)
        return found


def run_trials(
    url: str, env: dict[str, str], trials: int, followers: int
) -> dict[str, list[float]]:
    group = Group(url, env)
    for _ in range(followers + 1):
        group.spawn()
    handoff: list[float] = []
    crash: list[float] = []
    try:
        for kind in ["graceful", "crash"] * trials:
            live = group.live()
            old = group.leader(live)
            rest = [p for p in live if p is not old]
            time.sleep(0.2)  # let followers settle into their idle rhythm
            if kind == "graceful":
                old.terminate()
                start = old.of("revoked")[-1]["t"]
            else:
                start = time.monotonic()
                old.kill()
            new = group.leader(rest)
            elapsed = new.of("elected")[-1]["t"] - start
            (handoff if kind == "graceful" else crash).append(elapsed * 1000)
            group.spawn()
    finally:
        stop_all(group.procs)
    return {"graceful handoff": handoff, "crash (SIGKILL)": crash}


Topology = RedisServer | RedisClusterServers


def start_topology(cluster: bool) -> Topology:
    return RedisClusterServers().start() if cluster else RedisServer().start()


def primary_ports(topology: Topology) -> list[int]:
    if isinstance(topology, RedisServer):
        return [topology.port]
    port = next(iter(topology.nodes))
    with redis_sync.Redis(port=port) as client:
        listing = client.execute_command("CLUSTER", "NODES")
    text = listing.decode() if isinstance(listing, bytes) else str(listing)
    return [
        int(fields[1].split("@")[0].rsplit(":", 1)[1])
        for fields in (line.split() for line in text.splitlines())
        if "master" in fields[2] and "fail" not in fields[2]
    ]


def commands_processed(ports: list[int]) -> int:
    """``total_commands_processed`` summed over ``ports``, minus our own INFO calls."""
    total = 0
    for port in ports:
        with redis_sync.Redis(port=port) as client:
            total += int(client.info("stats")["total_commands_processed"]) - 1
    return total


def election_cost(
    env: dict[str, str], counts: list[int], window: float, cluster: bool = False
) -> dict[int, float]:
    """Redis commands per second of one leader and ``n`` idle followers, for each ``n``
    (followers run 25 to a process, each elector on its own connection, as separate
    processes would; counted from ``total_commands_processed``, which includes the
    commands run inside scripts)."""

    def commands_per_second(n_followers: int) -> float:
        server = start_topology(cluster)
        try:
            group = Group(server.url, env)
            group.spawn()
            group.leader(group.procs)
            left = n_followers
            while left:
                k = min(25, left)
                left -= k
                if k == 1:
                    group.spawn()
                    continue
                group.count += 1
                proc = Proc(
                    "tests.support.elector_proc",
                    server.url,
                    group.namespace,
                    f"f{group.count}",
                    str(k),
                    env=env,
                    name=f"f{group.count}",
                )
                group.procs.append(proc)
                wait_for(lambda p=proc: p.of("ready"), 60, "electors ready", [proc])
            time.sleep(max(3.0, window / 3))  # let the start-up campaigns settle
            ports = primary_ports(server)
            before = commands_processed(ports)
            time.sleep(window)
            after = commands_processed(ports)
            stop_all(group.procs)
            return (after - before) / window
        finally:
            server.stop()

    return {n: commands_per_second(n) for n in counts}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench failover")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--followers", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="test timings instead of defaults")
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument(
        "--cost-followers", type=int, nargs="*", default=[1, 10, 100], help="idle followers"
    )
    parser.add_argument(
        "--cluster", action="store_true", help="a 3+3 Redis Cluster instead of one redis-server"
    )
    args = parser.parse_args(argv)
    env = FAST_ENV if args.fast else {}
    timing = "lease 1.5 s, retry 0.3 s" if args.fast else "defaults: lease 5 s, retry 1 s"
    if args.cluster:
        timing += "; Redis Cluster, 3 primaries + 3 replicas"

    server = start_topology(args.cluster)
    try:
        results = run_trials(server.url, env, args.trials, args.followers)
    finally:
        server.stop()
    costs = election_cost(env, [0, *args.cost_followers], args.window, args.cluster)

    rows = ["| failover | n | p50 ms | p95 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    summary = {}
    for name, values in results.items():
        s = summarize(values)
        summary[name] = s
        rows.append(
            f"| {name} | {s['n']} | {s['p50']:.1f} | {s['p95']:.1f} | "
            f"{s['p99']:.1f} | {s['max']:.1f} |"
        )
    print(f"\nLeader failover, {args.followers + 1} processes, {timing}\n")
    print("\n".join(rows))
    alone = costs[0]
    cost_rows = [
        "| idle followers | Redis commands/s, all | per follower (leader's own subtracted) |",
        "|---|---|---|",
        f"| 0 (the leader alone) | {alone:.2f} | |",
    ]
    per_follower = {}
    for n, total in costs.items():
        if n:
            per_follower[n] = (total - alone) / n
            cost_rows.append(f"| {n} | {total:.2f} | {per_follower[n]:.3f} |")
    print("\n".join(["", *cost_rows]))
    cost = per_follower.get(max(per_follower), float("nan")) if per_follower else float("nan")
    RESULTS.mkdir(exist_ok=True)
    out = (
        RESULTS / f"failover{'-fast' if args.fast else ''}{'-cluster' if args.cluster else ''}.json"
    )
    out.write_text(
        json.dumps(
            {
                "timing": timing,
                "summary": summary,
                "raw": results,
                "commands_per_s": costs,
                "follower_commands_per_s": cost,
            },
            indent=2,
        )
    )
    print(f"raw results: {out}")
    return 0

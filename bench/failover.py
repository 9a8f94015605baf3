"""Leader failover across real processes: graceful handoff and crash (SIGKILL).

    python -m bench failover [--trials 20] [--followers 2] [--fast]

Prints p50/p95/p99/max in ms for each kind, and the Redis commands per second
that one idle follower costs. Uses the library's default timings unless
``--fast`` (lease 1.5 s, retry 0.3 s). Each run uses a redis-server it starts.
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


def follower_cost(env: dict[str, str], followers: int, window: float) -> float:
    """Redis commands per second per idle follower (leader's own load subtracted)."""

    def commands_per_second(n_followers: int) -> float:
        with RedisServer() as server:
            group = Group(server.url, env)
            for _ in range(n_followers + 1):
                group.spawn()
            group.leader(group.procs)
            time.sleep(1.0)
            client = redis_sync.Redis.from_url(server.url)
            before = int(client.info("stats")["total_commands_processed"])
            time.sleep(window)
            after = int(client.info("stats")["total_commands_processed"])
            client.close()
            stop_all(group.procs)
            return (after - before - 2) / window  # minus our own two INFO calls

    alone = commands_per_second(0)
    crowd = commands_per_second(followers)
    return (crowd - alone) / followers


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench failover")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--followers", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="test timings instead of defaults")
    parser.add_argument("--window", type=float, default=10.0)
    args = parser.parse_args(argv)
    env = FAST_ENV if args.fast else {}
    timing = "lease 1.5 s, retry 0.3 s" if args.fast else "defaults: lease 5 s, retry 1 s"

    with RedisServer() as server:
        results = run_trials(server.url, env, args.trials, args.followers)
    cost = follower_cost(env, 4, args.window)

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
    print(f"\nRedis commands per second per idle follower: {cost:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"failover{'-fast' if args.fast else ''}.json"
    out.write_text(
        json.dumps(
            {"timing": timing, "summary": summary, "raw": results, "follower_commands_per_s": cost},
            indent=2,
        )
    )
    print(f"raw results: {out}")
    return 0

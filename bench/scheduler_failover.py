"""Scheduler across induced failovers: duplicate fires, missed fires, first-fire delay.

    python -m bench scheduler_failover [--failovers 20] [--workers 3] [--tick 0.2] [--defaults]

``--workers`` processes (``coordinator worker tests.support.scheduler_jobs:build``)
run one interval job every ``--tick`` seconds on a redis-server the benchmark
starts. It then induces ``--failovers`` leader changes, alternating SIGKILL of
the leader and a graceful SIGTERM, starting a replacement process each time.

Measured over every fire the children reported (JSON events) and the run
history in Redis:

- duplicates: scheduled times that started more than once (must be 0);
- missed: scheduled times between the first and the last fire that never
  started (and how many of them the history records as ``missed``);
- first-fire delay: from the signal to the first fire started by the new
  leader (system-wide monotonic clock); and its lateness: how long after its
  scheduled time that fire started.

Timings are the tests' (lease 1.5 s, renew 0.3 s, deadline 1 s, retry 0.3 s)
unless ``--defaults`` (lease 5 s, retry 1 s).
"""

from __future__ import annotations

import argparse
import json
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis as redis_sync

from coordinator import Keys, RunRecord
from coordinator.testing import RedisServer
from tests.support.procs import Proc, stop_all, wait_for
from tests.support.timing import FAST_ENV

from ._stats import percentile

RESULTS = Path(__file__).parent / "results"


class Workers:
    def __init__(self, url: str, env: dict[str, str], tick: float) -> None:
        self.namespace = f"bench{uuid.uuid4().hex[:8]}"
        self.env = {
            **env,
            "REDIS_URL": url,
            "COORDINATOR_NAMESPACE": self.namespace,
            "COORDINATOR_ROLE": "worker",
            "SCHED_TICK_S": str(tick),
            "SCHED_TICK_WORK_S": "0.01",
        }
        self.procs: list[Proc] = []

    def spawn(self) -> Proc:
        name = f"w{len(self.procs) + 1}"
        proc = Proc(
            "coordinator.ops.cli",
            "worker",
            "tests.support.scheduler_jobs:build",
            "--log-level",
            "WARNING",
            env={**self.env, "COORDINATOR_INSTANCE_ID": name},
            name=name,
        )
        self.procs.append(proc)
        return proc

    def starts(self) -> list[dict[str, Any]]:
        return [e for p in self.procs for e in p.of("start") if e["job"] == "tick"]

    def first_start_after(self, t: float, exclude: Proc) -> tuple[Proc, dict[str, Any]] | None:
        found = [
            (e["t"], p, e)
            for p in self.procs
            if p is not exclude
            for e in p.of("start")
            if e["job"] == "tick" and e["t"] > t
        ]
        if not found:
            return None
        _, proc, event = min(found, key=lambda item: item[0])
        return proc, event


def run(url: str, env: dict[str, str], workers: int, failovers: int, tick: float) -> dict[str, Any]:
    group = Workers(url, env, tick)
    for _ in range(workers):
        group.spawn()
    wait_for(lambda: all(p.of("ready") for p in group.procs), 60, "workers ready", group.procs)
    wait_for(lambda: len(group.starts()) >= 3, 60, "first fires", group.procs)
    leader = max(group.procs, key=lambda p: max((e["t"] for e in p.of("start")), default=0))
    delays: dict[str, list[float]] = {"SIGKILL": [], "SIGTERM": []}
    lateness: dict[str, list[float]] = {"SIGKILL": [], "SIGTERM": []}
    elected: dict[str, list[float]] = {"SIGKILL": [], "SIGTERM": []}
    try:
        for i in range(failovers):
            kind = "SIGKILL" if i % 2 == 0 else "SIGTERM"
            sent = time.monotonic()
            if kind == "SIGKILL":
                leader.kill()
            else:
                leader.signal(signal.SIGTERM)
            old = leader
            found = wait_for(
                lambda old=old, sent=sent: group.first_start_after(sent, old),
                60,
                "the new leader's first fire",
                group.procs,
            )
            leader, event = found
            delays[kind].append((event["t"] - sent) * 1000)
            won = [e["t"] for e in leader.of("elected") if e["t"] > sent]
            elected[kind].append(((won[0] if won else event["t"]) - sent) * 1000)
            lateness[kind].append(event["wall"] * 1000 - event["scheduled_ms"])
            if kind == "SIGTERM":
                old.popen.wait(30)
            fresh = group.spawn()
            wait_for(lambda fresh=fresh: fresh.of("ready"), 60, "the replacement", group.procs)
            wait_for(
                lambda leader=leader, sent=sent: (
                    sum(1 for e in leader.of("start") if e["t"] > sent) >= 5
                ),
                60,
                "the new leader settles",
                group.procs,
            )
    finally:
        stop_all(group.procs)

    client = redis_sync.Redis.from_url(url)
    raw = client.lrange(Keys(group.namespace).runs(), 0, -1)
    client.close()
    records = [RunRecord.from_json(r) for r in raw]
    started = Counter(e["scheduled_ms"] for e in group.starts())
    tick_ms = round(tick * 1000)
    lo, hi = min(started), max(started)
    grid = range(lo, hi + 1, tick_ms)
    not_run = [ms for ms in grid if ms not in started]
    recorded_missed = {
        r.scheduled_ms for r in records if r.job_id == "tick" and r.status == "missed"
    }
    return {
        "workers": workers,
        "failovers": failovers,
        "tick_ms": tick_ms,
        "scheduled": len(grid),
        "ran": len(started),
        "duplicates": sum(n - 1 for n in started.values() if n > 1),
        "off_phase": sum(1 for ms in started if (ms - lo) % tick_ms),
        "missed": len(not_run),
        "missed_recorded": len(recorded_missed & set(not_run)),
        "delay_ms": delays,
        "lateness_ms": lateness,
        "elected_ms": elected,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench scheduler_failover")
    parser.add_argument("--failovers", type=int, default=20)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--tick", type=float, default=0.2, help="interval of the job, seconds")
    parser.add_argument("--defaults", action="store_true", help="library default timings")
    args = parser.parse_args(argv)
    env = {} if args.defaults else FAST_ENV
    timing = "defaults: lease 5 s, retry 1 s" if args.defaults else "lease 1.5 s, retry 0.3 s"
    with RedisServer() as server:
        result = run(server.url, env, args.workers, args.failovers, args.tick)

    print(
        f"\nScheduler failover: {args.workers} workers, a job every {args.tick} s, "
        f"{args.failovers} failovers, {timing}\n"
    )
    print("| fires scheduled | ran | duplicates | missed (recorded as missed) | off phase |")
    print("|---|---|---|---|---|")
    r = result
    print(
        f"| {r['scheduled']} | {r['ran']} | {r['duplicates']} | "
        f"{r['missed']} ({r['missed_recorded']}) | {r['off_phase']} |"
    )
    print(
        "\n| failover | n | new leader elected p50 / p99 ms | first fire after signal "
        "p50 / p99 ms | its lateness p50 / p99 ms |"
    )
    print("|---|---|---|---|---|")
    for kind in ("SIGKILL", "SIGTERM"):
        d, late, won = (result[k][kind] for k in ("delay_ms", "lateness_ms", "elected_ms"))
        if d:
            print(
                f"| {kind} | {len(d)} | {percentile(won, 50):.0f} / {percentile(won, 99):.0f} "
                f"| {percentile(d, 50):.0f} / {percentile(d, 99):.0f} | "
                f"{percentile(late, 50):.0f} / {percentile(late, 99):.0f} |"
            )
    RESULTS.mkdir(exist_ok=True)
    suffix = ("-defaults" if args.defaults else "") + (
        f"-tick{round(args.tick * 1000)}ms" if args.tick != 0.2 else ""
    )
    out = RESULTS / f"scheduler_failover{suffix}.json"
    out.write_text(json.dumps({"timing": timing, **result}, indent=2))
    print(f"\nraw results: {out}")
    return 1 if result["duplicates"] else 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))

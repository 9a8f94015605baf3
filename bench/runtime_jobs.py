"""Runtime jobs in a real app: add-to-fire latency, date-job accuracy, a burst, 100k scale.

    python -m bench runtime_jobs [--scale 20000] [--burst 10000] [--rate 100] [--latency 200]

Drives ``uvicorn tests.support.runtime_app:app --workers 4`` (an app built on
``Coordinator`` exactly as users run one; its task ``note`` appends each run, with
the wall clock at its start, to a Redis list) on a redis-server the benchmark starts.
Every fire and the failover happen in those workers.

- add-to-fire: ``POST /api/jobs`` on a worker that does not lead, a date job due now,
  until the run starts on the leader (one at a time);
- add cost: the same adds over HTTP (32 in flight) side by side with the library call
  (``RuntimeJobs.add_job``, what ``coordinator.jobs.add_job`` runs) from this process,
  64 in flight: adds per second;
- accuracy: ``--rate`` date jobs a second for 10 s, all added first (library) with a
  lead time, then the lateness of each start against its run_date;
- burst: ``--burst`` date jobs due at the same instant (library adds, done first);
- scale: ``--scale`` pending date jobs added through the library (HTTP at ~180/s is
  too slow for 100,000), due ``--scale-span`` seconds after a lead time: Redis memory,
  leader RSS, SIGKILL of the leader, the time from it to a probe job's run on the new
  leader, then every fire: runs, ``missed`` records and fires not handled at all
  (still pending in the index) counted apart, duplicates, lateness.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis as redis_sync
from redis.asyncio import Redis

from coordinator.scheduler.runtime import RuntimeJobs, TaskRegistry
from coordinator.store.keys import Keys
from coordinator.testing import RedisServer
from tests.support.app_cluster import AppCluster

from ._stats import summarize

HERE = Path(__file__).parent
RESULTS = HERE / "results"
APP = "tests.support.runtime_app:app"
CHART = HERE / "runtime_jobs.png"


def iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def now_ms() -> float:
    return time.time() * 1000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def date(at_ms: float | None = None) -> dict[str, Any]:
    return {"type": "date"} if at_ms is None else {"type": "date", "run_date": iso(at_ms)}


class Bench:
    def __init__(self, cluster: AppCluster, url: str, namespace: str) -> None:
        self.cluster = cluster
        self.redis = redis_sync.Redis.from_url(url)
        self.aredis = Redis.from_url(url, max_connections=64)
        self.calls = f"rt-calls:{namespace}"
        self.jobs = RuntimeJobs(self.aredis, Keys(namespace), TaskRegistry(), dict, 6)
        self.seen = 0
        self.by_id: dict[str, list[dict[str, Any]]] = {}

    # -- records ---------------------------------------------------------------------
    def poll(self) -> None:
        """Read the run records appended since the last poll."""
        for raw in self.redis.lrange(self.calls, self.seen, -1):
            r = json.loads(raw)
            self.by_id.setdefault(r["job_id"], []).append(r)
            self.seen += 1

    async def wait_records(self, ids: list[str], timeout: float) -> dict[str, list[dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if all(i in self.by_id for i in ids) or time.monotonic() > deadline:
                await asyncio.sleep(0.5)  # a duplicate would come right after
                self.poll()
                return {i: self.by_id[i] for i in ids if i in self.by_id}
            await asyncio.sleep(0.005 if len(ids) == 1 else 0.1)

    # -- workers ---------------------------------------------------------------------
    async def instance(self) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.cluster.base, timeout=5) as c:
            body: dict[str, Any] = (await c.get("/api/instance")).json()
            return body

    async def follower(self) -> httpx.AsyncClient:
        """A client whose one kept-alive connection is served by a worker that does not lead."""
        for _ in range(50):
            client = httpx.AsyncClient(
                base_url=self.cluster.base,
                timeout=30,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            )
            if not (await client.get("/api/instance")).json()["is_leader"]:
                return client
            await client.aclose()
        raise AssertionError("every connection landed on the leader")

    async def leader_pid(self, not_pid: int = 0, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                async with httpx.AsyncClient(base_url=self.cluster.base, timeout=5) as c:
                    for _ in range(8):  # connections spread over the workers
                        body = (
                            await c.get("/api/instance", headers={"Connection": "close"})
                        ).json()
                        if body["is_leader"] and int(body["pid"]) != not_pid:
                            return int(body["pid"])
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.01)
        raise AssertionError("no leader answered")

    # -- adding ----------------------------------------------------------------------
    async def add_http(self, specs: list[dict[str, Any]], inflight: int = 32) -> float:
        """POST every spec, ``inflight`` at a time over all workers; seconds taken."""
        sem = asyncio.Semaphore(inflight)
        async with httpx.AsyncClient(base_url=self.cluster.base, timeout=60) as http:

            async def one(spec: dict[str, Any]) -> None:
                async with sem:
                    r = await http.post("/api/jobs", json=spec)
                    assert r.status_code == 201, r.text

            t0 = time.monotonic()
            await asyncio.gather(*(one(s) for s in specs))
            return time.monotonic() - t0

    async def add_lib(self, specs: list[dict[str, Any]], inflight: int = 64) -> float:
        """``RuntimeJobs.add_job`` for every spec, ``inflight`` at a time; seconds taken."""
        sem = asyncio.Semaphore(inflight)

        async def one(spec: dict[str, Any]) -> None:
            async with sem:
                await self.jobs.add_job(
                    spec["task"],
                    spec["trigger"],
                    id=spec["id"],
                    misfire_grace_time=spec.get("misfire_grace_time"),
                    check_task=False,
                )

        t0 = time.monotonic()
        await asyncio.gather(*(one(s) for s in specs))
        return time.monotonic() - t0

    async def barrier(self, tag: str) -> float:
        """Seconds until the leader runs a job added now: it has applied every earlier notice."""
        t0 = now_ms()
        await self.jobs.add_job("note", date(), id=f"barrier-{tag}", check_task=False)
        got = await self.wait_records([f"barrier-{tag}"], 120)
        return (got[f"barrier-{tag}"][0]["started_ms"] - t0) / 1000

    # -- phases ----------------------------------------------------------------------
    async def latency(self, n: int) -> dict[str, Any]:
        http = await self.follower()
        out = []
        for i in range(n):
            t0 = now_ms()
            spec = {"id": f"lat-{i}", "task": "note", "trigger": date()}
            assert (await http.post("/api/jobs", json=spec)).status_code == 201
            got = await self.wait_records([f"lat-{i}"], 10)
            out.append(got[f"lat-{i}"][0]["started_ms"] - t0)
        await http.aclose()
        return {**summarize(out), "values": out}

    async def add_cost(self, n: int) -> dict[str, Any]:
        far = now_ms() + 3_600_000  # an hour ahead: nothing fires meanwhile
        http_s = await self.add_http(
            [{"id": f"cost-h-{i}", "task": "note", "trigger": date(far)} for i in range(n)]
        )
        lib_s = await self.add_lib(
            [{"id": f"cost-l-{i}", "task": "note", "trigger": date(far)} for i in range(n)]
        )
        t0 = time.monotonic()
        for i in range(200):
            await self.jobs.add_job("note", date(far), id=f"cost-s-{i}", check_task=False)
        lib_one_ms = (time.monotonic() - t0) / 200 * 1000
        http = await self.follower()
        t0 = time.monotonic()
        for i in range(200):
            r = await http.post(
                "/api/jobs", json={"id": f"cost-hs-{i}", "task": "note", "trigger": date(far)}
            )
            assert r.status_code == 201
        http_one_ms = (time.monotonic() - t0) / 200 * 1000
        t0 = time.monotonic()
        for _ in range(200):
            await http.get("/api/instance")
        get_ms = (time.monotonic() - t0) / 200 * 1000
        await http.aclose()
        sem = asyncio.Semaphore(64)

        async def remove(job_id: str) -> None:
            async with sem:
                await self.jobs.remove_job(job_id)

        ids = [f"cost-{p}-{i}" for p in ("h", "l") for i in range(n)]
        ids += [f"cost-{p}-{i}" for p in ("s", "hs") for i in range(200)]
        await asyncio.gather(*(remove(i) for i in ids))
        return {
            "n": n,
            "http_per_s": n / http_s,
            "lib_per_s": n / lib_s,
            "http_one_ms": http_one_ms,
            "lib_one_ms": lib_one_ms,
            "get_instance_ms": get_ms,
        }

    async def accuracy(self, rate: int, seconds: int = 10) -> dict[str, Any]:
        n = rate * seconds
        base = now_ms() + 3000 + n  # lead time: the adds finish well before
        specs = [
            {"id": f"acc-{i}", "task": "note", "trigger": date(base + i * 1000 / rate)}
            for i in range(n)
        ]
        add_s = await self.add_lib(specs)
        lead_ms = base - now_ms()
        got = await self.wait_records(
            [s["id"] for s in specs], (base - now_ms()) / 1000 + seconds + 30
        )
        late = [r[0]["started_ms"] - r[0]["scheduled_ms"] for r in got.values()]
        return {
            **summarize(late),
            "values": late,
            "add_s": add_s,
            "lead_ms": lead_ms,
            "missing": n - len(got),
            "dups": sum(len(v) - 1 for v in got.values()),
        }

    async def burst(self, n: int) -> dict[str, Any]:
        due = now_ms() + 5000 + n * 0.5
        specs = [{"id": f"burst-{i}", "task": "note", "trigger": date(due)} for i in range(n)]
        add_s = await self.add_lib(specs)
        lead_ms = due - now_ms()
        got = await self.wait_records([s["id"] for s in specs], lead_ms / 1000 + 120)
        starts = sorted(r[0]["started_ms"] - due for r in got.values())
        return {
            "n": n,
            "add_s": add_s,
            "lead_ms": lead_ms,
            "fired": len(got),
            "dups": sum(len(v) - 1 for v in got.values()),
            "first_ms": starts[0] if starts else float("nan"),
            "last_ms": starts[-1] if starts else float("nan"),
            "fires_per_s": len(starts) / ((starts[-1] - starts[0]) / 1000)
            if len(starts) > 1
            else float("nan"),
            "starts": starts,
        }

    async def scale(self, n: int, span_s: float) -> dict[str, Any]:
        await self.barrier("scale0")
        self.redis.execute_command("MEMORY", "PURGE")
        mem0 = int(self.redis.info("memory")["used_memory"])
        pid = await self.leader_pid()
        rss0 = rss_mb(pid)
        # Added first with a lead time; then due over span_s, at 1,000 instants.
        due = now_ms() + 30_000 + n * 1.0
        step = span_s * 1000 / 1000
        specs = [
            {"id": f"scale-{i}", "task": "note", "trigger": date(due + (i % 1000) * step)}
            for i in range(n)
        ]
        add_s = await self.add_lib(specs)
        applied_s = await self.barrier("scale1")
        mem1 = int(self.redis.info("memory")["used_memory"])
        rss1 = rss_mb(pid)
        t_kill = now_ms()
        os.kill(pid, signal.SIGKILL)
        new_pid = await self.leader_pid(not_pid=pid)
        t_seen = now_ms()
        await self.jobs.add_job(
            "note", date(), id="probe", misfire_grace_time=600, check_task=False
        )
        got = await self.wait_records(["probe"], 120)
        if "probe" not in got:
            raise AssertionError(f"probe never ran: {self.cluster.proc.stderr_tail(60)}")
        probe_s = (got["probe"][0]["started_ms"] - t_kill) / 1000
        rss_new = rss_mb(new_pid)
        if now_ms() > due:
            raise AssertionError("the failover ran into the firing window; raise the lead time")
        # Every fire is taken from the index when claimed (as a run or as missed):
        # wait until none is pending, then until the last runs are recorded.
        keys = self.jobs._keys
        deadline = time.monotonic() + (due - now_ms()) / 1000 + span_s + 300
        while time.monotonic() < deadline:
            if not self.redis.zcard(keys.due_dates()):
                break
            await asyncio.sleep(0.2)
        recorded = -1
        while time.monotonic() < deadline:
            if recorded == (recorded := self.redis.llen(self.calls)):
                break
            await asyncio.sleep(1.0)
        self.poll()
        ids = [s["id"] for s in specs]
        fired = {i: self.by_id[i] for i in ids if i in self.by_id}
        pending = int(self.redis.zcard(keys.due_dates()))
        late = sorted(r[0]["started_ms"] - r[0]["scheduled_ms"] for r in fired.values())
        starts = sorted(r[0]["started_ms"] for r in fired.values())
        rss_after = rss_mb(new_pid)
        return {
            "n": n,
            "span_s": span_s,
            "add_s": add_s,
            "applied_s": applied_s,
            "redis_mb": (mem1 - mem0) / 2**20,
            "leader_rss_before_mb": rss0,
            "leader_rss_mb": rss1,
            "new_leader_rss_mb": rss_new,
            "new_leader_rss_after_mb": rss_after,
            "kill_to_seen_s": (t_seen - t_kill) / 1000,
            "kill_to_probe_run_s": probe_s,
            "fired": len(fired),
            "missed": n - len(fired) - pending,
            "not_handled": pending,
            "dups": sum(len(v) - 1 for v in fired.values()),
            "fire_span_s": (starts[-1] - starts[0]) / 1000 if len(starts) > 1 else float("nan"),
            "late": summarize(late) if late else {},
        }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with RedisServer() as server:
        namespace = f"bench{uuid.uuid4().hex[:8]}"
        env = {"COORDINATOR_LOG_LEVEL": "WARNING"}
        cluster = AppCluster(server.url, namespace, workers=4, app=APP, env=env)
        async with cluster.running(exit_codes=(0, -15, 1)):
            b = Bench(cluster, server.url, namespace)
            out: dict[str, Any] = {"workers": 4, "app": APP, "rate": args.rate}
            for name, phase in (
                ("latency", lambda: b.latency(args.latency)),
                ("add_cost", lambda: b.add_cost(args.adds)),
                ("accuracy", lambda: b.accuracy(args.rate)),
                ("burst", lambda: b.burst(args.burst)),
                ("scale", lambda: b.scale(args.scale, args.scale_span)),
            ):
                if name in args.skip:
                    continue
                out[name] = await phase()
                brief = {k: v for k, v in out[name].items() if k not in ("values", "starts")}
                print(name, json.dumps(brief, default=str), flush=True)
            await b.aredis.aclose()
            return out


def table(out: dict[str, Any]) -> str:
    rows: list[str] = []
    if "latency" in out or "accuracy" in out:
        rows += ["| measure (goal) | p50 | p95 | p99 | max | n |", "|---|---|---|---|---|---|"]
    if "latency" in out:
        lat = out["latency"]
        rows.append(
            f"| add-to-fire ms: POST on a non-leader to run start (p99 < 50) | {lat['p50']:.1f} | "
            f"{lat['p95']:.1f} | {lat['p99']:.1f} | {lat['max']:.1f} | {lat['n']} |"
        )
    if "accuracy" in out:
        acc = out["accuracy"]
        rows.append(
            f"| lateness ms vs run_date at {out['rate']} fires/s (p99 < 20) | {acc['p50']:.1f} | "
            f"{acc['p95']:.1f} | {acc['p99']:.1f} | {acc['max']:.1f} | {acc['n']} (missing "
            f"{acc['missing']}, duplicates {acc['dups']}; added {acc['lead_ms'] / 1000:.1f} s "
            "before the first run_date) |"
        )
    if "add_cost" in out:
        c = out["add_cost"]
        rows += [
            "",
            "| adding a job | adds/s, many in flight | ms per add, one at a time |",
            "|---|---|---|",
            f"| `POST /api/jobs` (32 in flight over the 4 workers) | {c['http_per_s']:.0f} | "
            f"{c['http_one_ms']:.2f} |",
            f"| `RuntimeJobs.add_job` in the bench process (64 in flight) | {c['lib_per_s']:.0f} | "
            f"{c['lib_one_ms']:.2f} |",
            f"| (for scale: `GET /api/instance` on one worker) | | {c['get_instance_ms']:.2f} |",
        ]
    rows += ["", "| scale and burst | value |", "|---|---|"]
    if "scale" in out:
        sc = out["scale"]
        rows += [
            f"| pending date jobs | {sc['n']:,} (library adds: {sc['add_s']:.1f} s, "
            f"{sc['n'] / sc['add_s']:.0f}/s; all applied by the leader {sc['applied_s']:.1f} s "
            "after the last) |",
            f"| Redis memory for them | {sc['redis_mb']:.1f} MB |",
            f"| leader RSS: before / holding them (goal < 300 MB) | "
            f"{sc['leader_rss_before_mb']:.0f} / {sc['leader_rss_mb']:.0f} MB |",
            f"| SIGKILL of the leader to the new leader seen / to a probe run after its full "
            f"load | {sc['kill_to_seen_s']:.2f} s / {sc['kill_to_probe_run_s']:.2f} s |",
            f"| new leader RSS: elected / after all fired | {sc['new_leader_rss_mb']:.0f} / "
            f"{sc['new_leader_rss_after_mb']:.0f} MB |",
            f"| then due over {sc['span_s']:.0f} s ({sc['n'] / sc['span_s']:.0f}/s) | ran "
            f"{sc['fired']:,}, recorded missed {sc['missed']:,}, not handled "
            f"{sc['not_handled']:,}, duplicates {sc['dups']} |",
        ]
        if sc["late"]:
            la = sc["late"]
            rows.append(
                f"| their lateness against run_date, ms | p50 {la['p50']:.1f}, p99 "
                f"{la['p99']:.1f}, max {la['max']:.1f} |"
            )
    if "burst" in out:
        bu = out["burst"]
        rows.append(
            f"| burst: {bu['n']:,} due at the same instant | {bu['fires_per_s']:.0f} fires/s; "
            f"first started {bu['first_ms']:.0f} ms, last {bu['last_ms'] / 1000:.2f} s after "
            f"the run_date; missing {bu['n'] - bu['fired']}, duplicates {bu['dups']} |"
        )
    return "\n".join(rows)


def chart(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title, goal in (
        (axes[0], "latency", "add-to-fire (POST on a non-leader)", 50),
        (axes[1], "accuracy", f"lateness vs run_date at {out['rate']}/s", 20),
    ):
        if key not in out:
            continue
        values = sorted(out[key]["values"])
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.axvline(goal, color="red", linestyle="--", label=f"goal p99 < {goal} ms")
        ax.set_xscale("log")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of runs")
        ax.set_title(title)
        ax.legend()
    if "burst" in out:
        starts = [s / 1000 for s in out["burst"]["starts"]]
        axes[2].hist(starts, bins=50)
        axes[2].set_xlabel("s after the run_date")
        axes[2].set_ylabel("runs started")
        axes[2].set_title(f"burst: {out['burst']['n']:,} date jobs due at once")
    fig.suptitle("runtime jobs, uvicorn --workers 4, one redis-server, 2 shared cores")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench runtime_jobs")
    parser.add_argument("--scale", type=int, default=20_000)
    parser.add_argument(
        "--scale-span", type=float, default=100.0, help="seconds the scale jobs fall due over"
    )
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--latency", type=int, default=200)
    parser.add_argument("--adds", type=int, default=1000, help="jobs per add-cost system")
    parser.add_argument("--skip", nargs="*", default=[], help="phases to skip")
    parser.add_argument("--no-chart", action="store_true")
    args = parser.parse_args(argv)
    out = asyncio.run(run(args))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"runtime_jobs-{int(time.time())}.json"
    path.write_text(json.dumps(out, indent=2))
    print()
    print(table(out))
    if not args.no_chart:
        chart(out, CHART)
        print(f"\nwrote {CHART.relative_to(HERE.parent)}")
    print(f"raw results: {path}")
    return 0

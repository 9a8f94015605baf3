"""SSE fan-out over 4 uvicorn workers: coordinator's relay against three baselines.

    python -m bench fanout [--clients 100,1000] [--events 100] [--rate 20] [--burst 200]
                           [--systems coordinator,broadcaster,per_client,handrolled]

For each system and client count, on a fresh redis-server and a fresh
``uvicorn --workers 4``:

1. memory: RSS of all uvicorn processes before and after N idle SSE
   connections (and Redis's connected clients); per-connection delta.
2. latency: ``--events`` events published at ``--rate``/s through 4 keep-alive
   HTTP connections; publish-to-receive time (the ``t`` in the event, on the
   system-wide monotonic clock) for every (client, event); p50/p99; and the
   share of expected deliveries that arrived.
3. throughput: ``--burst`` events published as fast as 4 publishers can; delivered
   events/s = deliveries / (last delivery - first publish).

Systems: ``coordinator`` (this library, ``tests/support/relay_app.py``) and, from
``bench/_fanout_apps.py``, ``broadcaster`` (encode/broadcaster 0.3.1 Redis backend +
sse-starlette; see its known bugs there), ``per_client`` (one Redis subscription
per SSE client) and ``handrolled`` (one subscription per process, unbounded queues).

Everything (clients, 4 workers, Redis) shares this machine's cores; the client
process parses every event, so at high counts it is part of what is measured.
Prints a markdown table, writes ``bench/results/fanout.json`` and ``bench/fanout.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

from coordinator.testing import RedisServer
from tests.support.app_cluster import HOST, AppCluster
from tests.support.sse_client import SSEClient, SSEMessage

from ._stats import percentile

HERE = Path(__file__).parent
RESULTS = HERE / "results"
APPS = {"coordinator": "tests.support.relay_app:app"}
SYSTEMS = ["coordinator", "broadcaster", "per_client", "handrolled"]


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


class Recorder:
    """Collects (event seq, latency) from every client's messages as they arrive."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = {}
        self.counts: dict[str, int] = {}
        self.last_arrival = 0.0

    def __call__(self, message: SSEMessage) -> None:
        if message.event != "message":  # e.g. a greeting event
            return
        data = json.loads(message.data)
        if isinstance(data, str):  # the baselines send the JSON text as a string
            data = json.loads(data)
        phase = data["phase"]
        self.latencies.setdefault(phase, []).append(message.t - data["t"])
        self.counts[phase] = self.counts.get(phase, 0) + 1
        self.last_arrival = message.t


async def connect_all(port: int, path: str, n: int, recorder: Recorder) -> list[SSEClient]:
    clients: list[SSEClient] = []
    for start in range(0, n, 200):  # in waves, so the accept queue is not overrun
        wave = [
            SSEClient(HOST, port, path, on_message=recorder) for _ in range(min(200, n - start))
        ]
        await asyncio.gather(*(c.connect(timeout=60) for c in wave))
        clients += [c.start() for c in wave if c.status == 200]
    return clients


async def publish_phase(
    base: str, channel: str, phase: str, count: int, rate: float | None, errors: list[Any]
) -> float:
    """Publish ``count`` events over 4 connections; returns when the first was sent.
    Failed publishes are appended to ``errors`` (a failing baseline is a result too)."""
    publishers = [
        httpx.AsyncClient(base_url=base, timeout=30, limits=httpx.Limits(max_connections=1))
        for _ in range(4)
    ]
    first = time.monotonic()

    async def worker(index: int) -> None:
        for seq in range(index, count, 4):
            if rate:
                await asyncio.sleep(max(0.0, first + seq / rate - time.monotonic()))
            body = {"data": {"phase": phase, "seq": seq, "t": time.monotonic()}}
            try:
                response = await publishers[index].post(
                    f"/api/channels/{channel}/events", json=body
                )
                if response.status_code != 202:
                    errors.append(response.status_code)
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)

    try:
        await asyncio.gather(*(worker(i) for i in range(4)))
    finally:
        for client in publishers:
            await client.aclose()
    return first


async def settle(
    recorder: Recorder, phase: str, expected: int, quiet: float = 2.0, limit: float = 60.0
) -> None:
    """Wait until all expected deliveries arrived, or none arrived for ``quiet`` seconds."""
    started = time.monotonic()
    last_count, last_change = -1, time.monotonic()
    while time.monotonic() - started < limit:
        count = recorder.counts.get(phase, 0)
        if count >= expected:
            return
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > quiet:
            return
        await asyncio.sleep(0.05)


async def run_one(system: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    with RedisServer(extra_args=["--maxclients", "20000"]) as server:
        env = {"BENCH_MODE": system, "COORDINATOR_SSE_PING_S": "15"}
        app = APPS.get(system, "bench._fanout_apps:app")
        cluster = AppCluster(server.url, namespace, workers=4, env=env, app=app)
        redis = server.url
        try:
            await cluster.wait_ready()
            await asyncio.sleep(1.0)
            rss_before = tree_rss(cluster.proc.pid)
            recorder = Recorder()
            path = "/api/channels/bench/events"
            clients = await connect_all(cluster.port, path, n, recorder)
            await asyncio.sleep(1.0 + n / 1000)  # let subscriptions settle before measuring
            rss_after = tree_rss(cluster.proc.pid)
            import redis as redis_sync

            info = redis_sync.Redis.from_url(redis).info("clients")
            errors: list[Any] = []
            await publish_phase(cluster.base, "bench", "latency", args.events, args.rate, errors)
            await settle(recorder, "latency", args.events * len(clients))
            first = await publish_phase(cluster.base, "bench", "burst", args.burst, None, errors)
            await settle(recorder, "burst", args.burst * len(clients))
            burst_count = recorder.counts.get("burst", 0)
            elapsed = max(1e-6, recorder.last_arrival - first)
            lat = [v * 1000 for v in recorder.latencies.get("latency", [])]
            result = {
                "system": system,
                "clients": n,
                "connected": len(clients),
                "p50_ms": percentile(lat, 50),
                "p99_ms": percentile(lat, 99),
                "delivered_pct": 100 * len(lat) / max(1, args.events * len(clients)),
                "burst_delivered_pct": 100 * burst_count / max(1, args.burst * len(clients)),
                "events_per_s": burst_count / elapsed,
                "rss_per_conn_kb": (rss_after - rss_before) / max(1, len(clients)) / 1024,
                "redis_clients": int(info["connected_clients"]),
                "publish_errors": len(errors),
                "publish_error_kinds": sorted({str(e) for e in errors}),
            }
            for client in clients:
                await client.close()
            return result
        finally:
            cluster.stop()


def table(results: list[dict[str, Any]]) -> str:
    base = {(r["clients"]): r for r in results if r["system"] == "coordinator"}
    lines = [
        "| system | clients | p50 ms | p99 ms | delivered | events/s | coordinator/system events/s "
        "| RSS/conn KiB | Redis conns | failed publishes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(
                f"| {r['system']} | {r['clients']} | failed: {r['error'][:60]} | | | | | | |"
            )
            continue
        ours = base.get(r["clients"])
        ratio = ours["events_per_s"] / r["events_per_s"] if ours and r["events_per_s"] else 0
        lines.append(
            f"| {r['system']} | {r['clients']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['delivered_pct']:.1f}% | {r['events_per_s']:,.0f} | {ratio:.2f} "
            f"| {r['rss_per_conn_kb']:.1f} | {r['redis_clients']} | {r['publish_errors']} |"
        )
    return "\n".join(lines)


def chart(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r["system"] for r in results))
    counts = sorted({r["clients"] for r in results})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        ("p99_ms", "p99 publish-to-receive latency (ms, log)", True),
        ("delivered_pct", "deliveries that arrived (%)", False),
        ("events_per_s", "delivered events/s (burst)", False),
    ]
    width = 0.8 / max(1, len(systems))
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        for i, system in enumerate(systems):
            values = [
                next(
                    (r.get(key, 0) for r in results if r["system"] == system and r["clients"] == c),
                    0,
                )
                for c in counts
            ]
            ax.bar([x + i * width for x in range(len(counts))], values, width, label=system)
        ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(counts))])
        ax.set_xticklabels([f"{c} clients" for c in counts])
        ax.set_title(title)
        if log and any(r.get(key, 0) > 0 for r in results):
            ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle("SSE fan-out over 4 uvicorn workers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench fanout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", default="100,1000")
    parser.add_argument("--events", type=int, default=100, help="latency phase events")
    parser.add_argument("--rate", type=float, default=10.0, help="latency phase events/s")
    parser.add_argument("--burst", type=int, default=200, help="throughput phase events")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--out", default="fanout")
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []

    async def run() -> None:
        for n in [int(c) for c in args.clients.split(",")]:
            for system in args.systems.split(","):
                print(f"-- {system}, {n} clients", flush=True)
                try:
                    results.append(await run_one(system, n, args))
                except Exception as exc:  # one system failing must not hide the others
                    results.append({"system": system, "clients": n, "error": repr(exc)[:200]})
                print(json.dumps(results[-1]), flush=True)

    asyncio.run(run())
    print()
    print(table(results))
    RESULTS.mkdir(exist_ok=True)
    meta = {"argv": argv, "cpus": psutil.cpu_count(), "results": results}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(meta, indent=2))
    chart(results, HERE / f"{args.out}.png")
    print(f"\nwrote bench/results/{args.out}.json and bench/{args.out}.png")
    return 0

"""Shared state and cluster-wide limits: read cost, change propagation, limiter overhead.

    python -m bench state [--reads 1000000] [--rounds 300] [--requests 2000]

On one redis-server the benchmark starts:

1. Read cost, in this process: :meth:`SharedState.get` (a dict lookup), a typed
   read (:meth:`TypedKey.get`, validated once per version), a Redis ``GET``
   over ``redis.asyncio`` (what a read costs without a local copy), the same
   over sync redis-py, and sync redis-py with client-side caching (RESP3
   ``CLIENT TRACKING``, ``cache_config=CacheConfig()``): a cache hit still
   polls the socket for invalidations. redis-py's async client has no
   client-side caching (``redis.asyncio.Redis(cache_config=...)`` is a
   ``TypeError`` in the installed redis-py; the sync client has it since 5.1).
2. Change propagation, in this process: after a write returns, how long until a
   second client sees it: the client-side cache (the next read after the
   invalidation) and a second SharedState (its listener applies the change).
3. Change propagation to all 4 workers of ``uvicorn --workers 4``
   (``bench/_state_app.py``): one worker writes (``t0`` just before
   :meth:`SharedState.set`), the other three report when their watcher saw the
   change applied; per change, the time until the last of them has it.
4. Limiter overhead per request over the same 4 workers, limits off then on
   (rate and stream limits high enough never to refuse): publish latency
   (keep-alive clients pinned to workers, one request at a time) and stream
   open-to-hello latency; Redis commands per request from ``INFO commandstats``
   (the whole server's, so background traffic is in both runs and cancels out
   in the difference; it is a few commands a second).

Everything shares this machine's cores. Prints markdown tables, writes
``bench/results/state.json`` and ``bench/state.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import timeit
import uuid
from pathlib import Path
from typing import Any

import redis as redis_sync
from pydantic import BaseModel
from redis.asyncio import Redis

from coordinator import CoordinatorSettings, EventRelay, SharedState, create_redis
from coordinator.testing import RedisServer
from tests.support.app_cluster import HOST, AppCluster
from tests.support.pinned import Pinned, close_all, pin_workers
from tests.support.sse_client import SSEClient

from ._stats import summarize

HERE = Path(__file__).parent
RESULTS = HERE / "results"
APP = "bench._state_app:app"


class Flags(BaseModel):
    dark: bool = False
    beta: list[str] = []


# -- 1. read cost -----------------------------------------------------------------------
def per_op(seconds: float, n: int) -> dict[str, float]:
    return {"ns_per_op": seconds / n * 1e9, "ops_per_s": n / seconds}


def allow_client_side_caching(url: str) -> str:
    """redis-py enables client-side caching only on Redis 7.4 or later (its compatibility
    policy; ``CLIENT TRACKING`` exists since Redis 6.0). On an older server, lower that gate
    so the mechanism can be measured, and say so."""
    from redis.connection import CacheProxyConnection

    host, port = url.split("//")[1].split("/")[0].split(":")
    version = str(redis_sync.Redis(host=host, port=int(port)).info("server")["redis_version"])
    if tuple(int(p) for p in version.split(".")[:2]) >= (7, 4):
        return f"Redis {version}"
    CacheProxyConnection.MIN_ALLOWED_VERSION = "6.0.0"
    return (
        f"Redis {version}: redis-py allows client-side caching from 7.4 only; its version "
        "gate was lowered for this measurement (CLIENT TRACKING exists since 6.0)"
    )


async def read_cost(url: str, reads: int) -> tuple[dict[str, dict[str, float]], str]:
    conf = CoordinatorSettings(redis_url=url, namespace=f"b{uuid.uuid4().hex[:8]}")
    redis = create_redis(url)
    relay = EventRelay(conf, redis)
    state = SharedState(conf, redis, relay)
    await relay.start()
    await state.wait_fresh(10)
    await state.set("flags", Flags(dark=True, beta=["ann", "bob"]).model_dump())
    await redis.set("plain", json.dumps({"dark": True, "beta": ["ann", "bob"]}))
    typed = state.typed("flags", Flags)
    out: dict[str, dict[str, float]] = {}
    out["SharedState.get (memory)"] = per_op(
        min(timeit.repeat(lambda: state.get("flags"), number=reads, repeat=3)), reads
    )
    out["TypedKey.get (memory, pydantic)"] = per_op(
        min(timeit.repeat(typed.get, number=reads, repeat=3)), reads
    )
    n = max(2000, reads // 50)
    started = time.perf_counter()
    for _ in range(n):
        await redis.get("plain")
    out["redis.asyncio GET (round trip)"] = per_op(time.perf_counter() - started, n)
    await relay.stop()
    await state.stop()
    await redis.aclose()

    host, port = url.split("//")[1].split("/")[0].split(":")
    plain = redis_sync.Redis(host=host, port=int(port))
    out["sync redis-py GET (round trip)"] = per_op(
        min(timeit.repeat(lambda: plain.get("plain"), number=n, repeat=3)), n
    )
    from redis.cache import CacheConfig

    cached = redis_sync.Redis(host=host, port=int(port), protocol=3, cache_config=CacheConfig())
    cached.get("plain")  # fills the cache
    gets = int(plain.info("commandstats")["cmdstat_get"]["calls"])
    out["sync redis-py + client-side cache (hit)"] = per_op(
        min(timeit.repeat(lambda: cached.get("plain"), number=n * 5, repeat=3)), n * 5
    )
    server_gets = int(plain.info("commandstats")["cmdstat_get"]["calls"]) - gets
    assert server_gets == 0, f"{server_gets} GETs reached the server: the cache did not serve"
    plain.close()
    cached.close()
    try:
        import redis.asyncio as redis_async

        redis_async.Redis(protocol=3, cache_config=CacheConfig())  # type: ignore[call-arg]
        async_csc = "supported"
    except TypeError as exc:
        async_csc = f"TypeError: {exc}"
    return out, async_csc


# -- 2. propagation in one process --------------------------------------------------------
async def local_propagation(url: str, rounds: int) -> dict[str, dict[str, float]]:
    host, port = url.split("//")[1].split("/")[0].split(":")
    writer = redis_sync.Redis(host=host, port=int(port))
    from redis.cache import CacheConfig

    reader = redis_sync.Redis(host=host, port=int(port), protocol=3, cache_config=CacheConfig())
    csc: list[float] = []
    for r in range(rounds):
        reader.get("csc")  # cached (and tracked) before the write
        writer.set("csc", r)
        t0 = time.perf_counter()
        while reader.get("csc") != str(r).encode():
            pass
        csc.append(time.perf_counter() - t0)
    writer.close()
    reader.close()

    conf = CoordinatorSettings(redis_url=url, namespace=f"b{uuid.uuid4().hex[:8]}")
    procs = []
    for name in ("writer", "reader"):
        client = create_redis(url)
        relay = EventRelay(conf.model_copy(update={"instance_id": name}), client)
        procs.append((client, relay, SharedState(relay.settings, client, relay)))
    for _, relay, state in procs:
        await relay.start()
        await state.wait_fresh(10)
    (_, _, wstate), (_, _, rstate) = procs
    shared: list[float] = []
    for r in range(rounds):
        entry = await wstate.set("k", r)
        t0 = time.perf_counter()
        await rstate.wait_for("k", entry.version, timeout=5)
        shared.append(time.perf_counter() - t0)
    for client, relay, state in procs:
        await relay.stop()
        await state.stop()
        await client.aclose()
    return {
        "client-side cache: next read sees the write": summarize(csc),
        "SharedState: second process applies the write": summarize(shared),
    }


# -- 3. propagation to 4 workers ----------------------------------------------------------
async def worker_propagation(url: str, rounds: int) -> dict[str, Any]:
    cluster = AppCluster(url, f"b{uuid.uuid4().hex[:8]}", workers=4, app=APP)
    each: list[float] = []
    last: list[float] = []
    async with cluster.running():
        pinned = await pin_workers(cluster.base, 4)
        workers = [g[0] for g in pinned.values()]
        try:
            for r in range(rounds):
                writer = workers[r % 4]
                others = [w for w in workers if w is not writer]
                body = (await writer.request("POST", "/bench/set/k", json={"r": r})).json()
                answers = await asyncio.gather(
                    *(o.get(f"/bench/applied/k?version={body['version']}") for o in others)
                )
                times = [a.json()["applied_at"] - body["t0"] for a in answers]
                each += times
                last.append(max(times))
        finally:
            await close_all(pinned)
    return {"each other worker": summarize(each), "all 4 workers have it": summarize(last)}


# -- 4. limiter overhead -------------------------------------------------------------------
LIMITS_ON = {
    "COORDINATOR_PUBLISH_RATE_PER_CLIENT": "1000000",
    "COORDINATOR_PUBLISH_BURST": "1000000",
    "COORDINATOR_SSE_MAX_CONNECTIONS_PER_CLIENT": "100000",
}


async def command_counts(admin: Redis) -> dict[str, int]:
    stats = await admin.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


class Side:
    """One configuration of the A/B: its own redis-server and ``uvicorn --workers 4``."""

    def __init__(self, name: str, url: str, env: dict[str, str]) -> None:
        self.name = name
        self.cluster = AppCluster(url, f"b{uuid.uuid4().hex[:8]}", workers=4, app=APP, env=env)
        self.admin = create_redis(url)
        self.workers: list[Pinned] = []
        self.publish: list[float] = []
        self.streams: list[float] = []
        self.counts: dict[str, dict[str, int]] = {}

    async def start(self) -> None:
        await self.cluster.wait_ready()
        pinned = await pin_workers(self.cluster.base, 4)
        self.workers = [g[0] for g in pinned.values()]
        for n in range(200):  # warm-up: scripts loaded, connections open
            await self.post(n)

    async def post(self, n: int) -> float:
        t0 = time.perf_counter()
        response = await self.workers[n % 4].request(
            "POST", "/api/channels/b/events", json={"data": n}
        )
        took = time.perf_counter() - t0
        assert response.status_code == 202, response.text
        return took

    async def open_stream(self) -> float:
        hello = asyncio.Event()
        t0 = time.perf_counter()
        client = SSEClient(
            HOST,
            self.cluster.port,
            "/api/channels/s/events",
            on_message=lambda m: hello.set() if m.event == "hello" else None,
        )
        await client.connect()
        assert client.status == 200
        client.start()
        await asyncio.wait_for(hello.wait(), 10)
        took = time.perf_counter() - t0
        await client.close()
        return took

    async def count(self, label: str) -> None:
        self.counts[label] = await command_counts(self.admin)

    def delta(self, since: str, until: str) -> dict[str, int]:
        a, b = self.counts[since], self.counts[until]
        return {k: b.get(k, 0) - a.get(k, 0) for k in b if b.get(k, 0) != a.get(k, 0)}

    async def stop(self) -> None:
        for worker in self.workers:
            await worker.aclose()
        self.cluster.stop()
        await self.admin.aclose()


async def limiter_overhead(urls: tuple[str, str], requests: int) -> dict[str, Any]:
    """Limits off and on side by side, requests alternating between them, so both see the
    same load on this machine's shared cores; each side counts its own Redis's commands."""
    sides = [Side("off", urls[0], {}), Side("on", urls[1], LIMITS_ON)]
    try:
        await asyncio.gather(*(side.start() for side in sides))
        for side in sides:
            await side.count("start")
        for n in range(requests):
            for side in sides if n % 2 else reversed(sides):
                side.publish.append(await side.post(n))
        for side in sides:
            await side.count("published")
        for n in range(max(1, requests // 10)):
            for side in sides if n % 2 else reversed(sides):
                side.streams.append(await side.open_stream())
        await asyncio.sleep(0.5)  # the last closes reach the servers (and their ZREM)
        for side in sides:
            await side.count("streamed")
    finally:
        for side in sides:
            await side.stop()
    out: dict[str, Any] = {}
    for side in sides:
        published, streamed = side.delta("start", "published"), side.delta("published", "streamed")
        n_streams = len(side.streams)
        out[side.name] = {
            "publish": summarize(side.publish),
            "stream_open": summarize(side.streams),
            "publish_commands": published,
            "stream_commands": streamed,
            # Round trips: scripts run (EVALSHA); commands: inside the scripts too.
            "publish_scripts_per_request": published.get("evalsha", 0) / requests,
            "publish_commands_per_request": sum(published.values()) / requests,
            "stream_scripts_per_stream": streamed.get("evalsha", 0) / n_streams,
            "stream_zrem_per_stream": streamed.get("zrem", 0) / n_streams,
            "stream_commands_per_stream": sum(streamed.values()) / n_streams,
        }
    return out


# -- output ---------------------------------------------------------------------------------
def ms(v: float) -> str:
    return f"{v * 1000:.2f}"


def tables(results: dict[str, Any]) -> str:
    out = [
        "### Read cost (one process)",
        "",
        "| read | ns/op | ops/s | vs memory |",
        "|---|---|---|---|",
    ]
    base = results["reads"]["SharedState.get (memory)"]["ns_per_op"]
    for name, r in results["reads"].items():
        out.append(
            f"| {name} | {r['ns_per_op']:,.0f} | {r['ops_per_s']:,.0f} | "
            f"{r['ns_per_op'] / base:,.1f}x |"
        )
    out += [
        "",
        f"Server: {results['server']}.",
        f"redis.asyncio client-side caching: {results['async_csc']}.",
        "",
    ]
    out += [
        "### Propagation after a write returns (one process, two clients)",
        "",
        "| path | n | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for name, s in results["local"].items():
        out.append(f"| {name} | {s['n']} | {ms(s['p50'])} | {ms(s['p99'])} | {ms(s['max'])} |")
    out += [
        "",
        "### Change propagation over uvicorn --workers 4 (write start to applied)",
        "",
        "| measure | n | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for name, s in results["workers"].items():
        out.append(f"| {name} | {s['n']} | {ms(s['p50'])} | {ms(s['p99'])} | {ms(s['max'])} |")
    off, on = results["limits"]["off"], results["limits"]["on"]
    out += [
        "",
        "### Limiter overhead per request (4 workers, limits never refusing)",
        "",
        "Two `uvicorn --workers 4` side by side, each on its own redis-server, limits off",
        "and on, requests alternating between them (same load on the shared cores).",
        "Redis work counted by `INFO commandstats` over the whole server: scripts run",
        "(`EVALSHA`, one round trip each) and every command executed, those inside the",
        "scripts included.",
        "",
        "| request | limits | p50 ms | p99 ms | scripts per request | commands per request |",
        "|---|---|---|---|---|---|",
    ]
    rows = [
        ("publish", "publish", "publish_scripts_per_request", "publish_commands_per_request"),
        (
            "stream open to hello, then close",
            "stream_open",
            "stream_scripts_per_stream",
            "stream_commands_per_stream",
        ),
    ]
    for label, key, scripts, commands in rows:
        for name, r in (("off", off), ("on", on)):
            out.append(
                f"| {label} | {name} | {ms(r[key]['p50'])} | {ms(r[key]['p99'])} "
                f"| {r[scripts]:.2f} | {r[commands]:.2f} |"
            )
        out.append(
            f"| {label} | added | {ms(on[key]['p50'] - off[key]['p50'])} "
            f"| {ms(on[key]['p99'] - off[key]['p99'])} | {on[scripts] - off[scripts]:.2f} "
            f"| {on[commands] - off[commands]:.2f} |"
        )
    out.append(
        f"\nStream close with limits on: {on['stream_zrem_per_stream']:.2f} ZREM per stream "
        "(sent in the background after the stream ends)."
    )
    return "\n".join(out)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 11))
    names = list(results["reads"])
    values = [results["reads"][n]["ns_per_op"] for n in names]
    bars = axes[0].barh(names, values, color="#4f81bd")
    axes[0].bar_label(bars, labels=[f"{v:,.0f} ns" for v in values])
    axes[0].set_xscale("log")
    axes[0].invert_yaxis()
    axes[0].set_title("read cost (ns/op, log)")
    rows = {**results["local"], **{f"4 workers: {k}": v for k, v in results["workers"].items()}}
    labels = list(rows)
    p50 = [rows[k]["p50"] * 1000 for k in labels]
    p99 = [rows[k]["p99"] * 1000 for k in labels]
    y = range(len(labels))
    axes[1].barh([i + 0.2 for i in y], p99, height=0.4, label="p99", color="#c0504d")
    axes[1].barh([i - 0.2 for i in y], p50, height=0.4, label="p50", color="#4f81bd")
    axes[1].set_yticks(list(y), labels, fontsize=9)
    axes[1].invert_yaxis()
    axes[1].legend()
    axes[1].set_title("propagation after a write (ms)")
    off, on = results["limits"]["off"], results["limits"]["on"]
    groups = ["publish p50", "publish p99", "stream p50", "stream p99"]
    off_v = [
        off["publish"]["p50"],
        off["publish"]["p99"],
        off["stream_open"]["p50"],
        off["stream_open"]["p99"],
    ]
    on_v = [
        on["publish"]["p50"],
        on["publish"]["p99"],
        on["stream_open"]["p50"],
        on["stream_open"]["p99"],
    ]
    x = range(len(groups))
    axes[2].bar([i - 0.2 for i in x], [v * 1000 for v in off_v], width=0.4, label="limits off")
    axes[2].bar([i + 0.2 for i in x], [v * 1000 for v in on_v], width=0.4, label="limits on")
    axes[2].set_xticks(list(x), groups, fontsize=9)
    axes[2].legend()
    axes[2].set_title("request latency over 4 workers (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench state")
    parser.add_argument("--reads", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args(argv)

    async def run(url: str) -> dict[str, Any]:
        server = allow_client_side_caching(url)
        reads, async_csc = await read_cost(url, args.reads)
        return {
            "server": server,
            "reads": reads,
            "async_csc": async_csc,
            "local": await local_propagation(url, args.rounds),
            "workers": await worker_propagation(url, args.rounds),
        }

    with RedisServer() as server, RedisServer() as off, RedisServer() as on:
        results = asyncio.run(run(server.url))
        results["limits"] = asyncio.run(limiter_overhead((off.url, on.url), args.requests))
    print()
    print(tables(results))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "state.json").write_text(json.dumps(results, indent=2))
    chart(results, HERE / "state.png")
    print("\nwrote bench/results/state.json and bench/state.png")
    worst = results["workers"]["all 4 workers have it"]["p99"]
    return 0 if worst < 0.1 else 1


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))

"""SSE fan-out over 4 uvicorn workers: an app built on Coordinator against baselines.

    python -m bench fanout [--clients 100,1000,3000,10000] [--systems ...] [--events 100]
                           [--rate 10] [--burst 200] [--idle 2000] [--load-procs N]
    python -m bench fanout --broadcast     # 10,000 streams, 1 event/s, 20 events

Systems, each on a fresh redis-server and a fresh ``uvicorn --workers 4``:

- ``coordinator_app``: the demo (``app.main:app``), built on ``Coordinator`` as the
  README shows (routes, metrics, logging, sessions middleware), its own jobs kept
  quiet (``DEMO_*_EVERY_S=3600``, report at second 59).
- ``relay``: the bare relay router (``tests/support/relay_app.py``).
- ``handrolled``, ``per_client``, ``broadcaster``: baselines from
  ``bench/_fanout_apps.py`` (one subscription per process with unbounded queues; one
  Redis subscription per stream; encode/broadcaster 0.3.1). ``broadcaster`` is opt-in
  (``--systems ...,broadcaster``): it loses events (its known bugs; 0% to 44% delivered
  in runs on this machine), so its latencies are of the few that arrived.

For each system and client count N:

1. idle memory: RSS of every uvicorn process (supervisor and workers) before and
   after N idle streams: KiB per stream (the baseline is taken after 32 streams were
   opened and closed, so each worker's one-time first-stream costs are not in it).
   Redis's connected clients then (this script's own connection excluded).
   ``--idle 2000`` adds a dedicated run per system with 2,000 idle streams and
   nothing else, the issue's measure ("at most 30 KiB of worker RSS per idle
   stream, as the RSS delta for 2,000 idle streams").
2. latency: after :data:`WARMUP_EVENTS` unmeasured events, ``--events`` events at
   ``--rate``/s from 4 keep-alive HTTP connections
   (:class:`Publisher`, raw HTTP/1.1 so the driver costs little CPU; payload
   ``{"phase", "seq", "t": time.monotonic()}``); for every (stream, event) the
   receive time minus ``t``: p50, p99, and the share of deliveries that arrived. The
   JSON also has the phase by event (``per_event``: each event's p50, p99, max and
   ``post_ms``, the round trip of the POST that published it, and ``client_gc_ms``,
   the load client's garbage-collection pauses while it was delivered; ``slowest_events``;
   and ``events_over_p99``, how many events have their own p99
   above the phase's): a few such events mean the p99 was set by a few slow moments,
   not by every event.
3. burst: ``--burst`` events as fast as the 4 publishers go; delivered events/s =
   deliveries / (last delivery - first publish).

CPU seconds of the uvicorn processes, the load clients and redis-server are taken
(psutil) at each phase boundary; the table shows the latency and burst phases together,
the JSON each phase. Ratios are against ``handrolled`` at the same N in the same run.

The streams are held by ``--load-procs`` Node processes (``bench/sse_load.mjs``: raw
sockets, minimal chunked/SSE parsing, a latency histogram; Node 20, no packages), each
with its share of the streams, connecting in waves; this process only publishes and
polls them. Node's ``process.hrtime.bigint()`` is CLOCK_MONOTONIC, the clock of Python's
``time.monotonic()`` on Linux, so latencies compare the two processes' readings. Most of
the client's cost is the kernel's (a read per event per stream when events come one at a
time, as the server's writes are): about 1.6 us of CPU per delivery when reads carry many
events, 5 us when each carries one (against a Node server writing frames), 5-18 us in
these runs, against the server's 10-30 us. One process parses 200,000-600,000 deliveries
per second of a core, more than 4 Python workers send; on one machine its CPU is still
taken from the server's, so it is reported next to the server's, the default
``--load-procs`` is one process per 4 cores (1 on 2 cores: a second process cost more
CPU in context switches than it saved), and a client at 90% of its cores in the burst is
flagged (``client_busy``).

Limits for 10,000 streams (all on one machine): open files for the uvicorn workers (N/4
each plus Redis), the Node processes (N/procs each) and redis-server (maxclients, passed
as ``--maxclients``; per_client holds N Redis connections). This script raises its soft
RLIMIT_NOFILE to the hard limit before it starts anything, and children inherit it; if
the hard limit is below what N needs (it says so), raise it (``ulimit -Hn``,
``/etc/security/limits.conf``, ``LimitNOFILE=`` or ``docker run --ulimit
nofile=65536:65536``). The machine these tables come from has a hard limit of 20,000.
Streams connect in waves of ``--wave`` (200), far below uvicorn's ``--backlog``
(``--backlog``, 2048 by default, capped by ``net.core.somaxconn``); N client sockets
use N ephemeral ports of ``net.ipv4.ip_local_port_range``. All are printed at start.

Prints a markdown table (and the idle-memory table), writes ``bench/results/<out>.json``
and ``bench/<out>.png`` (p99 latency and delivered events/s against clients).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import redis as redis_sync

from coordinator.testing import RedisServer
from coordinator.testing.servers import die_with_parent
from tests.support.app_cluster import HOST, WORKER_HEALTHCHECK_S, AppCluster
from tests.support.procs import ROOT

from ._stats import cpu_model, percentile

HERE = Path(__file__).parent
RESULTS = HERE / "results"
LOAD_SCRIPT = HERE / "sse_load.mjs"
SYSTEMS = ["coordinator_app", "relay", "handrolled", "per_client", "broadcaster"]
DEFAULT_SYSTEMS = ["coordinator_app", "relay", "handrolled", "per_client"]
BASELINE = "handrolled"
APPS = {"coordinator_app": "app.main:app", "relay": "tests.support.relay_app:app"}
QUIET = {  # the demo's own jobs publish rarely (as tests/test_metrics.py keeps them)
    "DEMO_COLLECT_EVERY_S": "3600",
    "DEMO_CLEANUP_EVERY_S": "3600",
    "DEMO_REPORT_CRON_SECOND": "59",
}
CHANNEL = "bench"
PATH = f"/api/channels/{CHANNEL}/events"
WARMUP = 32  # streams opened and closed before the idle-memory baseline


# -- the machine ---------------------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); returns both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip().replace("\t", " ")
    except OSError:
        return "?"


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.strip()


def hardware() -> dict[str, Any]:
    import uvicorn

    model = cpu_model("?")
    redis_version = _version([shutil.which("redis-server") or "redis-server", "--version"])
    return {
        "cpu": model,
        "cores": psutil.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "uvicorn": uvicorn.__version__,
        "redis_server": redis_version.split(" v=")[-1].split()[0]
        if " v=" in redis_version
        else "?",
        "node": _version(["node", "--version"]),
    }


def limits(nofile: tuple[int, int]) -> dict[str, Any]:
    return {
        "nofile_soft": nofile[0],
        "nofile_hard": nofile[1],
        "somaxconn": _read("/proc/sys/net/core/somaxconn"),
        "tcp_max_syn_backlog": _read("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
        "ip_local_port_range": _read("/proc/sys/net/ipv4/ip_local_port_range"),
    }


# -- processes: memory and CPU ----------------------------------------------------------


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def rss(processes: Sequence[psutil.Process]) -> int:
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


def cpu(processes: Sequence[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


# -- load clients ---------------------------------------------------------------------------


class LoadClients:
    """``procs`` Node processes (``sse_load.mjs``) holding ``n`` streams between them."""

    def __init__(self, procs: list[asyncio.subprocess.Process], connected: list[dict[str, Any]]):
        self.procs = procs
        self.connected = connected
        self.ps = [psutil.Process(p.pid) for p in procs]

    @classmethod
    async def start(
        cls, port: int, path: str, n: int, procs: int, wave: int, timeout: float = 120
    ) -> LoadClients:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node (20+) is not on PATH: bench/sse_load.mjs needs it")
        shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
        started = []
        for share in (s for s in shares if s):
            opts = {
                "host": HOST,
                "port": port,
                "path": path,
                "n": share,
                "wave": max(1, wave // procs),
                "timeout_s": 60,
            }
            started.append(
                await asyncio.create_subprocess_exec(
                    node,
                    str(LOAD_SCRIPT),
                    json.dumps(opts),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    limit=1 << 26,
                    preexec_fn=die_with_parent(),
                )
            )
        load = cls(started, [])
        try:
            load.connected = await asyncio.wait_for(
                asyncio.gather(*(load._line(p) for p in started)), timeout
            )
        except BaseException:
            await load.close()
            raise
        return load

    @staticmethod
    async def _line(proc: asyncio.subprocess.Process) -> dict[str, Any]:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load client {proc.pid} exited ({await proc.wait()})")
        return json.loads(line)

    async def ask(self, command: str) -> list[dict[str, Any]]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(command.encode() + b"\n")
        return await asyncio.gather(*(self._line(p) for p in self.procs))

    async def stats(self) -> dict[str, Any]:
        """Every process's stats merged: counts summed, first/last the extremes."""
        merged: dict[str, Any] = {"statuses": {}, "phases": {}}
        for part in await self.ask("stats"):
            for key in ("connected", "failed", "ended", "open", "other_events", "bad_events"):
                merged[key] = merged.get(key, 0) + part[key]
            for code, count in part["statuses"].items():
                merged["statuses"][code] = merged["statuses"].get(code, 0) + count
            for name, phase in part["phases"].items():
                into = merged["phases"].setdefault(name, {"count": 0, "first": math.inf, "last": 0})
                into["count"] += phase["count"]
                into["first"] = min(into["first"], phase["first"])
                into["last"] = max(into["last"], phase["last"])
        return merged

    async def histogram(self, phase: str) -> list[tuple[float, int]]:
        """Latencies (ms, bucket middles) and their counts, merged and sorted."""
        merged: dict[float, int] = {}
        for part in await self.ask(f"hist {phase}"):
            for ms, count in part["buckets"]:
                merged[ms] = merged.get(ms, 0) + count
        return sorted(merged.items())

    async def per_event(self) -> list[dict[str, float]]:
        """The latency phase by event, in publish order: ``seq``, ``t`` (s after the
        first event was published), deliveries ``n``, ``p50``/``p99``/``max`` ms, and
        ``client_gc_ms``: the longest time one load process spent in garbage-collection
        pauses while that event was being delivered (from publish to its last delivery)."""
        latencies: dict[int, list[float]] = {}
        published: dict[int, float] = {}
        pauses: list[list[list[float]]] = []
        for part in await self.ask("events"):
            for seq, t, values in part["events"]:
                latencies.setdefault(seq, []).extend(v / 1000 for v in values)
                published[seq] = t
            pauses.append(part.get("gc", []))
        start = min(published.values(), default=0.0)

        def gc_ms(begin: float, end: float) -> float:
            return max(
                (
                    sum(ms for at, ms in process if at < end and at + ms / 1000 > begin)
                    for process in pauses
                ),
                default=0.0,
            )

        return [
            {
                "seq": seq,
                "t": round(published[seq] - start, 3),
                "n": len(values),
                "p50": round(percentile(values, 50), 2),
                "p99": round(percentile(values, 99), 2),
                "max": round(max(values), 2),
                "client_gc_ms": round(
                    gc_ms(published[seq], published[seq] + max(values) / 1000), 2
                ),
            }
            for seq, values in sorted(latencies.items())
        ]

    def cpu_s(self) -> float:
        return cpu(self.ps)

    async def close(self) -> None:
        for proc in self.procs:
            if proc.returncode is None and proc.stdin is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    proc.stdin.write(b"close\n")
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def hist_percentile(hist: list[tuple[float, int]], q: float) -> float:
    """Nearest-rank percentile (as ``bench._stats.percentile``) of a sorted histogram."""
    total = sum(count for _, count in hist)
    if not total:
        return math.nan
    rank = min(total - 1, max(0, round(q / 100 * (total - 1))))
    seen = 0
    for value, count in hist:
        seen += count
        if seen > rank:
            return value
    return hist[-1][0]


# -- publishing -----------------------------------------------------------------------------


class Publisher:
    """One keep-alive HTTP/1.1 connection that POSTs JSON, on raw asyncio streams.

    The publishing driver shares the machine's cores with the server and the load
    clients, so it must cost little per request: httpx spends several hundred
    microseconds of Python per POST, this a few tens (one write, a header read and a
    ``Content-Length`` body read). Responses must carry ``Content-Length`` (every
    system here answers a publish with a small JSON body); anything else is an error.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is not None and self.reader.at_eof():
            # The server closed the idle keep-alive connection (uvicorn does after 5 s,
            # e.g. while a slow system's latency phase settles): not a failed publish.
            await self.aclose()
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self.reader, self.writer

    async def post(self, path: str, body: bytes) -> int:
        """POST ``body`` as JSON; returns the status. On any failure the connection is
        dropped (the next call opens another) and the error raised."""
        try:
            reader, writer = await self._connection()
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
            if "content-length" not in headers:
                raise ValueError(f"a {status} response without Content-Length")
            await reader.readexactly(int(headers["content-length"]))
            if headers.get("connection") == "close":
                await self.aclose()
            return status
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def publishers(base: str) -> list[Publisher]:
    """4 keep-alive publishers, each on one connection, already connected."""
    url = urllib.parse.urlsplit(base)
    clients = [Publisher(url.hostname or HOST, url.port or 80) for _ in range(4)]
    for client in clients:
        with contextlib.suppress(OSError):
            await client._connection()
    return clients


async def publish_phase(
    clients: list[Publisher],
    phase: str,
    count: int,
    rate: float | None,
    errors: list[Any],
    post_s: dict[int, float] | None = None,
) -> float:
    """Publish ``count`` events, ``rate``/s or as fast as possible; returns when it began.
    Failed publishes are appended to ``errors`` (a failing system is a result too); each
    successful POST's round trip (from ``t`` to its response) goes to ``post_s[seq]``."""
    first = time.monotonic()

    async def worker(index: int) -> None:
        for seq in range(index, count, len(clients)):
            if rate:
                await asyncio.sleep(max(0.0, first + seq / rate - time.monotonic()))
            body = {"data": {"phase": phase, "seq": seq, "t": time.monotonic()}}
            try:
                status = await clients[index].post(PATH, json.dumps(body).encode())
                if status != 202:
                    errors.append(status)
                elif post_s is not None:
                    post_s[seq] = time.monotonic() - body["data"]["t"]
            except (
                OSError,
                asyncio.IncompleteReadError,
                ValueError,
            ) as exc:  # OSError: timeouts too
                errors.append(type(exc).__name__)

    await asyncio.gather(*(worker(i) for i in range(len(clients))))
    return first


async def settle(
    load: LoadClients, phase: str, expected: int, quiet: float = 3.0, limit: float = 180.0
) -> dict[str, Any]:
    """Wait until all expected deliveries arrived, or none arrived for ``quiet`` seconds."""
    started = time.monotonic()
    last_count, last_change = -1, time.monotonic()
    while True:
        stats = await load.stats()
        count = stats["phases"].get(phase, {}).get("count", 0)
        if count >= expected or time.monotonic() - started > limit:
            return stats
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > quiet:
            return stats
        await asyncio.sleep(0.25)


# -- one system at one client count ---------------------------------------------------------


WARMUP_EVENTS = 10
"""Events published (at ``--rate``) and delivered before the latency phase, not measured:
without them the phase's first event was the slowest of the phase for every system,
the load client's parsing then still running in V8's interpreter."""

BURST_DELIVERIES = 200_000
"""A burst publishes enough events for this many deliveries (at least ``--burst``), so
that at 100 clients it lasts long enough to measure: 200 events to 100 streams took
0.3-0.9 s here, and the ratio between two systems swung from 1.2x to 2.9x run to run."""


def burst_events(burst: int, clients: int) -> int:
    return max(burst, math.ceil(BURST_DELIVERIES / max(1, clients)))


class Cpu:
    """CPU seconds of the server (uvicorn tree), clients, Redis and this driver."""

    def __init__(self, server_pid: int, redis_pid: int | None, load: LoadClients | None):
        self.server_pid = server_pid
        self.redis = tree(redis_pid)[:1] if redis_pid else []
        self.load = load
        self.me = [psutil.Process()]

    def snapshot(self) -> dict[str, float]:
        return {
            "wall": time.monotonic(),
            "server": cpu(tree(self.server_pid)),
            "client": self.load.cpu_s() if self.load else 0.0,
            "redis": cpu(self.redis),
            "driver": cpu(self.me),
        }


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {key: round(b[key] - a[key], 3) for key in a}


def make_cluster(system: str, redis_url: str, args: argparse.Namespace, tmp: str) -> AppCluster:
    env = {"COORDINATOR_SSE_PING_S": "15"}
    if system == "coordinator_app":
        env |= {**QUIET, "PROMETHEUS_MULTIPROC_DIR": tmp}
    elif system not in APPS:
        env["BENCH_MODE"] = system
    app = APPS.get(system, "bench._fanout_apps:app")

    def command(port: int) -> list[str]:  # AppCluster's uvicorn line, plus --backlog
        return [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            "4",
            "--log-level",
            "warning",
            "--timeout-worker-healthcheck",
            str(WORKER_HEALTHCHECK_S),
            "--timeout-graceful-shutdown",
            "20",
            "--backlog",
            str(args.backlog),
        ]

    namespace = f"bench{uuid.uuid4().hex[:8]}"
    return AppCluster(redis_url, namespace, workers=4, env=env, command=command, cwd=ROOT)


async def run_one(
    system: str, n: int, args: argparse.Namespace, idle_only: bool = False
) -> dict[str, Any]:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    maxclients = max(10_000, 2 * n + 1000)
    if hard != resource.RLIM_INFINITY:
        maxclients = min(maxclients, hard - 32)  # redis-server needs 32 fds of its own
    with (
        tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp,
        RedisServer(extra_args=["--maxclients", str(maxclients)]) as server,
    ):
        cluster = make_cluster(system, server.url, args, tmp)
        info = redis_sync.Redis.from_url(server.url)
        load: LoadClients | None = None
        clients: list[Publisher] = []
        try:
            await cluster.wait_ready()
            # A few streams opened and closed first, so one-time costs (lazy imports, caches)
            # of each worker's first stream are not counted as per-stream memory.
            warm = await LoadClients.start(cluster.port, PATH, WARMUP, 1, WARMUP)
            await warm.close()
            await asyncio.sleep(1.0)
            rss_before = rss(tree(cluster.proc.pid))
            meter = Cpu(cluster.proc.pid, server.pid, None)
            cpu0 = meter.snapshot()
            load = await LoadClients.start(
                cluster.port, PATH, n, args.load_procs, args.wave, timeout=60 + n / 50
            )
            meter.load = load
            cpu0["client"] = 0.0  # the clients did not exist before
            await asyncio.sleep(1.0 + n / 1000)  # let subscriptions settle before measuring
            rss_after = rss(tree(cluster.proc.pid))
            stats = await load.stats()
            streams = stats["statuses"].get("200", 0)
            cpu1 = meter.snapshot()
            result: dict[str, Any] = {
                "system": system,
                "clients": n,
                "connected": streams,
                "statuses": stats["statuses"],
                "connect_failed": stats["failed"],
                "connect_s": round(max(c["connect_s"] for c in load.connected), 2),
                "rss_before_mib": round(rss_before / 2**20, 1),
                "rss_after_mib": round(rss_after / 2**20, 1),
                "kib_per_stream": (rss_after - rss_before) / max(1, streams) / 1024,
                "redis_clients": int(info.info("clients")["connected_clients"]) - 1,
                "cpu_connect": delta(cpu0, cpu1),
            }
            if idle_only:
                return result
            errors: list[Any] = []
            clients = await publishers(cluster.base)
            # The load client's event path runs first in V8's interpreter: warm it (and
            # each system's own first-event paths) up before measuring.
            await publish_phase(clients, "warmup", WARMUP_EVENTS, args.rate, errors)
            await settle(load, "warmup", WARMUP_EVENTS * streams)
            warm = meter.snapshot()
            post_s: dict[int, float] = {}
            await publish_phase(clients, "latency", args.events, args.rate, errors, post_s)
            stats = await settle(load, "latency", args.events * streams)
            cpu2 = meter.snapshot()
            hist = await load.histogram("latency")
            delivered = sum(count for _, count in hist)
            by_event = await load.per_event()
            for event in by_event:  # the publish's own round trip, to tell a slow publish
                if (took := post_s.get(int(event["seq"]))) is not None:
                    event["post_ms"] = round(took * 1000, 2)
            p99 = hist_percentile(hist, 99)
            result |= {
                "events_over_p99": sum(1 for e in by_event if e["p99"] > p99),
                "slowest_events": sorted(by_event, key=lambda e: -e["p99"])[:5],
                "per_event": by_event,
                "p50_ms": hist_percentile(hist, 50),
                "p99_ms": p99,
                "max_ms": hist[-1][0] if hist else math.nan,
                "delivered_pct": 100 * delivered / max(1, args.events * streams),
                "cpu_latency": delta(warm, cpu2),
            }
            cpu3 = cpu2
            if args.burst:
                events = burst_events(args.burst, n)
                first = await publish_phase(clients, "burst", events, None, errors)
                stats = await settle(load, "burst", events * streams)
                cpu3 = meter.snapshot()
                burst = stats["phases"].get("burst", {"count": 0, "last": first})
                elapsed = max(1e-6, burst["last"] - first)
                result |= {
                    "burst_events": events,
                    "burst_delivered_pct": 100 * burst["count"] / max(1, events * streams),
                    "events_per_s": burst["count"] / elapsed if burst["count"] else 0.0,
                    "burst_s": round(elapsed, 3),
                    "cpu_burst": delta(cpu2, cpu3),
                }
                per = 1e6 / max(1, burst["count"])  # CPU microseconds per delivery, burst
                result["burst_us_per_delivery"] = {
                    key: round(result["cpu_burst"][key] * per, 2)
                    for key in ("server", "client", "redis")
                }
            measured = delta(warm, cpu3)
            busiest = result.get("cpu_burst", result["cpu_latency"])  # the burst, if any
            busy = busiest["client"] / max(1e-6, busiest["wall"] * len(load.procs))
            result |= {
                "server_cpu_s": measured["server"],
                "client_cpu_s": measured["client"],
                "redis_cpu_s": measured["redis"],
                "client_busy": round(busy, 2),  # of its processes' cores in the burst; 1 = full
                "streams_ended": stats["ended"],
                "bad_events": stats["bad_events"],
                "publish_errors": len(errors),
                "publish_error_kinds": sorted({str(e) for e in errors}),
            }
            return result
        finally:
            for client in clients:
                await client.aclose()
            if load is not None:
                await load.close()
            info.close()
            cluster.stop()


# -- output ---------------------------------------------------------------------------------


def _num(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _ratio(ours: Any, theirs: Any) -> str:
    if not ours or not theirs or math.isnan(ours) or math.isnan(theirs):
        return "-"
    return f"{ours / theirs:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    base = {r["clients"]: r for r in results if r["system"] == BASELINE and "error" not in r}
    lines = [
        "| system | clients | p50 ms | p99 ms | p99 vs handrolled | delivered | events/s "
        "| events/s vs handrolled | KiB/stream | KiB/stream vs handrolled | Redis conns "
        "| server CPU s | client CPU s | Redis CPU s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(
                f"| {r['system']} | {r['clients']} | failed: {r['error'][:80]} |" + " |" * 11
            )
            continue
        hb = base.get(r["clients"], {})
        delivered = f"{r['delivered_pct']:.1f}%"
        if "burst_delivered_pct" in r and round(r["burst_delivered_pct"], 1) != 100.0:
            delivered += f" (burst {r['burst_delivered_pct']:.1f}%)"
        if r["connected"] < r["clients"]:
            delivered += f" ({r['connected']} streams)"
        lines.append(
            f"| {r['system']} | {r['clients']} | {_num(r['p50_ms'], '.1f')} "
            f"| {_num(r['p99_ms'], '.1f')} | {_ratio(r['p99_ms'], hb.get('p99_ms'))} "
            f"| {delivered} | {_num(r.get('events_per_s'), ',.0f')} "
            f"| {_ratio(r.get('events_per_s'), hb.get('events_per_s'))} "
            f"| {r['kib_per_stream']:.1f} "
            f"| {_ratio(r['kib_per_stream'], hb.get('kib_per_stream'))} "
            f"| {r['redis_clients']} | {r['server_cpu_s']:.1f} | {r['client_cpu_s']:.1f} "
            f"| {r['redis_cpu_s']:.1f} |"
        )
    return "\n".join(lines)


def idle_table(results: list[dict[str, Any]]) -> str:
    base = next((r for r in results if r["system"] == BASELINE and "error" not in r), {})
    lines = [
        "| system | idle streams | RSS before MiB | RSS after MiB | KiB/stream "
        "| vs handrolled | Redis conns |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['clients']} | failed: {r['error'][:80]} | | | | |")
            continue
        lines.append(
            f"| {r['system']} | {r['connected']} | {r['rss_before_mib']:.0f} "
            f"| {r['rss_after_mib']:.0f} | {r['kib_per_stream']:.1f} "
            f"| {_ratio(r['kib_per_stream'], base.get('kib_per_stream'))} | {r['redis_clients']} |"
        )
    return "\n".join(lines)


def chart(results: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    good = [r for r in results if "error" not in r]
    systems = list(dict.fromkeys(r["system"] for r in good))
    counts = sorted({r["clients"] for r in good})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = [
        ("p99_ms", "p99 publish-to-receive latency (ms, log)", True),
        ("events_per_s", "delivered events/s (burst)", False),
    ]
    for ax, (key, label, log_y) in zip(axes, panels, strict=True):
        for system in systems:
            rows = sorted(
                (
                    r
                    for r in good
                    if r["system"] == system and r.get(key) and not math.isnan(r[key])
                ),
                key=lambda r: r["clients"],
            )
            if not rows:
                continue
            partial = any(r["delivered_pct"] < 99.95 for r in rows)
            ax.plot(
                [r["clients"] for r in rows],
                [r[key] for r in rows],
                marker="o",
                linestyle="--" if partial else "-",
                label=f"{system} (not all delivered)" if partial else system,
            )
        ax.set_xscale("log")
        ax.set_xticks(counts, [f"{c:,}" for c in counts])
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("SSE clients (log)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench fanout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", help="client counts (default 100,1000,3000,10000)")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=", ".join(SYSTEMS))
    parser.add_argument("--events", type=int, help="latency phase events (default 100)")
    parser.add_argument("--rate", type=float, help="latency phase events/s (default 10)")
    parser.add_argument("--burst", type=int, help="burst phase events, 0 for none (default 200)")
    parser.add_argument(
        "--idle", type=int, help="a dedicated idle-memory run per system, 0 for none (2000)"
    )
    parser.add_argument(
        "--broadcast",
        action="store_true",
        help="broadcast mode: defaults become 10000 clients, 20 events at 1/s, no burst, no "
        "idle run, --out fanout_broadcast",
    )
    parser.add_argument(
        "--load-procs",
        type=int,
        default=max(1, (psutil.cpu_count() or 1) // 4),
        help="Node client processes (default: one per 4 cores)",
    )
    parser.add_argument("--wave", type=int, default=200, help="streams connecting at once")
    parser.add_argument("--backlog", type=int, default=2048, help="uvicorn --backlog")
    parser.add_argument("--out", help="results name (default fanout)")
    args = parser.parse_args(argv)
    defaults: dict[str, Any] = (
        {"clients": "10000", "events": 20, "rate": 1.0, "burst": 0, "idle": 0}
        if args.broadcast
        else {"clients": "100,1000,3000,10000", "events": 100, "rate": 10.0, "burst": 200}
    )
    defaults |= {
        "idle": defaults.get("idle", 2000),
        "out": "fanout_broadcast" if args.broadcast else "fanout",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    counts = [int(c) for c in args.clients.split(",")]
    systems = args.systems.split(",")
    nofile = raise_nofile()
    machine, limit = hardware(), limits(nofile)
    print(
        f"hardware: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM; "
        f"Python {machine['python']}, uvicorn {machine['uvicorn']}, "
        f"redis-server {machine['redis_server']}, node {machine['node']}"
    )
    print(
        f"limits: open files {limit['nofile_soft']} (hard {limit['nofile_hard']}), somaxconn "
        f"{limit['somaxconn']}, uvicorn --backlog {args.backlog}, ephemeral ports "
        f"{limit['ip_local_port_range']}; {args.load_procs} load process(es), waves of {args.wave}"
    )
    need = max([*counts, args.idle]) + 2000
    if nofile[0] < need:
        print(f"WARNING: open files {nofile[0]} < ~{need} needed for {max(counts)} streams")
    results: list[dict[str, Any]] = []
    idle: list[dict[str, Any]] = []

    async def attempt(system: str, n: int, idle_only: bool) -> dict[str, Any]:
        try:
            return await run_one(system, n, args, idle_only)
        except Exception as exc:  # one system failing must not hide the others
            return {"system": system, "clients": n, "error": repr(exc)[:300]}

    async def run() -> None:
        for n in counts:
            for system in systems:
                print(f"-- {system}, {n} clients", flush=True)
                results.append(await attempt(system, n, False))
                shown = {k: v for k, v in results[-1].items() if k != "per_event"}
                print(json.dumps(shown), flush=True)
        if args.idle:
            for system in systems:
                print(f"-- {system}, {args.idle} idle streams", flush=True)
                idle.append(await attempt(system, args.idle, True))
                print(json.dumps(idle[-1]), flush=True)

    asyncio.run(run())
    mode = "broadcast" if args.broadcast else "fan-out"
    phases = "latency and burst phases" if args.burst else "latency phase"
    print(
        f"\n{mode}: {args.events} events at {args.rate:g}/s, burst {args.burst} (at least "
        f"{BURST_DELIVERIES:,} deliveries); CPU s over the "
        f"{phases}"
    )
    print(table(results))
    busy = [r for r in results if r.get("client_busy", 0) >= 0.9]
    for r in busy:
        print(f"note: load clients near saturation for {r['system']} at {r['clients']}")
    if idle:
        print(f"\nidle memory, {args.idle} streams (uvicorn supervisor and workers RSS delta)")
        print(idle_table(idle))
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "argv": argv,
        "args": vars(args),
        "hardware": machine,
        "limits": limit,
        "results": results,
        "idle": idle,
    }
    (RESULTS / f"{args.out}.json").write_text(json.dumps(meta, indent=2))
    wrote = f"bench/results/{args.out}.json"
    if len(counts) > 1:
        title = f"SSE {mode} over 4 uvicorn workers ({machine['cores']} cores, all on one machine)"
        chart(results, title, HERE / f"{args.out}.png")
        wrote += f" and bench/{args.out}.png"
    print(f"\nwrote {wrote}")
    return 0

"""The same relay load on a single Redis and on a 3-shard Redis Cluster, side by side.

    python -m bench shards [--procs 8] [--channels 2000] [--publishers 4]
                           [--inflight 64] [--rate 2000] [--seconds 15]

Each topology gets fresh servers: one redis-server, then a Redis Cluster of 3 primaries
and 3 replicas (``coordinator.testing.topologies.RedisClusterServers``, relay URL
``redis+cluster://``, where every channel's stream and shard channel have a slot of
their own and the listener holds one SSUBSCRIBE connection per primary). On each, the
fleet of ``bench/fleet.py`` in a smaller shape, since this is about Redis and not the
listeners: ``--procs`` relay processes (``bench/_fleet_proc.py listen``), every one of
``--channels`` channels watched by a subscriber on ``--per-channel`` of them, and
``--publishers`` publisher processes sending to channels chosen at random. Two phases,
each with a fresh namespace, fresh listeners and fresh publishers:

- saturation: each publisher publishes as fast as it can with ``--inflight``
  publishes in flight (this module run as ``python -m bench.shards saturate``); the
  figure is events/s acknowledged, with the acknowledgement latency;
- fixed rate: ``--rate`` events/s offered in all (``_fleet_proc.py publish``), for
  the publish-to-deliver latency (publisher's ``time.time()`` in the payload, the
  subscriber's at delivery), p50 and p99, and the share of expected deliveries made.

Over each ``--seconds`` window: Redis CPU (``INFO cpu`` user + sys deltas) summed over
the primaries and of the busiest primary, in % of one core (the cluster's replicas
apart: they are extra processes on the same cores); the publisher and listener
processes' CPU (psutil); the whole machine's busy share. Then ratios cluster/single.
Markdown tables on stdout, JSON in ``bench/results/shards.json``, chart in
``bench/shards.png``.

Limits: every Redis node and every Python process shares this machine's cores (2 on
the VM the README's numbers come from), so the cluster cannot show horizontal scaling
here: three primaries and three replicas take turns on the cores one server had. What
it measures is the cluster's overhead (client-side slot routing, one listener
connection per primary, a slot per channel) and where the load saturates: publishers
near 100% of a core each mean the Python client saturates before Redis does; a busiest
primary near 100% means Redis does; a machine near 100% busy means the cores are spent
and neither side can show its own limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis as redis_sync

from ._stats import cpu_model, summarize
from .fleet import cpu_seconds, finish, spawn, wait_ready

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
CHART = Path(__file__).parent / "shards.png"
DRAIN_S = 3.0  # after the publishers stop: time for the listeners to deliver the rest
SATURATED_PCT = 80.0  # a process at this share of one core (or more) counts as saturated
MACHINE_SATURATED_PCT = 90.0


# -- the saturating publisher: a child process, ``python -m bench.shards saturate`` ----
async def saturate(url: str, namespace: str, channels: int, inflight: int) -> dict[str, Any]:
    """Publish to random channels from ``inflight`` concurrent loops until a line
    arrives on stdin; report what was acknowledged, failures and acknowledgement times."""
    from coordinator import CoordinatorSettings, EventRelay

    relay = EventRelay(CoordinatorSettings(redis_url=url, namespace=namespace))
    # One publish before "ready" (to a channel nobody watches): the script is loaded and,
    # on Cluster, the slot map and the nodes' versions are known before the window.
    await relay.publish("warmup", {"t": time.time()})
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.ensure_future(loop.run_in_executor(None, sys.stdin.readline))
    rng = random.Random()
    acks: list[float] = []
    errors: dict[str, int] = {}

    async def publisher() -> None:
        while not stop.done():
            started = time.perf_counter()
            try:
                await relay.publish(f"ch{rng.randrange(channels)}", {"t": time.time()})
            except Exception as exc:
                kind = f"{type(exc).__name__}: {str(exc).split(': ')[-1][:120]}"
                errors[kind] = errors.get(kind, 0) + 1
            else:
                acks.append(time.perf_counter() - started)

    start = time.monotonic()
    await asyncio.gather(*(publisher() for _ in range(inflight)))
    seconds = time.monotonic() - start
    await relay.stop()
    return {
        "sent": len(acks),
        "failed": sum(errors.values()),
        "errors": errors,
        "seconds": seconds,
        "acks": acks,
    }


def spawn_saturator(
    url: str, namespace: str, channels: int, inflight: int
) -> subprocess.Popen[str]:
    """A saturating publisher process, speaking ``bench/_fleet_proc.py``'s protocol
    (``ready``, then one JSON line after a line on stdin)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    command = ["-m", "bench.shards", "saturate", url, namespace, str(channels), str(inflight)]
    return subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


# -- topologies -------------------------------------------------------------------------
@dataclass(frozen=True)
class Topology:
    name: str
    url: str
    primaries: list[int]  # ports
    replicas: list[int]


def _roles(ports: list[int]) -> tuple[list[int], list[int]]:
    primaries: list[int] = []
    replicas: list[int] = []
    for port in ports:
        with redis_sync.Redis(host="127.0.0.1", port=port, socket_timeout=5) as client:
            role = client.info("replication")["role"]
        (primaries if role == "master" else replicas).append(port)
    return primaries, replicas


@contextlib.contextmanager
def topology(name: str) -> Iterator[Topology]:
    """Fresh servers for ``name`` (``single`` or ``cluster``), stopped on exit."""
    from coordinator.testing import RedisServer
    from coordinator.testing.topologies import RedisClusterServers

    if name == "single":
        with RedisServer(extra_args=["--maxclients", "10000"]) as server:
            yield Topology(name, server.url, [server.port], [])
    else:
        with RedisClusterServers() as cluster:
            primaries, replicas = _roles(list(cluster.nodes))
            yield Topology(name, cluster.url, primaries, replicas)


# -- counters ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Counters:
    at: float  # time.monotonic()
    redis: dict[int, float]  # CPU seconds (user + sys) by port
    publishers: list[float]  # CPU seconds by process
    listeners: list[float]


def redis_cpu(clients: dict[int, redis_sync.Redis]) -> dict[int, float]:
    out = {}
    for port, client in clients.items():
        cpu = client.info("cpu")
        out[port] = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return out


def counters(
    clients: dict[int, redis_sync.Redis],
    publishers: list[subprocess.Popen[str]],
    listeners: list[subprocess.Popen[str]],
) -> Counters:
    return Counters(
        time.monotonic(), redis_cpu(clients), cpu_seconds(publishers), cpu_seconds(listeners)
    )


def _pct(before: list[float], after: list[float], window: float) -> list[float]:
    return [(b - a) / window * 100 for a, b in zip(before, after, strict=True)]


# -- one phase on one topology ------------------------------------------------------------
def assign(args: argparse.Namespace) -> list[list[str]]:
    """Channels per listener process: each channel on ``per_channel`` consecutive ones."""
    assignment: list[list[str]] = [[] for _ in range(args.procs)]
    for c in range(args.channels):
        for k in range(args.per_channel):
            assignment[(c * args.per_channel + k) % args.procs].append(f"ch{c}")
    return [channels for channels in assignment if channels]


def run_phase(top: Topology, phase: str, args: argparse.Namespace) -> dict[str, Any]:
    """Listeners, then publishers (``saturation`` or ``fixed`` rate), one window."""
    namespace = f"shards-{phase[:3]}-{uuid.uuid4().hex[:6]}"
    ports = [*top.primaries, *top.replicas]
    clients = {p: redis_sync.Redis(host="127.0.0.1", port=p, socket_timeout=10) for p in ports}
    listeners: list[subprocess.Popen[str]] = []
    publishers: list[subprocess.Popen[str]] = []
    try:
        for port in top.primaries:
            clients[port].flushall()  # the previous phase's streams
        listeners = [
            spawn(["listen", top.url, namespace, ",".join(channels)], None)
            for channels in assign(args)
        ]
        wait_ready(listeners, 300)
        if phase == "saturation":
            publishers = [
                spawn_saturator(top.url, namespace, args.channels, args.inflight)
                for _ in range(args.publishers)
            ]
        else:
            rate = str(args.rate / args.publishers)
            publishers = [
                spawn(["publish", top.url, namespace, str(args.channels), rate], None)
                for _ in range(args.publishers)
            ]
        wait_ready(publishers, 120)
        psutil.cpu_percent(None)  # starts the machine-wide busy share's interval
        before = counters(clients, publishers, listeners)
        time.sleep(args.seconds)  # the window: the load runs meanwhile
        after = counters(clients, publishers, listeners)
        machine = psutil.cpu_percent(None)
        sent = [finish(p) for p in publishers]
        time.sleep(DRAIN_S)
        received = [finish(p) for p in listeners]
    finally:
        for proc in [*publishers, *listeners]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for client in clients.values():
            client.close()
    window = after.at - before.at
    redis = {p: (after.redis[p] - before.redis[p]) / window * 100 for p in ports}
    pub_cpu = _pct(before.publishers, after.publishers, window)
    lis_cpu = _pct(before.listeners, after.listeners, window)
    published = sum(s["sent"] for s in sent)
    expected = published * args.per_channel
    lags = summarize([lag for r in received for lag in r["lags"]])
    acks = summarize([a for s in sent for a in s.get("acks", [])])
    return {
        "namespace": namespace,
        "window_s": window,
        "offered_per_s": args.rate if phase == "fixed" else None,
        "published": published,
        "failed": sum(s["failed"] for s in sent),
        "errors": [s["errors"] for s in sent],
        "events_per_s": sum(s["sent"] / s["seconds"] for s in sent),
        "ack_p50_ms": acks["p50"] * 1000 if acks["n"] else None,  # saturation phase only
        "ack_p99_ms": acks["p99"] * 1000 if acks["n"] else None,
        "p50_ms": lags["p50"] * 1000,
        "p99_ms": lags["p99"] * 1000,
        "delivered": lags["n"] / expected if expected else None,
        "redis_cpu_by_port": redis,
        "redis_cpu_pct": sum(redis[p] for p in top.primaries),
        "redis_busiest_pct": max(redis[p] for p in top.primaries),
        "replicas_cpu_pct": sum(redis[p] for p in top.replicas),
        "publisher_cpu_pct": pub_cpu,
        "publisher_cpu_mean_pct": sum(pub_cpu) / len(pub_cpu),
        "publisher_cpu_max_pct": max(pub_cpu),
        "listener_cpu_mean_pct": sum(lis_cpu) / len(lis_cpu),
        "listener_cpu_total_pct": sum(lis_cpu),
        "machine_busy_pct": machine,
    }


def run_topology(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with topology(name) as top:
        with redis_sync.Redis(host="127.0.0.1", port=top.primaries[0]) as client:
            version = str(client.info("server")["redis_version"])
        row: dict[str, Any] = {
            "topology": name,
            "url": top.url,
            "primaries": len(top.primaries),
            "replicas": len(top.replicas),
            "redis_version": version,
        }
        for phase in ("saturation", "fixed"):
            row[phase] = run_phase(top, phase, args)
            print(f"{name} {phase}: " + json.dumps(_brief(row[phase])), flush=True)
    return row


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    """A phase's result without its per-process lists, for the progress lines."""
    return {k: v for k, v in result.items() if not isinstance(v, list | dict) or k == "errors"}


# -- report ---------------------------------------------------------------------------------
Column = tuple[str, str, str]
_SHARED_COLUMNS: list[Column] = [
    ("delivered", "delivered", "{:.2%}"),
    ("Redis CPU % (primaries)", "redis_cpu_pct", "{:.1f}"),
    ("busiest primary %", "redis_busiest_pct", "{:.1f}"),
    ("replicas %", "replicas_cpu_pct", "{:.1f}"),
    ("publisher CPU % mean", "publisher_cpu_mean_pct", "{:.1f}"),
    ("listener CPU % mean", "listener_cpu_mean_pct", "{:.1f}"),
    ("machine busy %", "machine_busy_pct", "{:.0f}"),
]
SATURATION_COLUMNS: list[Column] = [
    ("events/s acked", "events_per_s", "{:.0f}"),
    ("ack p50 ms", "ack_p50_ms", "{:.1f}"),
    ("ack p99 ms", "ack_p99_ms", "{:.1f}"),
    ("deliver p99 ms", "p99_ms", "{:.0f}"),
    *_SHARED_COLUMNS,
]
FIXED_COLUMNS: list[Column] = [
    ("events/s", "events_per_s", "{:.0f}"),
    ("p50 ms", "p50_ms", "{:.1f}"),
    ("p99 ms", "p99_ms", "{:.1f}"),
    *_SHARED_COLUMNS,
]


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _ratio(cluster: float | None, single: float | None) -> str:
    return "-" if cluster is None or not single else f"{cluster / single:.2f}x"


def table(rows: list[dict[str, Any]], phase: str, columns: list[Column]) -> str:
    lines = [
        "| topology | " + " | ".join(title for title, _, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [_cell(row[phase][key], fmt) for _, key, fmt in columns]
        lines.append(f"| {row['topology']} | " + " | ".join(cells) + " |")
    by_name = {row["topology"]: row[phase] for row in rows}
    if "single" in by_name and "cluster" in by_name:
        single, cluster = by_name["single"], by_name["cluster"]
        ratios = [_ratio(cluster[key], single[key]) for _, key, _ in columns]
        lines.append("| cluster/single | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def verdict(row: dict[str, Any], cores: int, inflight: int) -> str:
    """Where the saturation phase of ``row`` ran out: publishers, Redis, or the machine."""
    s = row["saturation"]
    redis_all = s["redis_cpu_pct"] + s["replicas_cpu_pct"]
    ours = redis_all + sum(s["publisher_cpu_pct"]) + s["listener_cpu_total_pct"]
    others = max(0.0, s["machine_busy_pct"] * cores - ours)  # e.g. a test run meanwhile
    spent = (
        f"cores spent: Redis {redis_all / 100:.2f} (all nodes), publishers "
        f"{sum(s['publisher_cpu_pct']) / 100:.2f}, listeners "
        f"{s['listener_cpu_total_pct'] / 100:.2f}, anything else {others / 100:.2f}, "
        f"of {cores}"
    )
    findings = []
    if s["publisher_cpu_mean_pct"] >= SATURATED_PCT:
        findings.append(
            f"publishers at {s['publisher_cpu_mean_pct']:.0f}% of a core each: the Python "
            "client (asyncio + redis-py) saturates before Redis does"
        )
    if s["redis_busiest_pct"] >= SATURATED_PCT:
        findings.append(f"the busiest primary at {s['redis_busiest_pct']:.0f}%: Redis saturates")
    if s["machine_busy_pct"] >= MACHINE_SATURATED_PCT:
        findings.append(
            f"the machine {s['machine_busy_pct']:.0f}% busy: its {cores} cores are spent, "
            "so no process reaches its own limit"
        )
    if not findings:
        findings.append(
            f"nothing at {SATURATED_PCT:.0f}% of a core (publishers "
            f"{s['publisher_cpu_mean_pct']:.0f}%, busiest primary "
            f"{s['redis_busiest_pct']:.0f}%): the limit is elsewhere "
            f"(the {inflight} publishes in flight per publisher, round trips)"
        )
    return f"- {row['topology']}: " + "; ".join(findings) + f" ({spent})"


def hardware() -> dict[str, Any]:
    model = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "nproc": cores or 1,
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["topology"] for row in rows]
    colors = ["#999", "#2a7"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))

    def bars(ax: Any, values: list[float], offset: float, width: float, label: str) -> None:
        xs = [i + offset for i in range(len(values))]
        ax.bar(xs, values, width, label=label)
        for x, v in zip(xs, values, strict=True):
            ax.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=8)

    ax = axes[0]
    values = [row["saturation"]["events_per_s"] for row in rows]
    ax.bar(names, values, color=colors[: len(rows)])
    for i, v in enumerate(values):
        ax.annotate(f"{v:.0f}", (i, v), ha="center", va="bottom", fontsize=9)
    ax.set_title("saturation: events/s acknowledged", fontsize=10)

    ax = axes[1]
    for j, (label, key) in enumerate(
        [
            ("Redis, primaries", "redis_cpu_pct"),
            ("busiest primary", "redis_busiest_pct"),
            ("a publisher (mean)", "publisher_cpu_mean_pct"),
        ]
    ):
        bars(ax, [row["saturation"][key] for row in rows], (j - 1) * 0.27, 0.27, label)
    ax.set_xticks(range(len(rows)), names)
    ax.set_title("saturation: CPU, % of one core", fontsize=10)
    ax.legend(fontsize=8)

    ax = axes[2]
    for j, (label, key) in enumerate([("p50", "p50_ms"), ("p99", "p99_ms")]):
        bars(ax, [row["fixed"][key] for row in rows], (j - 0.5) * 0.4, 0.4, label)
    ax.set_xticks(range(len(rows)), names)
    offered = rows[0]["fixed"]["offered_per_s"]
    ax.set_title(f"{offered:.0f} events/s offered: publish-to-deliver, ms", fontsize=10)
    ax.legend(fontsize=8)

    fig.suptitle("shards: a single Redis against a 3-shard Redis Cluster, same relay load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench shards", description=__doc__)
    parser.add_argument("--procs", type=int, default=8, help="listener processes")
    parser.add_argument("--channels", type=int, default=2000)
    parser.add_argument("--per-channel", type=int, default=2, help="listeners per channel")
    parser.add_argument("--publishers", type=int, default=4, help="publisher processes")
    parser.add_argument("--inflight", type=int, default=64, help="per saturating publisher")
    parser.add_argument("--rate", type=float, default=2000, help="events/s in all, fixed phase")
    parser.add_argument("--seconds", type=float, default=15, help="each phase's window")
    args = parser.parse_args(argv)
    if args.per_channel > args.procs:
        parser.error("--per-channel cannot exceed --procs")
    host = hardware()
    print(
        f"hardware: nproc {host['nproc']}, {host['cpu_model']}, {host['memory_gib']} GiB, "
        f"Python {host['python']}; every Redis node and Python process shares these cores",
        flush=True,
    )
    rows = []
    for name in ("single", "cluster"):
        rows.append(run_topology(name, args))
    print(f"\nredis-server {rows[0]['redis_version']}; nproc {host['nproc']}, {host['cpu_model']}")
    print(
        f"\nSaturation: {args.publishers} publishers x {args.inflight} in flight, "
        f"{args.procs} listener processes, {args.channels} channels x {args.per_channel}\n"
    )
    print(table(rows, "saturation", SATURATION_COLUMNS))
    print(f"\nFixed rate: {args.rate:.0f} events/s offered in all\n")
    print(table(rows, "fixed", FIXED_COLUMNS))
    print("\nWhere it saturates:")
    for row in rows:
        print(verdict(row, host["nproc"], args.inflight))
    for row in rows:
        for phase in ("saturation", "fixed"):
            if row[phase]["failed"]:
                print(f"! {row['topology']} {phase}: {row[phase]['failed']} publishes failed: ")
                print(f"  {row[phase]['errors']}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "shards.json"
    out.write_text(json.dumps({"args": vars(args), "hardware": host, "rows": rows}, indent=2))
    chart(rows, CHART)
    print(f"\nraw results: {out}; chart: bench/shards.png")
    return 0


def _child(argv: list[str]) -> None:
    """``python -m bench.shards saturate URL NAMESPACE CHANNELS INFLIGHT``."""
    mode, url, namespace, channels, inflight = argv
    if mode != "saturate":
        raise SystemExit(f"unknown mode {mode!r}")
    result = asyncio.run(saturate(url, namespace, int(channels), int(inflight)))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1:])

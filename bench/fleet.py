"""Fleet simulation: many relay processes on one Redis, the relay before and after
per-channel subscriptions, side by side in one run. No HTTP: the relay is what changed.

    python -m bench fleet [--procs 40] [--channels 5000] [--per-channel 2]
                          [--rate 2000] [--seconds 20] [--before REV]

Each design gets a fresh redis-server and the same fleet: ``--procs`` relay processes
(``bench/_fleet_proc.py listen``), every one of ``--channels`` channels watched by one
subscriber on each of ``--per-channel`` processes (consecutive processes, round robin),
and 2 publisher processes sending ``--rate`` events/s in all to channels chosen at
random. The "before" design is the relay of commit ``--before`` (default: the last one
before per-channel subscriptions), exported with ``git archive`` and put first on the
processes' ``PYTHONPATH``; "after" is this checkout's.

Reported per design, over the publishing window only:

- Redis egress: Pub/Sub messages the relay processes received per published event
  (their ``stats.events_received``; Redis sends nothing else to them meanwhile), and
  Redis's output bytes per event (``INFO stats`` ``total_net_output_bytes``);
- Redis CPU (``INFO cpu``, user + sys) in % of one core;
- relay processes' CPU (psutil), mean and max, in % of one core;
- publish-to-deliver latency (publisher's ``time.time()`` in the payload, subscriber's
  at delivery), p50 and p99, and the share of expected deliveries that arrived.

On a 2-core machine 42 Python processes share 2 cores: a design that makes every
process parse every event saturates them, which is the point being measured; the
per-event figures (messages, bytes) do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from io import BytesIO
from pathlib import Path
from typing import Any

import psutil
import redis as redis_sync

from coordinator.testing import RedisServer

from ._stats import summarize

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
PROC = Path(__file__).parent / "_fleet_proc.py"
BEFORE = "b95970a"  # the last commit whose relay heard every event on one channel


def export(rev: str, into: Path) -> Path:
    """``coordinator/`` as of ``rev``, under ``into``; returns the directory for PYTHONPATH."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "coordinator"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def spawn(args: list[str], pythonpath: Path | None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    else:
        env.pop("PYTHONPATH", None)
    return subprocess.Popen(
        [sys.executable, str(PROC), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_ready(procs: list[subprocess.Popen[str]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks; the deadline is checked between processes
        if line.strip() != "ready" or time.monotonic() > deadline:
            raise RuntimeError(f"fleet process {proc.args} did not start: {line!r}")


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("stop\n")
    proc.stdin.flush()
    result: dict[str, Any] = json.loads(proc.stdout.readline())
    proc.wait(30)
    return result


def redis_counters(client: redis_sync.Redis) -> tuple[float, int]:
    cpu = client.info("cpu")
    stats = client.info("stats")
    return cpu["used_cpu_user"] + cpu["used_cpu_sys"], int(stats["total_net_output_bytes"])


def cpu_seconds(procs: list[subprocess.Popen[str]]) -> list[float]:
    out = []
    for proc in procs:
        times = psutil.Process(proc.pid).cpu_times()
        out.append(times.user + times.system)
    return out


def run_design(name: str, pythonpath: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    namespace = f"fleet-{uuid.uuid4().hex[:6]}"
    assignment: list[list[str]] = [[] for _ in range(args.procs)]
    for c in range(args.channels):
        for k in range(args.per_channel):
            assignment[(c * args.per_channel + k) % args.procs].append(f"ch{c}")
    with RedisServer(extra_args=["--maxclients", "10000"]) as server:
        client = redis_sync.Redis.from_url(server.url)
        listeners = [
            spawn(["listen", server.url, namespace, ",".join(chs)], pythonpath)
            for chs in assignment
        ]
        publishers: list[subprocess.Popen[str]] = []
        try:
            wait_ready(listeners, 300)
            publishers = [
                spawn(
                    ["publish", server.url, namespace, str(args.channels), str(args.rate / 2)],
                    pythonpath,
                )
                for _ in range(2)
            ]
            wait_ready(publishers, 120)
            redis_cpu0, out0 = redis_counters(client)
            procs_cpu0 = cpu_seconds(listeners)
            t0 = time.monotonic()
            time.sleep(args.seconds)  # the measuring window: load runs meanwhile
            sent = [finish(p) for p in publishers]
            window = time.monotonic() - t0
            redis_cpu1, out1 = redis_counters(client)
            procs_cpu1 = cpu_seconds(listeners)
            published = sum(s["sent"] for s in sent)
            expected = published * args.per_channel
            # The last publishes were just made: give the relays time to deliver them (a
            # design that fell behind shows as delivered < 100%, not as a longer wait).
            time.sleep(3)
            results = [finish(p) for p in listeners]
        finally:
            for proc in [*listeners, *publishers]:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        client.close()
    lags = [lag for r in results for lag in r["lags"]]
    received = sum(r["received"] for r in results)
    cpu = [(b - a) / window * 100 for a, b in zip(procs_cpu0, procs_cpu1, strict=True)]
    lat = summarize(lags)
    return {
        "design": name,
        "module": results[0]["module"],
        "published": published,
        "failed": sum(s["failed"] for s in sent),
        "errors": [s["errors"] for s in sent],
        "events_per_s": sum(s["sent"] / s["seconds"] for s in sent),
        "messages_per_event": received / published if published else float("nan"),
        "bytes_per_event": (out1 - out0) / published if published else float("nan"),
        "redis_cpu_pct": (redis_cpu1 - redis_cpu0) / window * 100,
        "proc_cpu_mean_pct": sum(cpu) / len(cpu),
        "proc_cpu_max_pct": max(cpu),
        "p50_ms": lat["p50"] * 1000,
        "p99_ms": lat["p99"] * 1000,
        "delivered": len(lags) / expected if expected else float("nan"),
    }


COLUMNS = [
    ("design", "design", "{}"),
    ("events/s", "events_per_s", "{:.0f}"),
    ("Redis msgs/event", "messages_per_event", "{:.2f}"),
    ("Redis out bytes/event", "bytes_per_event", "{:.0f}"),
    ("Redis CPU %", "redis_cpu_pct", "{:.1f}"),
    ("proc CPU % mean", "proc_cpu_mean_pct", "{:.1f}"),
    ("proc CPU % max", "proc_cpu_max_pct", "{:.1f}"),
    ("p50 ms", "p50_ms", "{:.1f}"),
    ("p99 ms", "p99_ms", "{:.1f}"),
    ("delivered", "delivered", "{:.2%}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(title for title, _, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for _, key, fmt in COLUMNS) + " |")
    if len(rows) == 2:
        before, after = rows
        ratios = [
            f"{after[key] / before[key]:.2f}x"
            if isinstance(after[key], float) and before[key]
            else "after/before"
            for _, key, _ in COLUMNS
        ]
        lines.append("| " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("Redis messages per event", "messages_per_event"),
        ("Redis CPU, % of a core", "redis_cpu_pct"),
        ("relay process CPU, mean %", "proc_cpu_mean_pct"),
        ("publish-to-deliver p99, ms", "p99_ms"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.6))
    for ax, (title, key) in zip(axes, panels, strict=True):
        ax.bar([r["design"] for r in rows], [r[key] for r in rows], color=["#999", "#2a7"])
        ax.set_title(title, fontsize=10)
        for i, r in enumerate(rows):
            ax.annotate(f"{r[key]:.1f}", (i, r[key]), ha="center", va="bottom", fontsize=9)
    fig.suptitle("fleet: relay processes, channels watched on 2 processes each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench fleet", description=__doc__)
    parser.add_argument("--procs", type=int, default=40)
    parser.add_argument("--channels", type=int, default=5000)
    parser.add_argument("--per-channel", type=int, default=2)
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--before", default=BEFORE)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fleet-before-") as tmp:
        old = export(args.before, Path(tmp))
        for name, path in ((f"before ({args.before})", old), ("after (per-channel)", None)):
            row = run_design(name, path, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
    text = table(rows)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"fleet-{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    chart(rows, Path(__file__).parent / "fleet.png")
    print(f"raw results: {out}; chart: bench/fleet.png")
    return 0

"""Multi-pod simulation: 3 "pods" on one Redis, updated one after another with SIGTERM
as Kubernetes does.

Each pod runs the image's own command line: the Dockerfile's CMD (``sh -c "exec uvicorn
app.main:app ... --workers ${WEB_CONCURRENCY:-2} ..."``) with the final stage's ENV, from
a directory laid out like its WORKDIR (what it COPYs), plus the pod's POD_NAME. Only the
number after ``--port`` is replaced, in the script's text, by a free port; the shell
expands the rest as in a container. The image's venv (/opt/venv) is the one running the
tests. So a change to the image's command is what this simulation runs.

Through the roll: one leader at a time, every scheduled fire once, and SSE clients
that reconnect with Last-Event-ID miss nothing. Handoff times are printed and
written to test-output/rolling-update.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from .support.app_cluster import HOST, AppCluster
from .support.dockerfile import Image
from .support.procs import ROOT
from .support.reconnecting_client import ReconnectingClient

pytestmark = pytest.mark.slow

POD_ENV = {"DEMO_COLLECT_EVERY_S": "0.5", "DEMO_CLEANUP_EVERY_S": "3"}
IMAGE = Image.load()
IMAGE_VENV = "/opt/venv"  # the Dockerfile's `python -m venv /opt/venv`


def image_env() -> dict[str, str]:
    """The final stage's ENV on this machine: the image's venv is this interpreter's."""
    env = {
        name: os.path.expandvars(value.replace(IMAGE_VENV, sys.prefix))
        for name, value in IMAGE.env.items()
    }
    assert (Path(sys.prefix) / "bin" / "uvicorn").exists(), "uvicorn is not in this venv"
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory laid out like the image's WORKDIR: only what the final stage COPYs."""
    path = tmp_path_factory.mktemp("srv")
    IMAGE.lay_out(ROOT, path)
    return path


class Pods:
    def __init__(self, redis_url: str, namespace: str, workdir: Path) -> None:
        self.redis_url = redis_url
        self.namespace = namespace
        self.workdir = workdir
        self.env = image_env()
        # The CMD runs ${WEB_CONCURRENCY:-2} workers: the image's ENV sets it.
        self.workers = int(self.env["WEB_CONCURRENCY"])
        assert self.workers >= 2, "a pod of one worker would not test the handoff inside a pod"
        self.pods: dict[str, AppCluster] = {}

    def start(self, name: str) -> AppCluster:
        pod = AppCluster(
            self.redis_url,
            self.namespace,
            workers=self.workers,
            env={**self.env, **POD_ENV, "POD_NAME": name},
            command=IMAGE.cmd_on_port,
            cwd=self.workdir,
        )
        self.pods[name] = pod
        return pod

    def check_runs_the_image_cmd(self, pod: AppCluster) -> None:
        """The shell exec'd uvicorn (so it gets the SIGTERM), on the pod's port, in WORKDIR."""
        argv = Path(f"/proc/{pod.proc.pid}/cmdline").read_bytes().decode().split("\0")
        assert Path(argv[1]).name == "uvicorn", argv
        assert argv[argv.index("--port") + 1] == str(pod.port), argv
        assert argv[argv.index("--workers") + 1] == str(self.workers), argv
        assert Path(f"/proc/{pod.proc.pid}/cwd").resolve() == self.workdir.resolve()

    def live_ports(self) -> list[int]:
        return [p.port for p in self.pods.values() if p.proc.alive]


async def publisher(pods: Pods, stop: asyncio.Event, published: list[tuple[str, int]]) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        while True:  # this event must go out, through whichever pod answers
            port = random.choice(pods.live_ports())
            try:
                async with httpx.AsyncClient(timeout=5) as http:
                    r = await http.post(
                        f"http://{HOST}:{port}/api/channels/roll/events", json={"data": {"n": n}}
                    )
                if r.status_code == 202:
                    published.append((r.json()["id"], n))
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.04)


async def leader_watch(pods: Pods, stop: asyncio.Event, seen: list[tuple[float, Any]]) -> None:
    while not stop.is_set():
        with contextlib.suppress(httpx.HTTPError, IndexError):
            port = random.choice(pods.live_ports())
            async with httpx.AsyncClient(timeout=2) as http:
                r = await http.get(f"http://{HOST}:{port}/api/leader")
            if r.status_code == 200:
                seen.append((time.monotonic(), r.json()["leader"]))
        await asyncio.sleep(0.02)


async def test_rolling_update(redis_url: str, workdir: Path) -> None:
    pods = Pods(redis_url, f"roll{uuid.uuid4().hex[:8]}", workdir)
    names = ["pod-a", "pod-b", "pod-c"]
    for name in names:
        pods.start(name)
    await asyncio.gather(*(p.wait_ready() for p in pods.pods.values()))
    for pod in pods.pods.values():
        pods.check_runs_the_image_cmd(pod)

    stop = asyncio.Event()
    published: list[tuple[str, int]] = []
    leaders: list[tuple[float, Any]] = []
    clients = [
        ReconnectingClient(
            f"client{i}", lambda: random.choice(pods.live_ports()), "/api/channels/roll/events"
        )
        for i in range(6)
    ]
    # start() returns once the stream's hello arrived: subscribed before the first publish.
    await asyncio.gather(*(c.start() for c in clients))
    tasks = [
        asyncio.create_task(publisher(pods, stop, published)),
        asyncio.create_task(leader_watch(pods, stop, leaders)),
    ]
    handoffs: list[dict[str, Any]] = []
    try:
        await asyncio.sleep(2)
        for name in names:  # the rolling update
            old = pods.pods[name]
            leader_before = leaders[-1][1] if leaders else None
            sigterm_at = time.monotonic()
            code, took = await asyncio.to_thread(old.stop)
            assert code == 0, old.proc.stderr_tail()
            if leader_before and leader_before["instance_id"].startswith(name + "-"):
                handoffs.append(await handoff_after(leaders, leader_before, sigterm_at, name, took))
            new = pods.start(name)
            await new.wait_ready()
            pods.check_runs_the_image_cmd(new)
            await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*tasks)
        ids = [event_id for event_id, _ in published]
        with contextlib.suppress(AssertionError):  # the check below says what is missing
            await wait_until(
                lambda: all(len(c.messages()) >= len(ids) for c in clients),
                20,
                "every client to catch up",
            )
        async with httpx.AsyncClient(timeout=5) as http:
            port = pods.live_ports()[0]
            url = f"http://{HOST}:{port}/api/jobs/runs?limit=1000"
            runs = (await http.get(url)).json()
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.stop() for c in clients))
        for pod in pods.pods.values():
            if pod.proc.alive:
                pod.stop()

    # Every client received every event exactly once, in order, across reconnects.
    for client in clients:
        got = client.messages()
        assert got == ids, (len(got), len(ids), client.reconnects)
        assert "reset" not in {kind for kind, _ in client.entries}  # nothing was lost
        assert client.reconnects >= 1  # each was cut at least once by the roll

    # One leader at a time: tokens only go up, and each token belongs to one instance.
    owners: dict[int, str] = {}
    tokens = [info["fencing_token"] for _, info in leaders if info]
    assert tokens == sorted(tokens)
    for _, info in leaders:
        if info:
            assert (
                owners.setdefault(info["fencing_token"], info["instance_id"]) == info["instance_id"]
            )
    assert len(owners) >= 2 and handoffs, "the roll should have moved leadership"

    # Every scheduled fire ran once; the 0.5 s schedule has no hole that was not recorded.
    fires = [(r["job_id"], r["scheduled_at"]) for r in runs]
    assert len(fires) == len(set(fires)), "a fire ran twice"
    collect = sorted(
        datetime.fromisoformat(r["scheduled_at"]) for r in runs if r["job_id"] == "collect-metrics"
    )
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(collect)]
    assert gaps and all(abs(g - 0.5) < 0.01 for g in gaps), gaps
    by_token: dict[int, list[str]] = {}
    for r in runs:
        by_token.setdefault(r["fencing_token"], []).append(r["started_at"])
    spans = sorted((min(v), max(v), t) for t, v in by_token.items())
    for (_, end, t1), (start, _, t2) in itertools.pairwise(spans):
        assert end <= start and t1 < t2, spans  # terms never interleave

    report = {
        "handoffs": handoffs,
        "events": len(ids),
        "fires": len(fires),
        "reconnects": [c.reconnects for c in clients],
    }
    out = ROOT / "test-output"
    out.mkdir(exist_ok=True)
    (out / "rolling-update.json").write_text(json.dumps(report, indent=2))
    print("\nrolling update:", json.dumps(report))


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def handoff_after(
    leaders: list[tuple[float, Any]],
    before: dict[str, Any],
    sigterm_at: float,
    pod: str,
    shutdown_s: float,
) -> dict[str, Any]:
    """When did a new term appear after the old leader's pod got SIGTERM?"""
    deadline = time.monotonic() + 15
    while True:
        for t, info in leaders:
            if t >= sigterm_at and info and info["fencing_token"] > before["fencing_token"]:
                gone = [
                    t2
                    for t2, i in leaders
                    if t2 >= sigterm_at and (not i or i["fencing_token"] != before["fencing_token"])
                ]
                return {
                    "pod": pod,
                    "sigterm_to_new_leader_ms": round((t - sigterm_at) * 1000),
                    "old_lease_gone_to_new_leader_ms": round((t - gone[0]) * 1000),
                    "pod_shutdown_s": round(shutdown_s, 2),
                }
        assert time.monotonic() < deadline, "no new leader after the leader's pod stopped"
        await asyncio.sleep(0.05)

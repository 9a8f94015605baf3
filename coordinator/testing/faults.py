"""Network faults between a process and Redis, for tests: a small TCP proxy.

:class:`TcpProxy` listens on a free port of 127.0.0.1 and forwards every
connection to a target (a redis-server). Point the processes under test at
:attr:`TcpProxy.url` instead of the server, then, from the test:

- :meth:`TcpProxy.delay` adds latency to every chunk, both ways;
- :meth:`TcpProxy.blackhole` stops forwarding: bytes already sent wait in the
  proxy, new connections are accepted and never answered (a network partition
  as TCP sees it: no reset, no reply);
- :meth:`TcpProxy.heal` forwards again, held bytes first (a late packet that
  reaches Redis after the partition, the case fencing exists for);
- :meth:`TcpProxy.cut` closes every open connection at once (both sides).

It runs its own asyncio loop in a daemon thread, so a synchronous test can
drive it while child processes use it. In the style of redis-py's test
``DelayProxy``; no external tool is needed. Not for production traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_CHUNK = 65536


class _Link:
    """One proxied connection: the client's socket and, once connected, the target's."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.writers: list[asyncio.StreamWriter] = [client]
        self.tasks: list[asyncio.Task[None]] = []

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for writer in self.writers:
            with contextlib.suppress(Exception):
                writer.transport.abort()  # RST-like: the peer sees the cut at once


class TcpProxy:
    """A controllable TCP proxy to ``target_host:target_port`` (see the module doc).

    ``start()`` returns once it listens; ``stop()`` closes everything. All
    methods are thread-safe and return after the change took effect.
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.connections = 0
        """Connections accepted since start (for tests)."""
        self._delay = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._links: set[_Link] = set()

    @property
    def url(self) -> str:
        """``redis://host:port/0`` of the proxy."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def blackholed(self) -> bool:
        return self._flowing is not None and not self._flowing.is_set()

    @property
    def open_connections(self) -> int:
        return len(self._links)

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> TcpProxy:
        if self._thread is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name=f"TcpProxy->{self.target[1]}"
        )
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults -------------------------------------------------------------------
    def delay(self, seconds: float) -> None:
        """Hold every chunk ``seconds`` before forwarding it (0 turns delay off)."""
        self._delay = max(0.0, seconds)

    def blackhole(self) -> None:
        """Stop forwarding in both directions; accept new connections, answer nothing."""
        self._call(self._set_flowing(False))

    def heal(self, cut: bool = False) -> None:
        """Forward again (held bytes first); with ``cut=True`` close the held connections
        instead, so only new connections carry traffic."""
        if cut:
            self.cut()
        self._call(self._set_flowing(True))

    def cut(self) -> int:
        """Close every open connection now; returns how many were closed."""
        return self._call(self._cut())

    def retarget(self, host: str, port: int) -> None:
        """Send new connections to another server (open ones are not moved)."""
        self.target = (host, port)

    # -- internals ----------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None, "TcpProxy is not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, self.host, self.port or 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _set_flowing(self, on: bool) -> None:
        assert self._flowing is not None
        if on:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _cut(self) -> int:
        links = list(self._links)
        for link in links:
            link.close()
        self._links.clear()
        return len(links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            assert self._flowing is not None
            await self._flowing.wait()  # blackholed: accepted, never connected upstream
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            link.writers.append(up_writer)
            if link not in self._links:  # cut while connecting
                link.close()
                return
            link.tasks = [
                asyncio.ensure_future(self._pipe(reader, up_writer)),
                asyncio.ensure_future(self._pipe(up_reader, writer)),
            ]
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            link.close()
            self._links.discard(link)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        with contextlib.suppress(OSError):
            while data := await reader.read(_CHUNK):
                if self._delay:
                    await asyncio.sleep(self._delay)
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()

"""Many idle SSE streams on real uvicorn workers: they stay open, all receive a
broadcast, leave no task or file descriptor behind, and end cleanly on shutdown.

2,000 streams over 2 workers of the relay app, opened by raw sockets from this
process. Per worker, ``/relay/stats`` reports its open relay streams, asyncio
tasks and file descriptors (``/proc/self/fd``). A stream costs one task (the
request's own) and one socket; nothing more may grow with the streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import time
import uuid
from typing import Any

import pytest

from .support.app_cluster import HOST, AppCluster

STREAMS = 2000
WORKERS = 2
SLACK = 8  # tasks or fds a worker may open for its own reasons meanwhile (a publish, a stat)
PATH = "/api/channels/idle/events"


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files (RLIMIT_NOFILE hard limit is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))  # inherited by uvicorn


class RawStream:
    """One SSE stream over a raw socket: the bytes as they come, nothing parsed."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.ended = False  # the server sent the final chunk, or closed the socket
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self, port: int) -> None:
        self._reader, self._writer = await asyncio.open_connection(HOST, port)
        request = f"GET {PATH} HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n\r\n"
        self._writer.write(request.encode())
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._reader is not None
        with contextlib.suppress(ConnectionError):
            while chunk := await self._reader.read(65536):
                self.buffer += chunk
        self.ended = True

    def has(self, needle: bytes) -> bool:
        return needle in self.buffer

    @property
    def finished_cleanly(self) -> bool:
        """Ended with the chunked body's final ``0`` chunk."""
        return self.ended and self.buffer.endswith(b"0\r\n\r\n")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._task, 5)


async def wait_until(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def open_streams(port: int, n: int) -> list[RawStream]:
    streams: list[RawStream] = []
    for start in range(0, n, 250):  # in waves, so the accept queue is not overrun
        wave = [RawStream() for _ in range(min(250, n - start))]
        await asyncio.gather(*(s.open(port) for s in wave))
        streams += wave
        await wait_until(lambda w=wave: all(s.has(b"event: hello") for s in w), "hello", 60)
    return streams


async def worker_stats(cluster: AppCluster, until: Any = None) -> dict[str, dict[str, Any]]:
    return await cluster.stats(want=WORKERS, timeout=60, until=until)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_2000_idle_streams_get_a_broadcast_leak_nothing_and_end_on_shutdown(
    redis_url: str,
) -> None:
    _raise_fd_limit(STREAMS * 2 + 1024)
    cluster = AppCluster(redis_url, f"idle{uuid.uuid4().hex[:8]}", workers=WORKERS)
    await cluster.wait_ready()
    streams: list[RawStream] = []
    try:
        before = await worker_stats(cluster, until=lambda s: s["open_streams"] == 0)

        streams = await open_streams(cluster.port, STREAMS)
        during = await worker_stats(cluster)
        deadline = time.monotonic() + 60
        while sum(s["open_streams"] for s in during.values()) != STREAMS:
            assert time.monotonic() < deadline, during
            during = await worker_stats(cluster)
        for instance, stats in during.items():
            base = before[instance]
            # One task per stream (the request's), one fd per stream (its socket): no more.
            assert stats["tasks"] - base["tasks"] <= stats["open_streams"] + SLACK, (base, stats)
            assert stats["fds"] - base["fds"] <= stats["open_streams"] + SLACK, (base, stats)

        publisher = (await cluster.publishers(1))[0]
        event_id, _ = await cluster.publish(publisher, "idle", {"to": "everyone"})
        await publisher.aclose()
        marker = f"id: {event_id}\n".encode()
        await wait_until(lambda: all(s.has(marker) for s in streams), "the broadcast", 60)
        assert not any(s.ended for s in streams)

        for stream in streams:  # every client leaves
            await stream.close()
        streams = []
        await worker_stats(
            cluster,
            until=lambda s: (
                s["open_streams"] == 0
                and s["tasks"] <= before[s["instance_id"]]["tasks"] + SLACK
                and s["fds"] <= before[s["instance_id"]]["fds"] + SLACK
            ),
        )

        streams = await open_streams(cluster.port, 500)
        code, took = cluster.stop()
        assert code == 0, cluster.proc.stderr_tail(2000)
        await wait_until(lambda: all(s.ended for s in streams), "streams ended", 30)
        assert all(s.finished_cleanly for s in streams)
        assert took < 15, f"uvicorn took {took:.1f}s to stop with 500 open streams"
        assert "Traceback" not in cluster.proc.stderr_tail(4000)
    finally:
        for stream in streams:
            await stream.close()
        cluster.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_client_that_stops_reading_does_not_hold_up_shutdown(redis_url: str) -> None:
    """At shutdown a stream whose client stopped reading gives up its queued frames
    after a grace second: its request task ends, so uvicorn cancels nothing, and the
    other streams finish at once.

    Its socket is another matter: uvicorn closes it with unsent bytes, which waits
    for the client, so uvicorn itself exits at ``--timeout-graceful-shutdown``
    (AppCluster: 20 s). ASGI gives an app no way to abort a connection.
    """
    # A queue long enough that the stuck client is never cut for falling behind: at
    # shutdown its stream has a write blocked on a full socket and frames still queued.
    env = {"COORDINATOR_RELAY_CLIENT_QUEUE": "100000"}
    cluster = AppCluster(redis_url, f"stuck{uuid.uuid4().hex[:8]}", workers=2, env=env)
    await cluster.wait_ready()
    reader_, writer_ = await asyncio.open_connection(HOST, cluster.port)
    reading = RawStream()
    try:
        writer_.write(f"GET {PATH} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        head = b""
        while b"event: hello" not in head:  # then it never reads again
            head += await asyncio.wait_for(reader_.read(4096), 30)
        await reading.open(cluster.port)
        await wait_until(lambda: reading.has(b"event: hello"), "hello")

        publisher = (await cluster.publishers(1))[0]
        payload = "x" * 32_000
        last = ""
        for _ in range(700):  # 22 MB: more than the kernel buffers between the two ends
            last, _ = await cluster.publish(publisher, "idle", payload)
        await publisher.aclose()
        await wait_until(lambda: reading.has(f"id: {last}\n".encode()), "the reader got all", 60)

        stopping = asyncio.create_task(asyncio.to_thread(cluster.stop, 60))
        started = time.monotonic()
        await wait_until(lambda: reading.finished_cleanly, "the reading stream's final chunk")
        assert time.monotonic() - started < 5, "a healthy stream waited for a stuck one"
        code, _ = await stopping
        assert code == 0, cluster.proc.stderr_tail(2000)
        tail = cluster.proc.stderr_tail(4000)
        assert not re.search(r"Cancel [1-9]\d* running task", tail), tail
        assert "Traceback" not in tail
    finally:
        writer_.close()
        await reading.close()
        cluster.stop()

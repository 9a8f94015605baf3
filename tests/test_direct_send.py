"""Relay stream bodies past pass-through send wrappers (coordinator.web.direct_send).

The shortcut is on only when everything between DirectStreamWrites and the router
is known to pass body messages through; a middleware the user added outside sees
every chunk, and one added inside turns the shortcut off. Checked on the real
middleware stacks FastAPI builds; in process, that a stream's body really skips a
known inner layer and only where it was checked (not in a mounted app); and end to
end on a real uvicorn worker and Redis: a recording middleware sees exactly the
frames the client got, in order.

Past the middleware, chunks go straight to uvicorn's transport
(coordinator.web.transport_send) only on httptools with nothing wrapping ``send``,
framed as uvicorn frames them; a client that stops reading makes them wait in
``send`` and the queue, then gets every event, or is cut off at the queue's limit.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Host, Mount, Route, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator import Coordinator, CoordinatorSettings
from coordinator.relay.events import EventId, parse_event_id
from coordinator.relay.subscription import Subscription
from coordinator.testing import async_wait_until
from coordinator.web import direct_send
from coordinator.web.direct_send import DirectStreamWrites, first_blocker, stream_send
from coordinator.web.stream import ChannelEventResponse

from .support.app_cluster import HOST, AppCluster
from .support.sse_client import SSEClient


class UserMiddleware:
    """A middleware the shortcut knows nothing about."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def shortcut_on(build: Callable[[FastAPI, Coordinator], None]) -> bool:
    """Whether DirectStreamWrites, in the stack FastAPI builds, takes the shortcut."""
    coordinator = Coordinator(CoordinatorSettings(redis_url="redis://127.0.0.1:1/0"))
    app = FastAPI(lifespan=coordinator.lifespan)
    build(app, coordinator)
    layer: object = app.build_middleware_stack()
    while not isinstance(layer, DirectStreamWrites):
        layer = getattr(layer, "app")  # noqa: B009 - every layer above it has one
    return first_blocker(layer.app) is None


def test_shortcut_on_with_install_alone_and_with_sessions() -> None:
    assert shortcut_on(lambda app, c: c.install(app))
    assert shortcut_on(lambda app, c: c.install(app, sessions=True))


def test_user_middleware_outside_keeps_it_inside_turns_it_off() -> None:
    def outside(app: FastAPI, c: Coordinator) -> None:
        c.install(app, sessions=True)
        app.add_middleware(UserMiddleware)

    def inside(app: FastAPI, c: Coordinator) -> None:
        app.add_middleware(UserMiddleware)
        c.install(app, sessions=True)

    assert shortcut_on(outside)
    assert not shortcut_on(inside)


async def stream_through(
    app: AppCluster, events: int = 30, stats: str = "/recorded"
) -> tuple[SSEClient, dict[str, Any]]:
    """Start ``app`` (``tests.support.recorded_app``, or with ``stats="/relay/stats"``
    ``tests.support.relay_app``), open one stream, publish ``events`` events and wait
    for them; returns the client and ``GET stats`` (asked while the stream is still
    open)."""
    async with app.running(exit_codes=(0, -15)):
        client = await SSEClient(HOST, app.port, "/api/channels/rec/events").connect()
        assert client.status == 200, client.body
        client.start()
        try:
            (publisher,) = await app.publishers(1)
            for seq in range(events):
                await app.publish(publisher, "rec", {"seq": seq})
            await publisher.aclose()
            await async_wait_until(
                lambda: len(client.of("message")) >= events, timeout=30, message="all events"
            )
            recorded = (await app.get(stats)).json()
        finally:
            await client.close()
    assert [m.json()["seq"] for m in client.of("message")] == list(range(events))
    return client, recorded


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("place", "direct"), [("outside", True), ("inside", False)])
async def test_a_recording_middleware_sees_every_frame_the_client_gets(
    redis_url: str, namespace: str, place: str, direct: bool
) -> None:
    app = AppCluster(
        redis_url,
        namespace,
        workers=1,
        app="tests.support.recorded_app:app",
        env={"RECORDER": place, "COORDINATOR_SSE_PING_S": "60"},
    )
    client, recorded = await stream_through(app)
    assert recorded["direct"] is direct
    assert recorded["transport_streams"] == 0  # a wrapper outside the app's own: send it is
    body = recorded["body"]
    assert re.findall(r"^id: (\S+)$", body, re.M) == [m.id for m in client.messages if m.id]
    assert re.findall(r"^data: (.*)$", body, re.M) == [m.data for m in client.messages]
    assert body.startswith("retry: ")  # the stream's first bytes, also seen


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("uvicorn_args", "transport"),
    [
        (("--http", "httptools"), 1),
        (("--http", "h11"), 0),  # not a server whose state transport_send knows
        (("--http", "httptools", "--log-level", "trace"), 0),  # uvicorn wraps send to log
    ],
)
async def test_chunks_go_straight_to_uvicorns_transport_only_where_nothing_wraps_send(
    redis_url: str, namespace: str, uvicorn_args: tuple[str, ...], transport: int
) -> None:
    """The demo's stack on a real uvicorn worker: the stream writes its chunks to the
    transport on httptools with nothing around the app, and takes ``send`` otherwise;
    either way the client parses every event, in order, with its id."""
    app = AppCluster(
        redis_url,
        namespace,
        workers=1,
        app="tests.support.recorded_app:app",
        env={"RECORDER": "none", "COORDINATOR_SSE_PING_S": "60"},
        uvicorn_args=uvicorn_args,
    )
    client, recorded = await stream_through(app, events=200)
    assert recorded["transport_streams"] == transport
    ids = [parse_event_id(m.id) for m in client.of("message") if m.id]
    assert len(ids) == 200 and ids == sorted(ids)
    assert client.of("hello"), "the hello event comes first, as always"


@pytest.mark.parametrize(("direct_writes", "transport"), [("1", 1), ("0", 0)])
async def test_the_router_alone_takes_both_shortcuts_with_the_middleware_only(
    redis_url: str, namespace: str, direct_writes: str, transport: int
) -> None:
    """``channel_router`` in a plain FastAPI app, on a real uvicorn worker (httptools):
    with ``app.add_middleware(DirectStreamWrites)``, as the README shows, the stream
    writes to uvicorn's transport; without it, the route's own ``send`` wrapper is in
    the way and every chunk goes through ``send``. Every event arrives either way."""
    app = AppCluster(
        redis_url,
        namespace,
        workers=1,
        env={"RELAY_DIRECT_WRITES": direct_writes, "COORDINATOR_SSE_PING_S": "60"},
    )
    client, stats = await stream_through(app, events=50, stats="/relay/stats")
    assert stats["open_streams"] == 1
    assert stats["transport_streams"] == transport
    ids = [parse_event_id(m.id) for m in client.of("message") if m.id]
    assert len(ids) == 50 and ids == sorted(ids)


class Recording:
    """Passes everything on; notes each message it passes (type, body, more_body)."""

    def __init__(self, app: ASGIApp, log: list[tuple[str, bytes, bool]]) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def recording(message: Message) -> None:
            body = message.get("body", b"")
            self.log.append((message["type"], body, bool(message.get("more_body"))))
            await send(message)

        await self.app(scope, receive, recording)


class InnerRecording(Recording):
    """The same, as a middleware the test declares pass-through."""


FRAMES = [b"id: %d-0\ndata: %d\n\n" % (n, n) for n in range(1, 6)]
SETTINGS = CoordinatorSettings(redis_url="redis://127.0.0.1:1/0")


async def stream_endpoint(request: Request) -> ChannelEventResponse:
    """A stream of FRAMES that ends after writing them."""
    sub = Subscription("c", 100)
    sub.go_live()
    for n, frame in enumerate(FRAMES, 1):
        sub.push(EventId(n, 0), frame)
    sub.close("shutdown")  # ends after writing what is queued
    return ChannelEventResponse(sub, SETTINGS)


def stream_route(app: FastAPI) -> None:
    app.add_route("/stream", stream_endpoint)


async def get(app: ASGIApp, path: str) -> bytes:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get(path)
        assert response.status_code == 200, response.text
        return response.content


@pytest.mark.parametrize("known", [True, False])
async def test_the_body_skips_a_known_inner_layer_and_only_a_known_one(
    monkeypatch: pytest.MonkeyPatch, known: bool
) -> None:
    name = f"{InnerRecording.__module__}.{InnerRecording.__qualname__}"
    if known:
        monkeypatch.setattr(direct_send, "PASS_THROUGH", direct_send.PASS_THROUGH | {name})
    inner: list[tuple[str, bytes, bool]] = []
    outer: list[tuple[str, bytes, bool]] = []
    app = FastAPI()
    stream_route(app)
    app.add_middleware(InnerRecording, log=inner)
    app.add_middleware(DirectStreamWrites)
    app.add_middleware(Recording, log=outer)
    received = await get(app, "/stream")
    assert received.endswith(b"".join(FRAMES)) and b"event: hello" in received
    body = [m for m in outer if m[0] == "http.response.body"]
    assert b"".join(m[1] for m in body) == received  # outside: every chunk, in order
    assert body[-1] == ("http.response.body", b"", False)  # and the end
    assert outer[0][0] == inner[0][0] == "http.response.start"  # the start: everyone
    assert inner[1:] == ([] if known else outer[1:])


def recording_sub_app(log: list[tuple[str, bytes, bool]]) -> FastAPI:
    sub_app = FastAPI()
    stream_route(sub_app)
    sub_app.add_middleware(Recording, log=log)
    return sub_app


def routes_mount(path: str, log: list[tuple[str, bytes, bool]]) -> Mount:
    """The stream's route, mounted at ``path`` with a recording middleware of its own."""
    return Mount(
        path,
        routes=[Route("/stream", stream_endpoint)],
        middleware=[Middleware(Recording, log=log)],
    )


MOUNTS: dict[str, Callable[[list[tuple[str, bytes, bool]]], tuple[list[BaseRoute], str]]] = {
    # another app and another mount point
    "app at /sub": lambda log: (
        [Mount("/sub", app=recording_sub_app(log))],
        "/sub/stream",
    ),
    # the same app (scope["app"]), another mount point (root_path)
    "routes at /sub": lambda log: ([routes_mount("/sub", log)], "/sub/stream"),
    # another app, the same mount point
    'app at ""': lambda log: ([Mount("", app=recording_sub_app(log))], "/stream"),
    # neither changes: the check must see the Mount's middleware
    'routes at ""': lambda log: ([routes_mount("", log)], "/stream"),
    "host": lambda log: (
        [
            Host(
                "test",
                app=Router(
                    routes=[Route("/stream", stream_endpoint)],
                    middleware=[Middleware(Recording, log=log)],
                ),
            )
        ],
        "/stream",
    ),
}


@pytest.mark.parametrize("mount", list(MOUNTS))
async def test_middleware_below_a_mount_or_host_sees_every_chunk(mount: str) -> None:
    """DirectStreamWrites checks its own app; below it, middleware of a mounted app,
    a Mount or a Host router still sees every chunk (the stream takes the full chain)."""
    log: list[tuple[str, bytes, bool]] = []
    routes, path = MOUNTS[mount](log)
    outer = FastAPI(routes=routes)
    outer.add_middleware(DirectStreamWrites)
    received = await get(outer, path)
    assert received.endswith(b"".join(FRAMES))
    assert b"".join(m[1] for m in log if m[0] == "http.response.body") == received
    assert log[-1] == ("http.response.body", b"", False)


async def test_a_mounted_app_with_the_shortcut_off_ignores_the_outer_apps() -> None:
    """An outer app's DirectStreamWrites must not let streams skip the inner app's
    unknown middleware."""
    coordinator = Coordinator(SETTINGS)
    inner = FastAPI()
    inner.add_middleware(UserMiddleware)
    coordinator.install(inner)
    full_chain = object()

    @inner.get("/probe")
    async def probe(request: Request) -> dict[str, bool]:
        return {"direct": stream_send(request.scope, full_chain) is not full_chain}  # type: ignore[arg-type]

    outer = FastAPI()
    outer.mount("/inner", inner)
    outer.add_middleware(DirectStreamWrites)
    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/inner/probe")).json() == {"direct": False}


def test_a_routers_own_middleware_is_checked() -> None:
    unknown = f"{UserMiddleware.__module__}.{UserMiddleware.__qualname__}"
    assert first_blocker(Router([], middleware=[Middleware(UserMiddleware)])) == unknown
    assert first_blocker(Router([], middleware=[Middleware(CORSMiddleware)])) is None
    assert first_blocker(Router([])) is None


def bufferable_bytes() -> int:
    """More than the kernel can hold for one loopback connection: the largest send
    buffer, the largest receive buffer, and uvicorn's write high-water mark."""

    def largest(path: str) -> int:
        return int(Path(path).read_text().split()[2])

    return largest("/proc/sys/net/ipv4/tcp_wmem") + largest("/proc/sys/net/ipv4/tcp_rmem") + 2**17


def dechunk(raw: bytes) -> tuple[bytes, bytes, bool]:
    """Strictly decode the whole HTTP/1.1 chunks at the start of ``raw``: their bytes,
    what is left (a partial chunk), and whether the last chunk (size 0) came. A
    malformed chunk raises."""
    decoded = []
    while (end := raw.find(b"\r\n")) != -1:
        size = int(raw[:end], 16)
        if len(raw) < end + 2 + size + 2:
            break
        assert raw[end + 2 + size : end + 4 + size] == b"\r\n", "a chunk not ended by CRLF"
        decoded.append(raw[end + 2 : end + 2 + size])
        raw = raw[end + 4 + size :]
        if size == 0:
            return b"".join(decoded), raw, True
    return b"".join(decoded), raw, False


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("cut", [False, True], ids=["reads-later", "never-reads"])
async def test_a_client_that_stops_reading_gets_every_event_in_order_or_is_cut_off(
    redis_url: str, namespace: str, cut: bool
) -> None:
    """Straight transport writes and ``send`` mixed: while the client does not read,
    the kernel's buffers fill, uvicorn pauses writing, and the stream's chunks wait in
    ``send`` and the subscription's queue. Once it reads, every event arrives, whole,
    once, in order, in well-formed chunks; with a short queue it was cut off instead:
    it gets a prefix of the events and no last chunk."""
    pad = "x" * 60_000
    events = -(-2 * bufferable_bytes() // len(pad))  # far more than fits in the buffers
    queue = 32 if cut else events + 100
    app = AppCluster(
        redis_url,
        namespace,
        workers=1,
        app="tests.support.recorded_app:app",
        env={
            "RECORDER": "none",
            "COORDINATOR_SSE_PING_S": "60",
            "COORDINATOR_RELAY_CLIENT_QUEUE": str(queue),
            "COORDINATOR_RELAY_HISTORY": str(events + 100),
        },
        uvicorn_args=("--http", "httptools"),
    )
    path = "/api/channels/paused/events"
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    async with app.running(exit_codes=(0, -15)):
        try:
            sock.connect((HOST, app.port))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)  # the head only; the body waits
            assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head

            async def recorded() -> dict[str, Any]:
                return dict((await app.get("/recorded")).json())

            async def writes_to_the_transport() -> bool:
                return (await recorded())["transport_streams"] == 1

            await async_wait_until(writes_to_the_transport, timeout=10, message="no stream")
            (publisher,) = await app.publishers(1)
            for seq in range(events):
                await app.publish(publisher, "paused", {"seq": seq, "pad": pad})
            await publisher.aclose()

            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            raw, text, seqs, ended, eof = b"", b"", [], False, False
            async with asyncio.timeout(60):
                while len(seqs) < events and not eof:
                    received = await loop.sock_recv(sock, 1 << 20)
                    eof = not received
                    decoded, raw, last = dechunk(raw + received)
                    ended = ended or last
                    *blocks, text = (text + decoded).split(b"\n\n")
                    for block in blocks:
                        if block.startswith(b"id: ") and b"\nevent: message\n" in block:
                            data = json.loads(block.split(b"\ndata: ", 1)[1])
                            assert data["pad"] == pad
                            seqs.append(data["seq"])
            assert not ended, "a client cut off gets no last chunk; one reading is not ended"
            if cut:
                assert eof and 0 < len(seqs) < events, (len(seqs), events)
                assert seqs == list(range(len(seqs)))
                assert (await recorded())["open_streams"] == 0
            else:
                assert seqs == list(range(events))
                assert (await recorded())["open_streams"] == 1  # never cut off
        finally:
            sock.close()

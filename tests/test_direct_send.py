"""Relay stream bodies past pass-through send wrappers (coordinator.web.direct_send).

The shortcut is on only when everything between DirectStreamWrites and the router
is known to pass body messages through; a middleware the user added outside sees
every chunk, and one added inside turns the shortcut off. Checked on the real
middleware stacks FastAPI builds; in process, that a stream's body really skips a
known inner layer and only where it was checked (not in a mounted app); and end to
end on a real uvicorn worker and Redis: a recording middleware sees exactly the
frames the client got, in order.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Host, Mount, Route, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator import Coordinator, CoordinatorSettings
from coordinator.relay.events import EventId
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
    async with app.running(exit_codes=(0, -15)):
        client = await SSEClient(HOST, app.port, "/api/channels/rec/events").connect()
        assert client.status == 200, client.body
        client.start()
        try:
            (publisher,) = await app.publishers(1)
            for seq in range(30):
                await app.publish(publisher, "rec", {"seq": seq})
            await publisher.aclose()
            await async_wait_until(
                lambda: len(client.of("message")) >= 30, timeout=30, message="30 events"
            )
            recorded = (await app.get("/recorded")).json()
        finally:
            await client.close()
    assert [m.json()["seq"] for m in client.of("message")] == list(range(30))
    assert recorded["direct"] is direct
    body = recorded["body"]
    assert re.findall(r"^id: (\S+)$", body, re.M) == [m.id for m in client.messages if m.id]
    assert re.findall(r"^data: (.*)$", body, re.M) == [m.data for m in client.messages]
    assert body.startswith("retry: ")  # the stream's first bytes, also seen


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

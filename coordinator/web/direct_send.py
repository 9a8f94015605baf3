"""Relay stream bodies past the send wrappers that only watch for the response start.

Under ASGI every body message a response sends passes through the ``send``
wrapper of each middleware between it and the server. For a relay stream that
is one pass per client per event. In the demo (``Coordinator.install(app,
sessions=True)``) five wrappers sit there: the route's and the exception
middleware's (Starlette), starsessions', the session-store guard's and the
server-error middleware's. All five only note ``http.response.start``; for body
messages they pass the message on unchanged. Skipping the four inside
:class:`DirectStreamWrites` cut the workers' CPU per delivered event by about 7%
(median 29.7 against 31.9 us at 1,000 streams over 4 workers; 4-15% in each
of three alternating pairs; ``bench/README.md``).

:class:`DirectStreamWrites` sits outside those middleware and puts the ``send``
it was given into the request's scope (:data:`STREAM_SEND`), with the app and
mount point it checked. :class:`~coordinator.web.stream.ChannelEventResponse`
sends its response start through the full chain, as any response does (so
cookies, headers and the exception handlers see it), then sends its body chunks
to that ``send`` (:func:`stream_send`).

Guarantees:

- Only wrappers known to pass body messages through unchanged are skipped:
  everything between this middleware and the router, and the router's own
  middleware, must be one of :data:`PASS_THROUGH` (checked once, on the first
  request; Starlette builds an app's middleware stack once). Anything else there
  turns the shortcut off for the whole app, logged once at INFO: a user's
  middleware added before ``Coordinator.install``, and any passed as
  ``FastAPI(middleware=[...])``, which is always inside. Every chunk then takes
  the full chain.
- A stream uses the ``send`` only in the app and at the mount point that were
  checked: below a ``Mount`` of another path, or in another Starlette app
  mounted below, it takes the full chain (an app mounted below with its own
  ``Coordinator.install`` has its own shortcut). Routes that keep both (``Host``,
  ``Mount("")`` of a router) are checked with the rest: middleware there that is
  not known turns the shortcut off.
- Middleware added outside it (after ``Coordinator.install``) sees every chunk:
  :mod:`coordinator.web.transport_send` steps aside when anything but
  Starlette's own server-error middleware wraps uvicorn's ``send``. That
  server-error middleware sees the response start, and the chunks that go
  through ``send``; live chunks written straight to uvicorn's transport pass it
  by (it only notes whether the response has started).
- Only relay streams use the shortcut; every other response is unaffected.

Limits: the route's own wrapper is Starlette's (FastAPI's routes use the same
code); a route that wraps ``send`` itself (Starlette's ``Route(middleware=...)``,
a custom route class) is not detected: return a ``ChannelEventResponse`` from
such a route only in an app without this middleware.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Host, Mount, Router
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("coordinator.relay")

STREAM_SEND = "coordinator.stream_send"
"""Scope key: ``(send, app, root_path)``, the ``send`` a relay stream may use for its
body chunks in that app at that mount point."""

PASS_THROUGH = frozenset(
    {
        "starlette.middleware.exceptions.ExceptionMiddleware",
        "fastapi.middleware.asyncexitstack.AsyncExitStackMiddleware",
        "starlette.middleware.cors.CORSMiddleware",
        "starlette.middleware.trustedhost.TrustedHostMiddleware",
        "starlette.middleware.httpsredirect.HTTPSRedirectMiddleware",
        "starlette.middleware.sessions.SessionMiddleware",
        "starsessions.middleware.SessionMiddleware",
        "starsessions.middleware.SessionAutoloadMiddleware",
        "coordinator.web.sessions._SessionStoreErrors",
        # a router's body size limit (FastAPI(max_body_size=...)): acts on requests only
        "starlette.middleware.body_limit.RequestBodyLimitMiddleware",
        "fastapi._body_limit._BodyLimitExceptionMiddleware",
    }
)
"""Middleware whose ``send`` wrapper (if any) passes body messages on unchanged."""


class DirectStreamWrites:
    """ASGI middleware: lets relay streams under it send body chunks past the
    pass-through middleware inside it (module doc). ``Coordinator.install`` adds it;
    an app that serves :func:`~coordinator.channel_router` without ``Coordinator``
    adds it itself (``app.add_middleware(DirectStreamWrites)``, after its own
    middleware). Without it, a stream's chunks pass every wrapper and uvicorn's
    ``send`` (:mod:`coordinator.web.transport_send` needs uvicorn's own ``send``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._direct: bool | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self._direct is None:
                blocker = first_blocker(self.app)
                self._direct = blocker is None
                if blocker is not None:
                    logger.info(
                        "relay streams take every middleware's send: %s is not known to pass "
                        "response bodies through (a middleware of your own keeps the shortcut "
                        "if added after Coordinator.install; coordinator.web.direct_send)",
                        blocker,
                    )
            if self._direct:
                scope[STREAM_SEND] = (send, scope.get("app"), scope.get("root_path"))
        await self.app(scope, receive, send)


def stream_send(scope: Scope, send: Send) -> Send:
    """The ``send`` for a relay stream's body chunks: the one :class:`DirectStreamWrites`
    offered, if it checked this app at this mount point; else ``send``."""
    offered: tuple[Send, Any, Any] | None = scope.get(STREAM_SEND)
    if offered is None:
        return send
    direct, app, root_path = offered
    if scope.get("app") is not app or scope.get("root_path") != root_path:
        return send  # a mounted app below the one that was checked
    return direct


def first_blocker(app: ASGIApp) -> str | None:
    """The first layer that is not in :data:`PASS_THROUGH` on the way from ``app`` to
    the routes: down to the router, the router's own middleware, and, through routes
    that keep the app and mount point (``Host``, ``Mount("")`` of a router), the same
    again below them; ``None`` if there is none."""
    blocker, router = _first_unknown(app, lambda layer: isinstance(layer, Router))
    if blocker is not None:
        return blocker
    assert isinstance(router, Router)
    stack = getattr(router, "middleware_stack", router.app)  # Router(middleware=...), a limit
    blocker, _ = _first_unknown(stack, lambda layer: layer == router.app)
    if blocker is not None:
        return blocker
    for route in router.routes:
        below = _same_scope_app(route)
        blocker = first_blocker(below) if below is not None else None
        if blocker is not None:
            return blocker
    return None


def _first_unknown(layer: object, end: Callable[[object], bool]) -> tuple[str | None, object]:
    """Follow ``.app`` from ``layer`` until ``end(layer)``: the first layer on the way
    not in :data:`PASS_THROUGH` (``None`` if none), and where the walk stopped."""
    while not end(layer):
        if (name := _name(layer)) not in PASS_THROUGH:
            return name, layer
        layer = getattr(layer, "app", None)
    return None, layer


def _same_scope_app(route: BaseRoute) -> ASGIApp | None:
    """The app below ``route`` if a stream there would see the same ``app`` and
    ``root_path`` in its scope as the router does (so :func:`stream_send` could not
    tell it is below more middleware); ``None`` if not."""
    if isinstance(route, Host) or (isinstance(route, Mount) and route.path == ""):
        below: ASGIApp = route.app
        return None if isinstance(below, Starlette) else below
    return None


def _name(layer: object) -> str:
    kind = type(layer)
    return f"{kind.__module__}.{kind.__qualname__}"

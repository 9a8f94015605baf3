"""Sessions in Redis, through starsessions, on the coordinator's connection and namespace.

::

    coordinator.install(app, sessions=True)      # or install_sessions(app, redis, settings)

    @app.post("/login")
    async def login(request: Request) -> dict[str, str]:
        ...                                       # check the credentials first
        await begin_session(request, {"user": name})   # new session id, old one deleted
        return {"user": name}

    @app.get("/me")
    async def me(request: Request) -> dict[str, Any]:
        data = await session_data(request)       # None without a live session
        ...

Why starsessions: it is maintained (2.2.1; a security-hardening 2.3 in
pre-release), async end to end, and its ``RedisStore`` takes a
``redis.asyncio`` client, so sessions use the coordinator's client (one pool, the
same TLS, Sentinel and ACL setup) and its key namespace. Its data lives on the
server, so logout ends a session everywhere, which a signed-cookie session
(Starlette's own ``SessionMiddleware``) cannot do; ``fastapi-sessions`` ships
no Redis backend (you write it), and the small Redis session packages take a
URL and build their own client. Nothing here stores a session by hand: reads,
writes, expiry and the cookie are starsessions'.

What this module adds around it:

- Cookie ``HttpOnly``, ``SameSite=Lax``, ``Secure`` when ``session_cookie_secure``
  is set; lifetime ``session_lifetime_s`` from login (cookie ``Max-Age`` and
  Redis TTL alike), not extended by use.
- :func:`begin_session` rotates the session id at login and deletes the old
  session (starsessions 2.2's ``regenerate_session_id`` keeps the old key).
- A cookie that is not a session id this module could have issued (32 hex
  digits) is never looked up and never written back: a forged value cannot
  reach Redis or the ``Set-Cookie`` header. Stored data that is not a JSON
  object reads as no session.
- Redis unreachable while loading or saving a session is a ``503`` with
  ``Retry-After: 1``, never a ``500``.
- Sessions are loaded only where asked (:func:`session_data` and the other
  helpers, or ``autoload_paths``), so a request that does not use its session
  costs no Redis round trip.

Guarantees: a session written through one process is read by every process
(same Redis); logout deletes it in Redis, so no process accepts it afterwards.

Limits, said plainly: starsessions saves a loaded, non-empty session on every
response (one ``SET``); two concurrent requests of one session that both change
it race, the last save wins. A well-formed but unknown session id sent by a
client is kept as the id of data written without :func:`begin_session`
(starsessions' behaviour); log in through :func:`begin_session`, which always
issues a fresh id.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starsessions import (
    JsonSerializer,
    SessionAutoloadMiddleware,
    SessionMiddleware,
    generate_session_id,
    get_session_handler,
    is_loaded,
    load_session,
    regenerate_session_id,
)
from starsessions.stores.redis import RedisStore

from coordinator.errors import REDIS_UNREACHABLE
from coordinator.settings import CoordinatorSettings
from coordinator.store.connection import RedisClient
from coordinator.store.keys import Keys

SESSION_ID = re.compile(r"[0-9a-f]{32}")
"""What starsessions' ``generate_session_id`` issues (``secrets.token_hex(16)``)."""


class CoordinatorSessionStore(RedisStore):
    """starsessions' ``RedisStore`` on the coordinator's client and key namespace, that
    ignores session ids it could not have issued (see the module doc)."""

    def __init__(self, redis: RedisClient, settings: CoordinatorSettings) -> None:
        super().__init__(
            # Typed for Redis; a RedisCluster serves its single-key GET/SET/DEL the same.
            connection=redis,  # type: ignore[arg-type]
            prefix=Keys(settings.namespace).session_prefix(),
            gc_ttl=settings.session_lifetime_s,
        )

    async def read(self, session_id: str, lifetime: int) -> bytes:
        if not SESSION_ID.fullmatch(session_id):
            return b""
        return await super().read(session_id, lifetime)

    async def write(self, session_id: str, data: bytes, lifetime: int, ttl: int) -> str:
        if not SESSION_ID.fullmatch(session_id):
            session_id = generate_session_id()
        return await super().write(session_id, data, lifetime, ttl)

    async def remove(self, session_id: str) -> None:
        if SESSION_ID.fullmatch(session_id):
            await super().remove(session_id)


class _TolerantJsonSerializer(JsonSerializer):
    """Stored data that is not a JSON object reads as an empty session, not a 500."""

    def deserialize(self, data: bytes) -> dict[str, Any]:
        try:
            value = super().deserialize(data)
        except (ValueError, RecursionError):
            return {}
        return value if isinstance(value, dict) else {}


class _SessionStoreErrors:
    """Outside starsessions: Redis unreachable while it loads or saves a session, before
    the response has started, becomes a 503 instead of a 500."""

    def __init__(self, app: ASGIApp, headers: dict[str, str]) -> None:
        self.app = app
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True  # set before sending: a failed save happens inside send
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except REDIS_UNREACHABLE as exc:
            if started:
                raise
            response = unavailable(exc, self.headers)
            await response(scope, receive, send)


def unavailable(exc: BaseException, headers: dict[str, str]) -> Response:
    body = json.dumps({"detail": f"session store unreachable: {type(exc).__name__}: {exc}"})
    return Response(
        body,
        status_code=503,
        media_type="application/json",
        headers={**headers, "Retry-After": "1"},
    )


def install_sessions(
    app: FastAPI,
    redis: RedisClient,
    settings: CoordinatorSettings,
    *,
    autoload_paths: Sequence[str | re.Pattern[str]] = (),
    headers: dict[str, str] | None = None,
) -> CoordinatorSessionStore:
    """Add starsessions' middleware to ``app`` with the coordinator's Redis; returns the store.

    ``autoload_paths``: path patterns whose requests load their session before the
    route runs (``request.session`` is then ready); elsewhere use the helpers below,
    which load on demand. Call before the app starts serving.
    """
    store = CoordinatorSessionStore(redis, settings)
    if autoload_paths:
        app.add_middleware(SessionAutoloadMiddleware, paths=list(autoload_paths))
    app.add_middleware(
        SessionMiddleware,
        store=store,
        lifetime=settings.session_lifetime_s,
        rolling=False,
        cookie_name=settings.session_cookie_name,
        cookie_same_site="lax",
        cookie_https_only=settings.session_cookie_secure,
        cookie_path="/",
        serializer=_TolerantJsonSerializer(),
    )
    app.add_middleware(_SessionStoreErrors, headers=dict(headers or {}))
    app.state.coordinator_session_store = store
    app.state.coordinator_session_cookie = settings.session_cookie_name
    return store


async def load(request: Request) -> dict[str, Any]:
    """Load the request's session (once) and return it (``request.session``).

    Raises:
        HTTPException: 503 when Redis cannot be reached; 500-free.
        RuntimeError: sessions are not installed on this app.
    """
    if "session_handler" not in request.scope:
        raise RuntimeError("sessions are not installed: call install_sessions(app, ...) first")
    if not is_loaded(request):
        try:
            await load_session(request)
        except REDIS_UNREACHABLE as exc:
            # starsessions marks the session loaded before reading it: undo that, or the
            # response would try to save a session that was never read.
            get_session_handler(request).is_loaded = False
            raise HTTPException(
                503,
                f"session store unreachable: {type(exc).__name__}",
                headers={"Retry-After": "1"},
            ) from None
    return request.session


async def session_data(request: Request) -> dict[str, Any] | None:
    """The live session's data, or ``None`` (no cookie, expired, logged out, forged)."""
    data = await load(request)
    return dict(data) if data else None


async def begin_session(request: Request, data: dict[str, Any]) -> None:
    """Start a new session holding ``data`` (log in): a new id, the old session (if any)
    deleted from Redis, the lifetime counted from now. The cookie is set on the response.

    Raises:
        ValueError: ``data`` is empty (an empty session is never stored).
        HTTPException: 503 when Redis cannot be reached.
    """
    if not data:
        raise ValueError("a session needs some data")
    await load(request)
    handler = get_session_handler(request)
    if handler.session_id:
        try:
            await handler.store.remove(handler.session_id)
        except REDIS_UNREACHABLE as exc:
            raise HTTPException(
                503,
                f"session store unreachable: {type(exc).__name__}",
                headers={"Retry-After": "1"},
            ) from None
    regenerate_session_id(request)
    now = time.time()
    handler.metadata = {"lifetime": handler.lifetime, "created": now, "last_access": now}
    request.session.clear()
    request.session.update(data)


async def end_session(request: Request, response: Response | None = None) -> None:
    """End the session (log out): deleted from Redis as the response is sent, so no
    process accepts it afterwards. With ``response``, a stale cookie is cleared too
    when there was no live session behind it."""
    data = await load(request)
    had_session = bool(data)
    data.clear()
    cookie = str(getattr(request.app.state, "coordinator_session_cookie", "session"))
    if response is not None and not had_session and cookie in request.cookies:
        response.delete_cookie(cookie, path="/", httponly=True, samesite="lax")

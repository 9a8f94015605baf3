"""Server-Sent Events for relay channels: the response, and a FastAPI router.

:func:`channel_router` gives the two endpoints of the HTTP contract:

- ``POST {prefix}/{channel}/events`` with ``{"event": "message", "data": <any JSON>}``:
  ``202 {"id": ...}``; ``413`` over ``relay_max_event_bytes``; ``422`` for a bad
  channel name, a body that is not JSON or not of that shape; ``403`` when the
  authorizer says no; ``503`` when Redis is unreachable.
- ``GET {prefix}/{channel}/events``: ``text/event-stream``. Resumes after the
  ``Last-Event-ID`` header or the ``last_event_id`` query parameter (the header
  wins: browsers send it on their own reconnects). A malformed id is a ``400``
  naming the expected form; ``422`` bad channel; ``403`` denied; ``503`` while
  the relay is not subscribed to Redis.

Every response carries ``X-Coordinator-Instance`` (the serving process).

A stream starts with a ``retry`` hint (``sse_retry_ms``) and an event
``hello`` (``{"instance_id": ...}``, no id: which process serves the stream, for
clients such as ``EventSource`` that cannot read headers), sends a comment
every ``sse_ping_s`` so proxies keep it open, and ends:

- when the client disconnects (its subscription is dropped at once);
- when the client falls ``relay_client_queue`` events behind: the connection is
  closed without a final chunk, even if a write is blocked (uvicorn logs "ASGI
  callable returned without completing response"); the client reconnects and
  replays;
- on server shutdown: one watcher per process sees uvicorn's exit flag and the
  streams write what is queued and finish at once, so uvicorn does not wait on
  them; :meth:`EventRelay.stop` ends any that remain.

The stream is a :class:`~coordinator.web.stream.ChannelEventResponse`: no task per
connection and no task wakeup per event (see :mod:`coordinator.web.stream`).

Authorization: pass ``authorize=`` a callable ``(request, channel, action)``,
``action`` being ``"subscribe"`` or ``"publish"``, returning ``bool`` or an
awaitable of one. The default, :func:`allow_all`, lets everyone subscribe and
publish to every channel: put the router behind your own auth, or pass a
real authorizer, before exposing it (:mod:`coordinator.web.authz` has an example).

Limits (see :mod:`coordinator.web.limits`; off by default): open streams per client
(``sse_max_connections_per_client``) and publishes per second per client
(``publish_rate_per_client``), counted across every worker and pod, answer 429
with ``Retry-After``; while Redis cannot be asked they answer 503, or let the
request through with ``limits_fail_open``.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from coordinator.errors import (
    EventTooLargeError,
    InvalidEventError,
    InvalidEventIdError,
    RedisUnavailableError,
)
from coordinator.relay.events import (
    check_channel,
    parse_event_id,
    parse_publish_body,
)
from coordinator.relay.relay import EventRelay
from coordinator.settings import CoordinatorSettings
from coordinator.web.authz import Authorizer, allow_all, is_allowed
from coordinator.web.bodies import read_json
from coordinator.web.limits import ClientLimits
from coordinator.web.stream import ChannelEventResponse

ChannelAction = Literal["subscribe", "publish"]
ChannelAuthorizer = Authorizer
INSTANCE_HEADER = "X-Coordinator-Instance"


def channel_router(
    relay: EventRelay,
    settings: CoordinatorSettings | None = None,
    *,
    authorize: ChannelAuthorizer = allow_all,
    prefix: str = "/api/channels",
    tags: list[str] | None = None,
    limits: ClientLimits | None = None,
) -> APIRouter:
    """A router with ``POST`` and ``GET {prefix}/{channel}/events`` (see the module doc).

    ``settings`` defaults to ``relay.settings``. The relay must be started (by
    the app's lifespan) for streams to open; publishing works regardless.
    ``limits`` defaults to the settings' limits on the relay's Redis client; pass
    the :class:`Coordinator`'s (it stops them on shutdown) or your own.
    """
    conf = settings or relay.settings
    headers = {INSTANCE_HEADER: conf.instance_id}
    body_limit = conf.relay_max_event_bytes * 4 + 4096  # room for whitespace and escapes
    router = APIRouter(prefix=prefix, tags=list(tags or ["channels"]))
    client_limits = limits if limits is not None else ClientLimits(relay.redis, conf)

    async def check(request: Request, channel: str, action: ChannelAction) -> None:
        try:
            check_channel(channel)
        except InvalidEventError as exc:
            raise HTTPException(422, str(exc), headers=headers) from None
        if not await is_allowed(authorize, request, channel, action):
            raise HTTPException(
                403, f"not allowed to {action} on channel {channel!r}", headers=headers
            )

    @router.post(
        "/{channel}/events",
        status_code=202,
        summary="Publish an event to a channel",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["data"],
                            "properties": {
                                "event": {"type": "string", "default": "message"},
                                "data": {},
                            },
                        }
                    }
                },
            }
        },
    )
    async def publish(request: Request, channel: str) -> JSONResponse:
        await check(request, channel, "publish")
        await client_limits.check_publish(request, headers)
        body = await read_json(request, body_limit, headers)
        try:
            event = parse_publish_body(body)
            event_id = await relay.publish(channel, event.data, event=event.event)
        except EventTooLargeError as exc:
            raise HTTPException(413, str(exc), headers=headers) from None
        except InvalidEventError as exc:
            raise HTTPException(422, str(exc), headers=headers) from None
        except RedisUnavailableError as exc:
            raise HTTPException(503, str(exc), headers=headers) from None
        return JSONResponse({"id": event_id}, status_code=202, headers=headers)

    @router.get(
        "/{channel}/events",
        summary="Stream a channel's events (Server-Sent Events)",
        response_class=ChannelEventResponse,
        status_code=200,  # FastAPI reads it off a response class's __init__ otherwise
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def stream(
        request: Request,
        channel: str,
        last_event_id: str | None = Query(
            None, description="Resume after this id (the Last-Event-ID header wins)."
        ),
    ) -> ChannelEventResponse:
        await check(request, channel, "subscribe")
        resume = request.headers.get("last-event-id") or last_event_id or None
        try:
            after = parse_event_id(resume) if resume else None
        except InvalidEventIdError as exc:
            raise HTTPException(400, str(exc), headers=headers) from None
        slot = await client_limits.open_stream(request, headers)
        try:
            sub = await relay.subscribe(channel, last_event_id=after)
        except BaseException as exc:
            client_limits.release(slot)
            if isinstance(exc, RedisUnavailableError):
                raise HTTPException(
                    503, str(exc), headers={**headers, "Retry-After": "1"}
                ) from None
            raise
        sub.on_close(lambda _: client_limits.release(slot))
        return ChannelEventResponse(sub, conf, headers=headers)

    return router

"""A Coordinator app (``install(app, sessions=True)``, as README users build it) with
one more middleware that records the body bytes of every relay stream it passes.

``RECORDER=outside`` adds the recorder after ``install`` (outside
:class:`~coordinator.web.direct_send.DirectStreamWrites`); ``RECORDER=inside`` adds
it before (inside, which must turn the shortcut off); ``RECORDER=none`` adds none.
``GET /recorded`` answers what this process's recorder saw: the bodies it passed,
joined, and whether the stream's scope offered the direct ``send``; how many relay
streams are open, and how many of them write their chunks straight to uvicorn's transport
(:mod:`coordinator.web.transport_send`).

Run: ``uvicorn tests.support.recorded_app:app --workers 1`` with ``REDIS_URL``,
``COORDINATOR_NAMESPACE`` and ``RECORDER`` set.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator import Coordinator, CoordinatorSettings
from coordinator.web.direct_send import STREAM_SEND
from coordinator.web.stream import open_streams, transport_streams

RECORDED: dict[str, Any] = {"body": b"", "direct": None}


class Recorder:
    """Passes everything on; keeps the body bytes of the streams (``GET /api/channels/``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = scope["type"] == "http" and scope["method"] == "GET"
        if not stream or not scope["path"].startswith("/api/channels/"):
            await self.app(scope, receive, send)
            return

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                RECORDED["body"] += message.get("body", b"")
                RECORDED["direct"] = STREAM_SEND in scope
            await send(message)

        await self.app(scope, receive, recording_send)


coordinator = Coordinator(CoordinatorSettings())
app = FastAPI(lifespan=coordinator.lifespan)
place = os.environ["RECORDER"]
if place not in ("inside", "outside", "none"):
    raise ValueError(f"RECORDER must be inside, outside or none, not {place!r}")
if place == "inside":
    app.add_middleware(Recorder)
coordinator.install(app, sessions=True)
if place == "outside":
    app.add_middleware(Recorder)


@app.get("/recorded")
async def recorded() -> JSONResponse:
    return JSONResponse(
        {
            "body": RECORDED["body"].decode("utf-8"),
            "direct": RECORDED["direct"],
            "open_streams": open_streams(),
            "transport_streams": transport_streams(),
        }
    )

"""A minimal app mounting the relay router, for multi-worker tests and the fan-out benchmark.

Run: ``uvicorn tests.support.relay_app:app --workers 4`` from the repo root, with
``REDIS_URL`` and ``COORDINATOR_NAMESPACE`` (and any ``COORDINATOR_RELAY_*``) set.

Paths: the channel router under ``/api/channels``, ``/readyz`` (200 when the
relay is subscribed, else 503), ``/relay/stats`` (this worker's counters, its
open relay streams, asyncio tasks and file descriptors).
Every answer carries ``X-Coordinator-Instance``. ``RELAY_DIRECT_WRITES=1`` adds
:class:`~coordinator.DirectStreamWrites`, as the README tells users of the router alone
(the benchmark's bare relay runs without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from coordinator import (
    CoordinatorSettings,
    DirectStreamWrites,
    EventRelay,
    RedisUnavailableError,
    channel_router,
)
from coordinator.settings import default_instance_id
from coordinator.web.stream import open_streams, transport_streams

settings = CoordinatorSettings(instance_id=f"{default_instance_id()}")
relay = EventRelay(settings)
HEADERS = {"X-Coordinator-Instance": settings.instance_id}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await relay.start()
    with contextlib.suppress(RedisUnavailableError):
        await relay.wait_ready(10)
    yield
    await relay.stop()


app = FastAPI(lifespan=lifespan)
app.include_router(channel_router(relay, settings))
if os.environ.get("RELAY_DIRECT_WRITES") == "1":
    app.add_middleware(DirectStreamWrites)


@app.get("/readyz")
async def readyz() -> JSONResponse:
    body = {"ready": relay.ready, "relay": relay.status, "instance_id": settings.instance_id}
    return JSONResponse(body, status_code=200 if relay.ready else 503, headers=HEADERS)


@app.get("/relay/stats")
async def stats() -> JSONResponse:
    return JSONResponse(
        {
            "instance_id": settings.instance_id,
            "pid": os.getpid(),
            "ready": relay.ready,
            "subscribers": relay.subscribers,
            "reconnects": relay.stats.reconnects,
            "events_received": relay.stats.events_received,
            "clients_dropped": relay.stats.clients_dropped,
            "duplicates_dropped": relay.stats.duplicates_dropped,
            "backfilled_events": relay.stats.backfilled_events,
            "resets_sent": relay.stats.resets_sent,
            "open_streams": open_streams(),
            "transport_streams": transport_streams(),
            "tasks": len(asyncio.all_tasks()),
            "fds": len(os.listdir("/proc/self/fd")),
        },
        headers=HEADERS,
    )

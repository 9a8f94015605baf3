"""Baseline SSE apps for ``bench/fanout.py``, same HTTP paths as the relay router.

``BENCH_MODE`` picks one (``REDIS_URL`` from the environment):

- ``broadcaster``: encode/broadcaster 0.3.1's Redis backend + sse-starlette,
  as its README shows. Known bugs (DESIGN "Peers to beat"): its listener may
  start before the first SUBSCRIBE and wait forever; concurrent first
  subscribers overwrite each other's queue set.
- ``per_client``: one Redis Pub/Sub subscription per SSE client (the tutorial way).
- ``handrolled``: a correct minimal relay: one subscription per process, a set of
  unbounded queues per channel, each event encoded per client by sse-starlette.
  No ids, no replay, no backpressure, no reconnect.

Run: ``BENCH_MODE=per_client uvicorn bench._fanout_apps:app --workers 4``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis import asyncio as aioredis
from sse_starlette.sse import EventSourceResponse

MODE = os.environ.get("BENCH_MODE", "handrolled")
URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("COORDINATOR_NAMESPACE", "bench")
# redis-py caps a pool at 100 connections by default: lifted, or per_client fails
# (500s, "Too many connections") past 100 clients per worker instead of being measured.
redis = aioredis.Redis.from_url(URL, max_connections=100_000)
local: dict[str, set[asyncio.Queue[str]]] = {}
state: dict[str, Any] = {}


async def _handrolled_listener(ready: asyncio.Event) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(f"{PREFIX}:all")
    ready.set()
    async for message in pubsub.listen():
        if message["type"] != "message":
            continue
        envelope = json.loads(message["data"])
        for queue in list(local.get(envelope["channel"], ())):
            queue.put_nowait(envelope["data"])


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if MODE == "broadcaster":
        from broadcaster import Broadcast

        state["broadcast"] = Broadcast(URL)
        await state["broadcast"].connect()
    elif MODE == "handrolled":
        ready = asyncio.Event()
        state["task"] = asyncio.create_task(_handrolled_listener(ready))
        await asyncio.wait_for(ready.wait(), 10)
    yield
    if MODE == "broadcaster":
        await state["broadcast"].disconnect()
    elif "task" in state:
        state["task"].cancel()
    await redis.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/readyz")
async def readyz() -> JSONResponse:
    return JSONResponse({"ready": True, "instance_id": str(os.getpid())})


@app.post("/api/channels/{channel}/events", status_code=202)
async def publish(channel: str, request: Request) -> JSONResponse:
    body = await request.json()
    data = json.dumps(body["data"])
    if MODE == "broadcaster":
        await state["broadcast"].publish(channel=channel, message=data)
    elif MODE == "per_client":
        await redis.publish(f"{PREFIX}:{channel}", data)
    else:
        await redis.publish(f"{PREFIX}:all", json.dumps({"channel": channel, "data": data}))
    return JSONResponse({"id": None}, status_code=202)


@app.get("/api/channels/{channel}/events")
async def stream(channel: str) -> EventSourceResponse:
    async def broadcaster_events() -> AsyncIterator[dict[str, str]]:
        async with state["broadcast"].subscribe(channel=channel) as subscriber:
            async for event in subscriber:
                yield {"data": event.message}

    async def per_client_events() -> AsyncIterator[dict[str, str]]:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(f"{PREFIX}:{channel}")
            async for message in pubsub.listen():
                if message["type"] == "message":
                    yield {"data": message["data"].decode()}
        finally:
            await pubsub.aclose()

    async def handrolled_events() -> AsyncIterator[dict[str, str]]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        local.setdefault(channel, set()).add(queue)
        try:
            while True:
                yield {"data": await queue.get()}
        finally:
            local[channel].discard(queue)

    source = {
        "broadcaster": broadcaster_events,
        "per_client": per_client_events,
        "handrolled": handrolled_events,
    }[MODE]
    return EventSourceResponse(source(), headers={"X-Coordinator-Instance": str(os.getpid())})

"""The app ``bench/state.py`` runs under ``uvicorn --workers 4``: the library's routes plus
two timing endpoints on the system-wide monotonic clock.

- ``POST /bench/set/{key}`` with a JSON value: ``{"version", "t0"}``, ``t0`` taken just
  before :meth:`SharedState.set` (so propagation excludes the HTTP hop to the writer);
- ``GET /bench/applied/{key}?version=N``: waits until this process holds that version
  and answers ``{"applied_at"}``, the moment its watcher saw the change applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse

from coordinator import Coordinator, CoordinatorSettings
from coordinator.tasks import cancel_and_wait
from coordinator.web.sse import INSTANCE_HEADER

settings = CoordinatorSettings()
coordinator = Coordinator(settings)
HEADERS = {INSTANCE_HEADER: settings.instance_id}
applied: dict[tuple[str, int], float] = {}


async def _record() -> None:
    async with coordinator.state.watch() as changes:
        async for change in changes:
            if change.current is not None:
                applied[(change.key, change.current.version)] = time.monotonic()
                if len(applied) > 100_000:
                    applied.clear()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with coordinator.lifespan(app):
        task = asyncio.create_task(_record())
        try:
            yield
        finally:
            await cancel_and_wait(task)


app = FastAPI(lifespan=lifespan)
coordinator.install(app)


@app.post("/bench/set/{key}")
async def bench_set(key: str, request: Request) -> JSONResponse:
    value: Any = await request.json()
    t0 = time.monotonic()
    entry = await coordinator.state.set(key, value)
    return JSONResponse({"version": entry.version, "t0": t0}, headers=HEADERS)


@app.get("/bench/applied/{key}")
async def bench_applied(key: str, version: int = Query(...)) -> JSONResponse:
    await coordinator.state.wait_for(key, version, timeout=10)
    for _ in range(100):  # the watcher runs right after the change is applied
        if (key, version) in applied:
            break
        await asyncio.sleep(0)
    return JSONResponse({"applied_at": applied.get((key, version))}, headers=HEADERS)

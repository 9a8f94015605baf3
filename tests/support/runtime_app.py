"""A small app with runtime jobs, for the multi-worker tests, the chaos scenario and the bench.

Run: ``uvicorn tests.support.runtime_app:app --workers 4`` with ``REDIS_URL`` and
``COORDINATOR_NAMESPACE`` set. Every route of :meth:`Coordinator.install`. The task
``note`` appends one JSON line per run to the Redis list ``rt-calls:<namespace>``:
job id, scheduled time (ms), fencing token, instance, and the wall clock at the
start (ms), so a test or benchmark sees every run of every process in one place.
"""

from __future__ import annotations

import json
import time

from fastapi import FastAPI

from coordinator import Coordinator, CoordinatorSettings, JobContext
from coordinator.clock import datetime_to_ms

settings = CoordinatorSettings()
coordinator = Coordinator(settings, shutdown_timeout=5)
CALLS = f"rt-calls:{settings.namespace}"


@coordinator.task("note")
async def note(ctx: JobContext, text: str = "") -> None:
    started = time.time() * 1000
    record = {
        "job_id": ctx.job_id,
        "scheduled_ms": datetime_to_ms(ctx.scheduled_at),
        "token": ctx.fencing_token,
        "instance_id": ctx.instance_id,
        "started_ms": started,
        "text": text,
    }
    await coordinator.redis.rpush(CALLS, json.dumps(record))


@coordinator.job("interval", seconds=3600, id="code-hourly")
async def hourly() -> None:
    """A code-declared job, to pause and resume from any worker."""


app = FastAPI(lifespan=coordinator.lifespan)
coordinator.install(app)

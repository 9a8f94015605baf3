"""The demo service: ``uvicorn app.main:app --workers 4`` with ``REDIS_URL`` set.

Every worker declares the same jobs and serves the same routes; Redis elects
one leader to run the jobs and carries events to every worker's SSE clients.

Shared state across workers: sessions in Redis (``POST|GET|DELETE
/api/session``; the login takes a name and no password: it is a demo), and
the dashboard's feature flag, a shared-state key (``GET|PUT
/api/state/dashboard.highlight``) that every open dashboard shows, whichever
worker serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from coordinator import Coordinator, CoordinatorSettings
from coordinator.ops.logs import configure_logging
from coordinator.tasks import cancel_and_wait
from coordinator.web.authz import allow_all, bearer_token_policy
from coordinator.web.sse import INSTANCE_HEADER

from .jobs import register_jobs, runs_router
from .sessions import session_router
from .settings import DemoSettings

settings = CoordinatorSettings()
demo = DemoSettings()
authorize = (
    bearer_token_policy(
        demo.publish_token.get_secret_value() if demo.publish_token else None,
        demo.subscribe_token.get_secret_value() if demo.subscribe_token else None,
    )
    if demo.publish_token or demo.subscribe_token
    else allow_all
)
coordinator = Coordinator(
    settings,
    authorize=authorize,
    fail_fast=demo.fail_fast,
    startup_timeout=demo.startup_timeout_s,
    metrics=True,  # GET /metrics for every worker (coordinator.web.metrics)
)
configure_logging(settings, term=lambda: coordinator.elector.token)
register_jobs(coordinator, demo)


async def _announce_leader(token: int) -> None:
    """Tell every dashboard who leads now (best effort: the lease is the truth)."""
    try:
        await coordinator.publish(
            demo.channel,
            {
                "instance_id": settings.instance_id,
                "fencing_token": token,
                "at": time.time(),
            },
            event="leader",
        )
    except Exception as exc:  # Redis may be going away: the dashboard also polls
        logging.getLogger("app").info("could not announce leadership: %s", exc)


coordinator.elector.add_observer(on_elected=_announce_leader)

FLAG_KEY = "dashboard.highlight"
"""The dashboard's feature flag: a shared-state key anyone can toggle."""
HEADERS = {INSTANCE_HEADER: settings.instance_id}


async def _announce_state_changes() -> None:
    """Tell every dashboard about each state change this process wrote.

    Every process hears every change within milliseconds, but browsers hear only
    relay events; announcing from the writer's process gives each change one
    event. Dashboards keep the newest version they saw and re-read the flag
    whenever their stream (re)connects, so a lost announcement heals there.
    """
    async with coordinator.state.watch() as changes:
        async for change in changes:
            if change.source != "local" or change.current is None:
                continue
            try:
                await coordinator.publish(
                    demo.channel,
                    {
                        **change.current.as_dict(),
                        "instance_id": settings.instance_id,
                        "at": time.time(),
                    },
                    event="state",
                )
            except Exception as exc:  # best effort: dashboards also re-read on reconnect
                logging.getLogger("app").info("could not announce a state change: %s", exc)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with coordinator.lifespan(app):
        announcer = asyncio.create_task(_announce_state_changes(), name="announce-state")
        try:
            yield
        finally:
            await cancel_and_wait(announcer, name="announce-state")


app = FastAPI(
    title="coordinator demo",
    description="Leader-run jobs, cross-worker Server-Sent Events, sessions and shared "
    "state over Redis.",
    lifespan=lifespan,
)
coordinator.install(app, sessions=True)
app.include_router(session_router(HEADERS))
app.include_router(runs_router(coordinator))  # GET /api/demo/runs: history rows with data


_PAGE = resources.files("app").joinpath("static", "index.html").read_text("utf-8")


@app.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """The live dashboard; the page says which process served it."""
    page = (
        _PAGE.replace("{{INSTANCE_ID}}", html.escape(settings.instance_id))
        .replace("{{CHANNEL}}", html.escape(demo.channel))
        .replace("{{FLAG_KEY}}", html.escape(FLAG_KEY))
    )
    return HTMLResponse(page, headers={INSTANCE_HEADER: settings.instance_id})

"""The demo service: ``uvicorn app.main:app --workers 4`` with ``REDIS_URL`` set.

Every worker declares the same jobs and serves the same routes; Redis elects
one leader to run the jobs and carries events to every worker's SSE clients.
"""

from __future__ import annotations

import html
import logging
import time
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from coordinator import Coordinator, CoordinatorSettings
from coordinator.authz import bearer_token_policy
from coordinator.logs import configure_logging
from coordinator.sse import INSTANCE_HEADER, allow_all

from .jobs import register_jobs
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
    settings, authorize=authorize, fail_fast=demo.fail_fast, startup_timeout=demo.startup_timeout_s
)
configure_logging(settings, term=lambda: coordinator.elector.token)
register_jobs(coordinator, demo)


async def _announce_leader(token: int) -> None:
    """Tell every dashboard who leads now (best effort: the lease is the truth)."""
    try:
        await coordinator.publish(demo.channel, {
            "instance_id": settings.instance_id, "fencing_token": token, "at": time.time(),
        }, event="leader")  # fmt: skip
    except Exception as exc:  # Redis may be going away: the dashboard also polls
        logging.getLogger("app").info("could not announce leadership: %s", exc)


coordinator.elector.add_observer(on_elected=_announce_leader)

app = FastAPI(
    title="coordinator demo",
    description="Leader-run jobs and cross-worker Server-Sent Events over Redis.",
    lifespan=coordinator.lifespan,
)
coordinator.install(app)

_PAGE = resources.files("app").joinpath("static", "index.html").read_text("utf-8")


@app.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """The live dashboard; the page says which process served it."""
    page = _PAGE.replace("{{INSTANCE_ID}}", html.escape(settings.instance_id)).replace(
        "{{CHANNEL}}", html.escape(demo.channel)
    )
    return HTMLResponse(page, headers={INSTANCE_HEADER: settings.instance_id})

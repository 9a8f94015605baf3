"""Coordinator: one object that wires election, scheduler and relay into a FastAPI app.

::

    coordinator = Coordinator()            # settings from COORDINATOR_* / REDIS_URL

    @coordinator.job("interval", seconds=10, id="collect-metrics")
    async def collect(ctx: JobContext) -> None:
        await coordinator.publish("jobs", {"ran": ctx.job_id})

    app = FastAPI(lifespan=coordinator.lifespan)
    coordinator.install(app)               # health, status and channel routes

Routes added by :meth:`Coordinator.install` (the demo's HTTP contract):
``GET /healthz``, ``GET /readyz``, ``GET /api/instance``, ``GET /api/leader``,
``GET /api/jobs``, ``GET /api/jobs/runs?limit=N``,
``POST|GET /api/channels/{channel}/events``, ``GET|PUT /api/state/{key}``
(:mod:`coordinator.web.state`), and ``GET /metrics`` when metrics are on
(``Coordinator(metrics=True)`` or ``COORDINATOR_METRICS=true``; see
:mod:`coordinator.web.metrics`). ``install(app, sessions=True)`` also adds
Redis sessions (:mod:`coordinator.web.sessions`).

Beside the election, scheduler and relay, each process has
:attr:`Coordinator.state` (shared runtime state, read from memory,
:class:`~coordinator.state.SharedState`) and :attr:`Coordinator.limits` (the
channel routes' per-client limits, counted across every process).

Guarantees and limits:

- The lifespan never blocks startup on Redis: with Redis unreachable the
  process serves, ``/readyz`` answers 503 with the reason, and everything
  recovers by itself when Redis comes back (``fail_fast=True`` instead exits
  with one clear error if Redis cannot be reached within ``startup_timeout``).
- On shutdown the scheduler stops starting fires, running jobs get
  ``shutdown_timeout`` seconds to finish, the lease is released (another
  process leads within milliseconds), open SSE streams end, and the Redis
  client this object created is closed. A client passed in is not closed.
- Role ``api`` never campaigns or runs jobs; ``worker`` is for
  ``coordinator worker`` processes that serve no HTTP.
- ``/readyz`` is 503 while the shared state is stale (this process's Redis
  listener is down, or it has not reloaded since it came back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from coordinator.election.elector import LeaderElector
from coordinator.election.lease import read_leader
from coordinator.errors import REDIS_UNREACHABLE, RedisUnavailableError
from coordinator.ops.presence import PresenceHeartbeat
from coordinator.relay.relay import EventRelay
from coordinator.scheduler.scheduler import LeaderScheduler
from coordinator.settings import CoordinatorSettings
from coordinator.state.shared import SharedState
from coordinator.store.connection import (
    RedisClient,
    check_client_matches,
    create_client,
    redact_url,
)
from coordinator.web.authz import allow_all
from coordinator.web.direct_send import DirectStreamWrites
from coordinator.web.jobs import job_router
from coordinator.web.limits import (
    ClientKey,
    ClientLimits,
    client_address,
)
from coordinator.web.metrics import CoordinatorMetrics
from coordinator.web.sessions import install_sessions
from coordinator.web.shutdown import wait_for_server_exit
from coordinator.web.sse import INSTANCE_HEADER, ChannelAuthorizer, channel_router
from coordinator.web.state import StateAuthorizer, state_router

logger = logging.getLogger("coordinator")


class Coordinator:
    """Redis client, :class:`LeaderElector`, :class:`LeaderScheduler` and
    :class:`EventRelay` for one process, with a FastAPI lifespan and routes.

    Args:
        settings: defaults to ``CoordinatorSettings()`` (the environment).
        redis: a client to use (not closed by this object); default: one built
            from ``settings.redis_url`` and owned.
        authorize: the channel authorization hook (see :mod:`coordinator.web.sse`).
        authorize_state: the shared-state routes' hook (see :mod:`coordinator.web.state`).
        client_key: who "a client" is for the per-client limits (default: its address;
            see :mod:`coordinator.web.limits`).
        fail_fast: exit the lifespan with :class:`RedisUnavailableError` when Redis
            is unreachable at startup, instead of serving 503 until it is back.
        startup_timeout: how long ``fail_fast`` waits for Redis.
        shutdown_timeout: how long running jobs may finish on shutdown.
        cancel_on_revoke: default for jobs: cancel async jobs when leadership ends.
        metrics: serve ``GET /metrics`` (:mod:`coordinator.web.metrics`); default
            ``settings.metrics`` (``COORDINATOR_METRICS``), off.
        metrics_dir: the metrics directory of this server run; default
            ``$PROMETHEUS_MULTIPROC_DIR/coordinator``, else
            ``<temp dir>/coordinator-metrics-<process group id>``.
    """

    def __init__(
        self,
        settings: CoordinatorSettings | None = None,
        *,
        redis: RedisClient | None = None,
        authorize: ChannelAuthorizer = allow_all,
        authorize_state: StateAuthorizer = allow_all,
        client_key: ClientKey = client_address,
        fail_fast: bool = False,
        startup_timeout: float = 10.0,
        shutdown_timeout: float = 10.0,
        cancel_on_revoke: bool = False,
        metrics: bool | None = None,
        metrics_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = settings or CoordinatorSettings()
        self._owns_redis = redis is None
        if redis is not None:
            check_client_matches("Coordinator", redis, self.settings.redis_url)
        self.redis = redis if redis is not None else create_client(self.settings.redis_url)
        self.elector = LeaderElector(self.redis, self.settings)
        self.scheduler = LeaderScheduler(
            self.redis, self.settings, elector=self.elector, cancel_on_revoke=cancel_on_revoke
        )
        self.relay = EventRelay(self.settings, self.redis)
        self.jobs = self.scheduler.runtime
        """Runtime jobs, from any process: ``await coordinator.jobs.add_job(...)``
        (:class:`~coordinator.scheduler.runtime.RuntimeJobs`)."""
        self.state = SharedState(self.settings, self.redis, self.relay)
        """Shared runtime state: every key in this process's memory, kept current."""
        self.limits = ClientLimits(self.redis, self.settings, client_key)
        """The channel routes' per-client limits (cluster-wide; off unless set)."""
        self.metrics: CoordinatorMetrics | None = None
        """This process's metrics writer, or None when metrics are off."""
        if self.settings.metrics if metrics is None else metrics:
            self.metrics = CoordinatorMetrics(
                self.elector,
                self.relay,
                self.scheduler,
                instance_id=self.settings.instance_id,
                directory=Path(metrics_dir) if metrics_dir is not None else None,
            )
        self.presence = PresenceHeartbeat(self.redis, self.settings)
        self.authorize = authorize
        self.authorize_state = authorize_state
        self.fail_fast = fail_fast
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self._started = False
        self._drained = False
        self._drain_task: asyncio.Task[None] | None = None

    # -- declaring work -----------------------------------------------------------
    def job(self, trigger: str | Any, **options: Any) -> Callable[[Any], Any]:
        """Declare a job (see :meth:`LeaderScheduler.job`)."""
        return self.scheduler.job(trigger, **options)

    def task(self, name: str) -> Callable[[Any], Any]:
        """Register a task that runtime jobs may name (see :meth:`LeaderScheduler.task`)."""
        return self.scheduler.task(name)

    async def publish(self, channel: str, data: Any, event: str = "message") -> str:
        """Publish to every subscriber on every process (:meth:`EventRelay.publish`)."""
        return await self.relay.publish(channel, data, event=event)

    async def once(self, name: str, fn: Callable[[], Any], **options: Any) -> Any:
        """Cluster-wide run-once (see :func:`coordinator.scheduler.once.run_once`)."""
        return await self.scheduler.once(name, fn, **options)

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        """Start the relay listener, the elector (unless role ``api``) and the scheduler."""
        if self._started:
            return
        self._started = True
        logger.info(
            "%s: starting (role %s, namespace %s, redis %s)",
            self.settings.instance_id,
            self.settings.role,
            self.settings.namespace,
            redact_url(self.settings.redis_url),
        )
        if self.fail_fast:
            await self._wait_for_redis()
        if self.metrics is not None:
            await self.metrics.start()  # before campaigning: a bad directory fails here
        await self.relay.start()
        if self.settings.campaigns:
            await self.elector.start()
        await self.scheduler.start()
        self.presence.start()
        self._drain_task = asyncio.create_task(self._drain_on_server_exit(), name="drain-watch")

    async def drain(self) -> None:
        """Hand over at once: stop starting fires, let running jobs finish, release the
        lease (another process leads within milliseconds) and end this process's SSE
        streams (their clients reconnect elsewhere and replay). Publishing and
        status routes keep working until :meth:`stop`. Idempotent.

        Called automatically when uvicorn starts shutting down (see
        :mod:`coordinator.web.shutdown`); call it yourself from a ``preStop`` hook or
        a signal handler under other servers.
        """
        if self._drained:
            return
        self._drained = True
        logger.info(
            "%s: draining: handing over leadership, ending streams", self.settings.instance_id
        )
        await self.scheduler.stop(timeout=self.shutdown_timeout)
        await self.elector.stop()
        await self.relay.stop()

    async def _drain_on_server_exit(self) -> None:
        await wait_for_server_exit()
        await self.drain()

    async def stop(self) -> None:
        """Stop in the order that loses nothing: jobs, lease, streams, connections."""
        if not self._started:
            return
        self._started = False
        if self._drain_task is not None:
            if not self._drained:
                self._drain_task.cancel()  # still watching: stop watching
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_task  # a drain under way finishes first
            self._drain_task = None
        await self.presence.stop()
        self._drained = False
        await self.scheduler.stop(timeout=self.shutdown_timeout)
        await self.elector.stop()
        await self.relay.stop()
        await self.limits.stop()
        await self.state.stop()
        if self.metrics is not None:
            await self.metrics.stop()  # last: the final counts include the shutdown
        if self._owns_redis:
            with contextlib.suppress(Exception):
                await self.redis.aclose()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI | None = None) -> AsyncIterator[None]:
        """A FastAPI ``lifespan``: ``FastAPI(lifespan=coordinator.lifespan)``."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def _wait_for_redis(self) -> None:
        try:
            async with asyncio.timeout(self.startup_timeout):
                while True:
                    try:
                        await self.redis.ping()
                        return
                    except REDIS_UNREACHABLE:
                        await asyncio.sleep(0.5)
        except TimeoutError:
            raise RedisUnavailableError(
                f"Redis at {redact_url(self.settings.redis_url)} did not answer within "
                f"{self.startup_timeout:.0f}s; check REDIS_URL, or start without fail_fast "
                "to serve 503 on /readyz until it is back"
            ) from None

    # -- state --------------------------------------------------------------------
    def instance(self) -> dict[str, Any]:
        """``GET /api/instance``: the process that answers."""
        return {
            "instance_id": self.settings.instance_id,
            "pid": self.pid,
            "hostname": self.hostname,
            "is_leader": self.elector.is_leader,
        }

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether this process can serve: Redis answers, the relay is subscribed and
        the shared state is fresh."""
        checks: dict[str, Any] = {"relay": self.relay.status, "state": self.state.status}
        try:
            async with asyncio.timeout(1.0):
                await self.redis.ping()
            checks["redis"] = "ok"
        except REDIS_UNREACHABLE as exc:
            checks["redis"] = f"unreachable: {type(exc).__name__}"
        ready = checks["redis"] == "ok" and self.relay.ready and not self.state.stale
        return ready, checks

    # -- HTTP -----------------------------------------------------------------------
    def router(self) -> APIRouter:
        """Health, instance, leader, job and (when on) metrics routes; channels are separate."""
        router = APIRouter()
        headers = {INSTANCE_HEADER: self.settings.instance_id}
        metrics = self.metrics

        if metrics is not None:

            @router.get("/metrics", tags=["health"], include_in_schema=False)
            async def prometheus_metrics() -> Response:
                scraped = await metrics.scrape()
                if scraped is None:
                    return PlainTextResponse(
                        "metrics start with the app's lifespan", status_code=503, headers=headers
                    )
                body, content_type = scraped
                return Response(body, media_type=content_type, headers=headers)

        @router.get("/healthz", tags=["health"], summary="Liveness: 200 while the process serves")
        async def healthz() -> JSONResponse:
            return JSONResponse({"status": "ok"}, headers=headers)

        @router.get(
            "/readyz",
            tags=["health"],
            summary="Readiness: 200 when Redis answers, the relay is subscribed and the state "
            "is fresh",
        )
        async def readyz() -> JSONResponse:
            ready, checks = await self.readiness()
            body = {
                "status": "ready" if ready else "not ready",
                "instance_id": self.settings.instance_id,
                **checks,
            }
            return JSONResponse(body, status_code=200 if ready else 503, headers=headers)

        @router.get("/api/instance", tags=["status"])
        async def instance() -> JSONResponse:
            return JSONResponse(self.instance(), headers=headers)

        @router.get("/api/leader", tags=["status"])
        async def leader() -> JSONResponse:
            try:
                info = await read_leader(self.redis, self.elector.keys, self.elector.name)
            except REDIS_UNREACHABLE as exc:
                return JSONResponse(
                    {"detail": f"Redis unreachable: {type(exc).__name__}"},
                    status_code=503,
                    headers=headers,
                )
            return JSONResponse({"leader": info.as_dict() if info else None}, headers=headers)

        @router.get("/api/jobs", tags=["jobs"])
        async def jobs() -> JSONResponse:
            return JSONResponse(await self.scheduler.list_jobs(), headers=headers)

        @router.get("/api/jobs/runs", tags=["jobs"])
        async def runs(
            limit: int = Query(50, ge=1, le=1000), job_id: str | None = Query(None)
        ) -> JSONResponse:
            try:
                items = await self.scheduler.list_runs(limit, job_id)
            except REDIS_UNREACHABLE as exc:
                return JSONResponse(
                    {"detail": f"Redis unreachable: {type(exc).__name__}"},
                    status_code=503,
                    headers=headers,
                )
            return JSONResponse(items, headers=headers)

        return router

    def install(self, app: FastAPI, *, sessions: bool = False) -> None:
        """Add every route of the contract to ``app``; with ``sessions``, also the Redis
        session middleware (:func:`coordinator.web.sessions.install_sessions`).

        Also adds :class:`~coordinator.web.direct_send.DirectStreamWrites`, outside the
        middleware already added: relay streams then send their body chunks past the
        wrappers that only watch the response start. Add your own middleware after
        this call; one added before it (so inside), unless it is known to pass bodies
        through, turns that shortcut off (logged once), and every chunk takes the full
        chain: correct, about 7% more CPU per streamed event.
        """
        app.include_router(self.router())
        # After router(): GET /api/jobs/runs is matched before /api/jobs/{job_id}.
        app.include_router(
            job_router(
                self.jobs,
                authorize=self.authorize,
                headers={INSTANCE_HEADER: self.settings.instance_id},
            )
        )
        app.include_router(
            channel_router(self.relay, self.settings, authorize=self.authorize, limits=self.limits)
        )
        app.include_router(state_router(self.state, self.settings, authorize=self.authorize_state))
        if sessions:
            install_sessions(
                app,
                self.redis,
                self.settings,
                headers={INSTANCE_HEADER: self.settings.instance_id},
            )
        app.add_middleware(DirectStreamWrites)  # last: outside the session middleware

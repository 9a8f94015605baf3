"""Prometheus metrics, correct under ``uvicorn --workers N``.

prometheus_client's multiprocess mode is used: every worker writes its values
to files in one directory and ``GET /metrics``, served by whichever worker,
aggregates all of them. The directory is ``PROMETHEUS_MULTIPROC_DIR`` when set
(set it, and empty it at startup, in containers); otherwise this module sets it,
before prometheus_client is first imported, to a directory shared by the
workers of one server: ``$TMPDIR/coordinator-metrics-<process group id>``.

Limits: if prometheus_client was imported before this module without
``PROMETHEUS_MULTIPROC_DIR``, multiprocess mode cannot be turned on; each worker
then reports only itself (a warning is logged). Gauges are per live process
(label ``pid``) or summed over live processes, as each metric says.

Metrics (all prefixed ``coordinator_``):

- election: ``is_leader{instance_id}``, ``fencing_token``, ``elections_total``,
  ``stepdowns_total{reason}``, ``renew_latency_seconds`` (histogram),
  ``renew_failures_total``, ``lease_remaining_seconds`` (the leader's);
- jobs: ``job_fires_total{outcome}``, ``job_duration_seconds{job_id,status}``
  (histogram of finished runs);
- relay and SSE: ``sse_clients``, ``sse_channel_clients{channel}``,
  ``relay_events_published_total``, ``relay_events_received_total``,
  ``relay_events_delivered_total`` (frames queued to local clients),
  ``relay_events_dropped_total`` (queued frames discarded when a slow client is
  cut), ``relay_clients_dropped_total`` (slow-client disconnects),
  ``relay_reconnects_total``, ``relay_backfilled_events_total``,
  ``relay_resets_total``, ``relay_up``, ``relay_delivery_lag_seconds``
  (histogram: from the publish, by the Redis clock in the event id, to this
  process's receipt; includes clock skew between Redis and this host).

``sse_channel_clients`` has one series per channel a process has served
since it started (a channel that empties reads 0): mind the cardinality when
channel names are per-user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

_PREIMPORTED = "prometheus_client" in sys.modules
if not _PREIMPORTED and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _dir = Path(tempfile.gettempdir()) / f"coordinator-metrics-{os.getpgid(0)}"
    _dir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_dir)

from fastapi import APIRouter  # noqa: E402
from fastapi.responses import Response  # noqa: E402
from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from .tasks import cancel_and_wait  # noqa: E402

if TYPE_CHECKING:
    from .integration import Coordinator

logger = logging.getLogger("coordinator.metrics")

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

IS_LEADER = Gauge("coordinator_is_leader", "1 while this process leads its election",
                  ["instance_id"], multiprocess_mode="liveall")  # fmt: skip
FENCING_TOKEN = Gauge("coordinator_fencing_token", "Fencing token of the current term",
                      multiprocess_mode="livemax")  # fmt: skip
ELECTIONS = Counter("coordinator_elections", "Terms won by processes of this server")
STEPDOWNS = Counter("coordinator_stepdowns", "Terms ended, by reason", ["reason"])
JOB_FIRES = Counter("coordinator_job_fires", "Job fires by outcome", ["outcome"])
SSE_CLIENTS = Gauge("coordinator_sse_clients", "Open SSE subscriptions",
                    multiprocess_mode="livesum")  # fmt: skip
RELAY_UP = Gauge("coordinator_relay_up", "1 while the relay listener is subscribed",
                 multiprocess_mode="liveall")  # fmt: skip
_RELAY_COUNTERS = {
    "events_received": Counter("coordinator_relay_events_received", "Events read from Pub/Sub"),
    "reconnects": Counter("coordinator_relay_reconnects", "Relay listener reconnects"),
    "clients_dropped": Counter(
        "coordinator_relay_clients_dropped", "SSE clients cut for falling behind"
    ),
    "backfilled_events": Counter(
        "coordinator_relay_backfilled_events", "Events replayed after a listener reconnect"
    ),
    "resets_sent": Counter("coordinator_relay_resets", "reset events sent to clients"),
}
_FAST = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)  # fmt: skip
RENEW_LATENCY = Histogram("coordinator_renew_latency_seconds", "Lease renewal round trip",
                          buckets=_FAST)  # fmt: skip
RENEW_FAILURES = Counter("coordinator_renew_failures",
                         "Lease renewals that failed or found the lease lost")  # fmt: skip
LEASE_REMAINING = Gauge("coordinator_lease_remaining_seconds", "The leader's lease time left",
                        multiprocess_mode="livemax")  # fmt: skip
JOB_DURATION = Histogram("coordinator_job_duration_seconds", "Run time of finished job fires",
                         ["job_id", "status"],
                         buckets=(.01, .05, .1, .5, 1, 5, 10, 30, 60, 300, 1800))  # fmt: skip
CHANNEL_CLIENTS = Gauge("coordinator_sse_channel_clients", "Open SSE subscriptions by channel",
                        ["channel"], multiprocess_mode="livesum")  # fmt: skip
DELIVERY_LAG = Histogram("coordinator_relay_delivery_lag_seconds",
                         "Publish (Redis clock) to receipt by this process's listener",
                         buckets=_FAST)  # fmt: skip
_RELAY_COUNTERS.update({
    "events_published": Counter("coordinator_relay_events_published", "Events published"),
    "events_delivered": Counter("coordinator_relay_events_delivered",
                                "Event frames queued to local SSE clients"),
    "events_dropped": Counter("coordinator_relay_events_dropped",
                              "Queued frames discarded when a slow client was cut"),
})  # fmt: skip
_FIRE_OUTCOMES = ("claimed", "ok", "errors", "missed", "cancelled", "refused_not_leader",
                  "refused_already_claimed")  # fmt: skip

if _PREIMPORTED and not MULTIPROCESS:  # pragma: no cover - documented limit
    logger.warning(
        "prometheus_client was imported before coordinator.metrics without "
        "PROMETHEUS_MULTIPROC_DIR: /metrics reports only the worker that answers"
    )


class CoordinatorMetrics:
    """Keeps this process's metrics current for one :class:`Coordinator`.

    Election changes are recorded as they happen (observers); the relay's and
    scheduler's plain counters are copied every ``interval`` seconds.
    """

    def __init__(self, coordinator: Coordinator, interval: float = 1.0) -> None:
        self.coordinator = coordinator
        self.interval = interval
        self._seen: dict[str, int] = {}
        self._channels: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        coordinator.elector.add_observer(self._elected, self._revoked)

    def _elected(self, token: int) -> None:
        ELECTIONS.inc()
        FENCING_TOKEN.set(token)
        IS_LEADER.labels(self.coordinator.settings.instance_id).set(1)

    def _revoked(self, reason: str) -> None:
        STEPDOWNS.labels(reason).inc()
        IS_LEADER.labels(self.coordinator.settings.instance_id).set(0)

    def sample(self) -> None:
        """Copy the components' counters into the Prometheus metrics now."""
        c = self.coordinator
        IS_LEADER.labels(c.settings.instance_id).set(1 if c.elector.is_leader else 0)
        SSE_CLIENTS.set(c.relay.subscribers)
        RELAY_UP.set(1 if c.relay.ready else 0)
        for name, counter in _RELAY_COUNTERS.items():
            self._advance(f"relay.{name}", int(getattr(c.relay, name, 0)), counter)
        stats = c.scheduler.stats
        for outcome in _FIRE_OUTCOMES:
            self._advance(f"fires.{outcome}", int(getattr(stats, outcome, 0)),
                          JOB_FIRES.labels(outcome))  # fmt: skip
        while stats.durations:
            job_id, status, seconds = stats.durations.popleft()
            JOB_DURATION.labels(job_id, status).observe(max(0.0, seconds))
        elector = c.elector
        self._advance("renew.failures", elector.renew_failures, RENEW_FAILURES)
        while elector.renew_latencies:
            RENEW_LATENCY.observe(elector.renew_latencies.popleft())
        LEASE_REMAINING.set(elector.lease_remaining)
        lags = c.relay.delivery_lags
        while lags:
            DELIVERY_LAG.observe(max(0.0, lags.popleft()))
        by_channel = c.relay.channel_subscribers()
        for channel in self._channels - by_channel.keys():
            CHANNEL_CLIENTS.labels(channel).set(0)
        for channel, count in by_channel.items():
            CHANNEL_CLIENTS.labels(channel).set(count)
        self._channels = set(by_channel)

    def _advance(self, key: str, value: int, counter: Any) -> None:
        delta = value - self._seen.get(key, 0)
        if delta > 0:
            counter.inc(delta)
        self._seen[key] = value

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="coordinator-metrics")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        self.sample()
        if MULTIPROCESS:
            # Live gauges of this process disappear; counters keep their totals.
            with contextlib.suppress(Exception):
                multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    async def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # a metrics bug must never take the process down
                logger.exception("metrics sampling failed")
            await asyncio.sleep(self.interval)

    def router(self) -> APIRouter:
        """``GET /metrics``: the Prometheus text format, aggregated over workers."""
        router = APIRouter()

        @router.get("/metrics", tags=["health"], include_in_schema=False)
        async def metrics() -> Response:
            self.sample()
            if MULTIPROCESS:
                registry = CollectorRegistry()
                multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
                body = generate_latest(registry)
            else:
                body = generate_latest(REGISTRY)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

        return router

"""Prometheus metrics of a :class:`~coordinator.web.Coordinator`, correct under
``uvicorn --workers N``.

Off unless asked for: ``Coordinator(metrics=True)`` or ``COORDINATOR_METRICS=true``.
Then ``GET /metrics``, answered by any process, serves the ``coordinator_*``
metrics below for every process of the server.

How: each process writes its values to files of its own, in prometheus_client's
multiprocess file format, in one directory per server run; a scrape merges
every process's files (prometheus_client's ``MultiProcessCollector.merge``) in
a worker thread, off the event loop. This module writes the files itself,
not through prometheus_client's metric classes, so it never sets
``PROMETHEUS_MULTIPROC_DIR``, never changes how prometheus_client stores values
and registers nothing in its default ``REGISTRY``.

The host application's own prometheus_client:

- Importing ``coordinator`` or ``coordinator.web`` does not import
  prometheus_client; a Coordinator with metrics imports it when it starts.
  prometheus_client chooses its own mode (multiprocess or not) from
  ``PROMETHEUS_MULTIPROC_DIR`` when it is first imported, so an application that
  sets that variable in code must do so before then, as with any library that
  imports prometheus_client.
- Host metrics kept in one process (no ``PROMETHEUS_MULTIPROC_DIR``): untouched,
  and not served by this ``/metrics``. To serve both on one path, register
  :attr:`CoordinatorMetrics.registry` in your registry
  (``REGISTRY.register(coordinator.metrics.registry)``, after startup) and declare
  your ``/metrics`` route before :meth:`Coordinator.install` (the first route wins).
- Host in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set): the host's files
  stay where they are; the coordinator's go to the subdirectory ``coordinator``
  of that directory, which prometheus_client's collector does not read (it reads
  only the ``*.db`` files at the top). Nothing is counted twice, and emptying that
  directory before the server starts, as prometheus_client asks, empties ours too.

Where the files live, how a server run is told from the next, and the limits of
that: :mod:`coordinator.web.metrics_files`.

Guarantees:

- Counters and histograms keep the totals of processes that ended (a killed
  worker's included) for the whole run; a new run starts from zero.
- Live gauges (``is_leader``, ``sse_clients``, ``relay_up``, ...) cover live
  processes only: a stopping process removes its own, and every scrape first
  removes those of processes that no longer run, so a killed worker's are gone
  by the next scrape.
- The process that answers a scrape writes its values first; the others'
  are at most ``interval`` (1 s) old. Concurrent scrapes each read the files in
  their own thread; removals are serialized by the directory's lock.

Metrics (all prefixed ``coordinator_``):

- election: ``is_leader{instance_id,pid}``, ``fencing_token``, ``elections_total``,
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
  ``relay_resets_total``, ``relay_up{pid}``, ``relay_delivery_lag_seconds``
  (histogram: from the publish, by the Redis clock in the event id, to this
  process's receipt; includes clock skew between Redis and this host).

``sse_channel_clients`` has one series per channel a process has served
since it started (a channel that empties reads 0): mind the cardinality when
channel names are per-user.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio.to_thread

from coordinator.tasks import cancel_and_wait
from coordinator.web.metrics_files import (
    Family,
    ProcessValues,
    RunDirectory,
    claim_ident,
    default_directory,
    release_ident,
    server_run,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from coordinator.election.elector import LeaderElector
    from coordinator.relay.relay import EventRelay
    from coordinator.scheduler.scheduler import LeaderScheduler

logger = logging.getLogger("coordinator.metrics")


_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, float("inf"))


def _counter(name: str, help: str, *labels: str) -> Family:
    return Family(f"coordinator_{name}", help, "counter", labels)


def _gauge(
    name: str, help: str, mode: Literal["liveall", "livesum", "livemax"], *labels: str
) -> Family:
    return Family(f"coordinator_{name}", help, "gauge", labels, mode)


IS_LEADER = _gauge("is_leader", "1 while this process leads its election", "liveall", "instance_id")
FENCING_TOKEN = _gauge("fencing_token", "Fencing token of the current term", "livemax")
LEASE_REMAINING = _gauge("lease_remaining_seconds", "The leader's lease time left", "livemax")
SSE_CLIENTS = _gauge("sse_clients", "Open SSE subscriptions", "livesum")
CHANNEL_CLIENTS = _gauge(
    "sse_channel_clients", "Open SSE subscriptions by channel", "livesum", "channel"
)
RELAY_UP = _gauge("relay_up", "1 while the relay listener is subscribed", "liveall")
ELECTIONS = _counter("elections", "Terms won by processes of this server")
STEPDOWNS = _counter("stepdowns", "Terms ended, by reason", "reason")
RENEW_FAILURES = _counter("renew_failures", "Lease renewals that failed or found the lease lost")
JOB_FIRES = _counter("job_fires", "Job fires by outcome", "outcome")
RELAY_PUBLISHED = _counter("relay_events_published", "Events published")
RELAY_RECEIVED = _counter("relay_events_received", "Events read from Pub/Sub")
RELAY_DELIVERED = _counter("relay_events_delivered", "Event frames queued to local SSE clients")
RELAY_DROPPED = _counter(
    "relay_events_dropped", "Queued frames discarded when a slow client was cut"
)
RELAY_CLIENTS_DROPPED = _counter("relay_clients_dropped", "SSE clients cut for falling behind")
RELAY_RECONNECTS = _counter("relay_reconnects", "Relay listener reconnects")
RELAY_BACKFILLED = _counter("relay_backfilled_events", "Events replayed after a listener reconnect")
RELAY_RESETS = _counter("relay_resets", "reset events sent to clients")
RENEW_LATENCY = Family(
    "coordinator_renew_latency_seconds", "Lease renewal round trip", "histogram", buckets=_FAST
)
DELIVERY_LAG = Family(
    "coordinator_relay_delivery_lag_seconds",
    "Publish (Redis clock) to receipt by this process's listener",
    "histogram",
    buckets=_FAST,
)
JOB_DURATION = Family(
    "coordinator_job_duration_seconds",
    "Run time of finished job fires",
    "histogram",
    ("job_id", "status"),
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, float("inf")),
)


def _registry(directory: RunDirectory) -> CollectorRegistry:
    """A registry whose one collector merges the run's files (after reaping)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector

    class RunCollector(Collector):
        def collect(self) -> Iterable[Metric]:
            directory.reap()
            try:
                merged = MultiProcessCollector.merge(directory.value_files())  # type: ignore[no-untyped-call]
            except FileNotFoundError:  # a file removed between listing and reading
                merged = MultiProcessCollector.merge(directory.value_files())  # type: ignore[no-untyped-call]
            return list(merged)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector())
    return registry


class CoordinatorMetrics:
    """Keeps this process's metrics current and serves the run's, for one Coordinator.

    Reads the components' typed stats objects (``elector.stats``, ``relay.stats``,
    ``scheduler.stats``) every ``interval`` seconds and at each scrape, and
    elections as they happen (observers). Nothing touches the file system before
    :meth:`start`.

    Raises (from :meth:`start`): ``ConfigurationError`` when the directory belongs
    to another user; ``OSError`` when it cannot be created or written.
    """

    def __init__(
        self,
        elector: LeaderElector,
        relay: EventRelay,
        scheduler: LeaderScheduler,
        *,
        instance_id: str,
        directory: Path | None = None,
        interval: float = 1.0,
    ) -> None:
        self._elector = elector
        self._relay = relay
        self._scheduler = scheduler
        self._instance_id = instance_id
        self._directory = directory
        self.interval = interval
        self.registry: CollectorRegistry | None = None
        """The run's metrics as a prometheus_client registry (set by :meth:`start`)."""
        self._run: RunDirectory | None = None
        self._ident = ""
        self._values: ProcessValues | None = None
        self._seen: dict[tuple[str, tuple[str, ...]], int] = {}
        self._stepdowns: dict[str, int] = {}
        self._channels: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        elector.add_observer(self._elected, self._revoked)

    @property
    def directory(self) -> Path | None:
        """The run directory, once started."""
        return self._run.path if self._run else None

    def _elected(self, token: int) -> None:
        self.sample()

    def _revoked(self, reason: str) -> None:
        self._stepdowns[reason] = self._stepdowns.get(reason, 0) + 1
        self.sample()

    def sample(self) -> None:
        """Write this process's current values (runs on the event loop: it drains
        the components' deques, which only that thread touches)."""
        values = self._values
        if values is None:
            return
        elector, relay = self._elector, self._relay.stats
        values.set(IS_LEADER, (self._instance_id,), 1 if elector.is_leader else 0)
        term = elector.term
        if term is not None:
            values.set(FENCING_TOKEN, (), term.token)
        values.set(LEASE_REMAINING, (), elector.lease_remaining)
        values.set(SSE_CLIENTS, (), self._relay.subscribers)
        values.set(RELAY_UP, (), 1 if self._relay.ready else 0)
        by_channel = self._relay.channel_subscribers()
        for channel in self._channels - by_channel.keys():
            values.set(CHANNEL_CLIENTS, (channel,), 0)
        for channel, count in by_channel.items():
            values.set(CHANNEL_CLIENTS, (channel,), count)
        self._channels |= by_channel.keys()

        election = elector.stats
        fires = self._scheduler.stats
        totals: list[tuple[Family, tuple[str, ...], int]] = [
            (ELECTIONS, (), election.terms_won),
            (RENEW_FAILURES, (), election.renew_failures),
            (RELAY_PUBLISHED, (), relay.events_published),
            (RELAY_RECEIVED, (), relay.events_received),
            (RELAY_DELIVERED, (), relay.events_delivered),
            (RELAY_DROPPED, (), relay.events_dropped),
            (RELAY_CLIENTS_DROPPED, (), relay.clients_dropped),
            (RELAY_RECONNECTS, (), relay.reconnects),
            (RELAY_BACKFILLED, (), relay.backfilled_events),
            (RELAY_RESETS, (), relay.resets_sent),
            (JOB_FIRES, ("claimed",), fires.claimed),
            (JOB_FIRES, ("ok",), fires.ok),
            (JOB_FIRES, ("errors",), fires.errors),
            (JOB_FIRES, ("missed",), fires.missed),
            (JOB_FIRES, ("cancelled",), fires.cancelled),
            (JOB_FIRES, ("handed_back",), fires.handed_back),
            (JOB_FIRES, ("unreplicated",), fires.unreplicated),
            (JOB_FIRES, ("refused_not_leader",), fires.refused_not_leader),
            (JOB_FIRES, ("refused_already_claimed",), fires.refused_already_claimed),
            *((STEPDOWNS, (reason,), n) for reason, n in self._stepdowns.items()),
        ]
        for family, labels, total in totals:
            delta = total - self._seen.get((family.name, labels), 0)
            if delta > 0:
                values.inc(family, labels, delta)
            else:
                values.ensure(family, labels)  # the series exists from the start, at 0
            self._seen[family.name, labels] = total
        while election.renew_latencies:
            values.observe(RENEW_LATENCY, (), election.renew_latencies.popleft())
        while relay.delivery_lags:
            values.observe(DELIVERY_LAG, (), max(0.0, relay.delivery_lags.popleft()))
        while fires.durations:
            job_id, status, seconds = fires.durations.popleft()
            values.observe(JOB_DURATION, (job_id, status), max(0.0, seconds))

    async def start(self) -> None:
        """Join the server run's directory (see the module doc) and start sampling."""
        if self._values is not None:
            return
        run = RunDirectory(self._directory or default_directory())
        ident = claim_ident()
        try:
            await anyio.to_thread.run_sync(run.join, ident, server_run())
            values = await anyio.to_thread.run_sync(ProcessValues, run.path, ident)
        except BaseException:
            release_ident(ident)
            raise
        self._run, self._ident, self._values = run, ident, values
        self.registry = _registry(run)
        self.sample()
        self._task = asyncio.create_task(self._sample_every_interval(), name="coordinator-metrics")

    async def stop(self) -> None:
        """Write the final counts, drop this process's live gauges; the last process
        of the run to stop removes the directory."""
        await cancel_and_wait(self._task)
        self._task = None
        values, run = self._values, self._run
        if values is None or run is None:
            return
        self.sample()
        self._values = None
        values.close()
        try:
            if await anyio.to_thread.run_sync(run.leave, self._ident):
                logger.debug("metrics directory %s removed (last process of the run)", run.path)
        finally:
            release_ident(self._ident)

    async def _sample_every_interval(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # a metrics bug must never take the process down
                logger.exception("metrics sampling failed")
            await asyncio.sleep(self.interval)

    async def scrape(self) -> tuple[bytes, str] | None:
        """The run's metrics in Prometheus text format and its content type; None
        before :meth:`start`. Files are read in a worker thread."""
        if self._values is None or self.registry is None:
            return None
        self.sample()
        registry = self.registry

        def render() -> tuple[bytes, str]:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return generate_latest(registry), CONTENT_TYPE_LATEST

        return await anyio.to_thread.run_sync(render)

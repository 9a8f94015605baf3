"""A cluster of scheduler nodes (``tests.chaos.node``) in groups, each group behind its
own :class:`~coordinator.testing.faults.TcpProxy`, and the faults the scenarios inject.

Every fault waits on conditions with deadlines and returns a
:class:`~tests.chaos.checker.Fault` for the checker. ``history()`` gathers the
nodes' JSON lines and the run history in Redis into a
:class:`~tests.chaos.checker.History`.
"""

from __future__ import annotations

import itertools
import signal
import time
from typing import Any

import redis as redis_sync

from coordinator import Keys
from coordinator.testing import TcpProxy

from ..support.procs import Proc, wait_for
from .checker import Fault, History, ProcRecord

TIMING = {
    "COORDINATOR_LEASE_TTL_MS": "1500",
    "COORDINATOR_RENEW_INTERVAL_MS": "300",
    "COORDINATOR_RENEW_DEADLINE_MS": "1000",
    "COORDINATOR_RETRY_PERIOD_MS": "300",
    "COORDINATOR_BACKOFF_MAX_MS": "500",
}
TICK_S = 0.3
FAILOVER_LIMIT_S = 15.0


class NodeCluster:
    """``groups`` x ``per_group`` scheduler nodes; group ``g`` reaches Redis through
    ``proxies[g]`` (or, with ``direct_url``, every node uses that URL: Sentinel)."""

    def __init__(
        self,
        redis_port: int | None,
        namespace: str,
        groups: int = 2,
        per_group: int = 2,
        direct_url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.namespace = namespace
        self.env = env or {}
        self.redis_port = redis_port
        self.direct_url = direct_url
        self.proxies: list[TcpProxy] = []
        if direct_url is None and redis_port is not None:
            self.proxies = [TcpProxy("127.0.0.1", redis_port).start() for _ in range(groups)]
        self.records: dict[str, ProcRecord] = {}
        self.procs: dict[str, Proc] = {}
        self.group_of: dict[str, int] = {}
        self.faults: list[Fault] = []
        self._ids = itertools.count(1)
        for g in range(groups):
            for _ in range(per_group):
                self.spawn(g)

    def url(self, group: int) -> str:
        return self.direct_url or self.proxies[group].url

    def spawn(self, group: int) -> Proc:
        name = f"g{group}-n{next(self._ids)}"
        env = {
            **TIMING,
            "REDIS_URL": self.url(group),
            "COORDINATOR_NAMESPACE": self.namespace,
            "COORDINATOR_INSTANCE_ID": name,
            "CHAOS_TICK_S": str(TICK_S),
            **self.env,
        }
        proc = Proc("tests.chaos.node", env=env, name=name)
        self.procs[name] = proc
        self.group_of[name] = group
        self.records[name] = ProcRecord(name, proc.events)
        return proc

    @property
    def all(self) -> list[Proc]:
        return list(self.procs.values())

    def wait_ready(self) -> None:
        wait_for(lambda: all(p.of("ready") for p in self.all), 60, "nodes ready", self.all)
        self.wait_fire(0)

    # -- observing ----------------------------------------------------------------
    def starts(self) -> list[dict[str, Any]]:
        return sorted((e for p in self.all for e in p.of("start")), key=lambda e: e["t"])

    def top_token(self) -> int:
        return max((e["token"] for e in self.starts()), default=0)

    def wait_fire(self, above: int, timeout: float = FAILOVER_LIMIT_S + 10) -> dict[str, Any]:
        """The first fire started by a term with a token above ``above``."""
        found: dict[str, Any] = wait_for(
            lambda: next((e for e in self.starts() if e["token"] > above), None),
            timeout,
            f"a fire by a term above {above}",
            self.all,
        )
        return found

    def leader(self) -> Proc:
        """The node that ran the newest fire (it led a moment ago)."""
        last = self.starts()[-1]
        return next(p for p in self.all if p.name == last["instance_id"])

    def wait_ticks(self, n: int = 3) -> None:
        """``n`` more fires after now, so each fault starts from a working cluster."""
        t0 = time.monotonic()
        wait_for(
            lambda: sum(1 for e in self.starts() if e["t"] > t0) >= n, 20, f"{n} fires", self.all
        )

    # -- faults -------------------------------------------------------------------
    def sigkill_leader(self) -> Fault:
        leader, top = self.leader(), self.top_token()
        start = time.monotonic()
        leader.kill()
        self.records[leader.name].killed = True
        self.wait_fire(top)
        self.spawn(self.group_of[leader.name])  # keep the cluster's size
        return self._add(Fault("sigkill", start, time.monotonic()))

    def sigstop_leader(self) -> Fault:
        """Pause the leader past its lease; a new term runs fires; resume it: it must
        step down and its held-up claims must be refused."""
        leader, top = self.leader(), self.top_token()
        start = time.monotonic()
        leader.signal(signal.SIGSTOP)
        self.wait_fire(top)
        resumed = time.monotonic()
        leader.signal(signal.SIGCONT)
        self.records[leader.name].paused.append((start, resumed))
        wait_for(
            lambda: any(e["t"] > start for e in leader.of("revoked")),
            15,
            "the paused leader to step down",
            self.all,
        )
        return self._add(Fault("sigstop", start, time.monotonic()))

    def partition_leader(self) -> Fault:
        """Blackhole the leader's group: another group leads; heal (held bytes arrive late)."""
        leader, top = self.leader(), self.top_token()
        proxy = self.proxies[self.group_of[leader.name]]
        start = time.monotonic()
        proxy.blackhole()
        try:
            self.wait_fire(top)
            wait_for(
                lambda: any(e["t"] > start for e in leader.of("revoked")),
                15,
                "the partitioned leader to step down",
                self.all,
            )
        finally:
            proxy.heal()
        return self._add(Fault("partition", start, time.monotonic()))

    def cut_connections(self) -> Fault:
        """Close every connection of the leader's group (a network blip / CLIENT KILL)."""
        leader = self.leader()
        start = time.monotonic()
        self.proxies[self.group_of[leader.name]].cut()
        self.wait_ticks(2)
        return self._add(Fault("cut", start, time.monotonic(), displaces_leader=False))

    def restart_redis(self, server: Any) -> Fault:
        """Kill Redis and start it empty (data loss): leases, claims and history vanish."""
        top = self.top_token()
        start = time.monotonic()
        server.restart()
        self.wait_fire(top)
        return self._add(Fault("redis-restart", start, time.monotonic()))

    def _add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    # -- the record ---------------------------------------------------------------
    def stop(self) -> None:
        for name, proc in self.procs.items():
            record = self.records[name]
            if record.killed:
                continue
            if proc.alive:
                record.exit_code = proc.terminate(15)
            else:
                record.exit_code = proc.popen.returncode
        for name, proc in self.procs.items():
            self.records[name].stderr = proc.stderr_tail(400)
        for proxy in self.proxies:
            proxy.stop()

    def history(self, redis_url: str) -> History:
        client = redis_sync.Redis.from_url(redis_url, socket_timeout=5)
        try:
            import json

            runs = [json.loads(raw) for raw in client.lrange(Keys(self.namespace).runs(), 0, -1)]
        finally:
            client.close()
        return History(
            procs=list(self.records.values()),
            runs=runs,
            faults=self.faults,
            tick_ms=int(TICK_S * 1000),
        )

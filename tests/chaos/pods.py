"""Pods of the demo (``uvicorn app.main:app --workers 2``), each behind its own TCP proxy
to Redis; SSE clients that reconnect with Last-Event-ID and log what they receive; a
publisher that logs acknowledged ids; a /readyz poller. Feeds the checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import httpx

from coordinator.testing import TcpProxy

from ..support.app_cluster import HOST, AppCluster
from ..support.reconnecting_client import ReconnectingClient
from ..support.timing import FAST_ENV
from .checker import ClientLog, Fault, History, ProcRecord, unreceived

POD_ENV = {**FAST_ENV, "DEMO_COLLECT_EVERY_S": "0.5"}


class Pods:
    """``n`` pods of the demo; pod ``i`` reaches Redis through ``proxies[i]`` (or all use
    ``direct_url``)."""

    def __init__(
        self,
        redis_port: int | None,
        namespace: str,
        n: int = 2,
        workers: int = 2,
        env: dict[str, str] | None = None,
        direct_url: str | None = None,
    ) -> None:
        self.proxies: list[TcpProxy] = []
        if direct_url is None and redis_port is not None:
            self.proxies = [TcpProxy("127.0.0.1", redis_port).start() for _ in range(n)]
        urls = [direct_url] * n if direct_url else [p.url for p in self.proxies]
        self.pods = [
            AppCluster(
                url or "",
                namespace,
                workers=workers,
                app="app.main:app",
                env={**POD_ENV, **(env or {})},
            )
            for url in urls
        ]
        self.faults: list[Fault] = []
        self.readiness: list[tuple[float, int | None]] = []
        self.clients: list[ReconnectingClient] = []
        self.published: list[str] = []

    async def wait_ready(self) -> None:
        await asyncio.gather(*(pod.wait_ready() for pod in self.pods))

    def port(self, i: int) -> int:
        return self.pods[i % len(self.pods)].port

    async def open_clients(self, channel: str, n: int, pods: list[int] | None = None) -> None:
        for i in range(n):
            pod = (pods or list(range(len(self.pods))))[i % len(pods or self.pods)]
            client = ReconnectingClient(
                f"client{i}@pod{pod}", self.port(pod), f"/api/channels/{channel}/events"
            )
            self.clients.append(client)
            await client.start()

    async def publish(
        self, channel: str, seq: int, pods: list[int] | None = None, timeout: float = 30
    ) -> str:
        """POST one event to the first pod (of ``pods``) that accepts it; log its id."""
        order = pods or list(range(len(self.pods)))
        deadline = time.monotonic() + timeout
        for i in itertools.cycle(order):
            with contextlib.suppress(httpx.HTTPError):
                async with httpx.AsyncClient(timeout=3) as http:
                    response = await http.post(
                        f"http://{HOST}:{self.port(i)}/api/channels/{channel}/events",
                        json={"data": {"seq": seq}},
                    )
                if response.status_code == 202:
                    event_id: str = response.json()["id"]
                    self.published.append(event_id)
                    return event_id
                assert response.status_code == 503, (response.status_code, response.text)
            if time.monotonic() > deadline:
                raise AssertionError(f"could not publish {seq} within {timeout}s")
            await asyncio.sleep(0.05)
        raise AssertionError("unreachable")

    async def poll_readiness(self, pod: int, stop: asyncio.Event) -> None:
        """Sample /readyz of ``pod`` every 0.2 s on fresh connections (any worker)."""
        while not stop.is_set():
            status: int | None = None
            with contextlib.suppress(httpx.HTTPError):
                async with httpx.AsyncClient(timeout=3) as http:
                    status = (await http.get(f"http://{HOST}:{self.port(pod)}/readyz")).status_code
            self.readiness.append((time.monotonic(), status))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    async def wait_delivered(self, timeout: float = 30) -> None:
        """Every client holds every published id, or got a reset where it lost some (the
        checker's rule: a reset for an earlier loss does not excuse a later event)."""
        want = set(self.published)
        deadline = time.monotonic() + timeout
        while True:
            short = [c for c in self.clients if not self._caught_up(c, want)]
            if not short:
                return
            if time.monotonic() > deadline:
                worst = short[0]
                missing = [p for p, told in unreceived(self.published, worst.entries) if not told]
                raise AssertionError(
                    f"{len(short)} clients short, e.g. {worst.name} misses "
                    f"{missing[:5]} with no reset for them; log tail {worst.entries[-6:]}"
                )
            await asyncio.sleep(0.05)

    def _caught_up(self, client: ReconnectingClient, want: set[str]) -> bool:
        if want <= client.ids():
            return True
        return all(announced for _, announced in unreceived(self.published, client.entries))

    async def stop(self) -> list[ProcRecord]:
        for client in self.clients:
            await client.stop()
        records = []
        for i, pod in enumerate(self.pods):
            code, _ = pod.stop()
            records.append(
                ProcRecord(f"pod{i}", [], exit_code=code, stderr=pod.proc.stderr_tail(400))
            )
        for proxy in self.proxies:
            proxy.stop()
        return records

    def history(self, procs: list[ProcRecord], replay_ok: bool = True) -> History:
        return History(
            procs=procs,
            faults=self.faults,
            published=list(self.published),
            readiness=self.readiness,
            clients=[ClientLog(c.name, c.entries, replay_ok) for c in self.clients],
        )

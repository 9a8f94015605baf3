"""Run an ASGI app under ``uvicorn --workers N`` and drive it over real sockets.

The demo (``app="app.main:app"``) or the relay-only test app (the default,
``tests.support.relay_app``). Used by the multi-worker tests, the chaos suite
and ``bench/fanout.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx

from coordinator.testing import free_port

from .procs import ROOT, Proc
from .sse_client import SSEClient

HOST = "127.0.0.1"
WORKER_HEALTHCHECK_S = 60  # long, so a worker slow on 2 busy cores is never killed for it
# How long uvicorn may take to replace a SIGKILLed worker: it notices a dead worker on its
# next health check, but a kill that lands while it waits for that worker's pong is seen
# only when the wait times out; then the new worker starts up.
RESPAWN_S = WORKER_HEALTHCHECK_S + 30


class AppCluster:
    """``uvicorn APP --workers N`` on a free port, with ``REDIS_URL`` and a namespace."""

    def __init__(
        self,
        redis_url: str,
        namespace: str,
        workers: int = 4,
        env: dict[str, str] | None = None,
        app: str = "tests.support.relay_app:app",
        command: Callable[[int], Sequence[str]] | None = None,
        cwd: Path = ROOT,
        uvicorn_args: Sequence[str] = (),
    ) -> None:
        """``command``, given a port, returns a command line to run instead of uvicorn's own
        (an image's CMD): it must serve on that port with ``workers`` workers, from ``cwd``.
        ``uvicorn_args`` go after uvicorn's own options (a later option wins)."""
        self.port = free_port()
        self.workers = workers
        self.base = f"http://{HOST}:{self.port}"
        full_env = {
            "REDIS_URL": redis_url,
            "COORDINATOR_NAMESPACE": namespace,
            "COORDINATOR_RELAY_KEEPALIVE_S": "1",
            "COORDINATOR_BACKOFF_MAX_MS": "1000",
            **(env or {}),
        }
        if command is not None:
            self.proc = Proc.exec(
                command(self.port), env=full_env, name=f"image:{self.port}", cwd=cwd
            )
            return
        self.proc = Proc(
            "uvicorn",
            app,
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--timeout-worker-healthcheck",
            str(WORKER_HEALTHCHECK_S),
            "--timeout-graceful-shutdown",
            "20",
            *uvicorn_args,
            env=full_env,
            name=f"uvicorn:{self.port}",
        )

    @contextlib.asynccontextmanager
    async def running(self, exit_codes: tuple[int, ...] = (0,)) -> AsyncIterator[AppCluster]:
        """Wait until every worker is ready; on exit stop it and check how it ended.

        A single-process uvicorn (``workers=1``) re-raises the SIGTERM it handled
        after a graceful shutdown, so pass ``exit_codes=(0, -15)`` for it.
        """
        try:
            await self.wait_ready()
            yield self
        finally:
            code, _ = self.stop()
            tail = self.proc.stderr_tail(400)
            assert code in exit_codes, tail
            assert "Traceback" not in tail, tail

    async def get(self, path: str, timeout: float = 10) -> httpx.Response:
        """A GET on a fresh connection (so it may land on any worker)."""
        async with httpx.AsyncClient(base_url=self.base, timeout=timeout) as client:
            return await client.get(path)

    async def wait_ready(self, timeout: float = 90) -> set[str]:
        """Wait until ``workers`` distinct instances answered ``/readyz`` with 200."""
        ready: set[str] = set()
        deadline = time.monotonic() + timeout
        while len(ready) < self.workers:
            if not self.proc.alive:
                raise AssertionError(f"uvicorn exited:\n{self.proc.stderr_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(ready)} workers ready\n{self.proc.stderr_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                response = await self.get("/readyz", timeout=2)
                if response.status_code == 200:
                    ready.add(response.json()["instance_id"])
                    continue
            await asyncio.sleep(0.05)
        return ready

    async def stats(
        self, want: int | None = None, timeout: float = 30, until: Any = None
    ) -> dict[str, dict[str, Any]]:
        """``/relay/stats`` of every worker (by instance), each satisfying ``until``."""
        want = want or self.workers
        seen: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                body = (await self.get("/relay/stats", timeout=2)).json()
                seen[body["instance_id"]] = body
            good = [s for s in seen.values() if until is None or until(s)]
            if len(good) >= want:
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"worker stats never satisfied the condition: {seen}")
            await asyncio.sleep(0.02)

    async def clients(
        self, path: str, n: int, min_instances: int, last_event_id: str | None = None
    ) -> list[SSEClient]:
        """``n`` started SSE clients spread over at least ``min_instances`` workers."""
        opened: list[SSEClient] = []
        for _ in range(20):
            batch = [
                SSEClient(HOST, self.port, path, last_event_id=last_event_id)
                for _ in range(max(n - len(opened), 4))
            ]
            await asyncio.gather(*(c.connect() for c in batch))
            for client in batch:
                assert client.status == 200, (client.status, client.body)
                client.start()
            opened += batch
            if len({c.instance for c in opened}) >= min_instances and len(opened) >= n:
                break
        chosen = spread(opened, n)
        for client in opened:
            if client not in chosen:
                await client.close()
        assert len({c.instance for c in chosen}) >= min_instances
        return chosen

    async def publishers(self, n: int = 6) -> list[httpx.AsyncClient]:
        """Keep-alive HTTP clients, each pinned to one connection (so one worker)."""
        out = []
        for _ in range(n):
            client = httpx.AsyncClient(
                base_url=self.base, timeout=10, limits=httpx.Limits(max_connections=1)
            )
            await client.get("/healthz-unknown")  # opens the connection (404 is fine)
            out.append(client)
        return out

    async def publish(
        self, client: httpx.AsyncClient, channel: str, data: Any, timeout: float = 20
    ) -> tuple[str, str]:
        """POST one event, retrying 503s and dropped connections; returns (id, instance)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = await client.post(f"/api/channels/{channel}/events", json={"data": data})
                if response.status_code == 202:
                    return response.json()["id"], response.headers["x-coordinator-instance"]
                assert response.status_code == 503, (response.status_code, response.text)
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"could not publish {data!r} within {timeout}s")
            await asyncio.sleep(0.05)

    def stop(self, timeout: float = 30) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds it took)."""
        started = time.monotonic()
        code = self.proc.terminate(timeout)
        return code, time.monotonic() - started


def spread(clients: Iterable[SSEClient], n: int) -> list[SSEClient]:
    """Pick ``n`` clients round-robin over their instances (most workers covered)."""
    by_instance: dict[str, list[SSEClient]] = {}
    for client in clients:
        by_instance.setdefault(client.instance, []).append(client)
    chosen: list[SSEClient] = []
    while len(chosen) < n and any(by_instance.values()):
        for group in by_instance.values():
            if group and len(chosen) < n:
                chosen.append(group.pop())
    return chosen


async def wait_messages(clients: Iterable[SSEClient], count: int, timeout: float = 30) -> None:
    """Wait until every client holds at least ``count`` ``message`` events."""
    clients = list(clients)
    deadline = time.monotonic() + timeout
    while True:
        short = [c for c in clients if len(c.of("message")) < count]
        if not short:
            return
        if time.monotonic() > deadline:
            worst = min(len(c.of("message")) for c in short)
            raise AssertionError(f"{len(short)} clients short of {count} events (worst {worst})")
        await asyncio.sleep(0.02)

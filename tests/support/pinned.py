"""HTTP clients pinned to one uvicorn worker each: one keep-alive connection per client.

uvicorn's workers share one listening socket, so which worker serves a request
depends on which one accepted its connection. A client that keeps one
connection open talks to one worker; every answer's ``X-Coordinator-Instance``
says which, and :meth:`Pinned.request` checks it. uvicorn closes a connection
idle for 5 s (``--timeout-keep-alive``), so each pinned client sends a
``GET /healthz`` every 2 s while it is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx

INSTANCE = "x-coordinator-instance"


class Pinned:
    """A client on one connection to the worker ``instance``."""

    def __init__(self, client: httpx.AsyncClient, instance: str, pid: int) -> None:
        self.client = client
        self.instance = instance
        self.pid = pid
        self._keepalive = asyncio.create_task(self._keep_alive())

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(2)
            with contextlib.suppress(httpx.HTTPError):
                await self.client.get("/healthz")

    async def request(self, method: str, path: str, **options: Any) -> httpx.Response:
        response = await self.client.request(method, path, **options)
        served = response.headers.get(INSTANCE)
        assert served == self.instance, (
            f"{method} {path} was served by {served}, not {self.instance}"
        )
        return response

    async def get(self, path: str, **options: Any) -> httpx.Response:
        return await self.request("GET", path, **options)

    async def put(self, path: str, **options: Any) -> httpx.Response:
        return await self.request("PUT", path, **options)

    async def aclose(self) -> None:
        self._keepalive.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._keepalive
        await self.client.aclose()


async def pin_workers(
    base: str, workers: int, per_worker: int = 1, timeout: float = 60
) -> dict[str, list[Pinned]]:
    """``per_worker`` pinned clients for each of ``workers`` workers, by instance id."""
    pinned: dict[str, list[Pinned]] = {}
    extra: list[httpx.AsyncClient] = []  # held open meanwhile, so other workers accept
    deadline = time.monotonic() + timeout
    while len(pinned) < workers or any(len(p) < per_worker for p in pinned.values()):
        if time.monotonic() > deadline:
            found = {k: len(v) for k, v in pinned.items()}
            await close_all(pinned)
            for spare in extra:
                await spare.aclose()
            raise AssertionError(
                f"could not pin {per_worker} clients to {workers} workers: {found}"
            )
        client = httpx.AsyncClient(
            base_url=base,
            timeout=10,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        try:
            body = (await client.get("/api/instance")).json()
        except httpx.HTTPError:
            await client.aclose()
            continue
        group = pinned.setdefault(body["instance_id"], [])
        if len(group) < per_worker:
            group.append(Pinned(client, body["instance_id"], body["pid"]))
        else:
            extra.append(client)
    for spare in extra:
        await spare.aclose()
    return pinned


async def close_all(pinned: dict[str, list[Pinned]]) -> None:
    for group in pinned.values():
        for p in group:
            await p.aclose()

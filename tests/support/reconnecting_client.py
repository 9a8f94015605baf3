"""An SSE client that behaves like a browser's EventSource: on any end of its stream it
reconnects with its Last-Event-ID, and it logs what it receives for checkers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from coordinator.tasks import cancel_and_wait

from .app_cluster import HOST
from .sse_client import SSEClient, SSEMessage


class ReconnectingClient:
    """An SSE client that reconnects (with its Last-Event-ID) whenever its stream ends,
    as a browser's EventSource does, logging opens, messages, resets and ends."""

    def __init__(self, name: str, port: int | Callable[[], int], path: str) -> None:
        """``port``: the server's, or a callable choosing one for each connection
        (a load balancer over several servers)."""
        self.name, self.port, self.path = name, port, path
        self.entries: list[tuple[str, str | None]] = []
        self.last_id: str | None = None
        self.reconnects = 0
        self._client: SSEClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._opened = asyncio.Event()

    def _on(self, message: SSEMessage) -> None:
        if message.event == "message":
            self.entries.append(("message", message.id))
        elif message.event == "reset":
            self.entries.append(("reset", None))

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())
        await asyncio.wait_for(self._opened.wait(), 30)

    async def _run(self) -> None:
        while True:
            # Before any event, resume from the start of the (fresh) channel, not its tip:
            # events published while the first stream was down are still owed.
            resume = self.last_id if self.reconnects == 0 or self.last_id else "0-0"
            port = self.port() if callable(self.port) else self.port
            client = SSEClient(HOST, port, self.path, last_event_id=resume, on_message=self._on)
            try:
                await client.connect()
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
                await asyncio.sleep(0.1)
                continue
            if client.status != 200:
                await asyncio.sleep(0.1)
                continue
            self.entries.append(("open", self.last_id))
            self._client = client
            client.start()
            # The stream is live once its hello arrived (it opens every stream).
            while not client.ended and not client.of("hello"):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            self._opened.set()
            while not client.ended:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            self.last_id = client.last_event_id or self.last_id
            self.entries.append(("end", None))
            self.reconnects += 1
            await client.close()

    def ids(self) -> set[str]:
        return {v for k, v in self.entries if k == "message" and v}

    def messages(self) -> list[str]:
        """Ids of the ``message`` events received, in arrival order, across reconnects."""
        return [v for k, v in self.entries if k == "message" and v]

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._client is not None:
            await self._client.close()

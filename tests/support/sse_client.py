"""A small raw-asyncio SSE client: many of them are cheap, and nothing is hidden.

It speaks just enough HTTP/1.1 for a streaming GET (chunked or not), records
the response status and headers, and parses SSE messages into
:class:`SSEMessage` with the monotonic time each arrived. Used by the relay
tests and by ``bench/fanout.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SSEMessage:
    id: str | None
    event: str
    data: str
    t: float

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class SSEClient:
    host: str
    port: int
    path: str
    last_event_id: str | None = None
    on_message: Callable[[SSEMessage], None] | None = None
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    messages: list[SSEMessage] = field(default_factory=list)
    comments: int = 0
    retry: int | None = None
    ended: bool = False
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _task: asyncio.Task[None] | None = None

    @property
    def instance(self) -> str:
        return self.headers.get("x-coordinator-instance", "")

    async def connect(self, timeout: float = 10.0) -> SSEClient:
        """Send the request and read the status and headers (and a non-200 body)."""
        async with asyncio.timeout(timeout):
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            lines = [
                f"GET {self.path} HTTP/1.1",
                f"Host: {self.host}:{self.port}",
                "Accept: text/event-stream",
            ]
            if self.last_event_id is not None:
                lines.append(f"Last-Event-ID: {self.last_event_id}")
            self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                self.headers[name.strip().lower()] = value.strip()
        if self.status != 200:
            length = int(self.headers.get("content-length", "0"))
            async with asyncio.timeout(timeout):
                self.body = await self._reader.readexactly(length)
            await self.close()
        return self

    def start(self) -> SSEClient:
        """Read messages in a background task until the stream ends or :meth:`close`."""
        self._task = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _body_chunks(self) -> Any:
        assert self._reader is not None
        if self.headers.get("transfer-encoding", "").lower() != "chunked":
            while chunk := await self._reader.read(65536):
                yield chunk
            return
        while True:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return
            data = await self._reader.readexactly(size + 2)
            yield data[:-2]

    async def _read(self) -> None:
        buffer = b""
        try:
            async for chunk in self._body_chunks():
                buffer += chunk.replace(b"\r\n", b"\n")  # a split CRLF is rare; fine here
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    self._parse(block.decode("utf-8"))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self.ended = True

    def _parse(self, block: str) -> None:
        event_id, event, data = None, "message", []
        for line in block.split("\n"):
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                event_id = value
            elif name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "retry":
                self.retry = int(value)
        if data:
            message = SSEMessage(event_id, event, "\n".join(data), time.monotonic())
            if event_id is not None:
                self.last_event_id = event_id
            self.messages.append(message)
            if self.on_message is not None:
                self.on_message(message)

    def of(self, event: str = "message") -> list[SSEMessage]:
        return [m for m in self.messages if m.event == event]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

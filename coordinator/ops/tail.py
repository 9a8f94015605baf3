"""Follow a channel from a terminal: the ``coordinator tail`` command's engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Callable
from typing import Any

from coordinator.relay.relay import EventRelay
from coordinator.settings import CoordinatorSettings
from coordinator.store.connection import RedisClient
from coordinator.tasks import cancel_and_wait


def parse_frames(chunk: bytes) -> list[dict[str, Any]]:
    """SSE bytes (one or more whole messages) as ``{"id", "event", "data"}`` dicts.

    ``data`` is decoded JSON when it parses, else the raw text.
    """
    out = []
    for block in chunk.decode("utf-8", "replace").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, sep, value = line.partition(": ")
            if sep and name in ("id", "event", "data"):
                fields[name] = value
        if "data" not in fields:
            continue
        try:
            data: Any = json.loads(fields["data"])
        except ValueError:
            data = fields["data"]
        out.append({"id": fields.get("id"), "event": fields.get("event", "message"), "data": data})
    return out


async def follow(
    settings: CoordinatorSettings,
    redis: RedisClient,
    channel: str,
    last_event_id: str | None,
    count: int,
    show: Callable[[dict[str, Any]], None],
) -> int:
    """Call ``show`` for each event of ``channel`` until ``count`` (0: forever), SIGINT
    or SIGTERM; returns how many were shown. Raises the relay's errors."""
    relay = EventRelay(settings, redis)
    shown = 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await relay.start()
    try:
        await relay.wait_ready(settings.relay_subscribe_timeout_s)
        async with await relay.subscribe(channel, last_event_id=last_event_id) as sub:
            stopper = asyncio.create_task(stop.wait())
            try:
                chunks = aiter(sub)
                while not stop.is_set():
                    nxt = asyncio.ensure_future(anext(chunks))
                    await asyncio.wait({nxt, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    if not nxt.done():
                        await cancel_and_wait(nxt)
                        break
                    try:
                        chunk = nxt.result()
                    except StopAsyncIteration:
                        break
                    for event in parse_frames(chunk):
                        show(event)
                        shown += 1
                        if count and shown >= count:
                            return shown
            finally:
                await cancel_and_wait(stopper)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await relay.stop()
    return shown

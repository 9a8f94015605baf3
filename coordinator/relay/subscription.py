"""One local subscriber of an :class:`~coordinator.relay.relay.EventRelay` channel.

A :class:`Subscription` is a bounded queue of ready-to-send SSE bytes. The
relay pushes into it (the same ``bytes`` object to every subscriber of a
channel); the consumer (an SSE response) iterates it.

Ordering and duplicates: every frame carries its stream id. A subscription
keeps ``last_id``, the highest id it has queued, and drops any frame whose id
is not above it; so replayed and live copies of one event reach the client
once, in id order.

While a subscription is *replaying* (right after subscribe, and while the
relay backfills after a Redis reconnect), live frames are held aside and
merged with the replayed ones, sorted by id, when it goes live again.

Two ways to consume it: iterate it (one task wakes per batch of frames), or
register a synchronous consumer with :meth:`Subscription.consume` and drain
with :meth:`Subscription.take` (no task wakes: the HTTP layer writes frames
to the socket in the same pass that queued them).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from coordinator.relay.events import EventId
from coordinator.relay.stats import RelayStats

logger = logging.getLogger("coordinator.relay")

MAX_BATCH = 64
"""Frames joined into one write; fewer writes under bursts, same bytes."""

CloseReason = str
"""``"overflow"`` (fell behind), ``"shutdown"`` (relay stopped), ``"closed"`` (by the consumer)."""


class Subscription:
    """A bounded, ordered, duplicate-free stream of SSE frames for one channel.

    Iterate it (``async for chunk in sub``) to get ``bytes`` holding one or
    more whole SSE messages; iteration ends when the subscription closes. Use
    it as an async context manager, or call :meth:`aclose`, so the relay
    forgets it.

    Limits: at most ``capacity`` frames wait in the queue (plus, right after a
    replay, the replayed backlog). One frame more and the subscription closes
    with reason ``"overflow"``, drops its queue and calls its close callbacks:
    a slow client is cut off (it reconnects with Last-Event-ID and replays),
    never slowing the others.
    """

    def __init__(
        self,
        channel: str,
        capacity: int,
        *,
        stats: RelayStats | None = None,
        on_discard: Callable[[Subscription], None] | None = None,
    ) -> None:
        self.channel = channel
        self.last_id: EventId | None = None
        self.closed: CloseReason | None = None
        self._stats = stats if stats is not None else RelayStats()
        self._on_discard = on_discard
        self._base = capacity
        self._capacity = capacity
        self._queue: deque[bytes] = deque()
        self._held: list[tuple[EventId, bytes]] = []
        self._replayed: list[tuple[EventId, bytes]] = []
        self._reset: bytes | None = None
        self._live = False
        self._backfilling = False
        self._wakeup: asyncio.Event | None = None  # made by the first iterator that waits
        self._consumer: Callable[[], None] | None = None
        self._callbacks: list[Callable[[CloseReason], None]] = []

    # -- relay side -------------------------------------------------------------
    def push(self, event_id: EventId, frame: bytes) -> None:
        """Queue a live frame (called by the relay for every event of the channel)."""
        if self.closed is not None:
            return
        if not self._live:
            self._held.append((event_id, frame))
            if len(self._held) > self._capacity:
                self.close("overflow")
            return
        if self.last_id is not None and event_id <= self.last_id:
            self._stats.duplicates_dropped += 1
            return
        if len(self._queue) >= self._capacity:
            self.close("overflow")
            return
        self._queue.append(frame)
        self.last_id = event_id
        self._stats.events_delivered += 1
        self._ready()

    @property
    def cursor(self) -> EventId | None:
        """Where the next replay read starts (exclusive)."""
        return self._replayed[-1][0] if self._replayed else self.last_id

    def add_replayed(self, entries: list[tuple[EventId, bytes]], reset: bytes | None) -> None:
        """Add frames read from the stream (ascending ids) while not live."""
        if reset is not None and self._reset is None:
            self._reset = reset
        cursor = self.cursor
        self._replayed.extend(e for e in entries if cursor is None or e[0] > cursor)

    def suspend(self) -> None:
        """Hold live frames aside until :meth:`go_live` (the relay is reconnecting)."""
        if self._live or self._backfilling:
            self._live = False
            self._backfilling = True

    @property
    def backfilling(self) -> bool:
        return self._backfilling

    def go_live(self) -> int:
        """Merge replayed and held frames by id, queue the new ones; returns how many."""
        if self.closed is not None:
            return 0
        if self._reset is not None:
            self._queue.append(self._reset)
            self._stats.resets_sent += 1
        merged = sorted(self._replayed + self._held, key=lambda e: e[0])
        added = 0
        for event_id, frame in merged:
            if self.last_id is None or event_id > self.last_id:
                self._queue.append(frame)
                self.last_id = event_id
                added += 1
        self._replayed, self._held, self._reset = [], [], None
        self._capacity = self._base + len(self._queue)
        self._live, self._backfilling = True, False
        if self._queue:
            self._ready()
        return added

    def close(self, reason: CloseReason) -> None:
        """End the subscription; ``"overflow"`` also drops what is queued."""
        if self.closed is not None:
            return
        self.closed = reason
        if reason == "overflow":
            self._stats.events_dropped += len(self._queue) + len(self._held)
        if reason != "shutdown":
            self._queue.clear()
        self._held, self._replayed = [], []
        if self._on_discard is not None:
            self._on_discard(self)
        if reason == "overflow":
            self._stats.clients_dropped += 1
        self._ready()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            self._call(callback, reason)

    def on_close(self, callback: Callable[[CloseReason], None]) -> None:
        """Call ``callback(reason)`` when the subscription closes (at once if it has).

        Callbacks run where the close happens (often inside the relay's listener,
        for ``"overflow"``). One that raises is logged and does not affect the
        relay, the other callbacks or other subscribers.
        """
        if self.closed is not None:
            self._call(callback, self.closed)
        else:
            self._callbacks.append(callback)

    def _call(self, callback: Callable[[CloseReason], None], reason: CloseReason) -> None:
        try:
            callback(reason)
        except Exception:
            logger.exception("on_close callback %r of %r raised", callback, self)

    def _ready(self) -> None:
        """Frames were queued, or the subscription closed: tell the consumer."""
        if self._consumer is not None:
            self._consumer()
        elif self._wakeup is not None:
            self._wakeup.set()

    # -- consumer side ----------------------------------------------------------
    @property
    def queued(self) -> int:
        """Frames waiting to be read."""
        return len(self._queue)

    def take(self) -> bytes | None:
        """The queued frames (at most ``MAX_BATCH``) joined into one chunk; ``None`` if none."""
        queue = self._queue
        if not queue:
            return None
        count = min(len(queue), MAX_BATCH)
        popleft = queue.popleft
        chunk = popleft() if count == 1 else b"".join([popleft() for _ in range(count)])
        if self._capacity > self._base:
            self._capacity = max(self._base, self._capacity - count)
        return chunk

    def consume(self, ready: Callable[[], None]) -> None:
        """Call ``ready()`` whenever frames are queued or the subscription closes,
        instead of waking an iterator; the consumer drains with :meth:`take`.

        ``ready`` runs synchronously where the push happens (inside the relay's
        listener), so it must not block or raise; it may call :meth:`take`. If
        frames are already queued, or the subscription is closed, it is called
        at once. One consumer per subscription, and then do not iterate it.
        """
        if self._consumer is not None:
            raise RuntimeError(f"{self!r} already has a consumer")
        self._consumer = ready
        if self._queue or self.closed is not None:
            ready()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> bytes:
        while not self._queue:
            if self.closed is not None:
                raise StopAsyncIteration
            if self._wakeup is None:
                self._wakeup = asyncio.Event()
            self._wakeup.clear()
            await self._wakeup.wait()
        chunk = self.take()
        assert chunk is not None
        return chunk

    async def aclose(self) -> None:
        """Unsubscribe; safe to call more than once."""
        self.close("closed")

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = self.closed or ("live" if self._live else "replaying")
        return (
            f"<Subscription {self.channel!r} {state} last_id={self.last_id} queued={self.queued}>"
        )

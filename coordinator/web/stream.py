"""The HTTP side of a relay subscription: a lean ``text/event-stream`` response.

:class:`ChannelEventResponse` streams one
:class:`~coordinator.relay.subscription.Subscription`. It is built for many idle
streams and for broadcasts to all of them, so per connection it holds no task of
its own and per event it wakes none:

- The request's own task sends the headers, the ``retry`` hint, the ``hello``
  event and any replayed frames, then waits on ``receive()`` (which returns when
  the client disconnects) under a timer that sends a heartbeat comment every
  ``sse_ping_s``.
- Live frames are written where the relay queues them: the subscription calls
  back, and once per event-loop pass every stream with queued frames writes
  them all in one ``send``. The ASGI ``send`` coroutine is driven inline; it
  finishes without suspending unless the client's socket buffer is full, and
  only then does the rest of that one write continue in a task. Frames queued
  meanwhile wait in the subscription's bounded queue; a client that falls
  ``relay_client_queue`` frames behind is cut off (the connection is closed
  without a final chunk, so the client reconnects and replays).
- On server shutdown (uvicorn's exit flag, seen by one watcher per process,
  :mod:`coordinator.web.shutdown`), or :meth:`EventRelay.stop`, streams write
  what is queued and finish.

Guarantees: the bytes on the wire are exactly the subscription's frames, in
order, each written once; one write never interleaves with another of the same
stream. ``send`` runs in a copy of the request's context, so middleware that
reads context variables sees the request's values. Under
:class:`~coordinator.web.direct_send.DirectStreamWrites` (which
``Coordinator.install`` adds), the body chunks skip the send wrappers of the
middleware inside it that only watch the response start; the start itself
takes the full chain. Where that leaves nothing but uvicorn's ``httptools``
``send`` (and Starlette's server-error wrapper), live chunks are written straight
to uvicorn's transport whenever ``send`` would not wait
(:mod:`coordinator.web.transport_send`).

Limits: users' own streams should keep using sse-starlette's
``EventSourceResponse``; this response streams only a ``Subscription``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import CoroutineType
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from coordinator.relay.events import hello_frame, retry_frame
from coordinator.relay.subscription import Subscription
from coordinator.settings import CoordinatorSettings
from coordinator.tasks import cancel_and_wait
from coordinator.web.direct_send import stream_send
from coordinator.web.shutdown import server_is_exiting
from coordinator.web.transport_send import transport_writer

logger = logging.getLogger("coordinator.relay")

PING = b": ping\n\n"
SHUTDOWN_GRACE_S = 1.0
"""On shutdown, how long a stream may take to write what is queued to a slow client."""
EXIT_POLL_S = 0.05
"""How often the per-process watcher looks for uvicorn's exit flag while streams are open."""
SSE_HEADERS = {
    "Cache-Control": "no-store",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}


class ChannelEventResponse(Response):
    """A ``text/event-stream`` response streaming one :class:`Subscription` (module doc).

    The subscription must already be open (so errors became a status code, not a
    broken stream); the response closes it when it ends, however it ends.
    """

    media_type = "text/event-stream"
    charset = "utf-8"

    def __init__(
        self,
        subscription: Subscription,
        settings: CoordinatorSettings,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.subscription = subscription
        self.status_code = 200
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})
        self._first = retry_frame(settings.sse_retry_ms) + hello_frame(settings.instance_id)
        self._ping_s = settings.sse_ping_s
        self._send: Send | None = None
        self._direct: Callable[[bytes], bool] | None = None
        self._context: contextvars.Context | None = None
        self._writing: asyncio.Task[None] | None = None
        self._timer: asyncio.Timeout | None = None
        self._failed = False
        self._finishing = False
        self._queued_flush = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self.subscription
        streams = _streams()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            send = stream_send(scope, send)  # the body past pass-through wrappers
            self._direct = transport_writer(send)
            await send(_body(self._first))
            while (chunk := sub.take()) is not None:  # the replay, before going live
                await send(_body(chunk))
            self._send, self._context = send, contextvars.copy_context()
            streams.add(self)
            sub.on_close(lambda reason: self._on_overflow() if reason == "overflow" else None)
            sub.consume(lambda: streams.flush_soon(self))  # no await since the last take()
            await self._wait(receive)
            try:
                async with asyncio.timeout(SHUTDOWN_GRACE_S):
                    await self._finish(send)
            except TimeoutError:  # a client not reading: cut it off, as on overflow
                self._failed = True
        finally:
            streams.discard(self)
            await cancel_and_wait(self._writing, name="sse-write")
            await sub.aclose()

    async def _wait(self, receive: Receive) -> None:
        """Until the client leaves or the subscription closes; a heartbeat when idle."""
        sub = self.subscription
        while sub.closed is None and not self._failed:
            try:
                async with asyncio.timeout(self._ping_s) as self._timer:
                    message = await receive()
            except TimeoutError:
                if sub.closed is None and self._writing is None and not self._failed:
                    self._write(PING)  # a busy socket needs no heartbeat
                continue
            finally:
                self._timer = None
            if message["type"] == "http.disconnect":
                sub.close("closed")

    async def _finish(self, send: Send) -> None:
        """End the body cleanly unless the client was cut off or is gone."""
        sub = self.subscription
        if self._failed or sub.closed == "overflow":
            return  # no final chunk: the client sees a broken stream and reconnects
        self._finishing = True  # from here this task writes; the flusher stays out
        while self._writing is not None and not self._failed:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._writing)  # its done callback clears _writing
        while not self._failed and (chunk := sub.take()) is not None:  # shutdown: the rest
            await send(_body(chunk))
        if not self._failed:
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    # -- writing, called by the per-process flusher ---------------------------------
    def flush(self) -> None:
        """Write everything queued, one ``send`` per batch, until a send must wait."""
        self._queued_flush = False
        if self._finishing:
            return
        sub = self.subscription
        while self._writing is None and not self._failed:
            chunk = sub.take()
            if chunk is None:
                break
            self._write(chunk)
        if sub.closed is not None:
            self._wake()

    def _write(self, chunk: bytes) -> None:
        if self._direct is not None:
            try:
                if self._direct(chunk):
                    return
            except Exception as exc:  # as a failed send: the transport is gone
                self._fail(exc)
                return
        assert self._send is not None and self._context is not None
        sending = self._send(_body(chunk))
        coro = sending if type(sending) is CoroutineType else _await(sending)
        try:
            waiting = self._context.run(coro.send, None)
        except StopIteration:
            return
        except Exception as exc:
            self._fail(exc)
            return
        task = asyncio.get_running_loop().create_task(
            _resume(coro, waiting), name="sse-write", context=self._context
        )
        self._writing = task
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writing = None
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            self._fail(exc)
            return
        self.flush()

    def _fail(self, exc: BaseException) -> None:
        logger.debug("SSE write to a client failed: %r", exc)
        self._failed = True
        self.subscription.close("closed")
        self._wake()

    def _wake(self) -> None:
        """Make :meth:`_wait` look at the subscription now."""
        timer = self._timer
        if timer is not None and not timer.expired():
            with contextlib.suppress(RuntimeError):  # already leaving its block
                timer.reschedule(asyncio.get_running_loop().time())

    def _on_overflow(self) -> None:
        """Cut the client off even if a write is blocked on its socket."""
        if self._writing is not None:
            self._writing.cancel()
        self._wake()


def _body(chunk: bytes) -> Message:
    return {"type": "http.response.body", "body": chunk, "more_body": True}


class _Resume:
    """Awaitable that finishes a coroutine whose first step already ran and suspended
    on ``waiting`` (what it yielded): exactly what ``await coro`` would have done."""

    __slots__ = ("_coro", "_waiting")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self._coro, self._waiting = coro, waiting

    def __await__(self) -> Generator[Any, Any, None]:
        coro, waiting = self._coro, self._waiting
        while True:
            try:
                sent = yield waiting
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # forwarded, as await would
                try:
                    waiting = coro.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                waiting = coro.send(sent)
            except StopIteration:
                return


async def _await(awaitable: Awaitable[None]) -> None:
    await awaitable  # a server whose send returns a non-coroutine awaitable


async def _resume(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    await _Resume(coro, waiting)


class _Streams:
    """The open streams of one event loop: writes them once per loop pass, and ends
    them when the server starts shutting down."""

    def __init__(self) -> None:
        self._open: set[ChannelEventResponse] = set()
        self._dirty: list[ChannelEventResponse] = []
        self._scheduled = False
        self._watcher: asyncio.Task[None] | None = None

    def add(self, stream: ChannelEventResponse) -> None:
        self._open.add(stream)
        if self._watcher is None or self._watcher.done():
            loop = asyncio.get_running_loop()
            self._watcher = loop.create_task(self._watch_exit(), name="sse-exit-watch")

    def discard(self, stream: ChannelEventResponse) -> None:
        self._open.discard(stream)

    def flush_soon(self, stream: ChannelEventResponse) -> None:
        """Called by a subscription when it has frames or closed: write after this pass
        (frames of a burst that arrive in one pass go out in one write)."""
        if stream._queued_flush:
            return
        stream._queued_flush = True
        self._dirty.append(stream)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for stream in dirty:
            try:
                stream.flush()
            except Exception:  # one broken stream must not stop the others
                logger.exception("SSE stream flush failed")

    async def _watch_exit(self) -> None:
        try:
            while self._open:
                if server_is_exiting():
                    for stream in list(self._open):
                        stream.subscription.close("shutdown")
                    return
                await asyncio.sleep(EXIT_POLL_S)
        finally:
            self._watcher = None  # a finished task would keep its loop alive


_BY_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Streams] = (
    weakref.WeakKeyDictionary()
)


def _streams() -> _Streams:
    loop = asyncio.get_running_loop()
    streams = _BY_LOOP.get(loop)
    if streams is None:
        streams = _BY_LOOP[loop] = _Streams()  # no reference to the loop: the entry goes with it
    return streams


def open_streams() -> int:
    """Relay streams open on this event loop (for tests and diagnostics)."""
    streams = _BY_LOOP.get(asyncio.get_running_loop())
    return len(streams._open) if streams is not None else 0


def transport_streams() -> int:
    """Of :func:`open_streams`, those that write their chunks straight to the server's
    transport when they can (:mod:`coordinator.web.transport_send`)."""
    streams = _BY_LOOP.get(asyncio.get_running_loop())
    return sum(s._direct is not None for s in streams._open) if streams is not None else 0

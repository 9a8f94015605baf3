"""Relay stream body chunks written straight to uvicorn's transport.

Under ASGI, each body chunk of a relay stream is one ``send`` call per client per
event: a coroutine built and run, the server's checks, and its chunked framing.
A profile of the demo at 1,000 streams over 4 workers (py-spy, ``bench/README.md``)
put uvicorn's ``send`` around the socket write (13%), the server-error
middleware's wrapper outside it (5%) and driving the ``send`` coroutine (5%) at
about a fifth of the workers' busy time; the socket write itself was two fifths.
Writing straight to the transport cut the workers' CPU per delivered event by
about 12% (median 18.9 against 21.4 us over three alternating pairs of runs).

:func:`transport_writer` recognises the one server whose state it knows,
uvicorn's ``httptools`` protocol (uvicorn's default when ``httptools`` is
installed, as with ``uvicorn[standard]``), and returns a function that writes
one chunk exactly as that ``send`` would (``<size hex>\\r\\n<bytes>\\r\\n`` to
the connection's transport) when doing so is the same as calling it:

- the response has started, is chunked and is not complete;
- the client is connected;
- the transport is not paused for writing (uvicorn's ``send`` would wait).

Otherwise it writes nothing and returns ``False``, and the stream calls ``send``
as usual, which waits, ends or raises exactly as uvicorn does.

Guarantees: it is used only when nothing outside the app wraps ``send``: the
``send`` the stream was given must be uvicorn's own bound method, or Starlette's
server-error wrapper (which acts on the response start only) directly around
it. A server run at uvicorn's ``trace`` log level (which wraps ``send`` to log
every message), an ASGI middleware around the app, the ``h11`` protocol, or
another server: the stream calls ``send`` for every chunk, as before. The response
start and the final chunk always go through ``send``.

Limits: this reads uvicorn's private per-request state (``RequestResponseCycle``);
the attributes it needs are checked when a stream starts, and a uvicorn without
them gets ``send``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import Send

HTTPTOOLS_CYCLE = ("uvicorn.protocols.http.httptools_impl", "RequestResponseCycle")
SERVER_ERRORS_SEND = (
    "starlette.middleware.errors",
    "ServerErrorMiddleware.__call__.<locals>._send",
)
_STATE = (
    "transport",
    "flow",
    "disconnected",
    "response_started",
    "response_complete",
    "chunked_encoding",
)


def transport_writer(send: Send) -> Callable[[bytes], bool] | None:
    """A function writing one body chunk straight to the connection, or ``None`` if
    ``send`` is not (nothing but Starlette's server-error wrapper around) uvicorn's
    ``httptools`` send (module doc). The function returns ``False``, having written
    nothing, whenever the chunk must go through ``send``."""
    send = _inside_server_errors(send)
    cycle: Any = getattr(send, "__self__", None)
    if cycle is None:
        return None
    kind = type(cycle)
    if (kind.__module__, kind.__qualname__) != HTTPTOOLS_CYCLE:
        return None
    if getattr(send, "__func__", None) is not getattr(kind, "send", None):
        return None  # send replaced on the class: not the code this module knows
    if not all(hasattr(cycle, name) for name in _STATE) or not hasattr(cycle.flow, "write_paused"):
        return None
    return _Writer(cycle).write


def _inside_server_errors(send: Send) -> Send:
    """The ``send`` that Starlette's ``ServerErrorMiddleware`` wraps, if ``send`` is
    its wrapper (which passes body messages on unchanged); else ``send``."""
    code = getattr(send, "__code__", None)
    if code is None or (getattr(send, "__module__", None), send.__qualname__) != SERVER_ERRORS_SEND:
        return send
    cells = dict(zip(code.co_freevars, getattr(send, "__closure__", None) or (), strict=False))
    cell = cells.get("send")
    if cell is None:
        return send
    inner: Send = cell.cell_contents
    return inner


class _Writer:
    __slots__ = ("_cycle", "_flow")

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle
        self._flow = cycle.flow

    def write(self, chunk: bytes) -> bool:
        cycle = self._cycle
        if (
            self._flow.write_paused
            or cycle.disconnected
            or cycle.response_complete
            or not cycle.response_started
            or cycle.chunked_encoding is not True
        ):
            return False
        cycle.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        return True

"""Noticing that the ASGI server is shutting down, before the lifespan says so.

uvicorn runs the lifespan's shutdown only after every open connection has
closed, and SSE streams close last. A leader that waited for that would keep its
lease (and the jobs) for that whole time during a rolling update. So the
:class:`~coordinator.web.coordinator.Coordinator` watches for the server's exit flag
and hands over at once.

Detection is best effort, as in sse-starlette (which patches uvicorn's
``Server.handle_exit`` and also reads the flag off the SIGTERM handler's
server): it works under uvicorn and gunicorn's uvicorn workers. Elsewhere it
never fires, and handover happens in the lifespan shutdown as usual.
"""

from __future__ import annotations

import asyncio
import signal

from sse_starlette.sse import AppStatus  # importing it patches uvicorn's exit handler


def server_is_exiting() -> bool:
    """True once uvicorn (directly or under gunicorn) has been told to exit."""
    if not AppStatus.enable_automatic_graceful_drain:
        return False  # the app manages shutdown itself
    if AppStatus.should_exit:
        return True
    handler = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    return bool(getattr(server, "should_exit", False))


async def wait_for_server_exit(interval: float = 0.05) -> None:
    """Return when :func:`server_is_exiting` turns true (polls every ``interval`` s)."""
    while not server_is_exiting():  # noqa: ASYNC110 - a flag of another library: poll it
        await asyncio.sleep(interval)

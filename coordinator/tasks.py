"""Stopping background tasks reliably."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger("coordinator")


async def cancel_and_wait(task: asyncio.Task[Any] | None, *, name: str = "") -> None:
    """Cancel ``task`` and return once it has ended, whatever it does with the cancel.

    One ``cancel()`` is not always enough: on Python 3.11 a cancellation that
    lands while an inner ``asyncio.timeout`` expires can surface as
    ``TimeoutError``, which code that retries on timeouts then swallows (redis-py's
    reads and our own sleeps both do). So the task is cancelled again every
    100 ms until it is done. An exception the task ended with is logged, not raised.
    """
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    report_end(task, name)


def report_end(task: asyncio.Task[Any], name: str = "") -> None:
    """Log (WARNING, no traceback) the exception a finished ``task`` ended with, if any;
    this also marks it retrieved, so asyncio never reports it as lost."""
    if not task.cancelled() and task.exception() is not None:
        logger.warning(
            "background task %s ended with %r", name or task.get_name(), task.exception()
        )

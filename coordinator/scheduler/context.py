"""What a running job knows about its fire: :class:`JobContext`."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from coordinator.store.connection import RedisClient
from coordinator.store.scripts import CHECK


class JobContext:
    """What a running job knows about its fire. Declare a parameter named ``ctx`` to get it.

    ``fencing_token`` identifies the leadership term that claimed this fire; pass
    it to downstream systems so they can reject writes from an older term.
    ``lost_leadership`` is set the moment this process's term ends (sync jobs
    can poll it; async jobs may also be cancelled, see ``cancel_on_revoke``).
    """

    __slots__ = (
        "_lease_key",
        "_lease_value",
        "_loop",
        "_redis",
        "fencing_token",
        "instance_id",
        "job_id",
        "lost_leadership",
        "scheduled_at",
    )

    def __init__(
        self,
        *,
        job_id: str,
        scheduled_at: datetime,
        fencing_token: int,
        instance_id: str,
        redis: RedisClient,
        lease_key: str,
        lease_value: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.job_id = job_id
        self.scheduled_at = scheduled_at
        self.fencing_token = fencing_token
        self.instance_id = instance_id
        self.lost_leadership = threading.Event()
        self._redis = redis
        self._lease_key = lease_key
        self._lease_value = lease_value
        self._loop = loop

    async def still_leader(self) -> bool:
        """Ask Redis whether the term that claimed this fire is still the current one.

        A server-side check: false for a paused old leader even before its own
        loop noticed. Raises ``redis`` errors when Redis is unreachable.
        """
        if self.lost_leadership.is_set():
            return False
        return bool(await CHECK(self._redis, [self._lease_key], [self._lease_value]))

    def still_leader_blocking(self, timeout: float = 5.0) -> bool:
        """:meth:`still_leader` for sync jobs (which run in a worker thread).

        Raises ``RuntimeError`` when called on the event loop's own thread (use
        ``await ctx.still_leader()`` there), ``TimeoutError`` after ``timeout``.
        """
        if threading.get_ident() == getattr(self._loop, "_thread_id", None):
            raise RuntimeError(
                "still_leader_blocking() would block the event loop; await still_leader()"
            )
        future = asyncio.run_coroutine_threadsafe(self.still_leader(), self._loop)
        return future.result(timeout)

    def __repr__(self) -> str:
        return (
            f"JobContext(job_id={self.job_id!r}, scheduled_at={self.scheduled_at.isoformat()}, "
            f"fencing_token={self.fencing_token})"
        )


def wants_ctx(func: Callable[..., Any]) -> bool:
    try:
        return "ctx" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False

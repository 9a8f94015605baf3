"""Cluster-wide run-once: startup work (a migration) done by exactly one process.

:func:`run_once` is called by every process with the same ``name``. The first to
arrive runs ``fn``; the others wait and get its result, or an
:class:`~coordinator.errors.OnceFailedError` carrying its error.

Guarantees:

- While the runner is alive, nobody else runs ``fn``: the first caller writes a
  ``running`` marker (one script, so exactly one wins) and renews it every
  ``marker_ttl / 3``.
- A finished task is remembered for good in the namespace: later callers,
  including processes started hours later, get the stored result at once and
  do not run ``fn`` again. Use a new ``name`` (``"migrate-v42"``) for new work.
- A failure is remembered for ``failure_ttl`` seconds: every caller in that
  window gets ``OnceFailedError``. After it, the next caller runs ``fn`` again
  (a restarted deployment retries a failed migration).
- A crashed runner stops renewing; its marker expires within ``marker_ttl`` and
  a waiting process takes over and runs ``fn`` itself. Nobody waits forever.

Limits:

- A runner paused longer than ``marker_ttl`` (SIGSTOP, a stalled VM) can be
  taken over while it still runs: ``fn`` then runs twice. Make startup work
  idempotent or transactional, and keep ``marker_ttl`` well above any pause you
  expect.
- The result reaches the other processes as JSON; a result that is not JSON
  serializable is shared as ``None`` (the runner still gets the real value).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from coordinator.errors import REDIS_UNREACHABLE, ConfigurationError, OnceFailedError
from coordinator.settings import CoordinatorSettings, check_name
from coordinator.store.codec import text
from coordinator.store.connection import RedisClient, ready_for_pubsub
from coordinator.store.keys import Keys
from coordinator.store.scripts import ONCE_BEGIN, ONCE_END, ONCE_RENEW

logger = logging.getLogger("coordinator.once")


async def run_once(
    redis: RedisClient,
    settings: CoordinatorSettings,
    name: str,
    fn: Callable[[], Any],
    *,
    timeout: float | None = None,
    marker_ttl: float = 5.0,
    failure_ttl: float = 60.0,
) -> Any:
    """Run ``fn`` (sync or async, no arguments) once across the cluster; return its result.

    Every process calls this with the same ``name``; see the module docstring
    for the guarantees. ``redis`` is used, not owned.

    Raises:
        OnceFailedError: ``fn`` raised, here or in the process that ran it.
        TimeoutError: ``timeout`` seconds passed while another process was still
            running ``fn`` (raise ``timeout``, or leave it ``None`` to wait as long
            as the runner stays alive).
        ConfigurationError: ``name`` is not a valid name, or a TTL is not positive.
        redis.exceptions.RedisError: Redis could not be reached.
    """
    check_name("run-once name", name)
    if marker_ttl <= 0 or failure_ttl <= 0:
        raise ConfigurationError("marker_ttl and failure_ttl must be positive numbers of seconds")
    keys = Keys(settings.namespace)
    key, channel = keys.once(name), keys.once_notices(name)
    me = settings.instance_id
    ttl_ms = max(1, int(marker_ttl * 1000))
    poll = min(0.5, marker_ttl / 4)
    deadline = None if timeout is None else time.monotonic() + timeout
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    try:
        # Subscribe before the first look, so a finish between the two is not lost.
        await ready_for_pubsub(redis)
        await pubsub.subscribe(channel)
        while True:
            reply = await ONCE_BEGIN(redis, [key], [me, ttl_ms, int(time.time() * 1000)])
            state = text(reply[0])
            if state == "run":
                break
            if state == "done":
                result = text(reply[3])
                return json.loads(result) if result else None
            if state == "failed":
                raise OnceFailedError(name, text(reply[2]), text(reply[1]))
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"run-once task {name!r} is still running on {text(reply[1])} after "
                    f"{timeout}s; raise the timeout or check that process"
                )
            await pubsub.get_message(timeout=poll)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
    return await _run(redis, key, channel, me, name, fn, ttl_ms, int(failure_ttl * 1000))


async def _run(
    redis: RedisClient,
    key: str,
    channel: str,
    me: str,
    name: str,
    fn: Callable[[], Any],
    ttl_ms: int,
    failure_ttl_ms: int,
) -> Any:
    logger.info("%s: running run-once task %r", me, name)
    renewer = asyncio.create_task(_renew(redis, key, me, name, ttl_ms), name=f"once:{name}")

    async def finish(state: str, payload: str) -> None:
        args: list[str | int] = [
            me,
            state,
            payload,
            failure_ttl_ms,
            int(time.time() * 1000),
            channel,
        ]
        if not await ONCE_END(redis, [key], args):
            logger.warning(
                "%s: run-once task %r finished (%s) after its marker expired; another "
                "process may have run it too (raise marker_ttl)",
                me,
                name,
                state,
            )

    try:
        if inspect.iscoroutinefunction(fn):
            result = await fn()
        else:
            result = await asyncio.to_thread(fn)
            if inspect.isawaitable(result):
                result = await result
    except asyncio.CancelledError:
        renewer.cancel()
        with contextlib.suppress(Exception):
            await asyncio.shield(finish("abandoned", ""))
        raise
    except Exception as exc:
        renewer.cancel()
        error = f"{type(exc).__name__}: {exc}"
        await finish("failed", error)
        raise OnceFailedError(name, error, me) from exc
    renewer.cancel()
    try:
        payload = json.dumps(result)
    except (TypeError, ValueError):
        logger.warning("%s: result of run-once task %r is not JSON; sharing null", me, name)
        payload = "null"
    await finish("done", payload)
    return result


async def _renew(redis: RedisClient, key: str, me: str, name: str, ttl_ms: int) -> None:
    while True:
        await asyncio.sleep(ttl_ms / 3000)
        try:
            if not await ONCE_RENEW(redis, [key], [me, ttl_ms]):
                logger.warning("%s: lost the marker of run-once task %r", me, name)
                return
        except REDIS_UNREACHABLE as exc:
            logger.warning("%s: could not renew run-once task %r: %s", me, name, exc)

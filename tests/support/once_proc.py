"""Child process: calls run_once for three tasks, reporting what it saw as JSON lines.

Usage: python -m tests.support.once_proc (settings from COORDINATOR_* and REDIS_URL;
``ONCE_MARKER_TTL`` seconds, ``ONCE_PROCS`` processes to wait for before calling).

Tasks: ``ok`` (sleeps 1 s, returns who ran it), ``fail`` (raises), ``crash``
(the first attempt hangs forever, so the test can SIGKILL its runner; a later
attempt returns). Counters in Redis count the attempts of each.
"""

from __future__ import annotations

import asyncio
import os

from coordinator import CoordinatorSettings, Keys, OnceFailedError, create_redis, run_once
from coordinator.testing import async_wait_until

from .procs import emit


async def main() -> None:
    settings = CoordinatorSettings()
    me = settings.instance_id
    redis = create_redis(settings.redis_url)
    prefix = Keys(settings.namespace).prefix
    ttl = float(os.environ.get("ONCE_MARKER_TTL", "1.0"))
    emit("ready", instance_id=me)
    # A barrier, so every process calls run_once at about the same moment.
    await redis.incr(prefix + "test-barrier")

    async def everyone_here() -> bool:
        return int(await redis.get(prefix + "test-barrier") or 0) >= int(os.environ["ONCE_PROCS"])

    await async_wait_until(everyone_here, 60, message="all processes at the barrier")

    async def attempt(name: str) -> int:
        n = int(await redis.incr(prefix + f"test-attempts:{name}"))
        emit("ran", name=name, attempt=n, instance_id=me)
        return n

    async def ok() -> dict[str, str]:
        await attempt("ok")
        await asyncio.sleep(1.0)
        return {"by": me}

    async def fail() -> None:
        await attempt("fail")
        await asyncio.sleep(0.3)
        raise RuntimeError(f"migration broke on {me}")

    async def crash() -> dict[str, object]:
        n = await attempt("crash")
        if n == 1:
            await asyncio.sleep(3600)  # the test kills this process now
        return {"attempt": n, "by": me}

    for name, fn in (("ok", ok), ("fail", fail), ("crash", crash)):
        try:
            result = await run_once(redis, settings, name, fn, marker_ttl=ttl)
        except OnceFailedError as exc:
            emit("failed", name=name, error=exc.error, runner=exc.instance_id, instance_id=me)
        else:
            emit("result", name=name, result=result, instance_id=me)
    await redis.aclose()
    emit("done", instance_id=me)


if __name__ == "__main__":
    asyncio.run(main())

"""Child process: one LeaderElector, reporting its terms as JSON lines.

Usage: python -m tests.support.elector_proc REDIS_URL NAMESPACE INSTANCE_ID [COUNT]
With COUNT > 1 it runs that many electors (ids INSTANCE_ID.1 ...), each on its own
connection, as that many processes would (for the election-cost benchmark).
Timing settings come from COORDINATOR_* variables. SIGTERM stops it gracefully
(the lease is released). Events: ready, elected, revoked (with the server-side
check of the term just ended), stopped.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from coordinator import CoordinatorSettings, LeaderElector, Term, create_client
from coordinator.store.scripts import CHECK

from .procs import emit


async def many(url: str, namespace: str, instance_id: str, count: int) -> None:
    redis = create_client(url)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    electors = [
        LeaderElector(
            redis,
            CoordinatorSettings(
                redis_url=url, namespace=namespace, instance_id=f"{instance_id}.{k}"
            ),
        )
        for k in range(1, count + 1)
    ]
    for elector in electors:
        await elector.start()
    emit("ready", instance_id=instance_id, count=count)
    await stop.wait()
    for elector in electors:
        await elector.stop()
    await redis.aclose()
    emit("stopped", instance_id=instance_id)


async def main(url: str, namespace: str, instance_id: str) -> None:
    settings = CoordinatorSettings(redis_url=url, namespace=namespace, instance_id=instance_id)
    redis = create_client(url)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    last: list[Term] = []

    def elected(token: int) -> None:
        term = elector.term
        assert term is not None
        last.append(term)
        emit("elected", token=token, instance_id=instance_id)

    async def revoked(reason: str) -> None:
        emit(
            "revoked",
            reason=reason,
            token=last[-1].token if last else None,
            instance_id=instance_id,
        )
        if last:
            try:
                still = bool(
                    await CHECK(redis, [elector.keys.lease(elector.name)], [last[-1].lease_value])
                )
            except Exception as exc:  # Redis may be down: report, do not guess
                emit("server_check", token=last[-1].token, error=repr(exc))
            else:
                emit("server_check", token=last[-1].token, current=still)

    elector = LeaderElector(redis, settings, on_elected=elected, on_revoked=revoked)
    await elector.start()
    emit("ready", instance_id=instance_id)
    await stop.wait()
    await elector.stop()
    await redis.aclose()
    emit("stopped", instance_id=instance_id)


if __name__ == "__main__":
    if len(sys.argv) > 4 and int(sys.argv[4]) > 1:
        asyncio.run(many(*sys.argv[1:4], int(sys.argv[4])))
    else:
        asyncio.run(main(*sys.argv[1:4]))

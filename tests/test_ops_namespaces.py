"""Two apps with different namespaces on one Redis never see each other's leases,
jobs, events or instances."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.ops.status import cluster_status
from coordinator.testing import async_wait_until

from .support.flow import make_coordinator

pytestmark = pytest.mark.slow


async def test_namespaces_are_isolated(redis_url: str, namespace: str) -> None:
    one = make_coordinator(redis_url, f"{namespace}-one", "app")
    two = make_coordinator(redis_url, f"{namespace}-two", "app")
    await one.start()
    await two.start()
    try:
        # Each leads its own election at the same time: neither sees the other's lease.
        await async_wait_until(lambda: one.elector.is_leader and two.elector.is_leader, 15)
        await async_wait_until(lambda: len(one.fires) >= 2 and len(two.fires) >= 2, 10)  # type: ignore[attr-defined]
        runs_one = await one.scheduler.list_runs(100)
        runs_two = await two.scheduler.list_runs(100)
        assert {r["instance_id"] for r in runs_one} == {one.settings.instance_id}
        assert {r["instance_id"] for r in runs_two} == {two.settings.instance_id}

        await asyncio.wait_for(one.relay.wait_ready(10), 10)
        async with await one.relay.subscribe("shared") as sub:
            for n in range(3):
                await two.publish("shared", {"from": "two", "n": n})
            mine = await one.publish("shared", {"from": "one"})
            chunk = await asyncio.wait_for(anext(aiter(sub)), 10)
            assert chunk.startswith(f"id: {mine}\n".encode()) and b'"two"' not in chunk
            assert sub.queued == 0

        status_one = await cluster_status(one.redis, one.settings)
        status_two = await cluster_status(two.redis, two.settings)
        assert status_one["leader"]["instance_id"] == one.settings.instance_id
        assert status_two["leader"]["instance_id"] == two.settings.instance_id
        assert [i["instance_id"] for i in status_one["instances"]] == [one.settings.instance_id]
        assert [c["history"] for c in status_one["channels"]] == [1]
        assert [c["history"] for c in status_two["channels"]] == [3]
        # Every key either app wrote lives under its own prefix.
        for app in (one, two):
            other = two if app is one else one
            keys = [k async for k in app.redis.scan_iter(match=f"{{{app.settings.namespace}}}:*")]
            assert keys and not any(other.settings.namespace.encode() + b"}" in k for k in keys)
    finally:
        await one.stop()
        await two.stop()

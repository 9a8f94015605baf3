"""Shared state across 4 real uvicorn workers of the demo (GET/PUT /api/state/{key}): a PUT on
one worker is read on every other within 100 ms; compare-and-set under contention; a worker
whose listener connection is killed converges and is never fresh with an older value; bad
input is a clear 4xx; the dashboard's flag is announced to dashboards on every worker."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from coordinator import create_redis
from coordinator.store.keys import Keys
from coordinator.store.scripts import STATE_SET

from .support.app_cluster import AppCluster
from .support.pinned import Pinned, close_all, pin_workers

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]


@dataclass
class Demo:
    cluster: AppCluster
    redis: Redis
    namespace: str
    pinned: dict[str, list[Pinned]]

    def on(self, instance: str, n: int = 0) -> Pinned:
        return self.pinned[instance][n]

    @property
    def workers(self) -> list[Pinned]:
        return [group[0] for group in self.pinned.values()]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def demo(redis_url: str) -> AsyncIterator[Demo]:
    namespace = f"st{uuid.uuid4().hex[:8]}"
    cluster = AppCluster(redis_url, namespace, workers=4, app="app.main:app")
    client = create_redis(redis_url)
    try:
        async with cluster.running():
            pinned = await pin_workers(cluster.base, 4, per_worker=3)
            try:
                yield Demo(cluster, client, namespace, pinned)
            finally:
                await close_all(pinned)
    finally:
        await client.aclose()


async def put(client: Pinned, key: str, value: Any, version: int | None = None) -> httpx.Response:
    body: dict[str, Any] = {"value": value}
    if version is not None:
        body["version"] = version
    return await client.put(f"/api/state/{key}", json=body)


async def first_seen(client: Pinned, key: str, version: int, timeout: float = 5) -> float:
    """Poll GET on ``client`` until it answers ``version`` or newer; the time it did."""
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(f"/api/state/{key}")
        now = time.monotonic()
        if response.status_code == 200 and response.json()["version"] >= version:
            return now
        assert now < deadline, f"{client.instance} never reached version {version}"


async def test_a_put_on_one_worker_is_read_on_every_other_within_100_ms(demo: Demo) -> None:
    delays: list[float] = []
    for round_ in range(12):
        writer = demo.workers[round_ % 4]
        readers = [w for w in demo.workers if w is not writer]
        response = await put(writer, "spread", {"round": round_})
        put_done = time.monotonic()
        assert response.status_code == 200, response.text
        version = response.json()["version"]
        seen = await asyncio.gather(*(first_seen(r, "spread", version) for r in readers))
        delays += [t - put_done for t in seen]
        for reader in readers:  # what they serve is the value written, from their memory
            body = (await reader.get("/api/state/spread")).json()
            assert body == {
                "key": "spread",
                "value": {"round": round_},
                "version": version,
                "stale": False,
            }
    delays.sort()
    print(
        f"PUT -> GET on the 3 other workers: p50 {statistics.median(delays) * 1000:.1f} ms, "
        f"max {delays[-1] * 1000:.1f} ms over {len(delays)} reads"
    )
    # The 100 ms goal is the median; on 2 busy cores one read in 36 can wait for a core,
    # so the slowest gets a deadline (bench/state.py measures the distribution).
    assert statistics.median(delays) < 0.100, delays
    assert delays[-1] < 2.0, delays


async def test_stale_version_is_409_with_the_current_one(demo: Demo) -> None:
    a, b = demo.workers[0], demo.workers[1]
    created = await put(a, "cas", "v1", version=0)
    assert created.status_code == 200 and created.json()["version"] == 1
    again = await put(b, "cas", "other", version=0)  # 0: only if absent
    assert again.status_code == 409
    assert again.json()["version"] == 1 and "version 1, not 0" in again.json()["detail"]
    ok = await put(b, "cas", "v2", version=1)
    assert ok.status_code == 200 and ok.json() == {"key": "cas", "value": "v2", "version": 2}
    stale = await put(a, "cas", "lost update", version=1)
    assert stale.status_code == 409 and stale.json()["version"] == 2
    unconditional = await put(a, "cas", "forced")
    assert unconditional.json()["version"] == 3
    missing = await a.get("/api/state/never-set")
    assert missing.status_code == 404 and "never-set" in missing.json()["detail"]


async def test_200_concurrent_cas_increments_from_4_workers_end_at_200(demo: Demo) -> None:
    first = await put(demo.workers[0], "counter", 0, version=0)
    assert first.status_code == 200
    conflicts = 0

    async def increment(client: Pinned, times: int) -> None:
        nonlocal conflicts
        done = 0
        while done < times:
            current = (await client.get("/api/state/counter")).json()  # from its memory
            response = await put(client, "counter", current["value"] + 1, current["version"])
            if response.status_code == 200:
                done += 1
            else:
                assert response.status_code == 409, response.text
                conflicts += 1

    # 12 writers (3 per worker), 200 increments between them.
    writers = [c for group in demo.pinned.values() for c in group]
    shares = [
        200 // len(writers) + (1 if i < 200 % len(writers) else 0) for i in range(len(writers))
    ]
    await asyncio.gather(*(increment(c, n) for c, n in zip(writers, shares, strict=True)))
    for worker in demo.workers:
        final = (await worker.get("/api/state/counter")).json()
        if final["version"] < 201:  # its memory may be a moment behind the last write
            await first_seen(worker, "counter", 201)
            final = (await worker.get("/api/state/counter")).json()
        assert (final["value"], final["version"]) == (200, 201), final
    print(f"200 increments by 12 writers on 4 workers: {conflicts} conflicts (409) retried")


async def listener_id(redis: Redis, instance: str) -> int | None:
    name = f"coordinator-relay:{instance}"[:120].replace(" ", "_")
    for client in await redis.client_list():
        if client.get("name") == name:
            return int(client["id"])
    return None


async def test_a_worker_whose_listener_is_killed_converges_never_older(demo: Demo) -> None:
    victim, writer = demo.workers[0], demo.workers[1]
    created = await put(writer, "killed", "v1")
    base = created.json()["version"]
    await first_seen(victim, "killed", base)
    old_id = await listener_id(demo.redis, victim.instance)
    assert old_id is not None
    keys = Keys(demo.namespace)
    # Kill the victim's listener and write in one transaction: the change is announced
    # while the victim is not subscribed, so only its reload can bring it.
    async with demo.redis.pipeline(transaction=True) as pipe:
        pipe.client_kill_filter(_id=old_id)
        pipe.eval(
            STATE_SET.source,
            1,
            keys.state(),
            "killed",
            "",
            json.dumps("v2"),
            1000,
            keys.state_changes(),
            "test",
        )
        _, reply = await pipe.execute()
    missed = int(reply[1])
    assert missed == base + 1

    answers: list[tuple[float, bool, int]] = []  # (time, stale, version)
    reconnected_at: float | None = None
    deadline = time.monotonic() + 20
    while True:
        body = (await victim.get("/api/state/killed")).json()
        now = time.monotonic()
        answers.append((now, body["stale"], body["version"]))
        if reconnected_at is None:
            new_id = await listener_id(demo.redis, victim.instance)
            if new_id not in (None, old_id):
                reconnected_at = time.monotonic()  # the listener is back (seen after the fact)
        if reconnected_at is not None and not body["stale"] and body["version"] == missed:
            break
        assert now < deadline, answers[-5:]
    # Once the listener is back, every answer is either flagged stale or at least `missed`.
    after = [(stale, v) for t, stale, v in answers if t > reconnected_at]
    assert all(stale or v >= missed for stale, v in after), after
    ready = await victim.get("/readyz")
    assert ready.status_code == 200 and ready.json()["state"] == "fresh"


@pytest.mark.parametrize(
    ("path", "body", "status", "word"),
    [
        ("/api/state/bad%20key", b'{"value": 1}', 422, "state key"),
        ("/api/state/-dash", b'{"value": 1}', 422, "state key"),
        ("/api/state/" + "k" * 200, b'{"value": 1}', 422, "state key"),
        (
            "/api/state/ok",
            b'{"value": "' + b"x" * 70_000 + b'"}',
            413,
            "COORDINATOR_STATE_MAX_VALUE_BYTES",
        ),
        ("/api/state/ok", b"[" * 300_000, 413, "body over"),
        ("/api/state/ok", b"{not json", 422, "JSON"),
        ("/api/state/ok", b"\xff\xfe", 422, "JSON"),
        ("/api/state/ok", b"[1]", 422, "object"),
        ("/api/state/ok", b"{}", 422, "'value' is required"),
        ("/api/state/ok", b'{"value": 1, "verison": 2}', 422, "verison"),
        ("/api/state/ok", b'{"value": 1, "version": "2"}', 422, "version must be an integer"),
        ("/api/state/ok", b'{"value": 1, "version": 1.5}', 422, "version must be an integer"),
        ("/api/state/ok", b'{"value": 1, "version": true}', 422, "version must be an integer"),
        ("/api/state/ok", b'{"value": 1, "version": -1}', 422, "version must be between"),
        ("/api/state/ok", b'{"value": 1, "version": 99999999999999999999}', 422, "between"),
        ("/api/state/ok", b'{"value": NaN}', 422, "not JSON"),
        ("/api/state/ok", b'{"value": "\\ud800"}', 422, "not JSON"),
        ("/api/state/ok", b'{"value": ' + b"[" * 5000 + b"]" * 5000 + b"}", 422, "deep"),
    ],
)
async def test_bad_state_input_is_a_clear_4xx(
    demo: Demo, path: str, body: bytes, status: int, word: str
) -> None:
    worker = demo.workers[0]
    response = await worker.request(
        "PUT", path, content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text[:300]
    assert word in response.json()["detail"], response.text[:300]
    if path.startswith("/api/state/bad") or path.startswith("/api/state/-"):
        read = await worker.get(path)
        assert read.status_code == 422 and "state key" in read.json()["detail"]


@pytest.mark.parametrize("cookie", ["0" * 32, "forged", "x" * 3000, "../{x}:state"])
async def test_forged_session_cookie_is_401_on_every_worker(demo: Demo, cookie: str) -> None:
    for worker in demo.workers:
        response = await worker.get("/api/session", headers={"cookie": f"session={cookie}"})
        assert response.status_code == 401, (worker.instance, response.text)


async def test_the_dashboard_flag_is_announced_to_dashboards_on_every_worker(demo: Demo) -> None:
    page = await demo.workers[0].get("/")
    assert "dashboard.highlight" in page.text and 'id="flag"' in page.text
    streams = await demo.cluster.clients("/api/channels/dashboard/events", 8, min_instances=4)
    try:
        current = await demo.workers[2].get("/api/state/dashboard.highlight")
        version = current.json()["version"] if current.status_code == 200 else 0
        toggled = await put(demo.workers[2], "dashboard.highlight", True, version)
        assert toggled.status_code == 200, toggled.text
        new_version = toggled.json()["version"]

        def announced(stream: Any) -> bool:
            return any(
                m.json()["key"] == "dashboard.highlight" and m.json()["version"] == new_version
                for m in stream.of("state")
            )

        deadline = time.monotonic() + 10
        while not all(announced(s) for s in streams):
            assert time.monotonic() < deadline, [len(s.of("state")) for s in streams]
            await asyncio.sleep(0.02)
        [event] = [m.json() for m in streams[0].of("state") if m.json()["version"] == new_version]
        assert event["value"] is True and event["instance_id"] == demo.workers[2].instance
    finally:
        for stream in streams:
            await stream.close()

"""Redis sessions (starsessions on the coordinator's Redis): across 4 real uvicorn workers of
the demo, with a worker SIGKILLed and restarted; and in one process for the edges (cookie
flags, id rotation, expiry, forged cookies, Redis down, bad bodies)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from app.sessions import session_router
from coordinator import Coordinator, CoordinatorSettings
from coordinator.store.keys import Keys
from coordinator.testing import async_wait_until

from .support.app_cluster import RESPAWN_S, AppCluster
from .support.pinned import Pinned, close_all, pin_workers

SESSION_COOKIE = re.compile(r"^session=([0-9a-f]{32}); ")


def session_id(response: httpx.Response) -> str:
    """The session id a response sets (fails when it sets none)."""
    [cookie] = [v for k, v in response.headers.multi_items() if k == "set-cookie"]
    match = SESSION_COOKIE.match(cookie)
    assert match, cookie
    return match.group(1)


def cookie(sid: str) -> dict[str, str]:
    return {"cookie": f"session={sid}"}


# -- in one process -------------------------------------------------------------------
@contextlib.asynccontextmanager
async def session_app(
    url: str, namespace: str, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    conf = CoordinatorSettings(redis_url=url, namespace=namespace, **overrides)
    coordinator = Coordinator(conf)
    app = FastAPI()
    coordinator.install(app, sessions=True)
    app.include_router(session_router({}))
    await coordinator.start()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http
    finally:
        await coordinator.stop()


async def test_cookie_flags_rotation_and_logout(
    redis_url: str, namespace: str, redis_client: Redis
) -> None:
    keys = Keys(namespace)
    async with session_app(redis_url, namespace) as http:
        first = await http.post("/api/session", json={"user": "ann"})
        assert first.status_code == 200 and first.json() == {"user": "ann"}
        set_cookie = first.headers["set-cookie"].lower()
        for flag in ("httponly", "samesite=lax", "path=/"):
            assert flag in set_cookie, set_cookie
        max_age = int(re.search(r"max-age=(\d+)", set_cookie).group(1))  # type: ignore[union-attr]
        assert 14 * 86400 - 60 < max_age <= 14 * 86400  # the lifetime, counted from login
        assert "secure" not in set_cookie  # not configured: the demo runs on plain HTTP
        old = session_id(first)
        ttl = await redis_client.ttl(keys.session_prefix() + old)
        assert 14 * 86400 - 60 < ttl <= 14 * 86400

        # Logging in again rotates the id and deletes the old session.
        again = await http.post("/api/session", json={"user": "bob"}, headers=cookie(old))
        new = session_id(again)
        assert new != old
        assert not await redis_client.exists(keys.session_prefix() + old)
        assert (await http.get("/api/session", headers=cookie(old))).status_code == 401
        who = await http.get("/api/session", headers=cookie(new))
        assert who.status_code == 200 and who.json() == {"user": "bob"}

        gone = await http.delete("/api/session", headers=cookie(new))
        assert gone.status_code == 204
        assert (
            "session=''" in gone.headers["set-cookie"] or "expires=" in gone.headers["set-cookie"]
        )
        assert not await redis_client.exists(keys.session_prefix() + new)
        assert (await http.get("/api/session", headers=cookie(new))).status_code == 401
        assert (await http.delete("/api/session")).status_code == 204  # idempotent


async def test_secure_cookie_when_configured(redis_url: str, namespace: str) -> None:
    async with session_app(redis_url, namespace, session_cookie_secure=True) as http:
        response = await http.post("/api/session", json={"user": "ann"})
        assert "secure" in response.headers["set-cookie"].lower()


async def test_expired_session_is_401(redis_url: str, namespace: str, redis_client: Redis) -> None:
    async with session_app(redis_url, namespace, session_lifetime_s=1) as http:
        sid = session_id(await http.post("/api/session", json={"user": "ann"}))
        assert (await http.get("/api/session", headers=cookie(sid))).status_code == 200
        key = Keys(namespace).session_prefix() + sid
        await async_wait_until(lambda: _gone(redis_client, key), 10)
        expired = await http.get("/api/session", headers=cookie(sid))  # a browser may still send it
        assert expired.status_code == 401, expired.text
        assert "no live session" in expired.json()["detail"]


async def _gone(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


FORGED = [
    "0" * 32,  # well-formed, never issued
    "f" * 31,
    "not-a-session-id",
    "../../{x}:lease:scheduler",
    "*",
    "a" * 4000,
    "%00%0d%0a",
    '"quoted"',
]


@pytest.mark.parametrize("value", FORGED)
async def test_forged_cookie_is_401_and_writes_nothing(
    redis_url: str, namespace: str, redis_client: Redis, value: str
) -> None:
    async with session_app(redis_url, namespace) as http:
        response = await http.get("/api/session", headers={"cookie": f"session={value}"})
        assert response.status_code == 401, response.text
        assert "set-cookie" not in response.headers
        assert not await redis_client.keys(Keys(namespace).session_prefix() + "*")


async def test_stored_garbage_reads_as_no_session(
    redis_url: str, namespace: str, redis_client: Redis
) -> None:
    sid = "ab" * 16
    await redis_client.set(Keys(namespace).session_prefix() + sid, b"\xff{not json")
    async with session_app(redis_url, namespace) as http:
        assert (await http.get("/api/session", headers=cookie(sid))).status_code == 401


@pytest.mark.parametrize(
    ("body", "status", "word"),
    [
        (b"{}", 422, "user"),
        (b'{"user": ""}', 422, "user"),
        (b'{"user": "' + b"x" * 65 + b'"}', 422, "user"),
        (b'{"user": "a\\nb"}', 422, "user"),
        (b'{"user": 7}', 422, "user"),
        (b'{"user": 1e999}', 422, "out of range"),
        (b'{"user": "ann", "admin": true}', 422, "admin"),
        (b"{not json", 422, "JSON"),
        (b"\xff\xfe", 422, "JSON"),
        (b"[]", 422, "object"),
        (b"1e999", 422, "out of range"),
        (b"[" * 3000, 422, "deep"),
        (b" " * 5000, 413, "body over"),
    ],
)
async def test_bad_login_body_is_a_clear_4xx(
    redis_url: str, namespace: str, body: bytes, status: int, word: str
) -> None:
    async with session_app(redis_url, namespace) as http:
        response = await http.post(
            "/api/session", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == status, response.text
        assert word.lower() in response.json()["detail"].lower(), response.text


async def test_redis_down_is_503_never_500(redis_server: Any, namespace: str) -> None:
    async with session_app(redis_server.url, namespace) as http:
        sid = session_id(await http.post("/api/session", json={"user": "ann"}))
        redis_server.kill()
        for response in (
            await http.get("/api/session", headers=cookie(sid)),
            await http.post("/api/session", json={"user": "ann"}, headers=cookie(sid)),
            await http.post("/api/session", json={"user": "ann"}),
            await http.delete("/api/session", headers=cookie(sid)),
        ):
            assert response.status_code == 503, (response.request.method, response.text)
            assert response.headers["retry-after"] == "1"
            assert "session store unreachable" in response.json()["detail"]
        http.cookies.clear()
        assert (await http.get("/api/session")).status_code == 401  # no cookie: no Redis


# -- 4 uvicorn workers ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_login_on_one_worker_is_seen_by_every_worker_even_after_a_sigkill(
    redis_url: str,
) -> None:
    cluster = AppCluster(redis_url, f"s{uuid.uuid4().hex[:8]}", workers=4, app="app.main:app")
    async with cluster.running():
        pinned = await pin_workers(cluster.base, 4)
        try:
            a = next(iter(pinned.values()))[0]
            login = await a.request("POST", "/api/session", json={"user": "ann"})
            assert login.status_code == 200, login.text
            sid = session_id(login)
            await expect_everywhere(pinned, sid, 200)

            os.kill(a.pid, signal.SIGKILL)  # a worker of the uvicorn this test started
            await close_all(pinned)
            # uvicorn started a new worker
            pinned = await pin_workers(cluster.base, 4, timeout=RESPAWN_S)
            assert a.instance not in pinned and a.pid not in {g[0].pid for g in pinned.values()}
            await expect_everywhere(pinned, sid, 200)

            logout = await next(iter(pinned.values()))[0].request(
                "DELETE", "/api/session", headers=cookie(sid)
            )
            assert logout.status_code == 204
            await expect_everywhere(pinned, sid, 401)
        finally:
            await close_all(pinned)


async def expect_everywhere(pinned: dict[str, list[Pinned]], sid: str, status: int) -> None:
    """GET /api/session with ``sid`` answers ``status`` on every pinned worker."""
    assert len(pinned) == 4
    for instance, [client] in pinned.items():
        response = await client.get("/api/session", headers=cookie(sid))
        assert response.status_code == status, (instance, response.text)
        if status == 200:
            assert response.json() == {"user": "ann"}

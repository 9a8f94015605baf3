"""Connections against real servers started here: TLS only, unix socket, an ACL user
restricted to one namespace, and Sentinel failover."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from redis.exceptions import NoPermissionError

from coordinator import create_redis
from coordinator.testing import async_wait_until, binary_only_reason, owned_redis
from coordinator.testing.topologies import (
    SentinelCluster,
    TLSRedisServer,
    UnixRedisServer,
    make_certificates,
    tls_unsupported_reason,
)

from .support.flow import exercise, leader_of, pair

pytestmark = pytest.mark.slow

ACL_COMMANDS = (
    "+ping +client|id +client|list +client|setname "
    "+evalsha +eval +get +set +del +mget +scan +hgetall +lrange +xlen +xrevrange "
    "+lpush +ltrim +multi +exec +zadd +zremrangebyscore +zrevrangebyscore "
    "+subscribe +publish +time +exists +pttl +pexpire +expire +persist "
    "+incr +hget +hset +xadd +xrange +xinfo|stream "
    "+hlen +zcard +zrange +zrem +rename +incrby +script|load "
    "+hdel +hexists +hkeys +hmget +sadd +srem +sismember +smembers +smismember "
    "+zscore +hscan +unsubscribe +pubsub|numsub +wait"
)
"""Every command the library sends, directly or from its Lua scripts (README: ACL)."""


def acl_line(user: str, password: str, namespace: str) -> str:
    return (
        f"{user} on >{password} resetkeys resetchannels ~{{{namespace}}}:* "
        f"&{{{namespace}}}:* -@all {ACL_COMMANDS}"
    )


CLUSTER_ACL_COMMANDS = "+cluster|slots +command +info +spublish +ssubscribe +sunsubscribe"
"""What the library adds on Redis Cluster: the cluster client's slot map and command
table, the relay's Redis version check and sharded Pub/Sub (README: Redis Cluster)."""


def cluster_acl_line(user: str, password: str, namespace: str) -> list[str]:
    """The ACL SETUSER arguments on Redis Cluster: the keys and channels of the
    namespace's slot and of every channel's own slot (``{namespace/channel}``)."""
    return (
        f"{user} on >{password} resetkeys resetchannels ~{{{namespace}}}:* ~{{{namespace}/* "
        f"&{{{namespace}}}:* &{{{namespace}/* -@all {ACL_COMMANDS} {CLUSTER_ACL_COMMANDS}"
    ).split()


def check_flow(seen: dict[str, Any]) -> None:
    assert seen["first"] != seen["second"]
    assert seen["once"] == [42, 42]
    first_id, live_id = seen["ids"]
    assert first_id.encode() in seen["received"] and live_id.encode() in seen["received"]
    assert [c["channel"] for c in seen["status"]["channels"]] == ["ops"]
    assert {i["instance_id"] for i in seen["status"]["instances"]} >= {seen["first"]}
    assert any(r["job_id"] == "tick" and r["status"] == "ok" for r in seen["runs"])
    assert seen["relay_reconnects"] == 0


async def test_tls_only_server(tmp_path: Path, namespace: str) -> None:
    reason = binary_only_reason("a TLS-only server") or tls_unsupported_reason()
    if reason:
        pytest.skip(reason)
    certs = make_certificates(tmp_path / "certs")
    with TLSRedisServer(certs) as server:
        assert server.url.startswith("rediss://")
        check_flow(await exercise(server.url, namespace))
        # Without the CA the client refuses the server's certificate.
        bare = create_redis(f"rediss://127.0.0.1:{server.port}/0", retry=None)
        with pytest.raises(Exception, match=r"(?i)certificate|ssl"):
            await bare.ping()
        await bare.aclose()


async def test_unix_socket_server(namespace: str) -> None:
    if reason := binary_only_reason("a server on a unix socket"):
        pytest.skip(reason)
    with UnixRedisServer() as server:
        assert server.url.startswith("unix://")
        check_flow(await exercise(server.url, namespace))


async def test_acl_user_restricted_to_namespace(namespace: str) -> None:
    with owned_redis() as server:
        admin = redis_sync.Redis(host=server.host, port=server.port, decode_responses=True)
        admin.execute_command("ACL", "SETUSER", *acl_line("app", "s3cret", namespace).split())
        admin.execute_command("ACL", "LOG", "RESET")
        url = f"redis://app:s3cret@127.0.0.1:{server.port}/0"
        check_flow(await exercise(url, namespace))
        denied = [
            e for e in admin.execute_command("ACL", "LOG") if "setinfo" not in str(e)
        ]  # redis-py tries it, ignores a refusal
        assert denied == [], denied  # nothing the flow did was refused
        client = create_redis(url)
        try:
            with pytest.raises(NoPermissionError):
                await client.get("{other}:lease:scheduler")
            with pytest.raises(NoPermissionError):
                await client.flushall()
        finally:
            await client.aclose()
        admin.close()


async def test_sentinel_failover(namespace: str) -> None:
    if reason := binary_only_reason("a Sentinel topology (a primary, a replica, 3 sentinels)"):
        pytest.skip(reason)
    with SentinelCluster() as cluster:
        async with asyncio.timeout(120), pair(cluster.url, namespace) as (a, b):
            await leader_of(a, b)
            await asyncio.wait_for(b.relay.wait_ready(10), 10)
            async with await b.relay.subscribe("fo") as sub:
                before = await a.publish("fo", "before")
                old = cluster.primary_port()
                new = await asyncio.to_thread(cluster.failover)
                assert new != old
                # Publishing resumes through the new primary (retry while clients switch).
                after = await publish_until_ok(a, "fo", "after", timeout=20)
                received = await read_until(sub, after.encode(), timeout=20)
                assert before.encode() in received and after.encode() in received

            # Leadership resumes: one process holds a lease that is current on the new
            # primary (server-side check, not local belief).
            async def confirmed() -> bool:
                leading = [c for c in (a, b) if c.elector.is_leader]
                return len(leading) == 1 and await leading[0].elector.check()

            await async_wait_until(confirmed, 30, interval=0.1, message="leadership never resumed")
            assert (await a.redis.info("replication"))["role"] == "master"


async def publish_until_ok(coordinator: Any, channel: str, data: Any, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return str(await coordinator.publish(channel, data))
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def read_until(sub: Any, marker: bytes, timeout: float) -> bytes:
    received = b""
    async with asyncio.timeout(timeout):
        async for chunk in sub:
            received += chunk
            if marker in received:
                return received
    return received


def test_readme_documents_the_tested_acl_lines() -> None:
    """The single-node line (tested above) and the Cluster one (tests/test_app_cluster.py)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [x for x in readme.splitlines() if x.startswith("ACL SETUSER coordinator ")]
    cluster = [x for x in lines if "~{NAMESPACE/*" in x]
    (single,) = [x for x in lines if x not in cluster]
    assert single.split("-@all ", 1)[1].split() == ACL_COMMANDS.split()
    want = cluster_acl_line("coordinator", "PASSWORD", "NAMESPACE")
    assert [x.split() for x in cluster] == [["ACL", "SETUSER", *want]]

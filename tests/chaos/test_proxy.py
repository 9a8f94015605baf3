"""TcpProxy against a real redis-server: forward, delay, blackhole, heal, cut."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_sync
from redis.backoff import NoBackoff
from redis.retry import Retry

from coordinator.testing import TcpProxy


@pytest.fixture
def proxy(redis_server: Any) -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", redis_server.port) as p:
        yield p


def client(proxy: TcpProxy, timeout: float = 2.0) -> redis_sync.Redis:
    return redis_sync.Redis(
        host=proxy.host,
        port=proxy.port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
    )


def test_forwards_and_delays(proxy: TcpProxy) -> None:
    with client(proxy) as r:
        assert r.ping()
        proxy.delay(0.2)
        began = time.monotonic()
        assert r.set("k", "v")
        assert time.monotonic() - began >= 0.39  # both ways
        proxy.delay(0)
        assert r.get("k") == b"v"
    assert proxy.connections == 1


def test_blackhole_holds_bytes_and_heal_delivers_them(proxy: TcpProxy) -> None:
    with client(proxy, timeout=0.5) as r, client(proxy, timeout=5) as late:
        assert r.ping() and late.ping()
        proxy.blackhole()
        with pytest.raises(redis_sync.TimeoutError):
            r.ping()
        # A new connection is accepted, and never answered.
        with client(proxy, timeout=0.3) as fresh, pytest.raises(redis_sync.TimeoutError):
            fresh.ping()
        r.connection_pool.disconnect()
        proxy.heal()
        assert late.ping()
        assert r.ping()


def test_held_write_reaches_redis_after_heal(proxy: TcpProxy, redis_server: Any) -> None:
    with client(proxy, timeout=0.3) as r, redis_sync.Redis.from_url(redis_server.url) as direct:
        assert r.ping()
        proxy.blackhole()
        with pytest.raises(redis_sync.TimeoutError):
            r.set("late", "1")
        assert direct.get("late") is None
        proxy.heal()
        deadline = time.monotonic() + 5
        while direct.get("late") is None:
            assert time.monotonic() < deadline, "the held SET never arrived"
            time.sleep(0.01)


def test_cut_closes_open_connections(proxy: TcpProxy) -> None:
    with client(proxy) as r:
        assert r.ping()
        assert proxy.cut() == 1
        # redis-py retries once on a dropped connection; the new one works.
        assert r.ping()
    assert proxy.connections == 2

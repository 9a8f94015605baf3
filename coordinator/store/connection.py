"""Building the async Redis client from a URL, with one retry policy.

Supported URLs:

- ``redis://[[user]:password@]host[:port][/db]``
- ``rediss://...`` (TLS; ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
  ``ssl_cert_reqs`` and ``ssl_check_hostname`` may be given as query parameters:
  ``rediss://h:6380/0?ssl_ca_certs=/etc/redis/ca.crt&ssl_certfile=...&ssl_keyfile=...``;
  they are file paths, never secrets themselves)
- ``unix:///path/to/redis.sock[?db=0]``
- ``redis+sentinel://[[user]:password@]host1:port1[,host2:port2...]/service[/db]``:
  the client asks the Sentinels for the current primary of ``service`` and
  follows failovers (redis-py's ``SentinelConnectionPool``). ``rediss+sentinel://``
  speaks TLS to the Sentinels and the servers, with the same ``ssl_*`` query
  parameters; ``sentinel_password`` authenticates to the Sentinels.
- ``redis+cluster://[[user]:password@]host1:port1[,host2:port2...]`` (and
  ``rediss+cluster://`` with the ``ssl_*`` parameters): a Redis Cluster; the hosts are
  seeds, the client learns the rest and follows slot moves and failovers
  (redis-py's ``RedisCluster``). Only :func:`create_client` builds it, and every
  component takes it (:func:`create_redis` refuses it, naming :func:`create_client`).

The client returned owns its connection pool; close it with ``await client.aclose()``.

Connection pool: a command that finds every connection of the pool busy waits for one
(up to ``POOL_TIMEOUT_S``) instead of failing. redis-py 8's default pool refuses the
101st concurrent command at once ("Too many connections"), so a worker publishing
under a burst of requests would answer 503s while Redis is idle. At most
``MAX_CONNECTIONS`` per client (redis-py's default); ``?max_connections=N`` and
``?timeout=S`` in the URL change them. Sentinel URLs keep redis-py's Sentinel pool,
which cannot wait: it is given no cap instead (as redis-py before 8 did), so a burst
opens more connections rather than failing. Cluster URLs likewise (redis-py's cluster
client cannot wait for a node's connection either).
"""

from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from redis import __version__ as redis_version
from redis.asyncio import BlockingConnectionPool, Redis, SSLConnection
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import ExponentialWithJitterBackoff

from coordinator.errors import REDIS_UNREACHABLE, ConfigurationError

_TLS_OPTIONS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)
_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)
RedisClient = Redis | RedisCluster
"""What :func:`create_client` returns: a client of one Redis (or Sentinel's primary),
or of a Redis Cluster."""
_UNPOOLED = 2**31  # "no cap" for the pools that cannot wait (Sentinel, Cluster)
MAX_CONNECTIONS = 100
"""Connections per client (pool) at most, unless the URL says ``?max_connections=``."""
POOL_TIMEOUT_S = 20.0
"""How long a command waits for a free pooled connection before ``ConnectionError``."""


def default_retry() -> Retry:
    """A few quick retries with jittered exponential backoff for transient errors.

    Coordinator's own loops add their own, longer backoff on top; this only
    smooths over a single dropped connection.
    """
    return Retry(ExponentialWithJitterBackoff(cap=0.25, base=0.01), retries=2)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, safe to log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def check_redis_url(url: str) -> str:
    """Return ``url`` if :func:`create_redis` can use it, else raise ``ConfigurationError``.

    Checks the scheme, the ports, and that the database is a number: the path of
    ``redis://host:6379/0``, the ``?db=`` of ``unix:///path.sock?db=0``, the part
    after the service of ``redis+sentinel://host:26379/mymaster/0``. Messages show
    the URL with its password masked.
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(f"Redis URL {shown!r} is malformed: {exc}") from None
    if parts.scheme not in _SCHEMES:
        raise ConfigurationError(
            f"Redis URL {shown!r} has scheme {parts.scheme!r}; use one of "
            + ", ".join(f"{s}://" for s in _SCHEMES)
        )
    query = parse_qs(parts.query)
    if parts.scheme.endswith("+sentinel"):
        _sentinel_parts(url)
        return url
    if parts.scheme.endswith("+cluster"):
        _cluster_hosts(url)
        return url
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigurationError(
                f"Redis URL {shown!r} names no socket; use unix:///path/to/redis.sock?db=0"
            )
        for db in query.get("db", []):
            if not db.isdigit():
                raise ConfigurationError(
                    f"Redis URL {shown!r}: database db={db!r} is not a number; "
                    "use unix:///path/to/redis.sock?db=0"
                )
        return url
    try:
        _ = parts.port  # urlsplit checks the port only when it is read
    except ValueError:
        port = parts.netloc.rsplit("@", 1)[-1].rpartition(":")[2]
        raise ConfigurationError(
            f"Redis URL {shown!r}: port {port!r} is not a number; use {parts.scheme}://host:6379/0"
        ) from None
    db_path = parts.path.strip("/")
    for db in ([db_path] if db_path else []) + query.get("db", []):
        if not db.isdigit():
            raise ConfigurationError(
                f"Redis URL {shown!r}: database {db!r} is not a number; end the URL with "
                f"the database number, as in {parts.scheme}://host:6379/0"
            )
    return url


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return urlsplit(url).scheme.endswith("+cluster")


def create_client(url: str, **overrides: Any) -> RedisClient:
    """Build the async client for ``url``: a ``RedisCluster`` for a cluster URL, else
    what :func:`create_redis` builds.

    Raises:
        ConfigurationError: the URL is malformed or its scheme is unknown; or it is a
            cluster URL and the installed redis-py is older than 8.0.
    """
    if is_cluster_url(check_redis_url(url)):
        reason = cluster_unsupported_reason()
        if reason:
            raise ConfigurationError(f"Redis URL {redact_url(url)!r}: {reason}")
        return _cluster_client(url, _options(url, overrides))
    return create_redis(url, **overrides)


def check_client_matches(component: str, redis: object, url: str) -> None:
    """Refuse a client whose kind does not match ``url`` (a ``RedisCluster`` for a
    cluster URL, a plain client otherwise): a component that opens its own node
    connections takes them from the URL, so both must name the same Redis.

    Raises:
        ConfigurationError: they do not match; says to build the client from the URL.
    """
    cluster = is_cluster_url(url)
    if isinstance(redis, RedisCluster) != cluster:
        raise ConfigurationError(
            f"{component} was given a {type(redis).__name__} client but "
            f"{redact_url(url)!r} is "
            + ("a cluster URL" if cluster else "not a cluster URL")
            + "; pass a client made by create_client(settings.redis_url)"
        )


async def refresh_slot_map(cluster: RedisCluster) -> None:
    """Read ``cluster``'s slot map again (after a failover or a slot migration).

    A client that has not run a command yet is initialized first: redis-py's own
    start-up also loads the command table, without which it cannot route commands.

    Raises:
        RedisClusterException, RedisError: no node answered with a full slot map.
    """
    await cluster.initialize()
    await cluster.nodes_manager.initialize()


async def ready_for_pubsub(redis: RedisClient) -> None:
    """Call before a classic Pub/Sub subscribe on ``redis``: a cluster client's Pub/Sub
    picks its node from the slot map, which a client that ran no command yet lacks.
    Nothing to do off Cluster.

    Raises:
        RedisClusterException, RedisError: the slot map could not be read.
    """
    if isinstance(redis, RedisCluster):
        await redis.initialize()


async def recover_topology(redis: RedisClient) -> None:
    """Call after a Redis error, before retrying: on Cluster the slot map is read again,
    so the retry reaches the current primaries (after a failover or a slot migration).
    Errors are ignored (the retry reports them). Nothing to do off Cluster."""
    if isinstance(redis, RedisCluster):
        with contextlib.suppress(*REDIS_UNREACHABLE):
            await refresh_slot_map(redis)


class PrimaryClients:
    """The client a write must go through when ``WAIT`` follows it on the same
    connection: ``redis`` itself, or on Cluster a plain client of the primary that
    serves the key's slot (a cluster client picks a connection per command, so its
    ``WAIT`` could ask about another connection's writes).

    Node clients are opened on first use, from ``url``'s credentials and TLS, and
    owned: :meth:`aclose` closes them (``redis`` is not closed). After an error on one,
    call :meth:`forget`: the slot map is read again, so a retry reaches the slot's
    current primary (after a failover or a slot migration).
    """

    def __init__(self, redis: RedisClient, url: str) -> None:
        self._redis = redis
        self._url = url
        self._nodes: dict[str, Redis] = {}

    async def client_for(self, key: str) -> Redis:
        """The client for a write of ``key`` followed by ``WAIT`` (see class doc).

        Raises:
            ConnectionError: on Cluster, no node serves ``key``'s slot.
            RedisClusterException, RedisError: the slot map could not be read.
        """
        if not isinstance(self._redis, RedisCluster):
            return self._redis
        await self._redis.initialize()  # the first time only: its slot map
        node = self.primary_of(key)
        client = self._nodes.get(node.name)
        if client is None:
            client = create_node_client(self._url, node.host, int(node.port))
            self._nodes[node.name] = client
        return client

    def primary_of(self, key: str) -> ClusterNode:
        """The primary serving ``key``'s slot, as the cluster client knows it.

        Raises:
            ConnectionError: no node serves the slot (or ``redis`` is no cluster).
        """
        node = self._redis.get_node_from_key(key) if isinstance(self._redis, RedisCluster) else None
        if node is None:
            raise ConnectionError(f"no Redis Cluster node serves the slot of {key!r}")
        return node

    async def forget(self) -> None:
        """After an error on a node client: read the slot map again (see
        :func:`recover_topology`)."""
        await recover_topology(self._redis)

    async def aclose(self) -> None:
        """Close the node clients opened so far."""
        nodes, self._nodes = self._nodes, {}
        for client in nodes.values():
            with contextlib.suppress(Exception):
                await client.aclose()


CLUSTER_REDIS_PY = (8, 0)
"""The first redis-py whose asyncio Pub/Sub has ``ssubscribe`` (Sharded Pub/Sub)."""


def cluster_unsupported_reason() -> str | None:
    """Why this installation cannot use Redis Cluster URLs, or None when it can."""
    installed = tuple(int(p) for p in redis_version.split(".")[:2] if p.isdigit())
    if installed >= CLUSTER_REDIS_PY:
        return None
    return (
        f"Redis Cluster needs redis-py 8.0 or newer (asyncio Sharded Pub/Sub); "
        f"redis-py {redis_version} is installed: pip install 'redis>=8'"
    )


def create_redis(url: str, **overrides: Any) -> Redis:
    """Build a ``redis.asyncio.Redis`` for ``url``.

    ``overrides`` are passed to redis-py (``decode_responses``, ``socket_timeout``,
    ``client_name``, ...).

    Raises:
        ConfigurationError: the URL's scheme is not one of ``redis``, ``rediss``,
            ``unix``, ``redis+sentinel``, or the URL is malformed; or it names a Redis
            Cluster (use :func:`create_client`).
    """
    parts = urlsplit(check_redis_url(url))
    if is_cluster_url(url):
        raise ConfigurationError(
            f"Redis URL {redact_url(url)!r} names a Redis Cluster: use create_client(url), "
            "which builds a RedisCluster for it (the Coordinator app, EventRelay, "
            "LeaderElector and LeaderScheduler take one); create_redis() builds only "
            "redis://, rediss://, unix:// and redis+sentinel:// clients"
        )
    options = _options(url, overrides)
    if parts.scheme.endswith("+sentinel"):
        options.setdefault("max_connections", _UNPOOLED)
        return _sentinel_client(url, options)
    return _pooled(url, options)


def _pooled(url: str, options: dict[str, Any], **node: Any) -> Redis:
    """A client on a pool that waits for a free connection (see the module doc): of
    ``url``, or of one cluster ``node`` (``host``, ``port``) with ``options``' auth."""
    options.setdefault("max_connections", MAX_CONNECTIONS)
    options.setdefault("timeout", POOL_TIMEOUT_S)
    if node:
        if options.pop("ssl", False):  # from_url picks the class from the scheme; here, us
            options["connection_class"] = SSLConnection
        return Redis.from_pool(BlockingConnectionPool(**node, **options))
    try:
        return Redis.from_pool(BlockingConnectionPool.from_url(url, **options))
    except ValueError as exc:
        raise ConfigurationError(f"Redis URL {redact_url(url)!r} is invalid: {exc}") from None


def create_node_client(url: str, host: str, port: int, **overrides: Any) -> Redis:
    """A plain client of one node of the cluster of ``url`` (its credentials and TLS),
    for what a cluster client cannot do: a Pub/Sub connection to one shard.

    Raises:
        ConfigurationError: ``url`` is not a valid cluster URL.
    """
    if not is_cluster_url(check_redis_url(url)):
        raise ConfigurationError(f"Redis URL {redact_url(url)!r} is not a cluster URL")
    options = _options(url, overrides)
    options.update(_auth_and_tls(url))
    return _pooled(url, options, host=host, port=port)


def _options(url: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """redis-py options every client gets (retry, timeouts, keepalive), then ``overrides``."""
    options: dict[str, Any] = {
        "retry": default_retry(),
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "health_check_interval": 10,
    }
    if urlsplit(url).scheme == "unix":
        del options["socket_keepalive"]  # TCP only: redis-py's unix connection rejects it
    options.update(overrides)
    return options


def _auth_and_tls(url: str) -> dict[str, Any]:
    """The password, user and TLS options of a Sentinel or Cluster URL (its query's
    ``ssl_*`` parameters; ``ssl_check_hostname`` as a boolean)."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    options: dict[str, Any] = {}
    if parts.scheme.startswith("rediss"):
        options["ssl"] = True
        options.update({k: v for k, v in query.items() if k in _TLS_OPTIONS})
        if "ssl_check_hostname" in options:
            check = options["ssl_check_hostname"].lower() in ("1", "true", "yes")
            options["ssl_check_hostname"] = check
    if parts.password is not None:
        options["password"] = unquote(parts.password)
    if parts.username:
        options["username"] = unquote(parts.username)
    return options


def _hosts(url: str, default_port: int) -> list[tuple[str, int]]:
    """The comma-separated ``host:port`` list of a Sentinel or Cluster URL."""
    netloc = urlsplit(url).netloc.rsplit("@", 1)[-1]
    hosts: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", str(default_port))
        if not port.isdigit():
            raise ConfigurationError(f"address {item!r} in {redact_url(url)!r} needs host:port")
        hosts.append((host or "localhost", int(port)))
    return hosts


def _cluster_hosts(url: str) -> list[tuple[str, int]]:
    """The seed nodes of a cluster URL; a database other than 0 is an error."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    dbs = ([path] if path else []) + parse_qs(parts.query).get("db", [])
    if any(db != "0" for db in dbs):
        raise ConfigurationError(
            f"Cluster URL {redact_url(url)!r} names database {dbs[0]!r}: Redis Cluster has "
            "only database 0; use redis+cluster://host1:6379,host2:6379"
        )
    return _hosts(url, 6379)


def _cluster_client(url: str, options: dict[str, Any]) -> RedisCluster:
    options.setdefault("max_connections", _UNPOOLED)
    options.update(_auth_and_tls(url))
    nodes = [ClusterNode(host, port) for host, port in _cluster_hosts(url)]
    return RedisCluster(startup_nodes=nodes, **options)


class _SentinelConnection(SentinelManagedConnection):
    """Asks the Sentinels for the primary on every reconnect.

    redis-py 8 reconnects a dropped connection inside ``send_packed_command``
    without going through ``SentinelManagedConnection.connect``, so a
    dedicated connection (``Redis.client()``, as the elector's lease
    connection) would reconnect to the demoted primary forever after a
    failover, every write refused with READONLY.
    """

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not self.is_connected and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(check_health, retry_socket_connect)


class _SentinelSSLConnection(_SentinelConnection, SentinelManagedSSLConnection):
    pass


def _sentinel_parts(url: str) -> tuple[list[tuple[str, int]], str, int]:
    """The Sentinels' addresses, the service name and the database of a Sentinel URL."""
    parts = urlsplit(url)
    shown = redact_url(url)
    hosts = _hosts(url, 26379)
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ConfigurationError(
            f"Sentinel URL {shown!r} must name the service: "
            "redis+sentinel://host:26379/mymaster[/db]"
        )
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigurationError(
            f"Sentinel URL {shown!r}: database {'/'.join(path[1:])!r} is not a number; "
            "use redis+sentinel://host:26379/mymaster/0"
        )
    return hosts, path[0], int(path[1]) if len(path) > 1 else 0


def _sentinel_client(url: str, options: dict[str, Any]) -> Redis:
    hosts, service, db = _sentinel_parts(url)
    query = {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": 2}
    auth = _auth_and_tls(url)
    options.update(auth)  # the primary's and replicas' connections...
    if auth.get("ssl"):  # ...and the Sentinels' (TLS too)
        sentinel_kwargs.update({k: v for k, v in auth.items() if k == "ssl" or k in _TLS_OPTIONS})
    if "sentinel_password" in query:
        sentinel_kwargs["password"] = query["sentinel_password"]
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, db=db, **options)  # type: ignore[no-untyped-call]
    connection_class = _SentinelSSLConnection if options.get("ssl") else _SentinelConnection
    client: Redis = sentinel.master_for(
        service, redis_class=_SentinelManagedRedis, connection_class=connection_class
    )
    assert isinstance(client, _SentinelManagedRedis)
    client.sentinels = tuple(sentinel.sentinels)
    return client


class _SentinelManagedRedis(Redis):
    """The primary's client; closing it (with its pool) also closes its connections to
    the Sentinels, which redis-py leaves open (``.client()`` copies share the pool and
    close neither)."""

    sentinels: tuple[Redis, ...] = ()

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        owner = close_connection_pool or (
            close_connection_pool is None and self.auto_close_connection_pool
        )
        await super().aclose(close_connection_pool)
        if owner:
            for sentinel in self.sentinels:
                await sentinel.aclose()

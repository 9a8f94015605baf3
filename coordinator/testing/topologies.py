"""Redis topologies for tests, built on :class:`coordinator.testing.servers.RedisServer`.

- :class:`TLSRedisServer`: TLS only (no plain port), with certificates made by
  :func:`make_certificates` (the ``openssl`` command) and client certificates
  required; :func:`tls_unsupported_reason` says why it cannot run here.
- :class:`UnixRedisServer`: a unix socket only.
- :class:`SentinelCluster`: a primary, a replica and three Sentinels on free
  ports, with :meth:`SentinelCluster.failover` and :meth:`SentinelCluster.kill_primary`.
- :class:`RedisClusterServers`: a Redis Cluster, 3 primaries and 3 replicas, with
  :meth:`RedisClusterServers.kill_primary_of`.

Every process belongs to the test that started it and is stopped by ``stop()``.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from coordinator.testing.servers import (
    RedisServer,
    find_redis_server,
    free_port,
    handed_out_recently,
    wait_until,
)


@dataclass(frozen=True)
class Certificates:
    """PEM files of a throwaway CA, a server cert (localhost, 127.0.0.1) and a client cert."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def query(self) -> str:
        """The ``rediss://`` URL query that makes redis-py trust the CA and present the client."""
        return urlencode(
            {
                "ssl_ca_certs": self.ca,
                "ssl_certfile": self.client_cert,
                "ssl_keyfile": self.client_key,
            }
        )


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def make_certificates(directory: Path) -> Certificates:
    """Generate a CA and server/client certificates (EC P-256, valid one day) with openssl."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *key,
        "-keyout",
        d / "ca.key",
        "-out",
        d / "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=coordinator test CA",
    )
    for name, ext in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl(
            "req",
            *key,
            "-keyout",
            d / f"{name}.key",
            "-out",
            d / f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            d / f"{name}.csr",
            "-CA",
            d / "ca.crt",
            "-CAkey",
            d / "ca.key",
            "-CAcreateserial",
            "-out",
            d / f"{name}.crt",
            "-days",
            "1",
            "-extfile",
            d / f"{name}.ext",
        )
    return Certificates(
        d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key"
    )


def tls_unsupported_reason(binary: str | None = None) -> str | None:
    """Why a TLS server cannot be started here (no openssl, redis-server built without
    TLS), or ``None`` when it can."""
    if shutil.which("openssl") is None:
        return "the openssl command is not installed (needed to make test certificates)"
    binary = binary or find_redis_server()
    try:
        probe = subprocess.run(
            [binary, "--port", "0", "--tls-port", "0"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not run {binary}: {exc}"
    if "not listen anywhere" not in probe.stdout + probe.stderr:
        return f"{binary} was built without TLS support (BUILD_TLS=yes)"
    return None


class TLSRedisServer(RedisServer):
    """A redis-server that listens with TLS only, requiring client certificates."""

    def __init__(self, certs: Certificates, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.certs = certs

    @property
    def url(self) -> str:
        return f"rediss://{self.host}:{self.port}/0?{self.certs.query()}"

    def command(self) -> list[str]:
        c = self.certs
        return [
            *super().command(),
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            str(c.server_cert),
            "--tls-key-file",
            str(c.server_key),
            "--tls-ca-cert-file",
            str(c.ca),
        ]

    def ping(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.certs.ca))
        context.load_cert_chain(str(self.certs.client_cert), str(self.certs.client_key))
        try:
            with (
                socket.create_connection((self.host, self.port), timeout=0.5) as raw,
                context.wrap_socket(raw, server_hostname=self.host) as sock,
            ):
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except (OSError, ssl.SSLError):
            return False


class UnixRedisServer(RedisServer):
    """A redis-server on a unix socket only (no TCP port)."""

    @property
    def socket_path(self) -> Path:
        return self.dir / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    def command(self) -> list[str]:
        return [
            *super().command(),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
        ]

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(0.5)
                sock.connect(str(self.socket_path))
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class SentinelServer(RedisServer):
    """One Sentinel (``redis-server sentinel.conf --sentinel``) watching ``service``."""

    def __init__(self, primary_port: int, service: str, quorum: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    f"bind {self.host}",
                    "daemonize no",
                    "protected-mode no",
                    f"dir {self.dir}",
                    f"logfile {self.dir / 'sentinel.log'}",
                    f"sentinel monitor {service} {self.host} {primary_port} {quorum}",
                    f"sentinel down-after-milliseconds {service} 1000",
                    f"sentinel failover-timeout {service} 4000",
                    f"sentinel parallel-syncs {service} 1",
                    "",
                ]
            )
        )

    def command(self) -> list[str]:
        return [self.binary, str(self.conf), "--sentinel"]


class SentinelCluster:
    """A primary, a replica and three Sentinels (quorum 2), all on 127.0.0.1.

    ``url`` is the ``redis+sentinel://`` URL the library connects with.
    """

    def __init__(self, service: str = "mymaster") -> None:
        self.service = service
        self.primary = RedisServer()
        self.replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(self.primary.port)])
        self.sentinels = [SentinelServer(self.primary.port, service, 2) for _ in range(3)]
        self.servers = {s.port: s for s in (self.primary, self.replica)}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def start(self, timeout: float = 30.0) -> SentinelCluster:
        """Start everything; return once each Sentinel knows the replica and its peers."""
        try:
            self.primary.start()
            self.replica.start()
            wait_until(
                lambda: self._info(self.replica.port).get("master_link_status") == "up",
                timeout,
                interval=0.1,
                message="the replica never synced",
            )
            for sentinel in self.sentinels:
                sentinel.start()
            wait_until(
                self._discovered,
                timeout,
                interval=0.2,
                message="sentinels did not discover the replica and each other",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def primary_port(self) -> int:
        """The primary's port as the first answering Sentinel reports it."""
        for sentinel in self.sentinels:
            try:
                _, port = self._sentinel(sentinel.port).sentinel_get_master_addr_by_name(
                    self.service
                )
                return int(port)
            except Exception:
                continue
        raise RuntimeError("no sentinel answered")

    def failover(self, timeout: float = 30.0) -> int:
        """``SENTINEL FAILOVER``; returns the new primary's port once the old one is its
        replica (until then the old primary still accepts writes, which are lost)."""
        old = self.primary_port()
        self._sentinel(self.sentinels[0].port).execute_command("SENTINEL", "FAILOVER", self.service)
        new = self._wait_new_primary(old, timeout)
        wait_until(
            lambda: self._info(old).get("role") == "slave",
            timeout,
            interval=0.1,
            message="the old primary was never turned into a replica",
        )
        return new

    def kill_primary(self, timeout: float = 30.0) -> int:
        """SIGKILL the primary and wait for the Sentinels to promote the replica."""
        old = self.primary_port()
        self.servers[old].kill()
        return self._wait_new_primary(old, timeout)

    def stop(self) -> None:
        for server in [*self.sentinels, self.replica, self.primary]:
            server.stop()

    def __enter__(self) -> SentinelCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers ----------------------------------------------------------------
    def _wait_new_primary(self, old: int, timeout: float) -> int:
        def promoted() -> int:
            port = self.primary_port()
            return port if port != old and self._info(port).get("role") == "master" else 0

        port = wait_until(promoted, timeout, interval=0.1, message="no new primary")
        return port

    def _discovered(self) -> bool:
        for sentinel in self.sentinels:
            client = self._sentinel(sentinel.port)
            replicas = client.sentinel_slaves(self.service)
            peers = client.sentinel_sentinels(self.service)
            if len(replicas) != 1 or len(peers) != 2:
                return False
            if any("down" in str(r.get("flags", "")) for r in replicas):
                return False
        return True

    def _sentinel(self, port: int) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, decode_responses=True)

    def _info(self, port: int) -> dict[str, Any]:
        import redis

        try:
            with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2) as client:
                return dict(client.info("replication"))
        except (redis.RedisError, OSError):
            return {}


def free_cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher, Redis' rule) is free too; neither
    is a port, or the bus port of a port, handed out recently (another node's)."""

    def taken(port: int) -> bool:
        bus = port + 10000
        return bus > 65535 or handed_out_recently(bus) or handed_out_recently(port - 10000)

    while True:
        port = free_port(avoid=taken)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisClusterServers:
    """A Redis Cluster of ``primaries`` shards with one replica each (default 3 + 3),
    made with ``redis-server --cluster-enabled yes`` and ``redis-cli --cluster create``.

    ``url`` is the ``redis+cluster://`` URL (every node as a seed). Nodes are
    :class:`~coordinator.testing.servers.RedisServer`s in :attr:`nodes` (by port): kill,
    pause and restart them; :meth:`kill_primary_of` SIGKILLs the primary serving a key
    and waits until its replica took over (``cluster-node-timeout`` 1 s).
    """

    def __init__(self, primaries: int = 3, binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        self.nodes: dict[int, RedisServer] = {}
        for _ in range(primaries * 2):
            server = RedisServer(free_cluster_port(), binary=self.binary)
            server.extra_args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(server.dir / "nodes.conf"),
                "--cluster-node-timeout",
                "1000",
                # a replica whose primary died long ago may still take over (tests
                # pause nodes), and a shard without a primary does not stop the others
                "--cluster-replica-validity-factor",
                "0",
                "--cluster-require-full-coverage",
                "no",
            ]
            self.nodes[server.port] = server
        self.primaries = primaries

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.nodes)

    def start(self, timeout: float = 60.0) -> RedisClusterServers:
        """Start the nodes, create the cluster, and return once every node sees every
        slot served and every replica in sync."""
        try:
            for node in self.nodes.values():
                node.start()
            cli = shutil.which("redis-cli", path=str(Path(self.binary).parent)) or "redis-cli"
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{p}" for p in self.nodes),
                    "--cluster-replicas",
                    "1",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            wait_until(self.healthy, timeout, interval=0.1, message="the cluster never came up")
        except BaseException:
            self.stop()
            raise
        return self

    def healthy(self) -> bool:
        """Every running node says ``cluster_state:ok`` with all slots served, and
        ``primaries`` primaries each have a replica whose link is up."""
        running = [p for p, n in self.nodes.items() if n.process and n.process.poll() is None]
        synced = 0
        for port in running:
            raw = self._command(port, "CLUSTER", "INFO") or ""
            info = dict(line.split(":", 1) for line in raw.split() if ":" in line)
            if info.get("cluster_state") != "ok" or str(info.get("cluster_slots_ok")) != "16384":
                return False
            replication = self._command(port, "INFO", "replication") or {}
            synced += replication.get("master_link_status") == "up"
        return synced >= self.primaries

    def primary_of(self, key: str) -> int:
        """The port of the primary serving ``key``'s slot (as the first answering node says)."""
        slot = self._slot(key)
        for port in self.nodes:
            nodes = self._command(port, "CLUSTER", "NODES")
            if not isinstance(nodes, str):
                continue
            for line in nodes.splitlines():
                # <id> <ip:port@bus> <flags> <primary> <ping> <pong> <epoch> <link> <slot>...
                fields = line.split()
                flags = fields[2].split(",")
                if "master" not in flags or "fail" in flags or fields[7] != "connected":
                    continue
                for served in fields[8:]:
                    first, _, last = served.partition("-")
                    if first.isdigit() and int(first) <= slot <= int(last or first):
                        return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise RuntimeError(f"no node knows an online primary for slot {slot}")

    def replica_of(self, primary: int) -> int:
        """The port of the replica that follows the primary on port ``primary``."""
        for port in self.nodes:
            replication = self._command(port, "INFO", "replication") or {}
            if replication.get("role") == "slave" and replication.get("master_port") == primary:
                return port
        raise RuntimeError(f"no replica follows the primary on port {primary}")

    def kill_primary_of(self, key: str, timeout: float = 30.0) -> tuple[int, int]:
        """SIGKILL the primary of ``key``'s slot; return (old port, new primary's port)
        once its replica serves the slot."""
        old = self.primary_of(key)
        self.nodes[old].kill()

        def promoted() -> int:
            try:
                port = self.primary_of(key)
            except RuntimeError:
                return 0
            return port if port != old else 0

        new = wait_until(promoted, timeout, interval=0.1, message="no replica took over")
        return old, new

    def move_slot(self, key: str, to_port: int, timeout: float = 30.0) -> None:
        """Migrate ``key``'s slot, with its keys, to the primary on ``to_port`` (the
        ``redis-cli --cluster reshard`` steps: IMPORTING, MIGRATING, MIGRATE, NODE)."""
        slot = str(self._slot(key))
        source = self.primary_of(key)
        if source == to_port:
            return
        source_id = self._command(source, "CLUSTER", "MYID")
        target_id = self._command(to_port, "CLUSTER", "MYID")
        self._checked(to_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        self._checked(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := self._checked(source, "CLUSTER", "GETKEYSINSLOT", slot, "100"):
            self._checked(
                source, "MIGRATE", "127.0.0.1", str(to_port), "", "0", "5000", "KEYS", *keys
            )
        for port in (to_port, source, *self.nodes):
            if self._command(port, "PING") is not None:
                self._command(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        wait_until(
            lambda: self.primary_of(key) == to_port and self.healthy(),
            timeout,
            interval=0.1,
            message=f"slot {slot} never settled on {to_port}",
        )

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _slot(self, key: str) -> int:
        for port in self.nodes:
            reply = self._command(port, "CLUSTER", "KEYSLOT", key)
            if reply is not None:
                return int(reply)
        raise RuntimeError("no cluster node answered")

    def _checked(self, port: int, *args: str) -> Any:
        """A command that must succeed (``_command`` returns None on any error)."""
        import redis

        with redis.Redis(
            host="127.0.0.1", port=port, socket_timeout=5, decode_responses=True
        ) as client:
            return client.execute_command(*args)

    def _command(self, port: int, *args: str) -> Any:
        import redis

        node = self.nodes[port]
        if node.paused or node.process is None or node.process.poll() is not None:
            return None
        try:
            with redis.Redis(
                host="127.0.0.1", port=port, socket_timeout=2, decode_responses=True
            ) as client:
                reply = client.execute_command(*args)
        except (redis.RedisError, OSError):
            return None
        return reply

"""The container paths on a real Docker engine: the harness's Redis containers, the image
(Dockerfile), and compose.yaml with nginx in front and real EventSource clients.

Every container, network and volume here is started by this module and removed by it;
nothing else on the engine is touched. Without an engine every test skips with one reason
and nothing is installed (the EventSource client is fetched with npm on first use, into
tests/support/node/node_modules, or the compose tests skip).

Run them on any machine with Docker: ``./run test -m docker`` (Docker pulls the real
images; where no registry is reachable, ../shared/tools/docker-sandbox.sh builds stand-ins).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from coordinator.testing import DockerRedisServer, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "support" / "node"
IMAGE = os.environ.get("COORDINATOR_TEST_IMAGE", "coordinator-demo:test")
BUILD_CONTEXT = os.environ.get("COORDINATOR_TEST_BUILD_CONTEXT", str(ROOT))
"""Where the image is built from: this checkout, or (say) a clean ``git archive`` of it."""
REDIS_IMAGE = "redis:7-alpine"
LABEL = "coordinator.testing=containers"


def engine_reason() -> str | None:
    """Why no Docker engine can be driven from here (the image and compose tests use the CLI)."""
    if not shutil.which("docker"):
        return "the docker command-line client is not on PATH"
    try:
        done = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer within 15 s"
    if done.returncode != 0:
        return f"no Docker engine answers ({done.stderr.strip()[:200]})"
    return None


_reason = engine_reason()
pytestmark = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.skipif(_reason is not None, reason=f"needs a Docker engine: {_reason}"),
]
needs_testcontainers = pytest.mark.skipif(
    importlib.util.find_spec("testcontainers") is None,
    reason="the harness's Redis containers need the testcontainers package "
    "(pip install 'testcontainers>=4.5', in the dev extra)",
)


def docker(*args: str, timeout: float = 60, check: bool = True) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def inspect(container: str, template: str) -> str:
    return docker("inspect", "--format", template, container)


def http_get(url: str, timeout: float = 2) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


def published_port(container: str, port: int) -> int:
    out = docker("port", container, f"{port}/tcp").splitlines()[0]
    return int(out.rsplit(":", 1)[1])


@pytest.fixture(scope="session")
def app_image() -> str:
    """The Dockerfile built once per session (Docker's cache makes a rebuild quick)."""
    started = time.monotonic()
    env = {**os.environ, "DOCKER_BUILDKIT": os.environ.get("DOCKER_BUILDKIT", "0")}
    done = subprocess.run(
        ["docker", "build", "-q", "--label", LABEL, "-t", IMAGE, BUILD_CONTEXT],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    size = int(inspect(IMAGE, "{{.Size}}"))
    print(f"\nimage {IMAGE}: {size / 1e6:.0f} MB, built in {time.monotonic() - started:.1f} s")
    return IMAGE


# ---------------------------------------------------------------- the harness


@needs_testcontainers
def test_docker_redis_keeps_its_url_across_restart_kill_and_pause() -> None:
    with DockerRedisServer(extra_args=["--requirepass", "pw"]) as server:
        url = server.url
        client = redis_sync.Redis(host=server.host, port=server.port, password="pw")
        client.set("k", "v")
        first_pid = server.pid

        started = time.monotonic()
        server.restart()  # returns once Redis answers, on the same host port
        print(f"\ncontainer restart to PING: {time.monotonic() - started:.2f} s")
        assert server.url == url and server.pid != first_pid
        assert client.get("k") is None, "no persistence: a restart comes back empty"

        server.kill()
        with pytest.raises(redis_sync.ConnectionError):
            redis_sync.Redis(host=server.host, port=server.port, password="pw").ping()
        server.start()
        assert server.url == url and client.ping()

        server.pause()
        frozen = redis_sync.Redis(
            host=server.host, port=server.port, password="pw", socket_timeout=0.5
        )
        with pytest.raises(redis_sync.TimeoutError):
            frozen.ping()
        server.resume()
        assert client.ping()
        client.close()
        frozen.close()
        container = server.container_id
    assert not docker("ps", "-aq", "--filter", f"id={container}"), "stop() left the container"


@needs_testcontainers
def test_docker_redis_persist_keeps_data_across_restart() -> None:
    with DockerRedisServer(persist=True) as server:
        client = redis_sync.Redis(host=server.host, port=server.port)
        client.set("k", "v")
        server.restart()
        assert client.get("k") == b"v"
        client.close()


def test_docker_mode_without_an_engine_stops_the_run_at_once(tmp_path: Path) -> None:
    (tmp_path / "test_one.py").write_text("def test_one(redis_url):\n    pass\n")
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import *  # noqa\npytest_plugins = ['coordinator.testing.plugin']\n"
    )
    env = {
        **os.environ,
        "COORDINATOR_TEST_REDIS": "docker",
        "DOCKER_HOST": f"tcp://127.0.0.1:{free_port()}",  # nothing listens there
        "PYTHONPATH": str(ROOT),
    }
    env.pop("REDIS_URL", None)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 4, out  # a usage error: no test ran
    assert out.count("COORDINATOR_TEST_REDIS=docker asks for Redis containers") == 1, out
    assert "passed" not in out
    assert time.monotonic() - started < 30


# ---------------------------------------------------------------- the image


@dataclass
class Stack:
    """A user network with a password-protected Redis, and app containers beside it."""

    network: str
    password: str = "s3cret-pw"
    containers: list[str] = field(default_factory=list)

    def run(self, *args: str) -> str:
        cid = docker("run", "-d", "--label", LABEL, "--network", self.network, *args)
        self.containers.append(cid)
        return cid

    def app(self, image: str, **env: str) -> tuple[str, int]:
        settings = {
            "REDIS_URL": f"redis://:{self.password}@redis:6379/0",
            "COORDINATOR_NAMESPACE": "image-test",
            **env,
        }
        flags = [x for name, value in settings.items() for x in ("-e", f"{name}={value}")]
        cid = self.run("--read-only", "--tmpfs", "/tmp", "-p", "127.0.0.1::8000", *flags, image)
        return cid, published_port(cid, 8000)


@pytest.fixture(scope="module")
def stack(app_image: str) -> Iterator[Stack]:
    stack = Stack(network=f"coordinator-test-{uuid.uuid4().hex[:8]}")
    docker("network", "create", "--label", LABEL, stack.network)
    try:
        redis_id = stack.run(
            "--network-alias",
            "redis",
            REDIS_IMAGE,
            "redis-server",
            "--requirepass",
            stack.password,
            "--save",
            "",
            "--appendonly",
            "no",
        )
        wait_until(
            lambda: (
                "PONG"
                in docker(
                    "exec",
                    redis_id,
                    "redis-cli",
                    "-a",
                    stack.password,
                    "--no-auth-warning",
                    "ping",
                    check=False,
                )
            ),
            30,
            interval=0.1,
            message="Redis container never answered",
        )
        yield stack
    finally:
        if stack.containers:
            docker("rm", "-f", "-v", *stack.containers, check=False)
        docker("network", "rm", stack.network, check=False)


def test_image_serves_the_demo_as_non_root_on_a_read_only_root(
    stack: Stack, app_image: str
) -> None:
    started = time.monotonic()
    cid, port = stack.app(app_image)
    base = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: http_get(f"{base}/readyz")[0] == 200,
        60,
        interval=0.1,
        message="/readyz never answered 200",
    )
    ready_s = time.monotonic() - started
    print(f"\ncold start (docker run) to /readyz 200: {ready_s:.2f} s")

    with urllib.request.urlopen(f"{base}/", timeout=5) as page:  # the demo app, from /srv/app
        assert page.status == 200 and "<html" in page.read().decode().lower()
    assert http_get(f"{base}/api/instance")[1]["hostname"] == cid[:12]

    uid = docker("exec", cid, "sh", "-c", "awk '/^Uid:/ {print $2}' /proc/1/status")
    assert uid == "10001"
    assert inspect(cid, "{{.HostConfig.ReadonlyRootfs}}") == "true"
    refused = subprocess.run(
        ["docker", "exec", cid, "touch", "/srv/x"], capture_output=True, text=True, check=False
    )
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr

    wait_until(
        lambda: inspect(cid, "{{.State.Health.Status}}") == "healthy",
        60,
        interval=0.5,
        message="the image's HEALTHCHECK never became healthy",
    )
    print(f"HEALTHCHECK healthy after {time.monotonic() - started:.1f} s (first probe at 10 s)")
    docker("rm", "-f", cid)
    stack.containers.remove(cid)


def test_two_containers_elect_one_leader_and_docker_stop_hands_over(
    stack: Stack, app_image: str
) -> None:
    # A long lease: a follower that takes over within seconds can only have been handed it.
    env = {
        "COORDINATOR_NAMESPACE": f"t{uuid.uuid4().hex[:8]}",
        "COORDINATOR_LEASE_TTL_MS": "30000",
        "COORDINATOR_RENEW_INTERVAL_MS": "2000",
    }
    (a, port_a), (b, port_b) = stack.app(app_image, **env), stack.app(app_image, **env)
    hosts = {a[:12]: port_a, b[:12]: port_b}

    def leader_host() -> str | None:
        """The leader both containers see, if they agree on one."""
        leaders = {leader_host_of(port) for port in hosts.values()}
        return leaders.pop() if len(leaders) == 1 and None not in leaders else None

    for port in hosts.values():
        wait_until(
            lambda p=port: http_get(f"http://127.0.0.1:{p}/readyz")[0] == 200,
            60,  # type: ignore[misc]
            interval=0.1,
            message="an app container never became ready",
        )
    first = wait_until(leader_host, 30, interval=0.1, message="no single leader")
    assert first in hosts
    old = a if first == a[:12] else b
    survivor = b if old == a else a

    started = time.monotonic()
    docker("stop", old, timeout=30)
    stop_s = time.monotonic() - started
    assert inspect(old, "{{.State.ExitCode}}") == "0", "uvicorn did not exit cleanly"
    new = wait_until(
        lambda: (h := leader_host_of(hosts[survivor[:12]])) == survivor[:12] and h,
        3,
        interval=0.05,
        message="the lease was not handed over",
    )
    handover_s = time.monotonic() - started
    print(f"\ndocker stop of the leader: {stop_s:.2f} s; new leader after {handover_s:.2f} s")
    assert new == survivor[:12]
    assert stop_s < 3, f"docker stop took {stop_s:.2f} s"


def leader_host_of(port: int) -> str | None:
    leader = http_get(f"http://127.0.0.1:{port}/api/leader")[1].get("leader") or {}
    return leader.get("hostname")


# ---------------------------------------------------------------- compose + nginx


def compose_command() -> list[str] | None:
    """``docker compose`` (v2) where it exists, else Compose v1's ``docker-compose``."""
    if (
        subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def node_client_reason() -> str | None:
    """Why the EventSource client cannot run (installs it with npm on first use)."""
    if not shutil.which("node"):
        return "node is not on PATH (the EventSource client is a Node script)"
    if (NODE_DIR / "node_modules" / "eventsource").is_dir():
        return None
    if not shutil.which("npm"):
        return "npm is not on PATH to install the eventsource package"
    done = subprocess.run(
        ["npm", "install", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund", "--silent"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if done.returncode != 0:
        return f"npm install eventsource failed: {done.stderr.strip()[-300:]}"
    return None


class SseClient:
    """A Node EventSource client, its JSON lines read by a thread."""

    def __init__(self, url: str) -> None:
        self.records: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            ["node", str(NODE_DIR / "sse_client.mjs"), url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.records.append(json.loads(line))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in list(self.records) if r["kind"] == kind]

    def seqs(self) -> list[int]:
        out = []
        for r in self.of("event"):
            if r["event"] == "message":
                data = json.loads(r["data"])
                if isinstance(data, dict) and "seq" in data:
                    out.append(int(data["seq"]))
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def nginx_version(image: str) -> tuple[int, ...]:
    out = subprocess.run(
        ["docker", "run", "--rm", image, "nginx", "-v"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    assert found, out.stderr
    return tuple(int(x) for x in found.groups())


@dataclass
class Compose:
    base: list[str]
    project: str
    port: int
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 180, check: bool = True) -> str:
        done = subprocess.run(
            [*self.base, *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=ROOT,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-3000:]}")
        return done.stdout.strip()

    def ids(self, service: str) -> list[str]:
        return docker(
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
        ).split()


@pytest.fixture(scope="module")
def compose_stack(app_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compose]:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    if reason := node_client_reason():
        pytest.skip(reason)
    project = f"coordtest{uuid.uuid4().hex[:8]}"
    files = ["-f", str(ROOT / "compose.yaml")]
    version = nginx_version("nginx:1.28-alpine")
    if version < (1, 27, 3):
        # The pinned image is 1.28; an older stand-in cannot parse `resolve` (see
        # deploy/nginx.conf): run the file with that one word removed, as it says.
        conf = tmp_path_factory.mktemp("nginx") / "nginx.conf"
        text = (ROOT / "deploy" / "nginx.conf").read_text()
        conf.write_text(text.replace("server app:8000 resolve ", "server app:8000 "))
        override = conf.parent / "compose.override.yaml"
        override.write_text(
            json.dumps({"services": {"lb": {"volumes": [f"{conf}:/etc/nginx/nginx.conf:ro"]}}})
        )
        files += ["-f", str(override)]
        print(f"\nnginx {'.'.join(map(str, version))} < 1.27.3: upstream without `resolve`")
    port = free_port()
    env = {
        **os.environ,
        "APP_IMAGE": app_image,
        "PORT": str(port),
        "REDIS_PASSWORD": "compose-test-pw",
    }
    stack = Compose(
        [*command, "-p", project, "--project-directory", str(ROOT), *files], project, port, env
    )
    try:
        started = time.monotonic()
        stack("up", "-d", "--no-build", timeout=300)
        wait_until(
            lambda: (
                all(
                    inspect(c, "{{.State.Health.Status}}") == "healthy"
                    for s in ("redis", "app", "lb")
                    for c in stack.ids(s)
                )
                and len(stack.ids("app")) == 3
            ),
            120,
            interval=0.25,
            message="the stack never became healthy",
        )
        print(
            f"\ncompose up to all healthy (redis, 3 apps, lb): {time.monotonic() - started:.1f} s"
        )
        yield stack
    finally:
        stack("down", "-v", "--remove-orphans", "--timeout", "10", timeout=180, check=False)


def publish(base: str, channel: str, seq: int) -> None:
    """POST one event through the balancer, retrying while a replica goes away."""
    body = json.dumps({"data": {"seq": seq}}).encode()

    def sent() -> bool:
        request = urllib.request.Request(
            f"{base}/api/channels/{channel}/events",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 202
        except (OSError, urllib.error.HTTPError):
            return False

    wait_until(sent, 20, interval=0.1, message=f"could not publish seq {seq}")


def test_compose_sse_through_nginx_survives_a_replica_kill_and_stops_cleanly(
    compose_stack: Compose,
) -> None:
    stack = compose_stack
    base = f"http://127.0.0.1:{stack.port}"
    channel = f"c{uuid.uuid4().hex[:8]}"
    # The trailing slash makes the app redirect: the Location must keep this port.
    urls = [f"{base}/api/channels/{channel}/events/"] + [
        f"{base}/api/channels/{channel}/events"
    ] * 3
    clients = [SseClient(u) for u in urls]
    try:
        wait_until(
            lambda: all(c.of("open") for c in clients),
            20,
            interval=0.05,
            message="the EventSource clients never connected",
        )
        redirected = clients[0].of("open")[0]
        assert redirected["redirected"] and redirected["url"].startswith(f"{base}/"), redirected
        # Streams are open on the app once the relay has a subscriber; a first event proves it.
        total = 30
        for seq in range(10):
            publish(base, channel, seq)
        wait_until(
            lambda: all(c.seqs()[:10] == list(range(10)) for c in clients),
            20,
            interval=0.05,
            message="events did not reach every client",
        )

        victim_client = clients[1]
        serving = victim_client.of("open")[-1]["instance"]
        victim = next(c for c in stack.ids("app") if serving.startswith(c[:12]))
        opens_before = len(victim_client.of("open"))
        killed_at_ms = time.monotonic_ns() // 1_000_000
        docker("kill", victim)
        slowest = 0.0
        for seq in range(10, total):
            started = time.monotonic()
            publish(base, channel, seq)
            slowest = max(slowest, time.monotonic() - started)
        wait_until(
            lambda: all(sorted(set(c.seqs())) == list(range(total)) for c in clients),
            30,
            interval=0.05,
            message="a client lost events",
        )
        reopen = victim_client.of("open")[opens_before]
        assert reopen["lastEventId"], "the client did not resume with Last-Event-ID"
        assert reopen["instance"] != serving
        first_after = next(r for r in victim_client.of("event") if r["t"] >= reopen["t"])
        print(
            f"\nreplica kill -> client reconnected {reopen['t'] - killed_at_ms} ms, "
            f"first event after {first_after['t'] - killed_at_ms} ms; "
            f"slowest publish {slowest:.2f} s"
        )
        for c in clients:
            ids = [r["id"] for r in c.of("event") if r["event"] == "message"]
            assert len(ids) == len(set(ids)), "an event arrived twice"
            assert c.seqs() == sorted(c.seqs()), "events out of order"

        # A graceful stop of the balancer with streams open ends within its grace period.
        started = time.monotonic()
        stack("stop", "lb", timeout=60)
        stop_s = time.monotonic() - started
        lb = docker(
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            f"label=com.docker.compose.project={stack.project}",
            "--filter",
            "label=com.docker.compose.service=lb",
        ).split()[0]
        print(f"compose stop lb with {len(clients)} streams open: {stop_s:.1f} s")
        assert inspect(lb, "{{.State.ExitCode}}") == "0", "nginx was killed, not stopped"
        assert stop_s < 10
    finally:
        for c in clients:
            c.close()

    stack("down", "-v", "--remove-orphans", "--timeout", "10", timeout=180)
    label = f"label=com.docker.compose.project={stack.project}"
    assert not docker("ps", "-aq", "--filter", label)
    assert not docker("network", "ls", "-q", "--filter", label)
    assert not docker("volume", "ls", "-q", "--filter", label)

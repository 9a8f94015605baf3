"""The ``coordinator`` command, run as a subprocess against real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from coordinator import CoordinatorSettings, EventRelay, Keys, read_leader, redact_url
from coordinator.scheduler.runs import RunHistory
from coordinator.testing import async_wait_until, free_port, owned_redis

from .support.flow import leader_of, make_coordinator
from .support.procs import ROOT

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "coordinator.ops.cli"]


def cli_env(redis_url: str, namespace: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    return {**env, "REDIS_URL": redis_url, "COORDINATOR_NAMESPACE": namespace}


def spawn(env: dict[str, str], *args: str, **options: Any) -> subprocess.Popen[str]:
    """Start the CLI in the background (stderr piped unless ``options`` say otherwise)."""
    options = {"stderr": subprocess.PIPE, **options}
    return subprocess.Popen([*CLI, *args], env=env, cwd=ROOT, text=True, **options)


async def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI off the event loop (an in-process leader keeps renewing meanwhile)."""
    return await asyncio.to_thread(
        subprocess.run, [*CLI, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


async def run_json(env: dict[str, str], *args: str) -> Any:
    done = await run(env, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def test_status_leader_publish_runs(redis_url: str, namespace: str) -> None:
    env = cli_env(redis_url, namespace)
    coordinator = make_coordinator(redis_url, namespace, "cli")
    await coordinator.start()
    try:
        await leader_of(coordinator)
        await async_wait_until(lambda: len(coordinator.fires) >= 2, 10)  # type: ignore[attr-defined]
        published = await run_json(env, "publish", "news", '{"n": 1}')
        assert published["id"].count("-") == 1
        assert (await run(env, "publish", "news", "plain text")).returncode == 0

        status = await run_json(env, "status")
        me = coordinator.settings.instance_id
        assert status["leader"]["instance_id"] == me
        assert status["term"] == coordinator.elector.token and 0 < status["ttl_ms"] <= 2000
        assert [i["instance_id"] for i in status["instances"] if i["alive"]] == [me]
        assert status["channels"] == [
            {
                "channel": "news",
                "history": 2,
                "last_event_id": status["channels"][0]["last_event_id"],
            }
        ]
        text = (await run(env, "status")).stdout
        assert me in text and "term" in text and "news" in text and "2 events" in text

        leader = await run_json(env, "leader")
        assert leader["leader"]["instance_id"] == me
        assert me in (await run(env, "leader")).stdout

        runs = (await run_json(env, "runs", "--job", "tick", "--limit", "2"))["runs"]
        assert len(runs) == 2 and {r["job_id"] for r in runs} == {"tick"}
        assert "tick" in (await run(env, "runs")).stdout
    finally:
        await coordinator.stop()
    gone = await run_json(env, "status")
    assert gone["leader"] is None and not any(i["alive"] for i in gone["instances"])


async def test_tail_replays_then_follows(redis_url: str, namespace: str) -> None:
    env = cli_env(redis_url, namespace)
    first = (await run_json(env, "publish", "feed", '"one"'))["id"]
    second = (await run_json(env, "publish", "feed", '"two"', "--event", "update"))["id"]
    tail = spawn(
        env,
        "tail",
        "feed",
        "--last-event-id",
        first,
        "--count",
        "2",
        "--json",
        stdout=subprocess.PIPE,
    )
    try:
        assert tail.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(tail.stdout.readline), 30)
        assert json.loads(line) == {"id": second, "event": "update", "data": "two"}
        third = (await run_json(env, "publish", "feed", '{"n": 3}'))["id"]
        line = await asyncio.wait_for(asyncio.to_thread(tail.stdout.readline), 30)
        assert json.loads(line) == {"id": third, "event": "message", "data": {"n": 3}}
        assert await asyncio.to_thread(tail.wait, 20) == 0
    finally:
        tail.kill()
        tail.wait()


async def test_tail_stops_on_sigint(redis_url: str, namespace: str) -> None:
    tail = spawn(cli_env(redis_url, namespace), "tail", "quiet", stdout=subprocess.PIPE)
    lines: list[str] = []
    assert tail.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(tail.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    relay = EventRelay(CoordinatorSettings(redis_url=redis_url, namespace=namespace))
    try:
        # Running, subscribed and with its handlers in place once it prints an event:
        # publish until it does (a fixed wait is too short on a loaded machine).
        async def printed() -> bool:
            await relay.publish("quiet", "ping")
            return bool(lines)

        await async_wait_until(printed, 60, interval=0.2, message="tail never printed")
        tail.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(tail.wait, 20) in (0, 130)
        assert tail.stderr is not None and "Traceback" not in tail.stderr.read()
    finally:
        tail.kill()
        tail.wait()
        await relay.stop()


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["status", "--redis-url", "redis://:hunter2pw@127.0.0.1:1/0"], 1, "Redis at"),
        (["leader", "--redis-url", "redis://h:6379/abc"], 2, "database 'abc' is not a number"),
        (["leader", "--redis-url", "http://localhost"], 2, "scheme"),
        (["publish", "bad name", "1"], 2, "not valid"),
        (["tail", "feed", "--last-event-id", "nope"], 2, "Last-Event-ID"),
        (["runs", "--limit", "0"], 2, "limit"),
        (["status", "--namespace", "bad ns"], 2, "namespace"),
    ],
)
async def test_errors_are_one_clear_line(
    redis_url: str, namespace: str, args: list[str], code: int, needle: str
) -> None:
    done = await run(cli_env(redis_url, namespace), *args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert "hunter2pw" not in done.stderr + done.stdout


async def test_status_shows_no_secret_or_address(namespace: str) -> None:
    password = "pw-Zq81-never-shown"
    with owned_redis(extra_args=["--requirepass", password]) as server:
        url = f"redis://:{password}@127.0.0.1:{server.port}/0"
        coordinator = make_coordinator(url, namespace, "sec")
        await coordinator.start()
        try:
            await leader_of(coordinator)
            await coordinator.publish("c1", 1)
            env = cli_env(url, namespace)
            shown = f"redis://:***@127.0.0.1:{server.port}/0"  # which Redis, password masked
            for args in (["status", "--json"], ["status"], ["leader", "--json"], ["leader"]):
                done = await run(env, *args)
                assert done.returncode == 0, done.stderr
                out = done.stdout + done.stderr
                assert password not in out and "client_id" not in out
                if args[0] == "status":
                    assert out.count(f":{server.port}") == out.count(shown) == 1, out
                else:
                    assert f":{server.port}" not in out and "redis://" not in out
            leader = (await run_json(env, "leader"))["leader"]
            assert set(leader) == {
                "instance_id",
                "hostname",
                "pid",
                "fencing_token",
                "acquired_at",
                "renewed_at",
                "ttl_ms",
            }
        finally:
            await coordinator.stop()


def test_the_library_cli_has_no_demo_command() -> None:
    """The demo is this repository's app/, not part of the package: `coordinator`
    must never import a top-level `app` (that is the user's own package)."""
    result = subprocess.run([*CLI, "dev"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "No such command" in result.stderr


# -- which Redis: said by status, and by every command that fails to reach it -----------
async def test_status_says_which_redis_it_asked(redis_url: str, namespace: str) -> None:
    env = cli_env(redis_url, namespace)
    answer = await run_json(env, "status")
    assert answer["redis"] == {"url": redact_url(redis_url), "source": "REDIS_URL"}
    text = (await run(env, "status")).stdout
    assert f"redis      {redact_url(redis_url)} (from REDIS_URL)" in text
    flagged = await run_json(env, "status", "--redis-url", redis_url)
    assert flagged["redis"]["source"] == "--redis-url"


async def test_status_without_redis_url_names_the_default() -> None:
    """No REDIS_URL: it asks 127.0.0.1:6379 (only reads, in a namespace of its own) and
    says so, whether something answers there or not."""
    env = cli_env("unused", f"t{uuid.uuid4().hex[:10]}")
    del env["REDIS_URL"]
    done = await run(env, "status")
    said = "redis://127.0.0.1:6379/0 (the default: REDIS_URL is not set)"
    if done.returncode == 0:
        assert f"redis      {said}" in done.stdout.splitlines()[0]
        assert (await run_json(env, "status"))["redis"] == {
            "url": "redis://127.0.0.1:6379/0",
            "source": "default",
        }
    else:
        assert done.returncode == 1
        assert f"error: Redis at {said} is unreachable" in done.stderr
        assert "REDIS_URL / COORDINATOR_REDIS_URL" in done.stderr


@pytest.mark.parametrize(
    "args",
    [["status"], ["leader"], ["publish", "news", "1"], ["tail", "news"], ["runs"]],
)
async def test_every_command_names_the_redis_it_could_not_reach(args: list[str]) -> None:
    port = free_port()  # nobody listens there
    env = cli_env(f"redis://:hunter2pw@127.0.0.1:{port}/0", "ns")
    done = await run(env, *args)
    assert done.returncode == 1, (done.stdout, done.stderr)
    [line] = done.stderr.splitlines()
    assert line.startswith(
        f"error: Redis at redis://:***@127.0.0.1:{port}/0 (from REDIS_URL) is unreachable"
    ), line
    assert "check REDIS_URL / COORDINATOR_REDIS_URL" in line and "hunter2pw" not in line


# -- coordinator worker -------------------------------------------------------------------
README_WORKER = ["coordinator", "worker", "app.main:coordinator"]
"""The README's worker command, run verbatim (with COORDINATOR_ROLE=worker)."""


def worker_env(redis_url: str, namespace: str, role: str = "worker") -> dict[str, str]:
    env = {k: v for k, v in cli_env(redis_url, namespace).items() if not k.startswith("DEMO_")}
    bin_dir = str(Path(sys.executable).parent)  # where the `coordinator` script is installed
    return {**env, "COORDINATOR_ROLE": role, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}


def start_worker(env: dict[str, str], command: list[str]) -> Proc:
    """``command`` from the repo root (as a user runs it), stderr collected."""
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True).start()
    return Proc(proc, lines)


class Proc:
    def __init__(self, popen: subprocess.Popen[str], lines: list[str]) -> None:
        self.popen, self.lines = popen, lines

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


async def test_readme_worker_command_leads_and_runs_jobs(
    redis_client: Redis, redis_url: str, namespace: str
) -> None:
    assert shutil.which("coordinator", path=worker_env(redis_url, namespace)["PATH"])
    keys = Keys(namespace)
    first = start_worker(worker_env(redis_url, namespace), README_WORKER)
    second: Proc | None = None
    try:

        async def leader_pid() -> int | None:
            info = await read_leader(redis_client, keys, "scheduler")
            return info.pid if info else None

        await until(lambda: _is(leader_pid(), first.popen.pid), 60, "no leader", first)
        info = await read_leader(redis_client, keys, "scheduler")
        assert info is not None
        history = RunHistory(redis_client, keys, 100)

        async def ran_a_job() -> bool:
            runs = await history.recent(10)
            return any(r.instance_id == info.instance_id and r.status == "ok" for r in runs)

        await until(ran_a_job, 30, "no job ran", first)

        # A second worker stands by, and says who leads.
        second = start_worker(worker_env(redis_url, namespace), README_WORKER)
        await until(lambda: "standing by" in second.log, 60, "no standby line", second)
        [line] = [x for x in second.lines if "standing by" in x]
        assert f"standing by: {info.instance_id} (pid {first.popen.pid}" in line, line
        assert first.stop() == 0, first.log
        assert "Traceback" not in first.log
        await until(lambda: _is(leader_pid(), second.popen.pid), 10, "no takeover", second)
    finally:
        first.stop()
        if second is not None:
            assert second.stop() == 0, second.log


async def until(predicate: Any, timeout: float, what: str, proc: Proc) -> None:
    """Wait for ``predicate`` (may be async); on timeout fail with ``proc``'s log."""
    try:
        await async_wait_until(predicate, timeout, interval=0.1)
    except TimeoutError:
        raise AssertionError(f"{what} within {timeout}s:\n{proc.log}") from None


async def _is(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


async def test_worker_given_the_coordinators_scheduler_leads_too(
    redis_client: Redis, redis_url: str, namespace: str
) -> None:
    worker = start_worker(
        worker_env(redis_url, namespace),
        ["coordinator", "worker", "app.main:coordinator.scheduler"],
    )
    try:

        async def leads() -> bool:
            info = await read_leader(redis_client, Keys(namespace), "scheduler")
            return info is not None and info.pid == worker.popen.pid

        await until(leads, 60, "never led", worker)
    finally:
        assert worker.stop() == 0, worker.log


@pytest.mark.parametrize(
    ("role", "target", "needles"),
    [
        ("api", "app.main:coordinator", ["role 'api'", "COORDINATOR_ROLE=worker"]),
        ("worker", "app.main:app", ["FastAPI app", "did you mean app.main:coordinator"]),
        ("worker", "app.main:coordinator.elector", ["LeaderElector", "runs no jobs"]),
        ("worker", "app.jobs:register_jobs", ["needs arguments (coordinator, demo)"]),
        ("worker", "app.jobs:scheduler", ["has no attribute 'scheduler'"]),
    ],
)
def test_worker_that_cannot_lead_says_why(
    redis_url: str, namespace: str, role: str, target: str, needles: list[str]
) -> None:
    done = subprocess.run(
        ["coordinator", "worker", target],
        cwd=ROOT,
        env=worker_env(redis_url, namespace, role),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    [line] = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert all(n in line for n in needles), line
    assert "Traceback" not in done.stderr

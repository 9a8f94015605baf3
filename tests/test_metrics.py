"""``/metrics`` (coordinator.web.metrics): nothing happens on import, and the numbers
stay right over ``uvicorn --workers N`` when a worker is killed, across server
runs that share a directory, and until the last process removes the directory.

Real processes throughout: the demo under uvicorn with 2 or 4 workers, and
short-lived Python processes that write metric files and die.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from coordinator import Coordinator, CoordinatorSettings
from coordinator.web.metrics_files import RunDirectory

from .support.app_cluster import RESPAWN_S, AppCluster
from .support.procs import ROOT

APP = "app.main:app"
QUIET = {  # the demo's own jobs publish rarely, so counts are the test's
    "DEMO_COLLECT_EVERY_S": "3600",
    "DEMO_CLEANUP_EVERY_S": "3600",
    "DEMO_REPORT_CRON_SECOND": "59",
}
Series = list[tuple[str, dict[str, str], float]]
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> Series:
    out = []
    for line in text.splitlines():
        if match := _LINE.match(line):
            name, labels, value = match.groups()
            out.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return out


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def series(scraped: Series, name: str) -> list[tuple[dict[str, str], float]]:
    return [(labels, value) for n, labels, value in scraped if n == name]


def total(scraped: Series, name: str) -> float:
    return sum(value for _, value in series(scraped, name))


def pids(scraped: Series, name: str) -> set[int]:
    return {int(labels["pid"]) for labels, _ in series(scraped, name)}


async def scrape_until(
    cluster: AppCluster, condition: Callable[[Series], bool], what: str, timeout: float = 30
) -> Series:
    deadline = time.monotonic() + timeout
    text = ""
    while True:
        try:
            response = await cluster.get("/metrics", timeout=5)
            assert response.status_code == 200, response.text
            text = response.text
            if condition(parse(text)):
                return parse(text)
        except httpx.TransportError:
            pass  # a worker dying under the request
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics never showed {what}:\n{text[-5000:]}")
        await asyncio.sleep(0.1)


async def wait_for(predicate: Callable[[], Awaitable[object]], what: str, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while not (value := await predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
    return value


async def leader_pid(cluster: AppCluster) -> int | None:
    try:
        leader = (await cluster.get("/api/leader", timeout=2)).json()["leader"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return int(leader["pid"]) if leader else None


async def client_on(cluster: AppCluster, pid: int) -> httpx.AsyncClient:
    """A keep-alive client whose one connection is served by worker ``pid``."""
    deadline = time.monotonic() + 30
    while True:
        client = httpx.AsyncClient(
            base_url=cluster.base, timeout=10, limits=httpx.Limits(max_connections=1)
        )
        if (await client.get("/api/instance")).json()["pid"] == pid:
            return client
        await client.aclose()
        assert time.monotonic() < deadline, f"no connection reached worker {pid}"


async def publish(client: httpx.AsyncClient, channel: str, n: int) -> None:
    for i in range(n):
        response = await client.post(f"/api/channels/{channel}/events", json={"data": i})
        assert response.status_code == 202, response.text


# -- no side effects --------------------------------------------------------------------
def test_importing_and_constructing_change_nothing(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import json, os, sys, tempfile
        env = dict(os.environ)
        listing = lambda: sorted(os.listdir(tempfile.gettempdir()))
        before = listing()
        import coordinator
        import coordinator.web
        import coordinator.web.metrics
        from coordinator import Coordinator
        Coordinator()
        Coordinator(metrics=True)   # turned on, not started: still nothing
        import app.main              # the demo, metrics on
        print(json.dumps({
            "env": sorted(set(os.environ.items()) ^ set(env.items())),
            "tmp": [name for name in listing() if name not in before],
            "prometheus_client": "prometheus_client" in sys.modules,
        }))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("prometheus")}
    env["TMPDIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    found = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert found == {"env": [], "tmp": [], "prometheus_client": False}
    assert list(tmp_path.iterdir()) == []


def test_metrics_are_off_unless_asked_for() -> None:
    settings = CoordinatorSettings(namespace="metricsoff")
    off = Coordinator(settings)
    assert off.metrics is None
    app = FastAPI()
    off.install(app)
    assert TestClient(app).get("/metrics").status_code == 404
    assert Coordinator(CoordinatorSettings(namespace="m", metrics=True)).metrics is not None
    assert Coordinator(settings, metrics=True).metrics is not None


# -- the run directory, with processes that really die -------------------------------------
_WRITER = """
import os, sys
from pathlib import Path
from coordinator.web.metrics import ELECTIONS, IS_LEADER
from coordinator.web.metrics_files import ProcessValues, RunDirectory
run = RunDirectory(Path(sys.argv[1]))
run.join(str(os.getpid()), sys.argv[2])
values = ProcessValues(run.path, str(os.getpid()))
values.inc(ELECTIONS, (), 5)
values.set(IS_LEADER, ("dead",), 1)
print(os.getpid(), flush=True)
if sys.argv[3] == "die":
    os._exit(0)                  # like SIGKILL: no leave()
sys.stdin.read()                 # alive until the test closes stdin
"""


def writer(directory: Path, run: str, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(directory), run, mode],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def merged(run: RunDirectory) -> dict[str, float]:
    from prometheus_client.multiprocess import MultiProcessCollector

    run.reap()
    out: dict[str, float] = {}
    for metric in MultiProcessCollector.merge(run.value_files()):  # type: ignore[no-untyped-call]
        for sample in metric.samples:
            out[sample.name] = out.get(sample.name, 0) + sample.value
    return out


def test_a_dead_process_loses_its_live_gauges_and_keeps_its_counts(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "m")
    dead = writer(run.path, "run-1", "die")
    dead_pid = int(dead.stdout.readline()) if dead.stdout else 0
    assert dead.wait(30) == 0
    alive = writer(run.path, "run-1", "live")
    try:
        assert alive.stdout is not None and int(alive.stdout.readline()) == alive.pid
        values = merged(run)
        assert values["coordinator_elections_total"] == 10  # both processes' counts
        assert values["coordinator_is_leader"] == 1  # the live one's only
        assert not list(run.path.glob(f"gauge_*_{dead_pid}.db"))
        assert (run.path / f"counter_{dead_pid}.db").exists()
        assert (run.path / f"gauge_liveall_{alive.pid}.db").exists()
        # A pid now used by a process other than the one that joined (a reused pid):
        (run.path / f"process-{alive.pid}").write_text("1")
        assert merged(run).get("coordinator_is_leader", 0) == 0
    finally:
        alive.communicate("", timeout=30)


def test_a_new_run_removes_the_previous_runs_files(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "m")
    assert writer(run.path, "run-1", "die").wait(30) == 0
    run.join("1-1", "run-1")  # the same run: its files stay
    assert merged(run)["coordinator_elections_total"] == 5
    assert writer(run.path, "run-2", "die").wait(30) == 0  # a new run: from zero
    assert merged(run)["coordinator_elections_total"] == 5
    assert len(list(run.path.glob("counter_*.db"))) == 1


def test_the_last_member_to_leave_removes_the_directory(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "m")
    alive = writer(run.path, "run-1", "live")
    try:
        assert alive.stdout is not None and alive.stdout.readline()
        assert writer(run.path, "run-1", "die").wait(30) == 0  # a dead member: ignored
        run.join(str(os.getpid()), "run-1")
        assert run.leave(str(os.getpid())) is False  # another member runs
        assert run.path.is_dir()
    finally:
        alive.communicate("", timeout=30)
    run.join(str(os.getpid()), "run-1")
    assert run.leave(str(os.getpid())) is True
    assert not run.path.exists()


# -- the demo under uvicorn --------------------------------------------------------------
@pytest.mark.slow
async def test_a_killed_leader_vanishes_from_live_gauges_and_keeps_its_counts(
    redis_url: str, tmp_path: Path
) -> None:
    env = {**QUIET, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    cluster = AppCluster(redis_url, f"m{uuid.uuid4().hex[:8]}", workers=4, env=env, app=APP)
    async with cluster.running():
        await scrape_until(
            cluster,
            lambda s: (
                len(series(s, "coordinator_is_leader")) == 4
                and total(s, "coordinator_is_leader") == 1
            ),
            "4 workers and one leader",
        )
        dead = int(str(await wait_for(lambda: leader_pid(cluster), "a leader", 30)))
        publisher = await client_on(cluster, dead)
        await publish(publisher, "metered", 50)
        await publisher.aclose()
        streams = await cluster.clients("/api/channels/metered/events", 8, min_instances=4)
        before = await scrape_until(
            cluster,
            lambda s: (
                total(s, "coordinator_sse_clients") == 8
                and total(s, "coordinator_relay_events_published_total") >= 50
            ),
            "8 streams and 50 events published",
        )
        published = total(before, "coordinator_relay_events_published_total")

        os.kill(dead, signal.SIGKILL)  # a worker of the uvicorn this test started
        await wait_for(
            lambda: _new_leader(cluster, dead), "a new leader on another worker", timeout=30
        )

        def settled(s: Series) -> bool:
            open_streams = sum(1 for c in streams if not c.ended)
            up = series(s, "coordinator_relay_up")
            return (
                total(s, "coordinator_is_leader") == 1
                and dead not in pids(s, "coordinator_is_leader")
                and dead not in pids(s, "coordinator_relay_up")
                and len(up) == 4  # uvicorn started a new worker
                and all(value == 1 for _, value in up)
                and total(s, "coordinator_sse_clients") == open_streams
            )

        after = await scrape_until(
            cluster, settled, "the dead worker gone from live gauges", timeout=RESPAWN_S
        )
        assert any(c.ended for c in streams)  # the dead worker's streams ended
        assert total(after, "coordinator_relay_events_published_total") >= published

        # Concurrent scrapes, each merging the files in its own thread, agree.
        answers = await asyncio.gather(*(cluster.get("/metrics") for _ in range(16)))
        for answer in answers:
            assert answer.status_code == 200
            assert total(parse(answer.text), "coordinator_is_leader") == 1
        for stream in streams:
            await stream.close()


async def _new_leader(cluster: AppCluster, dead: int) -> bool:
    pid = await leader_pid(cluster)
    return pid is not None and pid != dead


@pytest.mark.slow
async def test_a_new_server_run_starts_counters_from_zero(redis_url: str, tmp_path: Path) -> None:
    env = {**QUIET, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    first = AppCluster(redis_url, f"m{uuid.uuid4().hex[:8]}", workers=2, env=env, app=APP)
    try:
        await first.wait_ready()
        publisher = (await first.publishers(1))[0]
        await publish(publisher, "counted", 40)
        await publisher.aclose()
        scraped = await scrape_until(
            first,
            lambda s: (
                total(s, "coordinator_relay_events_published_total") >= 40
                and len(series(s, "coordinator_is_leader")) == 2
            ),
            "40 events published",
        )
        first_pids = pids(scraped, "coordinator_is_leader")
    finally:
        os.killpg(first.proc.pid, signal.SIGKILL)  # the whole server, files left behind
        first.proc.popen.wait(30)
    directory = tmp_path / "coordinator"
    assert {p.name for p in directory.glob("counter_*.db")} == {
        f"counter_{pid}.db" for pid in first_pids
    }

    second = AppCluster(redis_url, f"m{uuid.uuid4().hex[:8]}", workers=2, env=env, app=APP)
    async with second.running():
        scraped = await scrape_until(
            second,
            lambda s: (
                len(series(s, "coordinator_is_leader")) == 2
                and total(s, "coordinator_is_leader") == 1
                and total(s, "coordinator_elections_total") >= 1
            ),
            "the second run's two workers and its leader",
        )
        assert not pids(scraped, "coordinator_is_leader") & first_pids
        assert total(scraped, "coordinator_relay_events_published_total") < 40
        assert total(scraped, "coordinator_elections_total") == 1
        assert not [p for p in directory.iterdir() if any(str(n) in p.name for n in first_pids)]
    assert not directory.exists()  # the second run stopped cleanly
    assert entries(tmp_path) == []  # the parent directory is not ours to remove


@pytest.mark.slow
async def test_the_last_process_to_stop_removes_the_default_directory(
    redis_url: str, tmp_path: Path
) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        pytest.skip("PROMETHEUS_MULTIPROC_DIR is set: the default directory is not used")
    env = {**QUIET, "TMPDIR": str(tmp_path)}
    cluster = AppCluster(redis_url, f"m{uuid.uuid4().hex[:8]}", workers=2, env=env, app=APP)
    async with cluster.running():
        directory = tmp_path / f"coordinator-metrics-{cluster.proc.pid}"  # its process group
        scraped = await scrape_until(
            cluster, lambda s: len(series(s, "coordinator_is_leader")) == 2, "two workers"
        )
        assert directory.is_dir()
        victim = min(pids(scraped, "coordinator_is_leader"))
        os.kill(victim, signal.SIGKILL)  # a member that never leaves
        await scrape_until(
            cluster,
            lambda s: (
                len(series(s, "coordinator_is_leader")) == 2
                and victim not in pids(s, "coordinator_is_leader")
            ),
            "the restarted worker in place of the killed one",
        )
    assert entries(tmp_path) == []

"""The README says what is true: its settings table is the settings, its quickstart
runs as written under 4 uvicorn workers, its CLI lines run, and every shell command
it shows is one a test runs (or is listed here with the reason it is not run here)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from coordinator.testing import async_wait_until
from tests.support.app_cluster import AppCluster
from tests.support.settings_table import settings_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# Every command a ```sh block shows, and what runs it. A new command fails
# test_every_shell_command_is_accounted_for until it gets a row here.
SHELL_COMMANDS = {
    "pip install fastapi-coordinator": "tests/test_packaging.py installs the built wheel",
    "REDIS_URL=redis://127.0.0.1:6379/0 uvicorn main:app --workers 4": "test_quickstart_runs",
    "./run demo": "tests/test_demo_lifecycle.py (python -m app.dev, what ./run demo runs)",
    "./run test": ".ci/run",
    "./run test -m docker": "the docker-marked tests: part of ./run test in .ci/run",
    "COORDINATOR_TEST_REDIS=docker ./run test": (
        "by hand (election, scheduler, relay, ops and chaos files: 71 passed, 3 skipped with "
        "reasons); tests/test_containers.py checks the mode's own behaviour"
    ),
    "COORDINATOR_ROLE=worker coordinator worker app.main:coordinator": (
        "tests/test_ops_cli.py runs it verbatim"
    ),
    "REDIS_PASSWORD=$(openssl rand -hex 32) docker compose up --build": (
        "needs a Docker engine; compose.yaml is validated offline in tests/test_deploy.py"
    ),
    "docker build -t registry.example.com/coordinator-demo:0.1.0 . && docker push "
    "registry.example.com/coordinator-demo:0.1.0": "needs a Docker engine and a registry",
    "(cd k8s/base && kustomize edit set image "
    "coordinator-demo=registry.example.com/coordinator-demo:0.1.0)": "needs kustomize",
    "kubectl create secret generic coordinator-redis --from-literal=REDIS_PASSWORD=$(openssl "
    "rand -hex 32)": "needs a Kubernetes API server",
    "kubectl apply -k k8s/": "needs a Kubernetes API server (k8s/ is rendered and validated "
    "offline in tests/test_deploy.py)",
}


def blocks(lang: str) -> list[str]:
    """The README's fenced blocks whose info string is ``lang`` (``""``: no language)."""
    found, current, info = [], None, ""
    for line in README.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == lang:
                    found.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return found


def commands(block: str) -> list[str]:
    """Non-comment lines of a shell block, without trailing comments."""
    out = []
    for line in block.splitlines():
        line = line.split("  #")[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def test_every_shell_command_is_accounted_for() -> None:
    shown = [c for block in blocks("sh") for c in commands(block)]
    assert shown, "no ```sh blocks found"
    unknown = [c for c in shown if c not in SHELL_COMMANDS]
    assert not unknown, f"README commands no test runs (add them to SHELL_COMMANDS): {unknown}"
    gone = [c for c in SHELL_COMMANDS if c not in shown]
    assert not gone, f"commands listed here but no longer in the README: {gone}"


def test_settings_table_is_the_settings() -> None:
    table = settings_table()
    assert table in README, (
        "README's settings table differs from CoordinatorSettings; paste the output of "
        "`python -m tests.support.settings_table`"
    )
    assert "|  |" not in table, "every setting needs a description"


def test_readme_speaks_to_users() -> None:
    for internal in ("DESIGN", "the issue", "issue's", "TODO", "WALLTIME", "SETTINGS_TABLE"):
        assert internal not in README, internal
    for name in ("bench/README.md", "tests/chaos/README.md"):
        assert f"]({name})" in README and (ROOT / name).exists(), name


def quickstart() -> str:
    marker = "`main.py`:\n\n```python\n"
    start = README.index(marker) + len(marker)
    return README[start : README.index("```", start)]


def test_quickstart_is_short() -> None:
    code = [line for line in quickstart().splitlines() if line.strip()]
    assert len(code) <= 15, len(code)


@pytest.mark.slow
async def test_quickstart_runs(tmp_path: Path, redis_url: str, namespace: str) -> None:
    """The quickstart's main.py, verbatim, under the README's uvicorn command (4 workers;
    REDIS_URL pointed at the test's server, on a free port): ready, one leader, and an
    event published through one worker reaches streams on the others."""
    (tmp_path / "main.py").write_text(quickstart())
    command = "REDIS_URL=redis://127.0.0.1:6379/0 uvicorn main:app --workers 4"
    assert command in README
    env = {"PYTHONPATH": str(tmp_path)}
    async with AppCluster(
        redis_url, namespace, workers=4, env=env, app="main:app"
    ).running() as app:
        instances = await app.wait_ready()
        assert len(instances) == 4
        leader = (await app.get("/api/leader")).json()["leader"]
        assert leader is not None and leader["instance_id"] in instances
        streams = await app.clients("/api/channels/digests/events", 8, min_instances=2)
        async with httpx.AsyncClient(base_url=app.base, timeout=10) as http:
            sent = await http.post("/api/channels/digests/events", json={"data": {"n": 1}})
        assert sent.status_code == 202, sent.text
        for stream in streams:
            await async_wait_until(
                lambda s=stream: bool(s.of("message")), 10, message="event not delivered"
            )
            assert stream.of("message")[0].json() == {"n": 1}
            await stream.close()
        metrics = (await app.get("/metrics")).text
        assert "coordinator_is_leader" in metrics


def cli_lines() -> list[str]:
    block = next(b for b in blocks("") if b.lstrip().startswith("coordinator status"))
    return commands(block)


def run_cli(
    line: str, env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    args = line.split()
    assert args[0] == "coordinator"
    args = [sys.executable, "-m", "coordinator.ops.cli", *json_args(args[1:])]
    return subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def json_args(args: list[str]) -> list[str]:
    """Undo the shell's quoting of the one JSON argument the README shows."""
    joined = " ".join(args)
    match = re.search(r"'(.*)'", joined)
    if not match:
        return args
    before, after = joined[: match.start()].split(), joined[match.end() :].split()
    return [*before, match.group(1), *after]


@pytest.mark.slow
def test_cli_lines_run(redis_url: str, namespace: str) -> None:
    env = {**os.environ, "REDIS_URL": redis_url, "COORDINATOR_NAMESPACE": namespace}
    lines = cli_lines()
    assert [line.split()[1] for line in lines] == [
        "status",
        "leader",
        "publish",
        "tail",
        "runs",
        "jobs",
        "state",
        "state",
        "state",
        "worker",
    ]
    for line in lines:
        if line.split()[1] in ("tail", "worker"):
            continue  # below, and tests/test_ops_cli.py for the worker
        result = run_cli(line, env)
        assert result.returncode == 0, (line, result.stderr)
        assert "Traceback" not in result.stderr
        if "--json" in line:
            json.loads(result.stdout)
    published = run_cli("coordinator publish news '{\"n\": 2}'", env).stdout.strip()
    tail = next(line for line in lines if line.split()[1] == "tail")
    args = [sys.executable, "-m", "coordinator.ops.cli", *tail.split()[1:]]
    # The README's id is an example; replay from the real one before the last event.
    args[args.index("--last-event-id") + 1] = "0-1"
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        seen = ""
        while published not in seen:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            seen += line
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0

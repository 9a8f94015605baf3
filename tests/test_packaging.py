"""The wheel as a downstream project gets it: built, read, installed in a fresh venv.

- The wheel holds the ``coordinator`` package alone (every module of the source
  tree, its Lua scripts, ``py.typed``), never the demo ``app`` or ``tests``; it
  declares the ``coordinator`` console script and no ``pytest11`` entry point,
  so its pytest fixtures load only when a project asks for them.
- Installed beside a project that has its own ``app`` package and its own
  ``redis_url`` fixture, the project's own win; ``-p coordinator.testing.plugin``
  adds ``coordinator_redis_url``, which serves a real Redis.
- ``import coordinator`` (and its core names) changes no environment variable,
  creates no file, and loads no web framework.
- The ``coordinator`` command and the ``--help`` of each of its commands run with
  the typer and click installed.

Real processes throughout: ``pip wheel``, ``python -m venv``, ``pip install``,
and the downstream project's own pytest. The venv is installed with ``pip
--no-index`` from a wheelhouse kept in pytest's cache directory and pinned to the
versions of the environment running this test; PyPI is asked only for what the
wheelhouse lacks (the first run), so later runs are fast and work offline.
"""

from __future__ import annotations

import configparser
import email.parser
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.testing import RedisBinaryNotFound, find_redis_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DIST = "fastapi-coordinator"
PIP_TIMEOUT = 600
# What a clean clone would not have: never copied into the build tree.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "test-output",
)
WEB_MODULES = ("fastapi", "starlette", "sse_starlette", "prometheus_client", "uvicorn")


@dataclass(frozen=True)
class Built:
    wheel: Path
    source: Path
    """The copy of the working tree the wheel was built from."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment: no PYTHONPATH, PYTEST_*, REDIS_URL or COORDINATOR_* leaks in."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL") if k in os.environ}
    return {**env, **extra}


def run(command: Sequence[str | Path], *, env: dict[str, str], cwd: Path | None = None) -> str:
    """Run ``command``; fail the test with its output unless it exits 0. Returns stdout."""
    result = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    )
    return str(result.stdout)


class Wheelhouse:
    """Wheels for offline installs, fetched from the index only when missing.

    ``pip`` is this interpreter's, or, where it has none (a venv made by ``uv``), the
    one ``ensurepip`` puts in a venv of its own (bundled with Python: no download).
    """

    def __init__(self, path: Path, pip_python: Path) -> None:
        self.path = path
        self.pip_python = pip_python

    def pip(
        self, *args: str | Path, python: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        target = ["--python", str(python)] if python else []
        return subprocess.run(
            [str(self.pip_python), "-m", "pip", "--disable-pip-version-check", "--no-input"]
            + target
            + [str(a) for a in args],
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT,
            check=False,
        )

    def offline(
        self, *args: str | Path, fetch: Sequence[str | Path], python: Path | None = None
    ) -> None:
        """``pip <args> --no-index --find-links <wheelhouse>``; when that fails, ``pip
        download`` the requirements ``fetch`` into the wheelhouse and try once more."""
        command = [*args, "--no-index", "--find-links", self.path]
        first = self.pip(*command, python=python)
        if first.returncode == 0:
            return
        fetched = self.pip("download", "--dest", self.path, *fetch)
        for stray in self.path.glob("fastapi_coordinator-*"):
            stray.unlink()  # the wheel under test is always passed by path
        assert fetched.returncode == 0, (
            f"pip {' '.join(map(str, args))} failed offline:\n{first.stderr[-2000:]}\n"
            f"and pip download failed too:\n{fetched.stderr[-3000:]}"
        )
        second = self.pip(*command, python=python)
        assert second.returncode == 0, (
            f"pip {' '.join(map(str, command))} failed:\n{second.stdout[-2000:]}\n"
            f"{second.stderr[-3000:]}"
        )


def pins() -> str:
    """``name==version`` of every distribution in this environment (the versions tested)."""
    skip = {canonical(DIST), "pip", "setuptools", "wheel"}
    found = {
        canonical(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions()
        if d.metadata["Name"] and canonical(d.metadata["Name"]) not in skip
    }
    return "".join(f"{name}=={version}\n" for name, version in sorted(found.items()))


@pytest.fixture(scope="module")
def wheelhouse(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Wheelhouse:
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    path = (
        cache.mkdir("coordinator-packaging-wheelhouse")
        if cache is not None
        else tmp_path_factory.mktemp("wheelhouse")
    )
    pip_python = Path(sys.executable)
    if importlib.util.find_spec("pip") is None:
        tools = tmp_path_factory.mktemp("pip")
        run([sys.executable, "-m", "venv", tools], env=clean_env())
        pip_python = tools / "bin" / "python"
    return Wheelhouse(Path(path), pip_python)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Wheelhouse) -> Built:
    """The wheel, built from a copy of the working tree (no stale ``build/`` reused)."""
    base = tmp_path_factory.mktemp("build")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE, symlinks=True)
    out = base / "dist"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    wheelhouse.offline("wheel", "--no-deps", "--wheel-dir", out, source, fetch=requires)
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return Built(wheels[0], source)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, built: Built, wheelhouse: Wheelhouse) -> Path:
    """A fresh venv with the wheel and pytest installed, nothing else. Returns its python."""
    root = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", root], env=clean_env())
    python = root / "bin" / "python"
    constraints = root.parent / f"{root.name}-constraints.txt"
    constraints.write_text(pins())
    wanted: list[str | Path] = ["-c", constraints, built.wheel, "pytest"]
    wheelhouse.offline("install", *wanted, fetch=wanted, python=python)
    return python


def test_wheel_holds_the_library_and_nothing_else(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as wheel:
        names = set(wheel.namelist())
        dist_info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        assert len(dist_info) == 1, dist_info
        (info,) = dist_info
        metadata = email.parser.Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
        entry_points = configparser.ConfigParser()
        if f"{info}/entry_points.txt" in names:
            entry_points.read_string(wheel.read(f"{info}/entry_points.txt").decode())

    assert {n.split("/")[0] for n in names} == {"coordinator", info}, "only the library ships"
    assert not any(n.startswith(("app/", "tests/")) for n in names)
    assert metadata["Name"] == DIST
    assert info.startswith("fastapi_coordinator-")

    package = built.source / "coordinator"
    sources = {p.relative_to(built.source).as_posix() for p in package.rglob("*.py")}
    shipped = {n for n in names if n.endswith(".py")}
    assert sources == shipped, f"missing: {sources - shipped}; extra: {shipped - sources}"
    lua = {p.relative_to(built.source).as_posix() for p in package.glob("store/lua/*.lua")}
    assert lua, "no Lua scripts in the source tree?"
    assert lua <= names, f"Lua scripts missing from the wheel: {lua - names}"
    assert "coordinator/py.typed" in names

    assert "pytest11" not in entry_points.sections(), "the pytest plugin must stay opt-in"
    assert entry_points.has_section("console_scripts")
    assert dict(entry_points["console_scripts"]) == {"coordinator": "coordinator.ops.cli:main"}


def test_import_changes_nothing_and_loads_no_web_framework(venv: Path, tmp_path: Path) -> None:
    check = tmp_path / "check_import.py"
    check.write_text(
        textwrap.dedent(
            f"""
            import importlib.util, json, os, sys, tempfile

            tmp = tempfile.gettempdir()
            env = dict(os.environ)
            in_tmp, in_cwd = set(os.listdir(tmp)), set(os.listdir("."))

            import coordinator
            from coordinator import EventRelay, LeaderElector, LeaderScheduler

            keys = env.keys() | os.environ.keys()
            changed = {{k for k in keys if env.get(k) != os.environ.get(k)}}
            print(json.dumps({{
                "file": coordinator.__file__,
                "prefix": sys.prefix,
                "env_changed": sorted(changed),
                "tmp_created": sorted(set(os.listdir(tmp)) - in_tmp),
                "cwd_created": sorted(set(os.listdir(".")) - in_cwd),
                "web_loaded": sorted(m for m in {WEB_MODULES!r} if m in sys.modules),
                "coordinator_web_loaded": "coordinator.web" in sys.modules,
                "app_importable": importlib.util.find_spec("app") is not None,
            }}))
            """
        )
    )
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # -I: neither the cwd nor PYTHON* variables reach sys.path; TMPDIR is a fresh, empty
    # directory, so a listing compares only what the import did.
    out = run([venv, "-I", check], cwd=cwd, env=clean_env(TMPDIR=str(scratch)))
    report = json.loads(out.strip().splitlines()[-1])

    assert Path(report["file"]).is_relative_to(report["prefix"]), "imported from the wheel"
    assert report["env_changed"] == [], "import coordinator set or changed environment variables"
    assert report["tmp_created"] == [], "import coordinator created files in the temp directory"
    assert report["cwd_created"] == []
    assert report["web_loaded"] == [], "the core must not load the web layer"
    assert not report["coordinator_web_loaded"]
    assert not report["app_importable"], "the demo app must not be installed"


HELP_OF_EVERY_COMMAND = """
import typer.main
from click.testing import CliRunner

from coordinator.ops.cli import app

group = typer.main.get_command(app)
for args in [["--help"], *([name, "--help"] for name in group.commands)]:
    result = CliRunner().invoke(group, args)
    assert result.exit_code == 0, (args, result.output, result.exception)
print(len(group.commands))
"""


def test_console_script_and_the_help_of_every_command(venv: Path) -> None:
    out = run([venv.parent / "coordinator", "--help"], env=clean_env())
    assert "Usage" in out
    # Every option of every command through the installed typer and click (where their
    # versions disagree, --help is what breaks).
    assert int(run([venv, "-I", "-c", HELP_OF_EVERY_COMMAND], env=clean_env())) > 3


DOWNSTREAM_FILES = {
    "pytest.ini": """
        [pytest]
        addopts = -p no:cacheprovider
        """,
    "app/__init__.py": """
        MARKER = "the downstream project's own app"
        """,
    "conftest.py": """
        import pytest


        @pytest.fixture
        def redis_url() -> str:
            return "redis://downstream.invalid:6399/7"
        """,
    "test_own.py": """
        import os
        import sys
        from pathlib import Path

        import pytest

        import app

        HERE = Path(__file__).resolve().parent


        def test_own_app_package_wins() -> None:
            assert app.MARKER == "the downstream project's own app"
            assert Path(app.__file__).resolve().parent == HERE / "app"


        def test_own_redis_url_fixture_wins(redis_url: str) -> None:
            assert redis_url == "redis://downstream.invalid:6399/7"


        def test_coordinator_is_the_installed_wheel() -> None:
            import coordinator

            assert Path(coordinator.__file__).is_relative_to(sys.prefix)


        def test_coordinator_fixtures_only_when_asked(request: pytest.FixtureRequest) -> None:
            opted_in = request.config.pluginmanager.has_plugin("coordinator.testing.plugin")
            assert opted_in == (os.environ["EXPECT_PLUGIN"] == "1")
            if not opted_in:
                with pytest.raises(pytest.FixtureLookupError):
                    request.getfixturevalue("coordinator_redis_url")
        """,
    "test_with_plugin.py": """
        import redis


        def test_plugin_serves_a_real_redis(coordinator_redis_url: str, redis_url: str) -> None:
            assert redis_url == "redis://downstream.invalid:6399/7"  # still the project's own
            client = redis.Redis.from_url(coordinator_redis_url, socket_timeout=5)
            try:
                assert client.ping() is True
            finally:
                client.close()
        """,
}


@pytest.fixture
def downstream(tmp_path: Path) -> Path:
    project = tmp_path / "downstream"
    for name, text in DOWNSTREAM_FILES.items():
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return project


def test_downstream_project_keeps_its_own_app_and_fixtures(
    venv: Path, downstream: Path, request: pytest.FixtureRequest
) -> None:
    scratch = downstream.parent / "tmp"
    scratch.mkdir()
    try:  # the plugin starts its own throwaway server, with the binary this suite uses
        server = {"COORDINATOR_REDIS_SERVER": find_redis_server()}
    except RedisBinaryNotFound:
        server = {"REDIS_URL": request.getfixturevalue("redis_url")}
    pytest_cmd: list[str | Path] = [venv, "-m", "pytest", "-q"]

    without = run(
        [*pytest_cmd, "test_own.py"],
        cwd=downstream,
        env=clean_env(TMPDIR=str(scratch), EXPECT_PLUGIN="0"),
    )
    assert re.search(r"^4 passed", without, re.M), without

    opted_in = run(
        [*pytest_cmd, "-p", "coordinator.testing.plugin"],
        cwd=downstream,
        env=clean_env(TMPDIR=str(scratch), EXPECT_PLUGIN="1", **server),
    )
    assert re.search(r"^5 passed", opted_in, re.M), opted_in

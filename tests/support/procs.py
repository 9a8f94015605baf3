"""Child processes for multi-process tests: start, signal, and read their JSON events.

A child prints one JSON object a line on stdout (see :func:`emit`); each has
``"event"`` and ``"t"`` (``time.monotonic()``, which is system-wide on Linux, so
times from different processes compare). The parent collects lines in a
background thread; tests wait on conditions over them with deadlines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from coordinator.testing import die_with_parent

ROOT = Path(__file__).resolve().parents[2]


def emit(event: str, **fields: Any) -> None:
    """Print one event line (for use in child processes)."""
    fields.update(event=event, t=time.monotonic(), pid=os.getpid())
    sys.stdout.write(json.dumps(fields, default=str) + "\n")
    sys.stdout.flush()


class Proc:
    """A child process started with ``python -m module args...`` from the repo root,
    or with a command line as given (:meth:`exec`)."""

    def __init__(
        self, module: str, *args: str, env: dict[str, str] | None = None, name: str = ""
    ) -> None:
        self._start([sys.executable, "-m", module, *args], env, name or module, ROOT)

    @classmethod
    def exec(
        cls, argv: Sequence[str], *, env: dict[str, str] | None = None, name: str = "", cwd: Path
    ) -> Proc:
        """Run ``argv`` as given (an image's CMD, say) in ``cwd``."""
        proc = cls.__new__(cls)
        proc._start(list(argv), env, name or argv[0], cwd)
        return proc

    def _start(self, argv: list[str], env: dict[str, str] | None, name: str, cwd: Path) -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.name = name
        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            # SIGTERM, not SIGKILL: a uvicorn supervisor then stops its workers too.
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        self.events: list[dict[str, Any]] = []
        self.stderr_lines: list[str] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read_stdout(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            with self._lock:
                self.events.append(event)

    def _read_stderr(self) -> None:
        assert self.popen.stderr is not None
        for raw in self.popen.stderr:
            with self._lock:
                self.stderr_lines.append(raw.decode(errors="replace").rstrip())
                del self.stderr_lines[:-400]

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("event") == kind]

    def last(self, kind: str) -> dict[str, Any] | None:
        found = self.of(kind)
        return found[-1] if found else None

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait; SIGKILL if it did not exit in time. Returns the exit code."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def stderr_tail(self, n: int = 40) -> str:
        with self._lock:
            return "\n".join(self.stderr_lines[-n:])


def stop_all(procs: Iterable[Proc]) -> None:
    """Terminate every process still alive (test teardown)."""
    procs = list(procs)
    for proc in procs:
        proc.signal(signal.SIGCONT)
        proc.signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.popen.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, procs: Iterable[Proc] = ()
) -> Any:
    """Poll until ``predicate()`` is truthy; on timeout, fail with the children's stderr."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = "\n".join(
                f"--- {p.name} (pid {p.pid}, alive={p.alive})\n{p.stderr_tail()}" for p in procs
            )
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{detail}")
        time.sleep(0.02)

"""The files behind ``/metrics``: one directory per server run, one set of value files per
process, in prometheus_client's multiprocess format (written here, read by its
``MultiProcessCollector.merge``).

The directory: ``Coordinator(metrics_dir=...)``; else
``$PROMETHEUS_MULTIPROC_DIR/coordinator``; else
``<temp dir>/coordinator-metrics-<process group id>``. Give each server its own:
two servers writing to one directory merge their metrics.

A server run is a process group (uvicorn's supervisor and its workers, a
gunicorn arbiter and its workers, a container). The directory records which
run its files belong to: the boot id, the process group id and the group
leader's start time (from ``/proc``). The first process of a new run finds
another run's mark and, under a file lock, removes that run's files, even when
that run was killed and left them; so counters start from zero. The last
process to stop cleanly removes the directory.

Limits, said plainly:

- A process is alive when ``/proc/<pid>/stat`` exists, is not a zombie and shows
  the start time the process recorded when it joined, so a reused pid is not
  taken for the process that died. Without ``/proc`` (macOS) the check is
  ``os.kill(pid, 0)``: a dead worker's pid reused by another process keeps the
  dead worker's live gauges until that process ends; and a run is marked by its
  process group id alone, so a restart that gets the same group id, with the
  same directory, continues the previous run's counters.
- A process manager that restarts the server inside one long-lived process
  group (systemd, Docker, Kubernetes, supervisord and shells all give it a new
  group) must give each run its own directory.
- A server killed outright leaves its directory: the next run with that
  directory empties it; a default one (named by group id) is left to the temp
  directory's cleaner.
- POSIX only (``fcntl`` file locks); the processes of a server must share the
  directory's file system and one pid namespace (one host, or one pod).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from coordinator.errors import ConfigurationError

if TYPE_CHECKING:
    from prometheus_client.mmap_dict import MmapedDict


@dataclass(frozen=True)
class Family:
    """One metric: its name (counters without ``_total``), help, type and labels.

    ``mode`` says how a gauge combines over processes (prometheus_client's live
    modes: ``liveall`` keeps one series per process with a ``pid`` label).
    """

    name: str
    help: str
    kind: Literal["counter", "gauge", "histogram"]
    labels: tuple[str, ...] = ()
    mode: Literal["", "liveall", "livesum", "livemax"] = ""
    buckets: tuple[float, ...] = ()

    @property
    def file_kind(self) -> str:
        return f"gauge_{self.mode}" if self.kind == "gauge" else self.kind


_FILE_KINDS = ("counter", "histogram", "gauge_liveall", "gauge_livesum", "gauge_livemax")
_LIVE_KINDS = tuple(kind for kind in _FILE_KINDS if kind.startswith("gauge_live"))


# -- processes and server runs ---------------------------------------------------------
def _proc_stat(pid: int | str) -> tuple[str, str] | None:
    """(state, start time in clock ticks) from ``/proc/<pid>/stat``, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces
    return fields[0], fields[19]


def _start_time(pid: int | str) -> str:
    stat = _proc_stat(pid)
    return stat[1] if stat else ""


def _running(pid: int, started: str) -> bool:
    """Whether ``pid`` is the live process that recorded start time ``started``."""
    stat = _proc_stat(pid)
    if stat is None:
        if _proc_stat("self") is not None:
            return False  # /proc works: that pid is gone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state, start = stat
    return state not in ("Z", "X") and (not started or start == started)


def server_run() -> str:
    """What marks this server run: boot id, process group id, the group leader's start."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    pgid = os.getpgid(0)
    return f"{boot} {pgid} {_start_time(pgid)}"


def default_directory() -> Path:
    """``$PROMETHEUS_MULTIPROC_DIR/coordinator``, else ``<tmp>/coordinator-metrics-<pgid>``."""
    shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if shared:
        return Path(shared) / "coordinator"
    return Path(tempfile.gettempdir()) / f"coordinator-metrics-{os.getpgid(0)}"


class RunDirectory:
    """The value files of one server run, and who may still write them.

    Files: ``.run`` (the run's mark), ``.lock`` (``flock``), ``process-<ident>``
    (start time of a process that joined), and prometheus_client's
    ``<kind>_<ident>.db``. An ident is a pid, or ``<pid>-<n>`` for a second
    Coordinator in one process; it is the ``pid`` label of per-process gauges.
    Every change happens under the lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl  # POSIX only: imported when metrics are used

        lock = self.path / ".lock"
        while True:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # The last process out removes the directory, lock file included: a
                # waiter that got the lock of a removed file starts over.
                if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            yield
        finally:
            os.close(fd)

    def join(self, ident: str, run: str) -> None:
        """Register process ``ident`` in ``run``, first removing another run's files."""
        if self.path.exists() and self.path.stat().st_uid != os.geteuid():
            raise ConfigurationError(
                f"the metrics directory {self.path} belongs to another user; pass "
                "Coordinator(metrics_dir=...) or set PROMETHEUS_MULTIPROC_DIR"
            )
        with self._locked():
            mark = self.path / ".run"
            try:
                previous = mark.read_text()
            except FileNotFoundError:
                previous = None
            if previous != run:
                self._remove(self._files())
                tmp = self.path / f".run.{os.getpid()}"
                tmp.write_text(run)
                tmp.replace(mark)
            self._remove(self._live_files(ident))  # a dead process that had our pid
            (self.path / f"process-{ident}").write_text(_start_time(os.getpid()))

    def leave(self, ident: str) -> bool:
        """Drop ``ident``'s live gauges; remove the directory if no member runs.

        Returns True when the directory was removed.
        """
        with self._locked():
            self._remove([*self._live_files(ident), self.path / f"process-{ident}"])
            if any(self._member_running(other) for other in self._members()):
                return False
            self._remove([*self._files(), self.path / ".run", self.path / ".lock"])
            with contextlib.suppress(OSError):  # not empty: someone else's files
                self.path.rmdir()
            return True

    def reap(self) -> None:
        """Remove the live gauges of members that no longer run (counters stay)."""
        if not self.path.is_dir():
            return
        with self._locked():
            for ident in self._members():
                if not self._member_running(ident):
                    self._remove([*self._live_files(ident), self.path / f"process-{ident}"])

    def value_files(self) -> list[str]:
        return [str(p) for p in self.path.glob("*.db")]

    def _members(self) -> set[str]:
        names = [p.name for p in self.path.iterdir()]
        members = {n.removeprefix("process-") for n in names if n.startswith("process-")}
        for name in names:
            kind, _, rest = name.rpartition("_")
            if kind in _LIVE_KINDS and rest.endswith(".db"):
                members.add(rest.removesuffix(".db"))
        return members

    def _member_running(self, ident: str) -> bool:
        try:
            pid = int(ident.partition("-")[0])
        except ValueError:
            return False
        try:
            started = (self.path / f"process-{ident}").read_text().strip()
        except FileNotFoundError:
            started = ""
        return _running(pid, started)

    def _live_files(self, ident: str) -> list[Path]:
        return [self.path / f"{kind}_{ident}.db" for kind in _LIVE_KINDS]

    def _files(self) -> list[Path]:
        return [
            p
            for p in self.path.iterdir()
            if p.suffix == ".db" or p.name.startswith(("process-", ".run."))
        ]

    @staticmethod
    def _remove(paths: Iterable[Path]) -> None:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


_idents_lock = threading.Lock()
_idents: set[str] = set()


def claim_ident() -> str:
    """This process's pid, or ``<pid>-<n>`` when another Coordinator here holds it."""
    pid, n = os.getpid(), 0
    with _idents_lock:
        while (ident := f"{pid}-{n}" if n else str(pid)) in _idents:
            n += 1
        _idents.add(ident)
    return ident


def release_ident(ident: str) -> None:
    """Give back an ident from :func:`claim_ident`."""
    with _idents_lock:
        _idents.discard(ident)


# -- this process's values -----------------------------------------------------------
class ProcessValues:
    """This process's value files: written from the event loop's thread only."""

    def __init__(self, directory: Path, ident: str) -> None:
        from prometheus_client.mmap_dict import MmapedDict

        self._files: dict[str, MmapedDict] = {
            kind: MmapedDict(str(directory / f"{kind}_{ident}.db"))  # type: ignore[no-untyped-call]
            for kind in _FILE_KINDS
        }
        self._series: set[tuple[str, tuple[str, ...]]] = set()

    def close(self) -> None:
        for file in self._files.values():
            file.close()  # type: ignore[no-untyped-call]

    def _add(
        self, family: Family, sample: str, labels: Iterable[str], values: Iterable[str], n: float
    ) -> None:
        from prometheus_client.mmap_dict import mmap_key

        key = mmap_key(family.name, sample, list(labels), list(values), family.help)
        file = self._files[family.file_kind]
        value, _ = file.read_value(key)  # type: ignore[no-untyped-call]
        file.write_value(key, value + n, 0.0)  # type: ignore[no-untyped-call]

    def ensure(self, family: Family, values: tuple[str, ...]) -> None:
        """Write every sample of a new series (histogram buckets at 0)."""
        if (family.name, values) in self._series:
            return
        self._series.add((family.name, values))
        if family.kind == "counter":
            self._add(family, family.name + "_total", family.labels, values, 0)
        elif family.kind == "histogram":
            self._add(family, family.name + "_sum", family.labels, values, 0)
            for bound in family.buckets:
                self._add(family, *self._bucket(family, values, bound), 0)

    @staticmethod
    def _bucket(
        family: Family, values: tuple[str, ...], bound: float
    ) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        from prometheus_client.utils import floatToGoString

        le = floatToGoString(bound)  # type: ignore[no-untyped-call]
        return family.name + "_bucket", (*family.labels, "le"), (*values, le)

    def inc(self, family: Family, values: tuple[str, ...], amount: float) -> None:
        self.ensure(family, values)
        self._add(family, family.name + "_total", family.labels, values, amount)

    def set(self, family: Family, values: tuple[str, ...], value: float) -> None:
        from prometheus_client.mmap_dict import mmap_key

        key = mmap_key(family.name, family.name, list(family.labels), list(values), family.help)
        self._files[family.file_kind].write_value(key, value, 0.0)  # type: ignore[no-untyped-call]

    def observe(self, family: Family, values: tuple[str, ...], amount: float) -> None:
        self.ensure(family, values)
        self._add(family, family.name + "_sum", family.labels, values, amount)
        bound = next((b for b in family.buckets if amount <= b), family.buckets[-1])
        self._add(family, *self._bucket(family, values, bound), 1)

"""The history checker: pure functions over what every process recorded.

A chaos run produces a :class:`History`: the JSON lines of every node
(``elected``, ``revoked``, ``start``, ``beat``...), the run history read back
from Redis, the faults injected, what every SSE client received, what was
published, and readiness samples. :func:`check` returns the list of invariant
violations (empty means the run was correct) and :func:`measure` the numbers
for the summary table. Nothing here does I/O, so ``test_checker.py`` feeds it
hand-made violating histories to prove it catches each one.

Times: ``t`` is ``time.monotonic()`` (system-wide on Linux, so comparable
across processes); ``scheduled_ms`` is the wall clock of the fire.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

Event = dict[str, Any]


@dataclass
class Fault:
    kind: str
    start: float
    end: float
    displaces_leader: bool = True
    """A leader fault: a new term must start (and the failover time is measured)."""
    unreachable: bool = False
    """Redis was unreachable for the whole group during [start, end] (readiness must say so)."""


@dataclass
class ProcRecord:
    name: str
    events: list[Event]
    exit_code: int | None = None
    """Exit code after the final SIGTERM; None if the test killed it on purpose."""
    killed: bool = False
    paused: list[tuple[float, float]] = field(default_factory=list)
    stderr: str = ""


@dataclass
class ClientLog:
    """One SSE client across its reconnects: ``("open", last_id)``, ``("message", id)``,
    ``("reset", None)``, ``("end", None)`` entries, in the order they happened."""

    name: str
    entries: list[tuple[str, str | None]]
    replay_ok: bool = True
    """The client always reconnected within the replay window: no reset, no loss allowed."""


@dataclass
class History:
    procs: list[ProcRecord] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    """Redis run history records (RunRecord fields)."""
    faults: list[Fault] = field(default_factory=list)
    clients: list[ClientLog] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    """Ids of events whose publish was acknowledged, before any client had to receive them."""
    readiness: list[tuple[float, int | None]] = field(default_factory=list)
    """(t, HTTP status or None when the request failed) of /readyz polls."""
    runtime_ops: list[dict[str, Any]] = field(default_factory=list)
    """Acknowledged runtime job changes: ``{"op": "add"|"pause"|"remove", "job", "t"}``
    (``t`` when the API answered), adds with ``"type"``, ``"run_ms"`` and ``"grace_s"``."""
    runtime_listed: list[str] | None = None
    """Runtime job ids ``GET /api/jobs`` listed at the end (None: not checked)."""
    change_slack_s: float = 0.5
    """How long after a pause or remove was acknowledged a fire claimed just before it may
    still start (time the process was stopped not counted)."""
    tick_ms: int = 0
    hang_s: float = 5.0
    ready_detect_s: float = 5.0
    ready_recover_s: float = 10.0

    def events(self, kind: str) -> list[Event]:
        out = [dict(e, proc=p.name) for p in self.procs for e in p.events if e["event"] == kind]
        return sorted(out, key=lambda e: e["t"])


def id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


# -- scheduler ------------------------------------------------------------------------
def check_fires_once(h: History) -> list[str]:
    """No (job, scheduled time) started twice, in the processes' records or in Redis."""
    out = []
    started = Counter((e["job"], e["scheduled_ms"]) for e in h.events("start"))
    out += [f"fire {k} started {n} times" for k, n in started.items() if n > 1]
    ran = Counter((r["job_id"], r["scheduled_ms"]) for r in h.runs)
    out += [f"fire {k} has {n} run records in Redis" for k, n in ran.items() if n > 1]
    missed = {(r["job_id"], r["scheduled_ms"]) for r in h.runs if r["status"] == "missed"}
    out += [f"fire {k} was recorded missed and also started" for k in started if k in missed]
    return out


def check_claims_fenced(h: History) -> list[str]:
    """No fire claimed by a term older than the current one at claim time.

    The claim script only accepts fires newer than the job's last one, so claims
    of one job happen in scheduled-time order; once a term with token T' claimed,
    every older term had already lost the lease. So along scheduled time the
    claiming tokens never decrease. (Runs and ``missed`` records both count.)
    """
    claims: dict[str, dict[int, int]] = {}
    for e in h.events("start"):
        claims.setdefault(e["job"], {})[e["scheduled_ms"]] = e["token"]
    for r in h.runs:
        claims.setdefault(r["job_id"], {}).setdefault(r["scheduled_ms"], r["fencing_token"])
    out = []
    for job, by_ms in claims.items():
        highest, at = 0, 0
        for ms in sorted(by_ms):
            token = by_ms[ms]
            if token < highest:
                out.append(
                    f"{job} fire at {ms} claimed by token {token} after token {highest} "
                    f"claimed the fire at {at}"
                )
            elif token > highest:
                highest, at = token, ms
    return out


def check_terms(h: History) -> list[str]:
    """Terms ordered by fencing token; a revoked leader started nothing after revocation."""
    out = []
    elected = h.events("elected")
    tokens = [e["token"] for e in elected]
    out += [f"token {t} elected {n} times" for t, n in Counter(tokens).items() if n > 1]
    for a, b in itertools.pairwise(elected):
        if b["token"] <= a["token"]:
            out.append(
                f"term {b['token']} ({b['proc']}) began after term {a['token']} "
                f"({a['proc']}) but has a lower or equal token"
            )
    for p in h.procs:
        revoked_at: dict[int, float] = {}
        own: set[int] = set()
        for e in p.events:
            if e["event"] == "elected":
                own.add(e["token"])
            elif e["event"] == "revoked" and e.get("token") is not None:
                revoked_at.setdefault(e["token"], e["t"])
            elif e["event"] == "start":
                if e["token"] not in own:
                    out.append(
                        f"{p.name} started {e['scheduled_ms']} with token {e['token']} "
                        "it was never elected with"
                    )
                if e["token"] in revoked_at:
                    out.append(
                        f"{p.name} started the fire at {e['scheduled_ms']} "
                        f"{e['t'] - revoked_at[e['token']]:.3f}s after term "
                        f"{e['token']} was revoked"
                    )
    return out


def missed_fires(h: History) -> int:
    """Ticks that never ran between the first and the last run: gaps between consecutive
    runs, in whole intervals (a phase change after a data-loss restart counts no gap)."""
    ran = sorted({e["scheduled_ms"] for e in h.events("start") if e["job"] == "tick"})
    if not h.tick_ms:
        return 0
    return sum(max(0, round((b - a) / h.tick_ms) - 1) for a, b in itertools.pairwise(ran))


def failover_times(h: History) -> list[float]:
    """Per leader fault: seconds from the fault to the first fire of a newer term."""
    starts = h.events("start")
    out = []
    for f in h.faults:
        if not f.displaces_leader:
            continue
        before = [e["token"] for e in starts if e["t"] < f.start]
        floor = max(before, default=0)
        after = [e["t"] for e in starts if e["t"] >= f.start and e["token"] > floor]
        out.append(min(after) - f.start if after else float("inf"))
    return out


def check_failovers(h: History, limit_s: float) -> list[str]:
    return [
        f"fault {f.kind} at {f.start:.2f}: no new term ran a fire within {limit_s}s (took {s:.2f}s)"
        for f, s in zip([f for f in h.faults if f.displaces_leader], failover_times(h), strict=True)
        if s > limit_s
    ]


# -- runtime jobs -----------------------------------------------------------------------
def runtime_missed(h: History) -> int:
    """Runtime date jobs recorded ``missed`` (their grace ran out before a leader ran them)."""
    added = {o["job"] for o in h.runtime_ops if o["op"] == "add"}
    return sum(1 for r in h.runs if r["status"] == "missed" and r["job_id"] in added)


def check_runtime_jobs(h: History) -> list[str]:
    """Runtime jobs changed through the API while leaders fail:

    - a date job neither paused nor removed runs once or is recorded ``missed``, never
      neither (a lost definition); it starts within its grace of its ``run_date``; it is
      recorded ``missed`` only if its grace is shorter than the longest failover;
    - no fire of a job starts after its pause or removal was acknowledged (beyond
      ``change_slack_s`` of running time of the process that started it);
    - at the end the list holds exactly the jobs that should remain: paused date jobs
      that did not run, and interval jobs not removed.
    """
    out: list[str] = []
    procs = {p.name: p for p in h.procs}
    starts: dict[str, list[Event]] = {}
    for e in h.events("start"):
        starts.setdefault(e["job"], []).append(e)
    missed: dict[str, int] = Counter(r["job_id"] for r in h.runs if r["status"] == "missed")
    longest = max((t for t in failover_times(h) if t != float("inf")), default=0.0)
    adds = {o["job"]: o for o in h.runtime_ops if o["op"] == "add"}
    stopped_at = {o["job"]: o for o in h.runtime_ops if o["op"] in ("pause", "remove")}
    expected_listed: set[str] = set()
    for job, add in adds.items():
        ran = starts.get(job, [])
        change = stopped_at.get(job)
        if change is not None:
            for e in ran:
                pauses = procs[e["proc"]].paused if e["proc"] in procs else []
                held = sum(max(0.0, min(e["t"], pe) - max(change["t"], ps)) for ps, pe in pauses)
                if e["t"] - change["t"] - held > h.change_slack_s:
                    out.append(
                        f"runtime job {job} started {e['t'] - change['t']:.2f}s after its "
                        f"{change['op']} was acknowledged"
                    )
            if change["op"] == "pause" and (add["type"] != "date" or not (ran or missed[job])):
                expected_listed.add(job)
            continue
        if add["type"] != "date":
            expected_listed.add(job)
            continue
        if len(ran) + missed[job] == 0:
            out.append(f"runtime date job {job} never ran and was not recorded missed: lost")
        for e in ran:
            late_s = (e["wall_ms"] - add["run_ms"]) / 1000
            if late_s > add["grace_s"] + h.change_slack_s:
                out.append(
                    f"runtime date job {job} started {late_s:.2f}s late, beyond its "
                    f"grace of {add['grace_s']}s"
                )
        if missed[job] and add["grace_s"] > longest:
            out.append(
                f"runtime date job {job} was recorded missed though its grace "
                f"({add['grace_s']}s) is longer than the longest failover ({longest:.2f}s)"
            )
    if h.runtime_listed is not None:
        listed = set(h.runtime_listed)
        out += [f"runtime job {j} is gone from the list: lost" for j in expected_listed - listed]
        out += [f"runtime job {j} is still listed" for j in sorted(listed - expected_listed)]
    return out


# -- processes ------------------------------------------------------------------------
def check_processes(h: History) -> list[str]:
    """No process crashed (it exited 0 on SIGTERM, no traceback) or hung (beats kept coming
    except while the test paused it)."""
    out = []
    for p in h.procs:
        if p.killed:
            continue
        if p.exit_code != 0:
            out.append(f"{p.name} exited with {p.exit_code}: {p.stderr[-500:]}")
        if "Traceback (most recent call last)" in p.stderr:
            out.append(f"{p.name} printed a traceback: {p.stderr[-800:]}")
        beats = [e["t"] for e in p.events if e["event"] in ("beat", "ready", "stopped")]
        for a, b in itertools.pairwise(beats):
            paused = sum(max(0.0, min(b, pe) - max(a, ps)) for ps, pe in p.paused)
            if b - a - paused > h.hang_s:
                out.append(f"{p.name} was silent for {b - a - paused:.1f}s (hung) at {a:.2f}")
    return out


def check_readiness(h: History) -> list[str]:
    """503 while Redis was unreachable (after a detection delay), 200 after (within a
    recovery delay)."""
    out = []
    windows = [f for f in h.faults if f.unreachable]
    for f in windows:
        inside = [(t, s) for t, s in h.readiness if f.start + h.ready_detect_s <= t <= f.end]
        if not inside:
            out.append(f"no readiness sample while {f.kind} made Redis unreachable")
        out += [
            f"/readyz answered {s} at +{t - f.start:.2f}s while Redis was unreachable ({f.kind})"
            for t, s in inside
            if s != 503
        ]
    for t, s in h.readiness:
        if any(f.start <= t <= f.end + h.ready_recover_s for f in windows):
            continue
        if any(t < f.start for f in windows) and not any(f.start < t for f in windows):
            continue  # before the first fault: startup is checked by the harness
        if s != 200:
            out.append(f"/readyz answered {s} at {t:.2f}, with Redis reachable")
    return out


# -- SSE --------------------------------------------------------------------------------
def unreceived(
    published: list[str], entries: list[tuple[str, str | None]]
) -> Iterator[tuple[str, bool]]:
    """``(id, announced)`` for each published id a client's log does not hold, in
    publish order. ``announced``: a ``reset`` came after the last event the client got
    before that id and before the first it got after it (a reset elsewhere, such as one
    for an earlier loss, does not cover it)."""
    delivered = [(i, id_key(v)) for i, (k, v) in enumerate(entries) if k == "message" and v]
    got = {v for k, v in entries if k == "message" and v}
    resets = [i for i, (k, _) in enumerate(entries) if k == "reset"]
    for pid in published:
        if pid in got:
            continue
        key = id_key(pid)
        before = max((i for i, v in delivered if v < key), default=-1)
        after = min((i for i, v in delivered if v > key), default=len(entries))
        yield pid, any(before < r < after for r in resets)


def sse_losses(h: History, client: ClientLog) -> tuple[list[str], int]:
    """(violations, events lost with a reset) for one client."""
    out: list[str] = []
    ids = [v for kind, v in client.entries if kind == "message" and v]
    dups = [k for k, n in Counter(ids).items() if n > 1]
    if dups:
        out.append(f"{client.name} received {len(dups)} events more than once (e.g. {dups[0]})")
    keys = [id_key(v) for v in ids]
    for a, b in itertools.pairwise(keys):
        if b < a:
            out.append(f"{client.name} received {b} after {a}: out of order")
            break
    lost = 0
    for pid, announced in unreceived(h.published, client.entries):
        if not announced:
            out.append(f"{client.name} never received {pid} and got no reset for it")
        elif client.replay_ok:
            out.append(
                f"{client.name} lost {pid} (with a reset) though it reconnected within "
                "the replay window"
            )
        lost += 1
    return out, lost


def check_sse(h: History) -> list[str]:
    return [v for c in h.clients for v in sse_losses(h, c)[0]]


# -- all ----------------------------------------------------------------------------------
def check(h: History, failover_limit_s: float = 15.0) -> list[str]:
    """Every invariant violation in ``h`` (empty: correct)."""
    return [
        *check_fires_once(h),
        *check_claims_fenced(h),
        *check_terms(h),
        *check_failovers(h, failover_limit_s),
        *check_processes(h),
        *check_readiness(h),
        *check_sse(h),
        *check_runtime_jobs(h),
    ]


def measure(h: History) -> dict[str, Any]:
    """The summary row: failovers, duplicate fires, missed fires, lost events, max failover."""
    starts = Counter((e["job"], e["scheduled_ms"]) for e in h.events("start"))
    times = [t for t in failover_times(h) if t != float("inf")]
    return {
        "failovers": len(h.events("elected")) - 1 if h.events("elected") else 0,
        "duplicate_fires": sum(n - 1 for n in starts.values() if n > 1),
        "missed_fires": missed_fires(h) + runtime_missed(h),
        "lost_events": sum(sse_losses(h, c)[1] for c in h.clients),
        "max_failover_s": max(times, default=None),
    }

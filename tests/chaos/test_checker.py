"""The checker catches what it claims to catch: each test feeds it one violating history.

Pure and fast; not marked ``chaos`` so it runs with the unit tests too.
"""

from __future__ import annotations

from typing import Any

from .checker import ClientLog, Fault, History, ProcRecord, check, measure, unreceived


def ev(event: str, t: float, **fields: Any) -> dict[str, Any]:
    return {"event": event, "t": t, **fields}


def start(t: float, ms: int, token: int, job: str = "tick") -> dict[str, Any]:
    return ev("start", t, job=job, scheduled_ms=ms, token=token)


def beats(t0: float, t1: float) -> list[dict[str, Any]]:
    return [ev("beat", t0 + i * 0.25) for i in range(int((t1 - t0) / 0.25) + 1)]


def good() -> History:
    """Leader a (token 1) is killed at t=2; b (token 2) takes over."""
    a = ProcRecord(
        "a",
        [
            ev("elected", 0.1, token=1),
            start(0.5, 1000, 1),
            start(1.0, 1500, 1),
            start(1.5, 2000, 1),
        ],
        killed=True,
    )
    b = ProcRecord(
        "b",
        [
            *beats(0, 6),
            ev("elected", 3.0, token=2),
            start(3.1, 2500, 2),
            start(3.5, 3000, 2),
            ev("stopped", 6.1),
        ],
        exit_code=0,
    )
    b.events.sort(key=lambda e: e["t"])
    return History(
        procs=[a, b],
        tick_ms=500,
        faults=[Fault("sigkill", 2.0, 2.0)],
        runs=[
            {"job_id": "tick", "scheduled_ms": ms, "status": "ok", "fencing_token": tok}
            for ms, tok in ((1000, 1), (1500, 1), (2000, 1), (2500, 2), (3000, 2))
        ],
        published=["1-0", "2-0", "3-0"],
        clients=[
            ClientLog(
                "c1",
                [
                    ("open", None),
                    ("message", "1-0"),
                    ("end", None),
                    ("open", "1-0"),
                    ("message", "2-0"),
                    ("message", "3-0"),
                ],
            )
        ],
        readiness=[(1.0, 200), (8.0, 200)],
    )


def test_a_correct_history_passes_and_is_measured() -> None:
    h = good()
    assert check(h) == []
    m = measure(h)
    assert m["failovers"] == 1 and m["duplicate_fires"] == 0 and m["missed_fires"] == 0
    assert m["lost_events"] == 0 and 1.0 < m["max_failover_s"] < 1.2


def test_a_fire_run_twice_is_caught() -> None:
    h = good()
    h.procs[1].events.append(start(3.6, 2000, 2))
    assert any("started 2 times" in v for v in check(h))
    assert measure(h)["duplicate_fires"] == 1
    h = good()
    h.runs.append({"job_id": "tick", "scheduled_ms": 1500, "status": "ok", "fencing_token": 2})
    assert any("2 run records" in v for v in check(h))


def test_a_claim_by_an_older_term_is_caught() -> None:
    h = good()
    # The old term claims a fire scheduled after the new term's first claim.
    h.runs.append({"job_id": "tick", "scheduled_ms": 3500, "status": "missed", "fencing_token": 1})
    assert any("claimed by token 1 after token 2" in v for v in check(h))


def test_tokens_out_of_order_and_reused_are_caught() -> None:
    h = good()
    h.procs[1].events = [
        dict(e, token=1) if e["event"] == "elected" else e for e in h.procs[1].events
    ]
    violations = check(h)
    assert any("token 1 elected 2 times" in v for v in violations)
    assert any("lower or equal token" in v for v in violations)


def test_a_start_after_revocation_is_caught() -> None:
    h = good()
    h.procs[0].events += [ev("revoked", 1.7, token=1), start(1.9, 2100, 1)]
    assert any("after term 1 was revoked" in v for v in check(h))


def test_a_missing_failover_is_caught() -> None:
    h = good()
    h.procs[1].events = [e for e in h.procs[1].events if e["event"] != "start"]
    assert any("no new term ran a fire" in v for v in check(h))


def test_missed_fires_are_counted() -> None:
    h = good()
    h.procs[1].events = [e for e in h.procs[1].events if e.get("scheduled_ms") != 2500]
    assert measure(h)["missed_fires"] == 1


def test_crash_and_hang_are_caught() -> None:
    h = good()
    h.procs[1].exit_code = 1
    assert any("exited with 1" in v for v in check(h))
    h = good()
    h.procs[1].events = [e for e in h.procs[1].events if not 4.0 < e["t"] < 5.9]
    h.hang_s = 1.5
    assert any("hung" in v for v in check(h))
    h.procs[1].paused = [(4.0, 5.9)]  # the test paused it then: not a hang
    assert check(h) == []
    h = good()
    h.procs[1].stderr = "Traceback (most recent call last):\n  boom"
    assert any("traceback" in v for v in check(h))


def test_sse_duplicates_reorder_and_silent_loss_are_caught() -> None:
    h = good()
    h.clients[0].entries.append(("message", "2-0"))
    assert any("more than once" in v for v in check(h))
    h = good()
    h.clients[0].entries[-2:] = [("message", "3-0"), ("message", "2-0")]
    assert any("out of order" in v for v in check(h))
    h = good()
    del h.clients[0].entries[4]  # 2-0 never arrives, no reset
    assert any("never received 2-0 and got no reset" in v for v in check(h))


def test_sse_loss_with_reset_is_allowed_only_beyond_the_window() -> None:
    h = good()
    h.clients[0].entries[4] = ("reset", None)
    assert any("within the replay window" in v for v in check(h))
    h.clients[0].replay_ok = False
    assert check(h) == []
    assert measure(h)["lost_events"] == 1


def test_a_reset_covers_only_the_gap_it_sits_in() -> None:
    """A reset for an earlier loss does not excuse a later event that never came (the
    harness waited on this rule too: it stopped the clients before the last event
    arrived, then the check failed)."""
    h = good()
    h.clients[0].replay_ok = False
    h.clients[0].entries[4] = ("reset", None)  # 2-0 lost, announced; 3-0 received
    h.published.append("4-0")  # not (yet) received
    assert list(unreceived(h.published, h.clients[0].entries)) == [("2-0", True), ("4-0", False)]
    assert any("never received 4-0 and got no reset" in v for v in check(h))
    h.clients[0].entries.append(("reset", None))  # its own reset covers it
    assert check(h) == []


def test_readiness_must_be_503_while_unreachable_and_200_after() -> None:
    h = good()
    h.faults.append(Fault("partition", 10.0, 20.0, displaces_leader=False, unreachable=True))
    h.readiness += [(12.0, 503), (16.0, 200), (19.0, 503), (31.0, 200)]
    assert any("answered 200 at +6.00s" in v for v in check(h))
    h.readiness.remove((16.0, 200))
    assert check(h) == []
    h.readiness.append((40.0, 503))
    assert any("answered 503 at 40.00, with Redis reachable" in v for v in check(h))
    h.readiness = [(1.0, 200)]
    assert any("no readiness sample" in v for v in check(h))


def runtime_good() -> History:
    """On top of good(): date jobs d1 (runs late but within grace, on b), d2 (short grace,
    due during the failover: recorded missed), d3 (paused before it was due), interval
    job i1 (removed after one fire) and i2 (still there)."""
    h = good()
    b = h.procs[1]
    h.runtime_ops = [
        {"op": "add", "job": "d1", "t": 1.0, "type": "date", "run_ms": 2000, "grace_s": 20},
        {"op": "add", "job": "d2", "t": 1.0, "type": "date", "run_ms": 2100, "grace_s": 0.5},
        {"op": "add", "job": "d3", "t": 1.0, "type": "date", "run_ms": 9000, "grace_s": 20},
        {"op": "add", "job": "i1", "t": 1.0, "type": "interval", "run_ms": 0, "grace_s": 20},
        {"op": "add", "job": "i2", "t": 1.0, "type": "interval", "run_ms": 0, "grace_s": 20},
        {"op": "pause", "job": "d3", "t": 1.2},
        {"op": "remove", "job": "i1", "t": 3.4},
    ]
    b.events += [
        dict(start(3.2, 2000, 2, job="d1"), wall_ms=3150),
        dict(start(3.3, 2600, 2, job="i1"), wall_ms=2610),
        dict(start(3.6, 2800, 2, job="i2"), wall_ms=2810),
    ]
    b.events.sort(key=lambda e: e["t"])
    h.runs += [
        {"job_id": "d1", "scheduled_ms": 2000, "status": "ok", "fencing_token": 2},
        {"job_id": "d2", "scheduled_ms": 2100, "status": "missed", "fencing_token": 2},
    ]
    h.runtime_listed = ["d3", "i2"]
    return h


def test_runtime_jobs_correct_history_passes() -> None:
    h = runtime_good()
    assert check(h) == []
    assert measure(h)["missed_fires"] == 1


def test_runtime_lost_late_missed_and_listing_violations_are_caught() -> None:
    h = runtime_good()
    h.runs = [r for r in h.runs if r["job_id"] != "d2"]
    assert any("d2 never ran" in v and "lost" in v for v in check(h))
    h = runtime_good()
    h.runtime_ops[0]["grace_s"] = 0.5  # d1 started 1.15 s late
    assert any("d1 started 1.15s late" in v for v in check(h))
    h = runtime_good()
    h.runtime_ops[1]["grace_s"] = 5  # longer than the 1.1 s failover, yet missed
    assert any("d2 was recorded missed though" in v for v in check(h))
    h = runtime_good()
    h.runtime_listed = ["i2"]  # the paused date job vanished
    assert any("d3 is gone from the list" in v for v in check(h))
    h = runtime_good()
    h.runtime_listed = ["d3", "i2", "i1"]  # the removed job is still there
    assert any("i1 is still listed" in v for v in check(h))


def test_runtime_fire_after_pause_or_remove_is_caught() -> None:
    h = runtime_good()
    h.procs[1].events.append(dict(start(4.5, 3200, 2, job="i1"), wall_ms=3210))
    assert any("i1 started 1.10s after its remove" in v for v in check(h))
    h = runtime_good()
    h.procs[1].events.append(dict(start(5.0, 9000, 2, job="d3"), wall_ms=9010))
    assert any("d3 started 3.80s after its pause" in v for v in check(h))
    # Time the starting process spent stopped does not count.
    h.procs[1].paused.append((1.0, 4.9))
    assert not any("d3 started" in v for v in check(h))

"""Chaos suite options, the seeded random source, and the end-of-session summary table.

``pytest -m chaos`` runs every scenario once (a size that fits CI: about three
minutes on two cores); ``--chaos-rounds N`` repeats each fault N times (and
makes the random mixes N times longer); ``--chaos-seed S`` replays a mix.
The table is printed at the end and written to ``test-output/chaos-summary.md``.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUMMARY_PATH = ROOT / "test-output" / "chaos-summary.md"
COLUMNS = (
    "scenario",
    "rounds",
    "failovers",
    "duplicate fires",
    "missed fires",
    "lost events",
    "max failover (s)",
    "violations",
)

_rows: dict[str, dict[str, Any]] = {}
_started = time.monotonic()


@pytest.fixture(scope="session")
def chaos_rounds(request: pytest.FixtureRequest) -> int:
    return max(1, int(request.config.getoption("--chaos-rounds", default=1)))


@pytest.fixture(scope="session")
def chaos_seed(request: pytest.FixtureRequest) -> int:
    seed = request.config.getoption("--chaos-seed", default=None)
    if seed is None:
        seed = int(os.environ.get("CHAOS_SEED", random.randrange(2**31)))
    print(f"\nchaos seed: {seed} (replay with --chaos-seed {seed})")
    return int(seed)


def record(scenario: str, rounds: int, measured: dict[str, Any], violations: int) -> None:
    """Add one run's numbers to the session's summary row for ``scenario``."""
    row = _rows.setdefault(
        scenario,
        {
            "rounds": 0,
            "failovers": 0,
            "duplicate_fires": 0,
            "missed_fires": 0,
            "lost_events": 0,
            "max_failover_s": None,
            "violations": 0,
        },
    )
    row["rounds"] += rounds
    for key in ("failovers", "duplicate_fires", "missed_fires", "lost_events"):
        row[key] += measured.get(key) or 0
    row["violations"] += violations
    worst = measured.get("max_failover_s")
    if worst is not None:
        row["max_failover_s"] = max(worst, row["max_failover_s"] or 0.0)


def table() -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, r in _rows.items():
        worst = "-" if r["max_failover_s"] is None else f"{r['max_failover_s']:.2f}"
        cells = [
            name,
            r["rounds"],
            r["failovers"],
            r["duplicate_fires"],
            r["missed_fires"],
            r["lost_events"],
            worst,
            r["violations"],
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _rows:
        return
    took = time.monotonic() - _started
    text = table()
    terminalreporter.write_sep("=", "chaos summary")
    terminalreporter.write_line(text)
    SUMMARY_PATH.parent.mkdir(exist_ok=True)
    command = ".venv/bin/python -m pytest -m chaos tests/chaos"
    SUMMARY_PATH.write_text(f"{text}\n\nSession time: {took:.0f} s. Made by `{command}`.\n")
    terminalreporter.write_line(f"written to {SUMMARY_PATH.relative_to(ROOT)}")

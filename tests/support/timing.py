"""Short election timings for tests and benchmarks (lease 1.5 s, retry 0.3 s).

``FAST`` is for ``CoordinatorSettings(**FAST)``; ``FAST_ENV`` is the same as
``COORDINATOR_*`` variables for child processes.
"""

from __future__ import annotations

FAST: dict[str, int] = {
    "lease_ttl_ms": 1500,
    "renew_interval_ms": 300,
    "renew_deadline_ms": 1000,
    "retry_period_ms": 300,
    "backoff_max_ms": 500,
}
FAST_ENV: dict[str, str] = {f"COORDINATOR_{name.upper()}": str(v) for name, v in FAST.items()}

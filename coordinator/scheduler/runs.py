"""Run history of scheduled jobs: a capped Redis list, newest first.

Every fire the leader handles leaves one record: ``ok``, ``error``, ``cancelled``
(told to stop, or leadership lost between claim and start) or ``missed`` (too
late for the job's ``misfire_grace_time``, coalesced into a later fire, or
skipped because the previous run was still going).

Guarantees and limits:

- ``missed`` records are written by the claim script itself, in the same atomic
  step as the claim. The other outcomes are written when the run ends, so a run
  in progress, or one whose process was killed mid-run, has no record (its claim
  still stops it from running again anywhere).
- The list keeps the last ``job_history`` records (``COORDINATOR_JOB_HISTORY``);
  older ones are trimmed on each write.
- Times are wall-clock milliseconds since the epoch (UTC). ``scheduled_at`` is
  the fire's scheduled time, identical on every process; ``started_at`` and
  ``finished_at`` come from the clock of the process that ran it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from coordinator.clock import ms_to_iso
from coordinator.store.connection import RedisClient
from coordinator.store.keys import Keys

RunStatus = Literal["ok", "error", "missed", "cancelled"]


@dataclass(frozen=True)
class RunRecord:
    """One handled fire of one job."""

    job_id: str
    scheduled_ms: int
    status: RunStatus
    instance_id: str
    fencing_token: int
    started_ms: int | None = None
    finished_ms: int | None = None
    error: str | None = None
    lost_leadership: bool = False
    """True when this process's term ended while the run was going (it was told)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> RunRecord:
        data = json.loads(raw)
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__ if k in data})

    def as_dict(self) -> dict[str, Any]:
        """The public, JSON-ready view (``GET /api/jobs/runs``)."""
        return {
            "job_id": self.job_id,
            "scheduled_at": ms_to_iso(self.scheduled_ms),
            "started_at": ms_to_iso(self.started_ms),
            "finished_at": ms_to_iso(self.finished_ms),
            "instance_id": self.instance_id,
            "fencing_token": self.fencing_token,
            "status": self.status,
            "error": self.error,
            "lost_leadership": self.lost_leadership,
        }


class RunHistory:
    """Reads and appends run records for one namespace.

    ``redis`` is used, not owned (the caller closes it).
    """

    def __init__(self, redis: RedisClient, keys: Keys, cap: int) -> None:
        self._redis = redis
        self._key = keys.runs()
        self.cap = cap

    async def append(self, record: RunRecord) -> None:
        """Push ``record`` and trim the list to ``cap``, in one transaction."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(self._key, record.to_json())
            pipe.ltrim(self._key, 0, self.cap - 1)
            await pipe.execute()

    async def recent(self, limit: int = 50, job_id: str | None = None) -> list[RunRecord]:
        """The ``limit`` most recently recorded runs (only ``job_id``'s when given), newest
        start first.

        A run is recorded when it ends, so runs that overlap are recorded in the order
        they finish; the page is sorted by start (scheduled time for ``missed`` records)
        so that it reads newest first however the runs overlapped.

        Raises ``ValueError`` if ``limit`` is not positive.
        """
        if limit <= 0:
            raise ValueError(f"limit must be a positive number of runs, got {limit}")
        span = limit if job_id is None else self.cap
        raw = await self._redis.lrange(self._key, 0, span - 1)
        records = [RunRecord.from_json(item) for item in raw]
        if job_id is not None:
            records = [r for r in records if r.job_id == job_id]
        page = records[:limit]
        page.sort(key=lambda r: (r.started_ms or r.scheduled_ms, r.scheduled_ms), reverse=True)
        return page

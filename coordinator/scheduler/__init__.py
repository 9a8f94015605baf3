"""The leader-only scheduler: fire claims, run history and cluster-wide run-once."""

from coordinator.scheduler.context import JobContext
from coordinator.scheduler.once import run_once
from coordinator.scheduler.runs import RunRecord
from coordinator.scheduler.scheduler import LeaderScheduler

__all__ = ["JobContext", "LeaderScheduler", "RunRecord", "run_once"]

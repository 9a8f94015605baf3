"""coordinator: run a FastAPI app as many processes, safely, with Redis.

- :class:`LeaderElector`: one leader across every worker and pod, with fencing tokens.
- :class:`CoordinatorSettings`: every setting, validated, from the environment.
- :func:`create_redis`: the async Redis client for a URL (TLS, unix, Sentinel).
- :class:`LeaderScheduler`: APScheduler jobs run by the leader only, each fire claimed once.
- :func:`run_once`: cluster-wide run-once for startup work.
"""

from .connection import create_redis, redact_url
from .election import LeaderElector, LeaderInfo, Term, read_leader
from .errors import (
    ConfigurationError,
    CoordinatorError,
    EventTooLargeError,
    InvalidEventError,
    InvalidEventIdError,
    NotLeaderError,
    OnceFailedError,
    RedisUnavailableError,
)
from .firing import JobContext
from .keys import Keys
from .once import run_once
from .runs import RunRecord
from .scheduler import LeaderScheduler
from .settings import CoordinatorSettings

__all__ = [
    "ConfigurationError",
    "CoordinatorError",
    "CoordinatorSettings",
    "EventTooLargeError",
    "InvalidEventError",
    "InvalidEventIdError",
    "JobContext",
    "Keys",
    "LeaderElector",
    "LeaderInfo",
    "LeaderScheduler",
    "NotLeaderError",
    "OnceFailedError",
    "RedisUnavailableError",
    "RunRecord",
    "Term",
    "create_redis",
    "read_leader",
    "redact_url",
    "run_once",
]

"""coordinator: run a FastAPI app as many processes, safely, with Redis.

- :class:`LeaderElector`: one leader across every worker and pod, with fencing tokens.
- :class:`CoordinatorSettings`: every setting, validated, from the environment.
- :func:`create_redis`: the async Redis client for a URL (TLS, unix, Sentinel).
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
from .keys import Keys
from .settings import CoordinatorSettings

__all__ = [
    "ConfigurationError",
    "CoordinatorError",
    "CoordinatorSettings",
    "EventTooLargeError",
    "InvalidEventError",
    "InvalidEventIdError",
    "Keys",
    "LeaderElector",
    "LeaderInfo",
    "NotLeaderError",
    "OnceFailedError",
    "RedisUnavailableError",
    "Term",
    "create_redis",
    "read_leader",
    "redact_url",
]

"""coordinator: run a FastAPI app as many processes, safely, with Redis.

- :class:`LeaderElector`: one leader across every worker and pod, with fencing tokens.
- :class:`CoordinatorSettings`: every setting, validated, from the environment.
- :func:`create_redis`: the async Redis client for a URL (TLS, unix, Sentinel).
- :class:`EventRelay`: events to every SSE client on every process, with replay;
  :func:`channel_router` serves them over HTTP.
- :class:`LeaderScheduler`: APScheduler jobs run by the leader only, each fire claimed once.
- :func:`run_once`: cluster-wide run-once for startup work.
"""

from .authz import bearer_token_policy
from .connection import create_redis, redact_url
from .election import LeaderElector
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
from .events import EventId
from .firing import JobContext
from .integration import Coordinator
from .keys import Keys
from .lease import LeaderInfo, Term, read_leader
from .logs import configure_logging
from .once import run_once
from .relay import EventRelay
from .runs import RunRecord
from .scheduler import LeaderScheduler
from .settings import CoordinatorSettings
from .sse import ChannelEventResponse, allow_all, channel_router
from .subscription import Subscription

__all__ = [
    "ChannelEventResponse",
    "ConfigurationError",
    "Coordinator",
    "CoordinatorError",
    "CoordinatorSettings",
    "EventId",
    "EventRelay",
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
    "Subscription",
    "Term",
    "allow_all",
    "bearer_token_policy",
    "channel_router",
    "configure_logging",
    "create_redis",
    "read_leader",
    "redact_url",
    "run_once",
]

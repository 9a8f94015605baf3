"""coordinator: run a FastAPI app as many processes, safely, with Redis.

- :class:`LeaderElector`: one leader across every worker and pod, with fencing tokens.
- :class:`LeaderScheduler`: APScheduler jobs run by the leader only, each fire claimed once;
  :func:`run_once`: cluster-wide run-once for startup work.
- :class:`EventRelay`: events to every SSE client on every process, with replay.
- :class:`Coordinator`: all of them in one FastAPI lifespan, with the routes
  (:func:`channel_router` serves channels over HTTP).
- :class:`SharedState`: typed runtime values every process reads from its own
  memory, changed anywhere with compare-and-set (``Coordinator.state``);
  sessions in Redis (:func:`install_sessions`, :func:`begin_session`,
  :func:`session_data`, :func:`end_session`); per-client limits across every
  process (:mod:`coordinator.web.limits`).
- :class:`CoordinatorSettings`: every setting, validated, from the environment;
  :func:`create_redis`: the async Redis client for a URL (TLS, unix, Sentinel).
  :func:`create_client`: the same, or a ``RedisCluster`` for a ``redis+cluster://``
  URL (for :class:`EventRelay`, :class:`LeaderElector` and :class:`LeaderScheduler`,
  which run on Cluster).

Importing this package changes nothing in the process: no environment variable
is set, no file or directory is created. The web layer (FastAPI, sse-starlette,
prometheus_client) is imported only when one of its names is first used, so a
process that uses :class:`LeaderElector`, :class:`LeaderScheduler` or
:class:`EventRelay` alone never loads it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from coordinator.election import LeaderElector, LeaderInfo, Term, read_leader
from coordinator.errors import (
    ConfigurationError,
    CoordinatorError,
    EventTooLargeError,
    InvalidEventError,
    InvalidEventIdError,
    InvalidStateError,
    OnceFailedError,
    RedisUnavailableError,
    StateConflictError,
    StateTooLargeError,
)
from coordinator.ops.logs import configure_logging
from coordinator.relay import EventId, EventRelay, Subscription
from coordinator.scheduler import JobContext, LeaderScheduler, RunRecord, run_once
from coordinator.settings import CoordinatorSettings
from coordinator.state import SharedState, StateChange, StateValue
from coordinator.store.connection import create_client, create_redis, redact_url
from coordinator.store.keys import Keys

if TYPE_CHECKING:
    from coordinator.web import (
        ChannelEventResponse,
        Coordinator,
        DirectStreamWrites,
        allow_all,
        bearer_token_policy,
        begin_session,
        channel_router,
        end_session,
        install_sessions,
        session_data,
        state_router,
    )

_WEB = frozenset(
    {
        "ChannelEventResponse",
        "Coordinator",
        "DirectStreamWrites",
        "allow_all",
        "bearer_token_policy",
        "begin_session",
        "channel_router",
        "end_session",
        "install_sessions",
        "session_data",
        "state_router",
    }
)


def __getattr__(name: str) -> Any:
    if name in _WEB:
        value = getattr(importlib.import_module("coordinator.web"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'coordinator' has no attribute {name!r}")


__all__ = [
    "ChannelEventResponse",
    "ConfigurationError",
    "Coordinator",
    "CoordinatorError",
    "CoordinatorSettings",
    "DirectStreamWrites",
    "EventId",
    "EventRelay",
    "EventTooLargeError",
    "InvalidEventError",
    "InvalidEventIdError",
    "InvalidStateError",
    "JobContext",
    "Keys",
    "LeaderElector",
    "LeaderInfo",
    "LeaderScheduler",
    "OnceFailedError",
    "RedisUnavailableError",
    "RunRecord",
    "SharedState",
    "StateChange",
    "StateConflictError",
    "StateTooLargeError",
    "StateValue",
    "Subscription",
    "Term",
    "allow_all",
    "bearer_token_policy",
    "begin_session",
    "channel_router",
    "configure_logging",
    "create_client",
    "create_redis",
    "end_session",
    "install_sessions",
    "read_leader",
    "redact_url",
    "run_once",
    "session_data",
    "state_router",
]

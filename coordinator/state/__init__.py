"""Shared runtime state and cluster-wide limits on the coordinator's Redis.

- :class:`SharedState`: typed values every process reads from its own memory and
  any process changes with compare-and-set; changes arrive over the relay's
  Pub/Sub within milliseconds.
- :class:`ClusterRateLimiter` and :class:`StreamSlots`: per-client publish rate
  and open SSE streams, counted across every worker and pod.

Sessions are in the web layer (:mod:`coordinator.web.sessions`): the session
library is a Starlette middleware.
"""

from coordinator.state.limits import ClusterRateLimiter, LimitDecision, StreamSlot, StreamSlots
from coordinator.state.shared import SharedState
from coordinator.state.values import StateChange, StateValue
from coordinator.state.views import StateWatch, TypedKey

__all__ = [
    "ClusterRateLimiter",
    "LimitDecision",
    "SharedState",
    "StateChange",
    "StateValue",
    "StateWatch",
    "StreamSlot",
    "StreamSlots",
    "TypedKey",
]

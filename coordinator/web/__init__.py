"""The web layer: the only place FastAPI, sse-starlette and prometheus_client are imported.

:class:`Coordinator` (the lifespan facade and routes), the SSE channel router,
the shared-state router, Redis sessions (starsessions), authorization hooks,
cluster-wide per-client limits and ``/metrics``.
"""

from coordinator.web.authz import Authorizer, allow_all, bearer_token_policy
from coordinator.web.coordinator import Coordinator
from coordinator.web.direct_send import DirectStreamWrites
from coordinator.web.sessions import begin_session, end_session, install_sessions, session_data
from coordinator.web.sse import channel_router
from coordinator.web.state import state_router
from coordinator.web.stream import ChannelEventResponse

__all__ = [
    "Authorizer",
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
]

"""An example channel authorization policy: bearer tokens.

Pass the result to ``Coordinator(authorize=...)`` or ``channel_router(authorize=...)``.
The router calls it for every publish and every stream before touching
Redis; a ``False`` answer is a 403 and nothing is published or streamed.

Tokens are compared in constant time. A browser ``EventSource`` cannot send
headers, so subscribers may pass the token as ``?access_token=`` instead (it
then shows in access logs: prefer short-lived tokens, or a signed-channel
scheme, in production).
"""

from __future__ import annotations

import hmac
import logging

from fastapi import Request

from .sse import ChannelAction, ChannelAuthorizer

logger = logging.getLogger("coordinator.authz")


def _presented(request: Request, allow_query: bool) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if allow_query:
        return request.query_params.get("access_token") or None
    return None


def bearer_token_policy(
    publish_token: str | None = None, subscribe_token: str | None = None
) -> ChannelAuthorizer:
    """Require ``Authorization: Bearer <token>`` to publish (and to subscribe, if set).

    A ``None`` token leaves that action open to everyone. Subscribers may also
    present their token as the ``access_token`` query parameter.
    """

    def authorize(request: Request, channel: str, action: ChannelAction) -> bool:
        expected = publish_token if action == "publish" else subscribe_token
        if expected is None:
            return True
        presented = _presented(request, allow_query=action == "subscribe")
        allowed = presented is not None and hmac.compare_digest(
            presented.encode(), expected.encode()
        )
        if not allowed:
            logger.info("denied %s: %s", action, "wrong token" if presented else "no token",
                        extra={"channel": channel})  # fmt: skip
        return allowed

    return authorize

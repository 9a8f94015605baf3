"""Authorization hooks: one signature for every route the library serves, and an
example policy (bearer tokens).

An :data:`Authorizer` is called as ``authorize(request, name, action)`` before any
Redis work, and returns ``bool`` or an awaitable of one; ``False`` is a 403 and nothing
happens. ``name`` and ``action`` by router: channels (the channel; ``"subscribe"`` or
``"publish"``), runtime jobs (the job id; ``"manage"``), shared state (the key;
``"read"`` or ``"write"``). The default, :func:`allow_all`, allows everything: put the
routes behind your own auth, or pass a real authorizer, before exposing them.

:func:`bearer_token_policy`: pass the result to ``Coordinator(authorize=...)`` or
``channel_router(authorize=...)``.

Tokens are compared in constant time. A browser ``EventSource`` cannot send
headers, so subscribers may pass the token as ``?access_token=`` instead (it
then shows in access logs: prefer short-lived tokens, or a signed-channel
scheme, in production).
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable

from fastapi import Request

logger = logging.getLogger("coordinator.authz")

Authorizer = Callable[[Request, str, str], "bool | Awaitable[bool]"]
"""``authorize(request, name, action)``: see the module's docstring."""


def allow_all(request: Request, name: str, action: str) -> bool:
    """The default authorizer: every request may do everything."""
    return True


async def is_allowed(authorize: Authorizer, request: Request, name: str, action: str) -> bool:
    """Ask ``authorize``, awaiting its answer when it is a coroutine."""
    answer = authorize(request, name, action)
    if inspect.isawaitable(answer):
        answer = await answer
    return bool(answer)


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
) -> Authorizer:
    """Require ``Authorization: Bearer <token>`` to publish and to manage jobs (and to
    subscribe, if set).

    A ``None`` token leaves that action open to everyone. Subscribers may also
    present their token as the ``access_token`` query parameter.
    """

    def authorize(request: Request, channel: str, action: str) -> bool:
        # "manage" (runtime jobs) changes things, as publishing does.
        expected = subscribe_token if action == "subscribe" else publish_token
        if expected is None:
            return True
        presented = _presented(request, allow_query=action == "subscribe")
        allowed = presented is not None and hmac.compare_digest(
            presented.encode(), expected.encode()
        )
        if not allowed:
            logger.info(
                "denied %s: %s",
                action,
                "wrong token" if presented else "no token",
                extra={"channel": channel},
            )
        return allowed

    return authorize

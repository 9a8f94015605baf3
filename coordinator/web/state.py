"""HTTP routes for shared state: read from process memory, write with compare-and-set.

:func:`state_router` gives the two endpoints of the HTTP contract:

- ``GET {prefix}/{key}``: ``200 {"key", "value", "version", "stale"}`` from this
  process's memory (no Redis round trip); ``stale`` is true while this process
  may have missed changes (its Redis listener is down or reloading: see
  :class:`~coordinator.state.SharedState`); ``404`` for a key it does not hold;
  ``422`` for a bad key name.
- ``PUT {prefix}/{key}`` with ``{"value": <any JSON>, "version": <int, optional>}``:
  ``200 {"key", "value", "version"}`` (the new version); ``409
  {"detail", "key", "version"}`` when ``version`` is given and is not the
  current one (``version`` then says the current one; 0 for a key that does not
  exist); ``413`` for a value over ``state_max_value_bytes`` or a new key over
  ``state_max_keys``; ``422`` for a bad key, a body that is not JSON, not an
  object, without ``value``, with other fields, or a version that is not an
  integer in ``0..2**53-1``; ``503`` when Redis is unreachable.

Every answer carries ``X-Coordinator-Instance``. Authorization: ``authorize=`` a
callable ``(request, key, action)``, ``action`` ``"read"`` or ``"write"``,
returning ``bool`` or an awaitable of one; ``False`` is a ``403``. The default,
:func:`allow_all`, lets everyone read and write every key: pass a real
policy before exposing the routes.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from coordinator.errors import (
    InvalidStateError,
    RedisUnavailableError,
    StateConflictError,
    StateTooLargeError,
)
from coordinator.settings import CoordinatorSettings
from coordinator.state.shared import SharedState
from coordinator.state.values import check_key, check_version
from coordinator.web.authz import Authorizer, allow_all, is_allowed
from coordinator.web.bodies import InvalidJSONError, parse_json, read_body
from coordinator.web.sse import INSTANCE_HEADER

StateAction = Literal["read", "write"]
StateAuthorizer = Authorizer

_BODY_FIELDS = frozenset({"value", "version"})


def parse_put_body(raw: bytes) -> tuple[Any, int | None]:
    """``(value, version or None)`` from a PUT body.

    Raises:
        InvalidStateError: naming what is wrong (JSON, shape, field, version).
    """
    try:
        body = parse_json(raw)
    except InvalidJSONError as exc:
        raise InvalidStateError(str(exc)) from None
    if not isinstance(body, dict):
        raise InvalidStateError(
            f'body must be an object {{"value": ..., "version": ...}}, not {type(body).__name__}'
        )
    unknown = sorted(set(body) - _BODY_FIELDS)
    if unknown:
        raise InvalidStateError(
            f"unknown field(s) {', '.join(map(repr, unknown))}: send 'value' and, "
            "optionally, 'version'"
        )
    if "value" not in body:
        raise InvalidStateError("field 'value' is required (any JSON, null included)")
    version = body.get("version")
    if version is not None:
        version = check_version(version)
    return body["value"], version


def state_router(
    state: SharedState,
    settings: CoordinatorSettings | None = None,
    *,
    authorize: StateAuthorizer = allow_all,
    prefix: str = "/api/state",
    tags: list[str] | None = None,
) -> APIRouter:
    """A router with ``GET`` and ``PUT {prefix}/{key}`` (see the module doc)."""
    conf = settings or state.settings
    headers = {INSTANCE_HEADER: conf.instance_id}
    body_limit = conf.state_max_value_bytes * 4 + 4096  # room for whitespace and escapes
    router = APIRouter(prefix=prefix, tags=list(tags or ["state"]))

    async def check(request: Request, key: str, action: StateAction) -> None:
        try:
            check_key(key)
        except InvalidStateError as exc:
            raise HTTPException(422, str(exc), headers=headers) from None
        if not await is_allowed(authorize, request, key, action):
            raise HTTPException(403, f"not allowed to {action} state key {key!r}", headers=headers)

    @router.get("/{key}", summary="Read a shared-state key from this process's memory")
    async def read(request: Request, key: str) -> JSONResponse:
        await check(request, key, "read")
        entry = state.get(key)
        if entry is None:
            why = f" (this process is {state.status})" if state.stale else ""
            raise HTTPException(404, f"no state key {key!r}{why}", headers=headers)
        return JSONResponse({**entry.as_dict(), "stale": state.stale}, headers=headers)

    @router.put(
        "/{key}",
        summary="Set a shared-state key (compare-and-set with 'version')",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["value"],
                            "properties": {"value": {}, "version": {"type": "integer"}},
                            "additionalProperties": False,
                        }
                    }
                },
            }
        },
    )
    async def write(request: Request, key: str) -> JSONResponse:
        await check(request, key, "write")
        raw = await read_body(request, body_limit, headers)
        try:
            value, version = parse_put_body(raw)
            entry = await state.set(key, value, version)
        except StateConflictError as exc:
            return JSONResponse(
                {"detail": str(exc), "key": key, "version": exc.current},
                status_code=409,
                headers=headers,
            )
        except StateTooLargeError as exc:
            raise HTTPException(413, str(exc), headers=headers) from None
        except InvalidStateError as exc:
            raise HTTPException(422, str(exc), headers=headers) from None
        except RedisUnavailableError as exc:
            raise HTTPException(503, str(exc), headers={**headers, "Retry-After": "1"}) from None
        return JSONResponse(entry.as_dict(), headers=headers)

    return router

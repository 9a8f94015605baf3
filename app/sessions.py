"""The demo's login routes: ``POST|GET|DELETE /api/session`` on Redis sessions.

The login takes a name and no password: it shows sessions shared by every
worker, not authentication. The session itself (cookie, id rotation, storage,
expiry) is the library's (:mod:`coordinator.web.sessions`).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coordinator import begin_session, end_session, session_data
from coordinator.web.bodies import read_json


class Login(BaseModel):
    """``POST /api/session`` body."""

    model_config = ConfigDict(extra="forbid")
    user: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Who logs in: 1-64 characters, no control characters.",
    )


MAX_BODY = 4096


async def read_login(request: Request, headers: dict[str, str]) -> Login:
    """The body as a :class:`Login`, or a 413/422 naming what is wrong. Parsed here, not by
    FastAPI, whose 422 echoes the input and fails to render a non-finite number."""
    body = await read_json(request, MAX_BODY, headers)
    if not isinstance(body, dict):
        raise HTTPException(
            422,
            f'body must be an object {{"user": ...}}, not {type(body).__name__}',
            headers=headers,
        )
    try:
        return Login.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise HTTPException(422, problems, headers=headers) from None


def session_router(headers: dict[str, str]) -> APIRouter:
    """The three routes; ``headers`` go on every answer (the serving instance)."""
    router = APIRouter(prefix="/api/session", tags=["session"])

    @router.post(
        "",
        summary="Log in (a demo: a name, no password)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": Login.model_json_schema()}},
            }
        },
    )
    async def login(request: Request) -> JSONResponse:
        """A new session (new id; any old one deleted) for ``user``, valid on every worker."""
        body = await read_login(request, headers)
        await begin_session(request, {"user": body.user, "login_at": time.time()})
        return JSONResponse({"user": body.user}, headers=headers)

    @router.get("", summary="Who this session's cookie belongs to")
    async def whoami(request: Request) -> JSONResponse:
        """200 ``{"user"}`` on any worker or pod; 401 without a live session."""
        data = await session_data(request)
        if not data or not isinstance(data.get("user"), str):
            return JSONResponse(
                {"detail": "no live session: log in with POST /api/session"},
                status_code=401,
                headers=headers,
            )
        return JSONResponse({"user": data["user"]}, headers=headers)

    @router.delete("", status_code=204, summary="Log out everywhere")
    async def logout(request: Request) -> Response:
        """204: the session is deleted from Redis; no worker accepts its cookie afterwards."""
        response = Response(status_code=204, headers=headers)
        await end_session(request, response)
        return response

    return router

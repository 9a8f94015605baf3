"""HTTP routes for runtime jobs (mounted by :meth:`Coordinator.install`).

- ``POST /api/jobs``: 201 the job; 409 the id is taken, or the runtime job limit
  is reached; 422 unknown task, bad trigger, time zone, run_date, id or
  arguments; 413 arguments too large; 403 denied.
- ``GET /api/jobs/{id}``: 200 the job; 404 unknown; 422 bad id.
- ``DELETE /api/jobs/{id}``: 204; 404 unknown; 409 a job declared in code
  (pause it instead); 403 denied.
- ``POST /api/jobs/{id}/pause``, ``/resume``: 200 the job with ``paused`` set;
  404; 403.
- ``POST /api/jobs/{id}/run``: 202 ``{"job_id", "scheduled_at"}``, one extra run
  now, claimed and recorded like any fire; 404; 403.

(``GET /api/jobs`` and ``GET /api/jobs/runs`` are served by the coordinator's own
router, included first, so ``runs`` is never taken for a job id; runtime job ids
cannot be ``runs``.)

Every 4xx body is ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`` for
input errors (as FastAPI's own validation errors, ``loc`` naming the field, such
as ``["body", "trigger", "run_date"]``), or ``{"detail": "..."}`` otherwise.
Redis unreachable: 503. A ``run_date`` in the past by at most the job's misfire
grace time runs at once; older is a 422 on ``trigger.run_date``.

Authorization: every change (add, remove, pause, resume, run) asks the same hook
as the channel routes, ``authorize(request, job_id, "manage")``, the second
argument being the job's id (for an add, the id asked for, or the generated
one). Reading jobs is not authorized here: put the routes behind your own auth
if job definitions are private.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coordinator.errors import (
    REDIS_UNREACHABLE,
    ConflictingIdError,
    DeclaredJobError,
    InvalidJobError,
    JobArgumentsTooLargeError,
    JobLimitError,
    JobLookupError,
)
from coordinator.scheduler.runtime import RuntimeJobs
from coordinator.web.authz import Authorizer, is_allowed
from coordinator.web.bodies import InvalidJSONError, parse_json, read_body

JobAuthorizer = Authorizer
"""``authorize(request, job_id, "manage") -> bool`` (or an awaitable of one)."""


class JobSpec(BaseModel):
    """``POST /api/jobs`` body."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=128, description="default: generated")
    task: str = Field(..., max_length=128, description="a task registered on every process")
    trigger: dict[str, Any] = Field(
        ..., description='{"type": "date"|"interval"|"cron", ...} (see DESIGN: Runtime jobs)'
    )
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    misfire_grace_time: int | None = Field(None, ge=1, le=604800)
    coalesce: bool = True
    replace: bool = False


_BODY_SLACK = 64 * 1024
"""Bytes a ``POST /api/jobs`` body may hold beyond the arguments' limit."""


def parse_job_spec(raw: bytes) -> JobSpec | list[dict[str, Any]]:
    """The body of ``POST /api/jobs``, or the errors to answer 422 with (``loc`` from
    ``body``). Numbers must be finite: ``NaN``, ``Infinity`` and ``1e999`` are refused."""
    try:
        body = parse_json(raw)
    except InvalidJSONError as exc:
        return [{"loc": ["body"], "msg": str(exc), "type": "json_invalid"}]
    try:
        return JobSpec.model_validate(body)
    except ValidationError as exc:
        return [
            {"loc": ["body", *error["loc"]], "msg": error["msg"], "type": error["type"]}
            for error in exc.errors(include_url=False, include_input=False, include_context=False)
        ]


def _invalid(
    exc: InvalidJobError, headers: dict[str, str], loc: list[str] | None = None
) -> JSONResponse:
    status = 413 if isinstance(exc, JobArgumentsTooLargeError) else 422
    loc = loc or ["body", *exc.field.split(".")]
    detail = [{"loc": loc, "msg": exc.message, "type": type(exc).__name__}]
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _error(status: int, message: str, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def job_router(
    jobs: RuntimeJobs,
    *,
    authorize: JobAuthorizer,
    headers: dict[str, str] | None = None,
) -> APIRouter:
    """Routes to manage runtime jobs (and pause code-declared ones) from any process."""
    router = APIRouter(tags=["jobs"])
    base = dict(headers or {})

    async def denied(request: Request, job_id: str) -> JSONResponse | None:
        if await is_allowed(authorize, request, job_id, "manage"):
            return None
        return _error(403, f"not allowed to manage job {job_id!r}", base)

    async def guarded(call: Callable[[], Awaitable[Any]], ok: int) -> Response:
        try:
            result = await call()
        except InvalidJobError as exc:
            return _invalid(exc, base)
        except JobLookupError as exc:
            return _error(404, str(exc), base)
        except (ConflictingIdError, DeclaredJobError) as exc:
            return _error(409, str(exc), base)
        except JobLimitError as exc:
            return _error(409, str(exc), base)
        except REDIS_UNREACHABLE as exc:
            return _error(503, f"Redis unreachable: {type(exc).__name__}", base)
        if ok == 204:
            return Response(status_code=204, headers=base)
        return JSONResponse(result, status_code=ok, headers=base)

    def checked_id(job_id: str) -> JSONResponse | None:
        try:
            jobs.check_id(job_id)
        except InvalidJobError as exc:
            return _invalid(exc, base, ["path", "job_id"])
        return None

    body_limit = jobs.max_args_bytes * 4 + _BODY_SLACK

    @router.post(
        "/api/jobs",
        status_code=201,
        summary="Add a runtime job (201; 409 id taken; 422 bad task, trigger or arguments)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": JobSpec.model_json_schema()}},
            }
        },
    )
    async def add_job(request: Request) -> Response:
        spec = parse_job_spec(await read_body(request, body_limit, base))
        if isinstance(spec, list):
            return JSONResponse({"detail": spec}, status_code=422, headers=base)
        try:
            job = jobs.build(
                spec.task,
                spec.trigger,
                id=spec.id,
                args=spec.args,
                kwargs=spec.kwargs,
                misfire_grace_time=spec.misfire_grace_time,
                coalesce=spec.coalesce,
            )
        except InvalidJobError as exc:
            return _invalid(exc, base)
        refusal = await denied(request, job.id)
        if refusal is not None:
            return refusal
        return await guarded(
            lambda: jobs.add_job(
                spec.task,
                job.trigger,
                id=job.id,
                args=spec.args,
                kwargs=spec.kwargs,
                misfire_grace_time=spec.misfire_grace_time,
                coalesce=spec.coalesce,
                replace=spec.replace,
            ),
            201,
        )

    @router.get("/api/jobs/{job_id}", summary="One job, code-declared or runtime (404 unknown)")
    async def get_job(job_id: str) -> Response:
        return checked_id(job_id) or await guarded(lambda: jobs.get_job(job_id), 200)

    @router.delete(
        "/api/jobs/{job_id}",
        status_code=204,
        summary="Remove a runtime job (204; 404 unknown; 409 declared in code)",
    )
    async def remove_job(request: Request, job_id: str) -> Response:
        return (
            checked_id(job_id)
            or await denied(request, job_id)
            or await guarded(lambda: jobs.remove_job(job_id), 204)
        )

    @router.post("/api/jobs/{job_id}/pause", summary="Pause a job everywhere (200; 404)")
    async def pause_job(request: Request, job_id: str) -> Response:
        return (
            checked_id(job_id)
            or await denied(request, job_id)
            or await guarded(lambda: jobs.pause_job(job_id), 200)
        )

    @router.post("/api/jobs/{job_id}/resume", summary="Resume a paused job (200; 404)")
    async def resume_job(request: Request, job_id: str) -> Response:
        return (
            checked_id(job_id)
            or await denied(request, job_id)
            or await guarded(lambda: jobs.resume_job(job_id), 200)
        )

    @router.post(
        "/api/jobs/{job_id}/run",
        status_code=202,
        summary="One extra run now, claimed like any fire (202; 404)",
    )
    async def run_job(request: Request, job_id: str) -> Response:
        return (
            checked_id(job_id)
            or await denied(request, job_id)
            or await guarded(lambda: jobs.run_job_now(job_id), 202)
        )

    return router

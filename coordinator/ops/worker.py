"""``coordinator worker MODULE:ATTR``: the jobs of an app, run with no HTTP server.

What it accepts, and why a target can never lead: :data:`WORKER_HELP`.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import signal
import sys
from typing import Annotated, Any

import typer

from coordinator.errors import (
    REDIS_UNREACHABLE,
    ConfigurationError,
)
from coordinator.ops.logs import configure_logging
from coordinator.scheduler.scheduler import LeaderScheduler
from coordinator.settings import CoordinatorSettings
from coordinator.store.connection import redact_url
from coordinator.tasks import cancel_and_wait

WORKER_HELP = """Run the jobs on the elected leader, with no HTTP server.

TARGET is MODULE:ATTR, imported from the current directory as uvicorn does, naming one of:

- a Coordinator, the one your FastAPI app's lifespan uses: it runs as in the lifespan
  (elector, scheduler, relay, presence), without HTTP.
  Example: COORDINATOR_ROLE=worker coordinator worker app.main:coordinator

- a LeaderScheduler (myapp.jobs:scheduler, or app.main:coordinator.scheduler):
  it runs with its elector, which this command starts when the scheduler does not own it.

- a function with no arguments (sync or async) that returns either.

Settings come from REDIS_URL and COORDINATOR_* as usual. A worker that can never
lead (role api, or a TARGET that is not one of the above) exits with the reason;
one that stands by says who leads instead. SIGTERM and SIGINT stop it gracefully:
running jobs finish (up to --drain seconds), the lease is released, and another
process takes over at once.
"""

_TARGET_KINDS = "a Coordinator, a LeaderScheduler, or a function with no arguments returning one"


def _coordinator_class() -> type | None:
    """The Coordinator class if the web layer is loaded (a Coordinator exists only then)."""
    module = sys.modules.get("coordinator.web.coordinator")
    return getattr(module, "Coordinator", None) if module is not None else None


def _is_target(obj: Any) -> bool:
    coordinator_class = _coordinator_class()
    return isinstance(obj, LeaderScheduler) or (
        coordinator_class is not None and isinstance(obj, coordinator_class)
    )


def _suggest(module: Any, module_name: str) -> str:
    """`` (did you mean ...?)`` naming the module's Coordinators and LeaderSchedulers."""
    found = [
        f"{module_name}:{name}"
        for name, value in sorted(vars(module).items())
        if not name.startswith("_") and _is_target(value)
    ]
    return f" (did you mean {' or '.join(found)}?)" if found else ""


def load_scheduler_target(target: str) -> Any:
    """Import ``MODULE:ATTR`` and return the attribute.

    Raises ``ConfigurationError`` when the target is malformed or not found.
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(
            f"worker target {target!r} must look like 'package.module:coordinator' "
            f"(MODULE:ATTR naming {_TARGET_KINDS})"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r} for {target!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigurationError(
                f"{module_name!r} has no attribute {attr!r} ({target!r}); a worker target "
                f"names {_TARGET_KINDS}{_suggest(module, module_name)}"
            )
        obj = getattr(obj, part)
    return obj


def _not_a_target(obj: Any, target: str) -> ConfigurationError:
    kind = type(obj).__name__
    module = sys.modules.get(target.partition(":")[0])
    hint = _suggest(module, target.partition(":")[0]) if module is not None else ""
    if kind == "AsyncIOScheduler" or kind.endswith("Scheduler"):
        why = (
            "a plain APScheduler runs its jobs in every process; declare them on a LeaderScheduler"
        )
    elif kind == "LeaderElector":
        why = "an elector alone runs no jobs; give the LeaderScheduler that uses it"
    elif kind in ("FastAPI", "Starlette"):
        why = "a worker serves no HTTP; give the Coordinator that the app's lifespan uses"
    else:
        why = f"a worker target is {_TARGET_KINDS}"
    what = f"a {kind} app" if kind in ("FastAPI", "Starlette") else f"a {kind}"
    return ConfigurationError(f"{target!r} is {what}, which never leads: {why}{hint}")


async def _resolve(obj: Any, target: str) -> Any:
    """The Coordinator or LeaderScheduler ``obj`` is, or returns when called."""
    if not _is_target(obj) and (inspect.isroutine(obj) or isinstance(obj, functools.partial)):
        try:
            signature = inspect.signature(obj)
            signature.bind()
        except TypeError:
            needed = ", ".join(
                name
                for name, p in signature.parameters.items()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            )
            raise ConfigurationError(
                f"{target!r} is a function that needs arguments ({needed}), which a worker "
                f"cannot give; point at {_TARGET_KINDS}"
            ) from None
        except ValueError:
            pass  # no signature to inspect (a builtin): just call it
        obj = obj()
        if inspect.isawaitable(obj):
            obj = await obj
    if not _is_target(obj):
        raise _not_a_target(obj, target)
    return obj


def _cannot_lead(obj: Any, target: str) -> str | None:
    """Why ``obj`` can never lead, or ``None``."""
    settings: CoordinatorSettings = obj.settings
    if not settings.campaigns:
        return (
            f"{target!r} has role {settings.role!r} (COORDINATOR_ROLE), which never "
            "campaigns or runs jobs; set COORDINATOR_ROLE=worker (or all) for a worker process"
        )
    return None


async def _report_standby(scheduler: LeaderScheduler, where: str) -> None:
    """Once, if this worker does not lead within a lease period, say why."""
    elector = scheduler.elector
    settings = scheduler.settings
    log = logging.getLogger("coordinator.cli")
    try:
        await elector.wait_for_leadership(settings.lease_ttl + settings.retry_period + 1)
        return
    except TimeoutError:
        pass
    try:
        holder = await elector.leader()
    except REDIS_UNREACHABLE as exc:
        log.warning(
            "%s: not leading: Redis at %s is unreachable (%s: %s); check REDIS_URL / "
            "COORDINATOR_REDIS_URL",
            scheduler.instance_id,
            where,
            type(exc).__name__,
            exc,
        )
        return
    if holder is not None and holder.instance_id != scheduler.instance_id:
        log.info(
            "%s: standing by: %s (pid %d on %s) leads election %r in namespace %r; "
            "this worker takes over when it stops",
            scheduler.instance_id,
            holder.instance_id,
            holder.pid,
            holder.hostname,
            elector.name,
            settings.namespace,
        )
    elif not elector.is_leader:
        log.warning(
            "%s: not leading yet and nobody holds election %r in namespace %r at %s; "
            "see the election's warnings above",
            scheduler.instance_id,
            elector.name,
            settings.namespace,
            where,
        )


async def run_worker(target: str, drain: float | None = None) -> None:
    """Run what ``target`` names (see :data:`WORKER_HELP`) until SIGTERM or SIGINT.

    Raises:
        ConfigurationError: the target is not found, is not a Coordinator or a
            LeaderScheduler (or a function returning one), or can never lead.
    """
    obj = await _resolve(load_scheduler_target(target), target)
    reason = _cannot_lead(obj, target)
    if reason is not None:
        raise ConfigurationError(reason)
    scheduler: LeaderScheduler = obj if isinstance(obj, LeaderScheduler) else obj.scheduler
    where = redact_url(scheduler.settings.redis_url)
    log = logging.getLogger("coordinator.cli")
    jobs = len(scheduler.apscheduler.get_jobs())
    if not jobs:
        log.warning(
            "%s: %s declares no jobs: this worker may lead but has nothing to run",
            scheduler.instance_id,
            target,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if isinstance(obj, LeaderScheduler):
        await scheduler.start()
        await scheduler.elector.start()  # idempotent: started already when the scheduler owns it
    else:
        if drain is not None:
            obj.shutdown_timeout = drain
        await obj.start()
    log.info(
        "%s: worker running %s (%d jobs), campaigning for election %r in namespace %r at %s",
        scheduler.instance_id,
        target,
        jobs,
        scheduler.elector.name,
        scheduler.settings.namespace,
        where,
    )
    standby = asyncio.create_task(_report_standby(scheduler, where), name="worker-standby")
    try:
        await stop.wait()
    finally:
        await cancel_and_wait(standby)
        if isinstance(obj, LeaderScheduler):
            await scheduler.stop(timeout=10.0 if drain is None else drain)
            await scheduler.elector.stop()
        else:
            await obj.stop()


def worker(
    target: Annotated[
        str,
        typer.Argument(help="MODULE:ATTR of a Coordinator, a LeaderScheduler, or a factory."),
    ],
    drain: Annotated[
        float | None,
        typer.Option(
            help="Seconds running jobs get to finish on stop; default: the Coordinator's "
            "shutdown_timeout, else 10.",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    try:
        configure_logging(CoordinatorSettings())  # COORDINATOR_LOG_FORMAT, secrets masked
    except ConfigurationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    logging.getLogger().setLevel(log_level.upper())
    if "" not in sys.path:
        sys.path.insert(0, "")  # resolve MODULE from the current directory, as uvicorn does
    try:
        asyncio.run(run_worker(target, drain))
    except ConfigurationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

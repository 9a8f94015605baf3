"""The ``coordinator`` command.

Operator commands read ``REDIS_URL`` / ``COORDINATOR_*`` like the library
(``--redis-url`` and ``--namespace`` override them) and print text, or JSON
with ``--json``: ``status``, ``leader``, ``publish CHANNEL DATA``,
``tail CHANNEL [--last-event-id ID]``, ``runs [--job ID] [--limit N]`` and
``dev`` (the demo with a private Redis). Errors are one ``error: ...`` line on
stderr and a non-zero exit (2: bad input or settings, 1: Redis unreachable or
refused); never a traceback, never a password.

``coordinator worker MODULE:ATTR`` runs a :class:`~coordinator.LeaderScheduler`
with no HTTP server (the "separate worker process" deployment). ``ATTR`` is a
``LeaderScheduler``, or a callable (sync or async, no arguments) that returns
one. Settings come from ``COORDINATOR_*`` variables as usual. SIGTERM and SIGINT
stop it gracefully: running jobs finish (up to ``--drain``), the lease is
released, and another process takes over at once.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import cli_render as render
from .connection import create_redis, redact_url
from .errors import ConfigurationError, CoordinatorError
from .logs import configure_logging
from .scheduler import LeaderScheduler
from .settings import CoordinatorSettings

T = TypeVar("T")

app = typer.Typer(
    help="coordinator: leader election, scheduling and event relay over Redis.",
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """coordinator commands."""


def load_scheduler_target(target: str) -> Any:
    """Import ``MODULE:ATTR`` and return the attribute.

    Raises ``ConfigurationError`` when the target is malformed or not found.
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(
            f"worker target {target!r} must look like 'package.module:scheduler'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r} for {target!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigurationError(f"{module_name!r} has no attribute {attr!r} ({target!r})")
        obj = getattr(obj, part)
    return obj


async def _resolve(obj: Any, target: str) -> LeaderScheduler:
    if not isinstance(obj, LeaderScheduler) and callable(obj):
        obj = obj()
        if inspect.isawaitable(obj):
            obj = await obj
    if not isinstance(obj, LeaderScheduler):
        raise ConfigurationError(
            f"{target!r} is a {type(obj).__name__}, not a LeaderScheduler or a callable "
            "returning one"
        )
    return obj


async def run_worker(target: str, drain: float = 10.0) -> None:
    """Run the scheduler named by ``target`` until SIGTERM or SIGINT."""
    scheduler = await _resolve(load_scheduler_target(target), target)
    if not scheduler.settings.campaigns:
        raise ConfigurationError(
            f"COORDINATOR_ROLE is {scheduler.settings.role!r}, which never runs jobs; "
            "set COORDINATOR_ROLE=worker (or all) for a worker process"
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await scheduler.start()
    logging.getLogger("coordinator.cli").info(
        "%s: worker running %s (%d jobs)",
        scheduler.instance_id,
        target,
        len(scheduler.apscheduler.get_jobs()),
    )
    try:
        await stop.wait()
    finally:
        await scheduler.stop(timeout=drain)


@app.command()
def worker(
    target: Annotated[str, typer.Argument(help="MODULE:ATTR of a LeaderScheduler or a factory.")],
    drain: Annotated[
        float, typer.Option(help="Seconds running jobs get to finish on stop.")
    ] = 10.0,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Run the scheduler's jobs on the elected leader, with no HTTP server."""
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


# -- operator commands -------------------------------------------------------------
RedisUrl = Annotated[str | None, typer.Option(
    "--redis-url", help="Redis URL; default REDIS_URL / COORDINATOR_REDIS_URL.",
    show_default=False)]
Namespace = Annotated[str | None, typer.Option(
    "--namespace", "-n", help="Key namespace; default COORDINATOR_NAMESPACE.", show_default=False)]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _settings(redis_url: str | None, namespace: str | None) -> CoordinatorSettings:
    overrides: dict[str, object] = {}
    if redis_url:
        overrides["redis_url"] = redis_url
    if namespace:
        overrides["namespace"] = namespace
    try:
        return CoordinatorSettings(**overrides)
    except ConfigurationError as exc:
        raise _fail(str(exc), 2) from None


def _run(settings: CoordinatorSettings, work: Callable[[Redis], Awaitable[T]]) -> T:
    """Run ``work(redis)`` with a client for ``settings``; errors become clear exits."""

    async def main() -> T:
        redis = create_redis(settings.redis_url, socket_timeout=10)
        try:
            return await work(redis)
        finally:
            await redis.aclose()

    where = redact_url(settings.redis_url)
    try:
        return asyncio.run(main())
    except CoordinatorError as exc:  # bad input (ValueError) or Redis unavailable
        raise _fail(str(exc), 2 if isinstance(exc, ValueError) else 1) from None
    except (RedisError, OSError, TimeoutError) as exc:
        detail = str(exc) or type(exc).__name__
        raise _fail(f"Redis at {where}: {type(exc).__name__}: {detail}") from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _print(obj: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    typer.echo(json.dumps(obj, default=str) if as_json else text(obj))


@app.command()
def status(redis_url: RedisUrl = None, namespace: Namespace = None, json_: AsJson = False) -> None:
    """Leader, term, TTL left, instances seen recently, channels and their history."""
    from .status import cluster_status

    conf = _settings(redis_url, namespace)
    _print(_run(conf, lambda r: cluster_status(r, conf)), json_, render.status)


@app.command()
def leader(redis_url: RedisUrl = None, namespace: Namespace = None, json_: AsJson = False) -> None:
    """Who leads now (as GET /api/leader answers)."""
    from .keys import Keys
    from .lease import read_leader

    conf = _settings(redis_url, namespace)

    async def work(redis: Redis) -> dict[str, Any]:
        info = await read_leader(redis, Keys(conf.namespace), conf.election_name)
        return {"leader": info.as_dict() if info else None}

    _print(_run(conf, work), json_, lambda o: render.leader(o["leader"]))


@app.command()
def publish(
    channel: Annotated[str, typer.Argument(help="Channel name.")],
    data: Annotated[str, typer.Argument(help="JSON value; other text is sent as a string.")],
    event: Annotated[str, typer.Option(help="SSE event name.")] = "message",
    redis_url: RedisUrl = None, namespace: Namespace = None, json_: AsJson = False,
) -> None:  # fmt: skip
    """Publish one event to every subscriber of CHANNEL; prints its id."""
    from .relay import EventRelay

    conf = _settings(redis_url, namespace)
    try:
        value: Any = json.loads(data)
    except ValueError:
        value = data

    async def work(redis: Redis) -> str:
        return await EventRelay(conf, redis).publish(channel, value, event=event)

    _print({"id": _run(conf, work)}, json_, lambda o: str(o["id"]))


@app.command()
def tail(
    channel: Annotated[str, typer.Argument(help="Channel name.")],
    last_event_id: Annotated[str | None, typer.Option(
        "--last-event-id", help="Replay retained events after this id first.")] = None,
    count: Annotated[int, typer.Option(help="Exit after this many events; 0: never.")] = 0,
    redis_url: RedisUrl = None, namespace: Namespace = None, json_: AsJson = False,
) -> None:  # fmt: skip
    """Print CHANNEL's events as they arrive (after a replay with --last-event-id)."""
    from .tail import follow

    conf = _settings(redis_url, namespace)

    def show(event: dict[str, Any]) -> None:
        _print(event, json_, render.event)
        sys.stdout.flush()

    _run(conf, lambda redis: follow(conf, redis, channel, last_event_id, count, show))


@app.command()
def runs(
    job: Annotated[str | None, typer.Option("--job", help="Only this job id.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many runs.")] = 20,
    redis_url: RedisUrl = None, namespace: Namespace = None, json_: AsJson = False,
) -> None:  # fmt: skip
    """Recent job runs, newest first."""
    from .keys import Keys
    from .runs import RunHistory

    conf = _settings(redis_url, namespace)

    async def work(redis: Redis) -> list[dict[str, Any]]:
        history = RunHistory(redis, Keys(conf.namespace), conf.job_history)
        return [r.as_dict() for r in await history.recent(limit, job)]

    _print({"runs": _run(conf, work)}, json_, lambda o: render.runs(o["runs"]))


@app.command()
def dev(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 4,
) -> None:
    """Run the demo service (uvicorn app.main:app) with a private Redis if REDIS_URL is unset."""
    try:
        from app.dev import main as run_demo
    except ImportError as exc:
        raise _fail(f"the demo app is not importable ({exc})") from None
    code = run_demo(["--host", host, "--port", str(port), "--workers", str(workers)])
    raise typer.Exit(code)


def main() -> None:
    """Console script entry point (``coordinator``)."""
    app()


if __name__ == "__main__":
    main()

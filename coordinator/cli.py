"""The ``coordinator`` command.

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
import logging
import signal
import sys
from typing import Annotated, Any

import typer

from .errors import ConfigurationError
from .scheduler import LeaderScheduler

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
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if "" not in sys.path:
        sys.path.insert(0, "")  # resolve MODULE from the current directory, as uvicorn does
    try:
        asyncio.run(run_worker(target, drain))
    except ConfigurationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def main() -> None:
    """Console script entry point (``coordinator``)."""
    app()


if __name__ == "__main__":
    main()

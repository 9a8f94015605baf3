"""The ``coordinator`` command.

Operator commands read ``REDIS_URL`` / ``COORDINATOR_*`` like the library
(``--redis-url`` and ``--namespace`` override them) and print text, or JSON
with ``--json``: ``status``, ``leader``, ``publish CHANNEL DATA``,
``tail CHANNEL [--last-event-id ID]``, ``runs [--job ID] [--limit N]``,
``jobs ...`` and ``state list|get KEY|set KEY VALUE [--version N]``.
``status`` says which Redis it asked (``redis``: the URL with its password masked,
and where it came from: ``--redis-url``, ``COORDINATOR_REDIS_URL``, ``REDIS_URL`` or the default).
Errors are one ``error: ...`` line on stderr and a non-zero exit (2: bad input
or settings, 1: Redis unreachable or refused, naming that Redis and the setting
to check); never a traceback, never a password.

``coordinator worker MODULE:ATTR`` runs the jobs with no HTTP server (the
"separate worker process" deployment): see :data:`WORKER_HELP`.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from coordinator.ops import render
from coordinator.ops.cli_support import (
    AsJson,
    Namespace,
    RedisUrl,
    emit,
    json_or_text,
    run,
    target_settings,
)
from coordinator.ops.jobs_cli import jobs_app
from coordinator.ops.state_cli import state_app
from coordinator.ops.worker import WORKER_HELP, worker
from coordinator.store.connection import RedisClient

app = typer.Typer(
    help="coordinator: leader election, scheduling and event relay over Redis.",
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """coordinator commands."""


app.command(help=WORKER_HELP)(worker)
app.add_typer(jobs_app, name="jobs")
app.add_typer(state_app, name="state")


@app.command()
def status(redis_url: RedisUrl = None, namespace: Namespace = None, json_: AsJson = False) -> None:
    """Leader, term, TTL left, instances seen recently, channels and their history."""
    from coordinator.ops.status import cluster_status

    target = target_settings(redis_url, namespace)

    async def work(redis: RedisClient) -> dict[str, Any]:
        return {"redis": target.redis, **await cluster_status(redis, target.settings)}

    emit(run(target, work), json_, render.status)


@app.command()
def leader(redis_url: RedisUrl = None, namespace: Namespace = None, json_: AsJson = False) -> None:
    """Who leads now (as GET /api/leader answers)."""
    from coordinator.election.lease import read_leader
    from coordinator.store.keys import Keys

    target = target_settings(redis_url, namespace)
    conf = target.settings

    async def work(redis: RedisClient) -> dict[str, Any]:
        info = await read_leader(redis, Keys(conf.namespace), conf.election_name)
        return {"leader": info.as_dict() if info else None}

    emit(run(target, work), json_, lambda o: render.leader(o["leader"]))


@app.command()
def publish(
    channel: Annotated[str, typer.Argument(help="Channel name.")],
    data: Annotated[str, typer.Argument(help="JSON value; other text is sent as a string.")],
    event: Annotated[str, typer.Option(help="SSE event name.")] = "message",
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    json_: AsJson = False,
) -> None:
    """Publish one event to every subscriber of CHANNEL; prints its id."""
    from coordinator.relay.relay import EventRelay

    target = target_settings(redis_url, namespace)
    conf = target.settings
    value = json_or_text(data)

    async def work(redis: RedisClient) -> str:
        return await EventRelay(conf, redis).publish(channel, value, event=event)

    emit({"id": run(target, work)}, json_, lambda o: str(o["id"]))


@app.command()
def tail(
    channel: Annotated[str, typer.Argument(help="Channel name.")],
    last_event_id: Annotated[
        str | None,
        typer.Option("--last-event-id", help="Replay retained events after this id first."),
    ] = None,
    count: Annotated[int, typer.Option(help="Exit after this many events; 0: never.")] = 0,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    json_: AsJson = False,
) -> None:
    """Print CHANNEL's events as they arrive (after a replay with --last-event-id)."""
    from coordinator.ops.tail import follow

    target = target_settings(redis_url, namespace)
    conf = target.settings

    def show(event: dict[str, Any]) -> None:
        emit(event, json_, render.event)
        sys.stdout.flush()

    run(target, lambda redis: follow(conf, redis, channel, last_event_id, count, show))


@app.command()
def runs(
    job: Annotated[str | None, typer.Option("--job", help="Only this job id.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many runs.")] = 20,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    json_: AsJson = False,
) -> None:
    """Recent job runs, newest first."""
    from coordinator.scheduler.runs import RunHistory
    from coordinator.store.keys import Keys

    target = target_settings(redis_url, namespace)
    conf = target.settings

    async def work(redis: RedisClient) -> list[dict[str, Any]]:
        history = RunHistory(redis, Keys(conf.namespace), conf.job_history)
        return [r.as_dict() for r in await history.recent(limit, job)]

    emit({"runs": run(target, work)}, json_, lambda o: render.runs(o["runs"]))


def main() -> None:
    """Console script entry point (``coordinator``)."""
    app()


if __name__ == "__main__":
    main()

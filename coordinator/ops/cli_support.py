"""What every ``coordinator`` subcommand shares: the Redis and namespace options,
settings from them, one way to run a command against Redis, and one way to print.

Errors become one ``error: ...`` line on stderr and a non-zero exit (2: bad input or
settings; 1: Redis unreachable or refused, naming that Redis and where its URL came from).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

from coordinator.errors import (
    REDIS_UNREACHABLE,
    ConfigurationError,
    CoordinatorError,
    RedisUnavailableError,
)
from coordinator.ops import render
from coordinator.settings import CoordinatorSettings
from coordinator.store.connection import RedisClient, create_client, redact_url

T = TypeVar("T")

RedisUrl = Annotated[
    str | None,
    typer.Option(
        "--redis-url",
        help="Redis URL; default REDIS_URL / COORDINATOR_REDIS_URL.",
        show_default=False,
    ),
]
Namespace = Annotated[
    str | None,
    typer.Option(
        "--namespace",
        "-n",
        help="Key namespace; default COORDINATOR_NAMESPACE.",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@dataclass(frozen=True)
class Target:
    """The settings of an operator command, and where its Redis URL came from."""

    settings: CoordinatorSettings
    source: str
    """``--redis-url``, ``COORDINATOR_REDIS_URL``, ``REDIS_URL`` or ``default``."""

    @property
    def redis(self) -> dict[str, str]:
        """Which Redis, safe to print: ``{"url": <password masked>, "source": ...}``."""
        return {"url": redact_url(self.settings.redis_url), "source": self.source}


def redis_source(option: str | None) -> str:
    """Where the Redis URL comes from, in the order the settings read it."""
    if option:
        return "--redis-url"
    present = {name.upper() for name, value in os.environ.items() if value}
    for name in ("COORDINATOR_REDIS_URL", "REDIS_URL"):
        if name in present:
            return name
    return "default"


def target_settings(redis_url: str | None, namespace: str | None) -> Target:
    overrides: dict[str, object] = {}
    if redis_url:
        overrides["redis_url"] = redis_url
    if namespace:
        overrides["namespace"] = namespace
    try:
        return Target(CoordinatorSettings(**overrides), redis_source(redis_url))
    except ConfigurationError as exc:
        raise fail(str(exc), 2) from None


def run(target: Target, work: Callable[[RedisClient], Awaitable[T]]) -> T:
    """Run ``work(redis)`` with a client for ``target`` once Redis answers a PING;
    errors become one line naming the Redis asked and a non-zero exit."""

    async def main() -> T:
        redis = create_client(target.settings.redis_url, socket_timeout=10)
        try:
            await redis.ping()  # "unreachable" up front, before any work half-starts
            return await work(redis)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(main())
    except RedisUnavailableError as exc:
        raise fail(f"Redis at {render.redis_where(target.redis)}: {exc}") from None
    except CoordinatorError as exc:  # bad input
        raise fail(str(exc), 2 if isinstance(exc, ValueError) else 1) from None
    except REDIS_UNREACHABLE as exc:
        raise fail(render.redis_failure(target.redis, exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def emit(obj: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    typer.echo(json.dumps(obj, default=str) if as_json else text(obj))


def json_or_text(value: str) -> Any:
    """A command-line value as JSON when it parses, else as the text itself."""
    try:
        return json.loads(value)
    except ValueError:
        return value

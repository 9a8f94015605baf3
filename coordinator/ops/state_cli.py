"""``coordinator state list|get|set``: shared runtime state from a shell.

Each command talks to Redis only (no server needed). ``set`` writes exactly as a
process does (one compare-and-set script that announces the change), so every
running process holds the new value within milliseconds. ``get`` and ``list``
read Redis, the source every process reloads from. ``--json`` prints JSON.

Exit codes as the other commands: 2 for bad input (a key name, a version, a value
too large), 1 when Redis is unreachable, the key does not exist (``get``), or the
version given to ``set --version`` is not the current one.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from coordinator.errors import InvalidStateError
from coordinator.ops.cli_support import (
    AsJson,
    Namespace,
    RedisUrl,
    emit,
    fail,
    json_or_text,
    run,
    target_settings,
)
from coordinator.state import values
from coordinator.store.connection import RedisClient
from coordinator.store.keys import Keys

state_app = typer.Typer(help="Shared runtime state: list, get, set (compare-and-set).")

_SHOWN = 60
"""Characters of a value shown per line by ``list``."""


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _entries(raw: dict[str, bytes]) -> list[dict[str, Any]]:
    out = []
    for key in sorted(raw):
        try:
            entry = values.decode_stored(key, raw[key])
        except ValueError:
            continue
        out.append(entry.as_dict())
    return out


def _list_text(body: dict[str, Any]) -> str:
    if not body["state"]:
        return "no shared state in this namespace"
    width = max(len(e["key"]) for e in body["state"])
    lines = []
    for entry in body["state"]:
        shown = _compact(entry["value"])
        if len(shown) > _SHOWN:
            shown = shown[: _SHOWN - 1] + "…"
        lines.append(f"{entry['key']:<{width}}  v{entry['version']:<5} {shown}")
    return "\n".join(lines)


@state_app.command("list")
def list_(redis_url: RedisUrl = None, namespace: Namespace = None, json_: AsJson = False) -> None:
    """Every key, its version and value (values cut to one line; --json for all)."""
    target = target_settings(redis_url, namespace)

    async def work(redis: RedisClient) -> dict[str, Any]:
        epoch, raw = await values.read_all(redis, Keys(target.settings.namespace))
        return {"epoch": epoch, "state": _entries(raw)}

    emit(run(target, work), json_, _list_text)


@state_app.command()
def get(
    key: Annotated[str, typer.Argument(help="The state key.")],
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    json_: AsJson = False,
) -> None:
    """One key's value (JSON) and version."""
    try:
        values.check_key(key)
    except InvalidStateError as exc:
        raise fail(str(exc), 2) from None
    target = target_settings(redis_url, namespace)

    async def work(redis: RedisClient) -> bytes | None:
        raw = await redis.hget(Keys(target.settings.namespace).state(), key)
        return raw.encode() if isinstance(raw, str) else raw

    raw = run(target, work)
    if raw is None:
        raise fail(f"no state key {key!r} in namespace {target.settings.namespace!r}")
    entry = values.decode_stored(key, raw)
    emit(
        entry.as_dict(),
        json_,
        lambda o: (
            f"{json.dumps(o['value'], indent=2, ensure_ascii=False)}\n(version {o['version']})"
        ),
    )


@state_app.command("set")
def set_(
    key: Annotated[str, typer.Argument(help="The state key.")],
    value: Annotated[str, typer.Argument(help="JSON value; other text is stored as a string.")],
    version: Annotated[
        int | None,
        typer.Option(
            "--version",
            help="Only if the key is at this version now (0: only if it does not exist).",
            show_default=False,
        ),
    ] = None,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    json_: AsJson = False,
) -> None:
    """Set KEY to VALUE on every process (with --version: compare-and-set)."""
    target = target_settings(redis_url, namespace)
    conf = target.settings
    parsed = json_or_text(value)
    try:
        values.check_key(key)
        if version is not None:
            values.check_version(version)
        encoded = values.encode_value(parsed, conf.state_max_value_bytes)
    except InvalidStateError as exc:
        raise fail(str(exc), 2) from None

    async def work(redis: RedisClient) -> dict[str, Any]:
        number, _ = await values.write(redis, conf, key, encoded, version)
        return {"key": key, "value": json.loads(encoded), "version": number}

    emit(
        run(target, work),
        json_,
        lambda o: f"{o['key']} = {_compact(o['value'])} (version {o['version']})",
    )

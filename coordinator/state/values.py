"""Shared-state values in Redis: the encoding, the change message, one read and one write.

Stored in one hash per namespace (:meth:`Keys.state`): each field is a key, each
value ``"<version>\\n<compact JSON>"``; the field ``~epoch`` names the hash's
lifetime (a new one after data loss). A change is announced on
:meth:`Keys.state_changes` as ``"1\\n<epoch>\\n<origin>\\n<key>\\n<version>\\n<JSON>"``
(``origin``: the writer's instance id, so a writer knows its own change whichever
of the reply and the announcement it sees first).

Both are used by :class:`~coordinator.state.SharedState` and the CLI, so what
the CLI writes, every process sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, cast

from coordinator.errors import (
    REDIS_UNREACHABLE,
    InvalidStateError,
    RedisUnavailableError,
    StateConflictError,
    StateTooLargeError,
)
from coordinator.settings import CoordinatorSettings, name_error
from coordinator.store.codec import text
from coordinator.store.connection import PrimaryClients, RedisClient
from coordinator.store.keys import Keys
from coordinator.store.scripts import STATE_SET

EPOCH_FIELD = b"~epoch"
MAX_VERSION = 2**53 - 1
"""Versions are exact integers in Redis's Lua (doubles) up to here."""


@dataclass(frozen=True, slots=True)
class StateValue:
    """One key's value as a process holds it. Immutable; ``value`` is shared by every
    reader of this version: treat it as read-only."""

    key: str
    value: Any
    """The JSON value (dict, list, str, int, float, bool or None)."""
    version: int
    """1 for the first value of the key, then one more per change."""

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "value": self.value, "version": self.version}


@dataclass(frozen=True, slots=True)
class StateChange:
    """What a watcher receives: ``key`` changed from ``previous_version`` to ``current``."""

    key: str
    current: StateValue | None
    """The new value; ``None`` when a reload found the key gone (Redis lost its data)."""
    previous_version: int
    """The version this process held before (0: none)."""
    source: Literal["local", "remote", "reload"]
    """``local``: written by this process; ``remote``: written by another process or
    tool, heard over Pub/Sub; ``reload``: found by a full reload (after a reconnect or
    a new epoch)."""
    origin: str = ""
    """The writer's instance id (empty for ``reload``)."""


@dataclass(frozen=True, slots=True)
class ChangeMessage:
    """One decoded change announcement."""

    epoch: str
    origin: str
    key: str
    version: int
    value_json: bytes


def check_key(key: object) -> str:
    """``key`` if it is a valid state key (the channel-name rule), else ``InvalidStateError``."""
    problem = name_error("state key", key)
    if problem is not None:
        raise InvalidStateError(problem)
    assert isinstance(key, str)
    return key


def check_version(version: object) -> int:
    """``version`` if it is an int in ``0..2**53-1`` (not a bool), else ``InvalidStateError``."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidStateError(f"version must be an integer, not {type(version).__name__}")
    if not 0 <= version <= MAX_VERSION:
        raise InvalidStateError(f"version must be between 0 and {MAX_VERSION}, not {version}")
    return version


def encode_value(value: Any, max_bytes: int) -> str:
    """``value`` as compact JSON text.

    Raises:
        InvalidStateError: not JSON-serialisable (NaN, a set, a lone surrogate, too deep).
        StateTooLargeError: over ``max_bytes`` encoded (UTF-8).
    """
    try:
        encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        size = len(encoded.encode("utf-8"))
    except (TypeError, ValueError) as exc:
        raise InvalidStateError(f"value is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidStateError("value is nested too deeply") from None
    if size > max_bytes:
        raise StateTooLargeError(
            f"value is {size} bytes encoded, over the limit of {max_bytes} bytes "
            "(COORDINATOR_STATE_MAX_VALUE_BYTES)",
            size,
            max_bytes,
        )
    return encoded


def decode_stored(key: str, raw: bytes) -> StateValue:
    """A hash field's value (``b"<version>\\n<json>"``) as a :class:`StateValue`.

    Raises:
        ValueError: the stored bytes are not of that form.
    """
    version, sep, data = raw.partition(b"\n")
    if not sep or not version.isdigit():
        raise ValueError(f"state key {key!r} holds {raw[:40]!r}, not '<version>\\n<json>'")
    return StateValue(key, json.loads(data), int(version))


def decode_message(data: bytes) -> ChangeMessage:
    """A change announcement. Raises ``ValueError`` when it is not one."""
    parts = data.split(b"\n", 5)
    if len(parts) != 6 or parts[0] != b"1" or not parts[4].isdigit():
        raise ValueError(f"not a state change message: {data[:60]!r}")
    return ChangeMessage(text(parts[1]), text(parts[2]), text(parts[3]), int(parts[4]), parts[5])


def origin_of(settings: CoordinatorSettings) -> str:
    """The origin a write from these settings announces: the instance id, one line."""
    return settings.instance_id.replace("\n", " ").replace("\r", " ")


async def read_all(redis: RedisClient, keys: Keys) -> tuple[str | None, dict[str, bytes]]:
    """The whole state hash in one ``HGETALL``: (epoch or None, raw stored values by key).

    Raises:
        RedisUnavailableError: Redis could not be reached.
    """
    try:
        raw = cast(dict[bytes, bytes], await redis.hgetall(keys.state()))
    except REDIS_UNREACHABLE as exc:
        raise RedisUnavailableError(f"could not read the shared state: {exc}") from exc
    epoch = raw.pop(EPOCH_FIELD, None)
    return (text(epoch) if epoch is not None else None), {text(k): v for k, v in raw.items()}


async def write(
    redis: RedisClient,
    settings: CoordinatorSettings,
    key: str,
    encoded: str,
    version: int | None,
    *,
    primaries: PrimaryClients | None = None,
) -> tuple[int, str]:
    """Compare-and-set ``key`` to ``encoded`` (from :func:`encode_value`); announce it.

    With ``min_replicas`` the write and its ``WAIT`` go through ``primaries`` (on
    Cluster, the state slot's primary; a long-lived caller passes its own, else one is
    opened for this call and closed).

    ``version``: ``None`` sets unconditionally; an int must be the key's current
    version (0: the key must not exist yet). Returns (new version, epoch).

    Raises:
        StateConflictError: ``version`` is not the current one.
        StateTooLargeError: a new key would go over ``state_max_keys``.
        RedisUnavailableError: Redis could not be reached, or (``min_replicas``) the
            write was not confirmed by enough replicas; read the key and retry.
    """
    keys = Keys(settings.namespace)
    args: list[str | int] = [
        key,
        "" if version is None else version,
        encoded,
        settings.state_max_keys,
        keys.state_changes(),
        origin_of(settings),
    ]
    replicas = settings.min_replicas
    owned = primaries is None
    via = primaries if primaries is not None else PrimaryClients(redis, settings.redis_url)
    try:
        if replicas:
            reply, confirmed = await STATE_SET.call_replicated(
                await via.client_for(keys.state()),
                [keys.state()],
                args,
                replicas,
                settings.replica_timeout_ms,
            )
        else:
            reply, confirmed = await STATE_SET(redis, [keys.state()], args), 0
    except REDIS_UNREACHABLE as exc:
        if replicas:
            await via.forget()
        raise RedisUnavailableError(f"could not write state key {key!r}: {exc}") from exc
    finally:
        if owned:
            await via.aclose()
    status, number, epoch = int(reply[0]), int(reply[1]), text(reply[2])
    if status == 0:
        assert version is not None
        raise StateConflictError(key, version, number)
    if status == -1:
        raise StateTooLargeError(
            f"the shared state holds {number} keys, the limit (COORDINATOR_STATE_MAX_KEYS); "
            f"key {key!r} was not created",
            number,
            settings.state_max_keys,
        )
    if confirmed < replicas:
        raise RedisUnavailableError(
            f"state key {key!r} reached the primary but {confirmed} of {replicas} replicas "
            "confirmed it (COORDINATOR_MIN_REPLICAS); a failover may lose it: read and retry"
        )
    return number, epoch

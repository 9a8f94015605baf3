"""SharedState: runtime values every process reads from its own memory.

::

    state = coordinator.state
    flag = state.get("dark-mode")                  # no Redis: a dict lookup
    await state.set("dark-mode", True, version=flag.version if flag else 0)
    changed = await state.wait_for("dark-mode", version=2, timeout=1.0)
    async with state.watch(["dark-mode"]) as changes:
        async for change in changes: ...

How a change travels:

1. :meth:`SharedState.set` runs one Lua script (``store/lua/state_set.lua``):
   compare the expected version, store ``"<version>\\n<JSON>"`` in the
   namespace's state hash, and ``PUBLISH`` the change, atomically.
2. Every process hears it on its relay's one Pub/Sub connection (a
   :class:`~coordinator.relay.watchers.ChannelWatcher`: the relay's listener
   already supervises, pings, reconnects and reports readiness; a second
   listener would duplicate all of it) and applies it if it is newer than what
   it holds.
3. Reads are dict lookups in the process.

Guarantees:

- Compare-and-set: ``set(key, value, version=n)`` succeeds only if the key is
  at version ``n`` (0: absent) at that instant in Redis. Of concurrent writers
  of one version exactly one wins; the others get :class:`StateConflictError`.
- Per key, a process only moves forward: a change is applied only when its
  version is newer than the one held. The writer sees its own write at once.
- Staleness is said, never hidden: from the moment this process's listener
  loses Redis until it has resubscribed *and* reloaded the whole hash,
  :attr:`stale` is true and :attr:`status` says why. A value served while
  :attr:`stale` is false is at least as new as what Redis held when this
  process resubscribed (messages that race the reload are held and applied
  after it, by version).
- Data loss in Redis (a restart without persistence, ``FLUSHALL``, a failover
  to a replica that missed writes) starts a new *epoch* with the next write;
  every process that sees a new epoch reloads instead of ignoring versions
  that restarted from 1.

Limits, said plainly:

- While stale, reads return the last value this process knew, flagged; the
  caller decides whether that is good enough.
- Every process holds every key: at most ``state_max_keys`` values of at most
  ``state_max_value_bytes`` each. It is for flags and small configuration, not
  a database.
- Values are shared objects: treat what :meth:`get` returns as read-only.
- Keys are never deleted (versions must keep increasing); set ``None`` instead.
- Writes need Redis (and fail with :class:`RedisUnavailableError` without it);
  reads never do. Not thread-safe: use it from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

from redis.backoff import FullJitterBackoff

from coordinator.errors import RedisUnavailableError, StateConflictError
from coordinator.relay.relay import EventRelay
from coordinator.settings import CoordinatorSettings
from coordinator.state import values
from coordinator.state.values import ChangeMessage, StateChange, StateValue
from coordinator.state.views import StateWatch, TypedKey
from coordinator.store.connection import PrimaryClients, RedisClient
from coordinator.store.keys import Keys
from coordinator.tasks import cancel_and_wait

logger = logging.getLogger("coordinator.state")

T = TypeVar("T")

RELOAD_TIMEOUT_S = 5.0
"""How long one reload (``HGETALL``) may take before it is retried."""


class SharedState:
    """This process's copy of the namespace's shared state, kept current over Pub/Sub.

    Args:
        settings: namespace, limits (``state_max_keys``, ``state_max_value_bytes``).
        redis: the client for writes and reloads (not closed by this object).
        relay: the relay whose listener carries the change announcements; this
            registers on it, so it must be made before ``relay.start()``.

    Until the relay's listener first subscribes and the first reload completes,
    the state is empty and :attr:`stale`.
    """

    def __init__(
        self, settings: CoordinatorSettings, redis: RedisClient, relay: EventRelay
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self._redis = redis
        self._primaries = PrimaryClients(redis, settings.redis_url)  # min_replicas writes
        self._origin = values.origin_of(settings)
        self._values: dict[str, StateValue] = {}
        self._epoch: str | None = None
        self._pending: list[ChangeMessage] | None = []
        """Changes heard while stale, applied after the reload; ``None`` while fresh."""
        self._stale_reason: str | None = "not started"
        self._generation = 0
        self._reload_task: asyncio.Task[None] | None = None
        self._tick = asyncio.Event()
        self._watches: set[StateWatch] = set()
        self.reloads = 0
        """Full reloads done (after each (re)subscribe, and each new epoch)."""
        relay.watch(self.keys.state_changes(), self)

    # -- reading (memory only) ------------------------------------------------------
    def get(self, key: str) -> StateValue | None:
        """The value of ``key`` this process holds, or ``None``. No I/O."""
        return self._values.get(key)

    def value(self, key: str, default: Any = None) -> Any:
        """The JSON value of ``key``, or ``default``. No I/O."""
        entry = self._values.get(key)
        return default if entry is None else entry.value

    def items(self) -> dict[str, StateValue]:
        """Every key this process holds (a new dict; the values are shared)."""
        return dict(self._values)

    def typed(self, key: str, type_: type[T] | Any) -> TypedKey[T]:
        """A typed view of ``key``: values are validated as ``type_`` (a pydantic model,
        a dataclass, ``dict[str, bool]``...) on read and dumped as JSON on write."""
        return TypedKey(self, values.check_key(key), type_)

    @property
    def stale(self) -> bool:
        """True while this process may have missed changes (see the module doc)."""
        return self._stale_reason is not None

    @property
    def status(self) -> str:
        """``"fresh"``, or ``"stale: <why>"``."""
        return "fresh" if self._stale_reason is None else f"stale: {self._stale_reason}"

    @property
    def epoch(self) -> str | None:
        """The epoch of the data this process holds (``None`` before the first write)."""
        return self._epoch

    # -- writing --------------------------------------------------------------------
    async def set(self, key: str, value: Any, version: int | None = None) -> StateValue:
        """Set ``key`` to the JSON ``value``; with ``version``, only if the key is at that
        version now (0: only if it does not exist). Returns the new value, which this
        process holds from now on; every other process has it within milliseconds.

        Raises:
            InvalidStateError: bad key name, bad version, or a value that is not JSON.
            StateTooLargeError: value over ``state_max_value_bytes``, or a new key
                over ``state_max_keys``.
            StateConflictError: ``version`` is not the current one (``.current`` has it).
            RedisUnavailableError: Redis could not be reached; nothing was written.
        """
        values.check_key(key)
        if version is not None:
            values.check_version(version)
        encoded = values.encode_value(value, self.settings.state_max_value_bytes)
        number, epoch = await values.write(
            self._redis, self.settings, key, encoded, version, primaries=self._primaries
        )
        message = ChangeMessage(epoch, self._origin, key, number, encoded.encode("utf-8"))
        if self._pending is not None:
            self._pending.append(message)  # a reload is under way: it applies it after
        else:
            self._apply(message)
        held = self._values.get(key)
        return (
            held
            if held is not None and held.version == number
            else StateValue(key, json.loads(encoded), number)
        )

    async def update(
        self,
        key: str,
        change: Callable[[Any], Any],
        *,
        attempts: int = 50,
        timeout: float = 5.0,
    ) -> StateValue:
        """Compare-and-set loop: ``change(current JSON value or None)`` gives the new
        value, written against the version it was computed from; on a conflict, waits
        until this process holds the winning version and tries again.

        Raises:
            StateConflictError: still conflicting after ``attempts`` tries.
            and what :meth:`set` raises.
        """
        for attempt in range(1, attempts + 1):
            entry = self._values.get(key)
            version = entry.version if entry else 0
            try:
                return await self.set(key, change(entry.value if entry else None), version)
            except StateConflictError as conflict:
                if attempt >= attempts:
                    raise
                with contextlib.suppress(TimeoutError):
                    await self.wait_for(key, conflict.current, timeout)
        raise ValueError(f"attempts must be at least 1, not {attempts}")

    # -- waiting ----------------------------------------------------------------------
    async def wait_for(self, key: str, version: int, timeout: float | None = None) -> StateValue:
        """Wait until this process holds ``key`` at ``version`` or newer; return it.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while True:
                entry = self._values.get(key)
                if entry is not None and entry.version >= version:
                    return entry
                await self._tick.wait()

    async def wait_fresh(self, timeout: float | None = None) -> None:
        """Wait until :attr:`stale` is false. Raises ``TimeoutError`` after ``timeout`` s."""
        async with asyncio.timeout(timeout):
            while self._stale_reason is not None:
                await self._tick.wait()

    def watch(self, keys: Iterable[str] | None = None, max_queued: int = 1000) -> StateWatch:
        """Changes of ``keys`` (all keys when ``None``) from now on, as an async iterator;
        use it as ``async with state.watch([...]) as changes: async for c in changes``.

        A watcher that falls ``max_queued`` changes behind loses them and gets one
        :class:`StateChange` with key ``"*"`` and ``current=None`` instead: re-read
        what it needs with :meth:`get`.
        """
        return StateWatch(self, None if keys is None else frozenset(keys), max_queued)

    # -- lifecycle --------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop reloading (the relay's stop ends the listener). Idempotent."""
        self._generation += 1
        await cancel_and_wait(self._reload_task, name="state-reload")
        self._reload_task = None
        if self._stale_reason is None:
            self._mark_stale("stopped")
        for watch in list(self._watches):
            watch.close()
        await self._primaries.aclose()

    # -- the relay's ChannelWatcher -----------------------------------------------------
    def subscribed(self) -> None:
        """The listener is subscribed: reload everything (changes meanwhile are held)."""
        self._start_reload()

    def _start_reload(self) -> None:
        self._generation += 1
        if self._reload_task is not None:
            self._reload_task.cancel()
        if self._pending is None:
            self._pending = []
        self._stale_reason = "reloading"
        self._reload_task = asyncio.create_task(
            self._reload(self._generation), name="coordinator-state-reload"
        )

    def message(self, data: bytes) -> None:
        try:
            change = values.decode_message(data)
        except ValueError as exc:
            logger.warning("shared state ignored a message: %s", exc)
            return
        if self._pending is not None:
            self._pending.append(change)
        else:
            self._apply(change)

    def lost(self, reason: str) -> None:
        """The listener lost Redis: stale until the next reload completes."""
        self._generation += 1
        if self._reload_task is not None:
            self._reload_task.cancel()
            self._reload_task = None
        self._mark_stale(f"listener down ({reason})")

    # -- internals ----------------------------------------------------------------------
    def _mark_stale(self, reason: str) -> None:
        if self._pending is None:
            self._pending = []
        self._stale_reason = reason
        self._changed()

    def _apply(self, change: ChangeMessage) -> None:
        if change.epoch != self._epoch:
            if self._epoch is None and not self._values:
                self._epoch = change.epoch  # the first write ever: nothing to reload
            else:
                logger.warning(
                    "shared state of %s: new epoch %s (Redis lost its data); reloading",
                    self.settings.instance_id,
                    change.epoch,
                )
                self._start_reload()  # under the same listener subscription
                assert self._pending is not None
                self._pending.append(change)
                return
        held = self._values.get(change.key)
        if held is not None and held.version >= change.version:
            return
        try:
            entry = StateValue(change.key, json.loads(change.value_json), change.version)
        except ValueError:
            logger.warning("shared state ignored a bad value for %r", change.key)
            return
        self._values[change.key] = entry
        source: Literal["local", "remote"] = "local" if change.origin == self._origin else "remote"
        previous = held.version if held else 0
        self._publish(StateChange(change.key, entry, previous, source, change.origin))
        self._changed()

    async def _reload(self, generation: int) -> None:
        backoff = FullJitterBackoff(cap=self.settings.backoff_max_ms / 1000, base=0.05)
        failures = 0
        while generation == self._generation:
            try:
                async with asyncio.timeout(RELOAD_TIMEOUT_S):
                    epoch, raw = await values.read_all(self._redis, self.keys)
            except (RedisUnavailableError, TimeoutError) as exc:
                failures += 1
                self._stale_reason = f"reload failed ({exc}); retrying"
                await asyncio.sleep(backoff.compute(min(failures, 16)))
                continue
            if generation == self._generation:
                self._install(epoch, raw)
            return

    def _install(self, epoch: str | None, raw: dict[str, bytes]) -> None:
        fresh: dict[str, StateValue] = {}
        for key, stored in raw.items():
            try:
                fresh[key] = values.decode_stored(key, stored)
            except ValueError as exc:
                logger.warning("shared state skipped a stored value: %s", exc)
        old, self._values, self._epoch = self._values, fresh, epoch
        pending, self._pending = self._pending or [], None
        self._stale_reason = None
        self.reloads += 1
        for key in old.keys() | fresh.keys():
            before, after = old.get(key), fresh.get(key)
            if before != after:
                self._publish(StateChange(key, after, before.version if before else 0, "reload"))
        stray = False
        for change in pending:
            if epoch is not None and change.epoch != epoch:
                # From another lifetime of the data than the snapshot's: older (heard
                # before a data loss) or newer (a loss after the snapshot). Read again;
                # the next snapshot decides. Dropping it makes this terminate.
                stray = True
                continue
            self._apply(change)
        if stray:
            self._start_reload()
        self._changed()

    def _changed(self) -> None:
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    def _publish(self, change: StateChange) -> None:
        for watch in list(self._watches):
            watch.offer(change)

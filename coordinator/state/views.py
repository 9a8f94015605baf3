"""Views of a :class:`~coordinator.state.SharedState`: a stream of changes
(:class:`StateWatch`) and one key as a Python type (:class:`TypedKey`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import TypeAdapter, ValidationError

from coordinator.errors import InvalidStateError
from coordinator.state.values import StateChange, StateValue

if TYPE_CHECKING:
    from coordinator.state.shared import SharedState

T = TypeVar("T")


class StateWatch:
    """The changes of some keys, from when it was made (see :meth:`SharedState.watch`)."""

    def __init__(self, state: SharedState, keys: frozenset[str] | None, max_queued: int) -> None:
        self._state = state
        self._keys = keys
        self._queue: asyncio.Queue[StateChange | None] = asyncio.Queue(max_queued)
        state._watches.add(self)

    def offer(self, change: StateChange) -> None:
        if self._keys is not None and change.key not in self._keys:
            return
        try:
            self._queue.put_nowait(change)
        except asyncio.QueueFull:
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(StateChange("*", None, 0, "reload"))

    def close(self) -> None:
        """Stop watching; an iteration under way ends."""
        if self in self._state._watches:
            self._state._watches.discard(self)
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)

    async def __aenter__(self) -> StateWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[StateChange]:
        return self

    async def __anext__(self) -> StateChange:
        change = await self._queue.get()
        if change is None:
            raise StopAsyncIteration
        return change


class TypedKey(Generic[T]):
    """One state key as a Python type (see :meth:`SharedState.typed`).

    Reads validate the JSON once per version (then reuse the result); a stored value
    that does not fit the type raises :class:`InvalidStateError` naming the key.
    """

    def __init__(self, state: SharedState, key: str, type_: type[T] | Any) -> None:
        self.state = state
        self.key = key
        self._adapter: TypeAdapter[T] = TypeAdapter(type_)
        self._type_name = getattr(type_, "__name__", repr(type_))
        self._cached: tuple[StateValue, T] | None = None

    def get(self, default: T | None = None) -> T | None:
        """The value as ``type_``, or ``default`` when the key has none. No I/O."""
        entry = self.state.get(self.key)
        if entry is None:
            return default
        if self._cached is not None and self._cached[0] is entry:
            return self._cached[1]
        try:
            parsed = self._adapter.validate_python(entry.value)
        except ValidationError as exc:
            raise InvalidStateError(
                f"state key {self.key!r} (version {entry.version}) does not fit "
                f"{self._type_name}: {exc.errors()[0]['msg']}"
            ) from None
        self._cached = (entry, parsed)
        return parsed

    @property
    def version(self) -> int:
        """The version this process holds (0: none)."""
        entry = self.state.get(self.key)
        return entry.version if entry else 0

    async def set(self, value: T, version: int | None = None) -> StateValue:
        """Write ``value`` (dumped as JSON); see :meth:`SharedState.set`."""
        return await self.state.set(
            self.key, self._adapter.dump_python(value, mode="json"), version
        )

    async def update(self, change: Callable[[T | None], T], **options: Any) -> StateValue:
        """Compare-and-set loop over the typed value; see :meth:`SharedState.update`."""

        def raw_change(raw: Any) -> Any:
            current = None if raw is None else self._adapter.validate_python(raw)
            return self._adapter.dump_python(change(current), mode="json")

        return await self.state.update(self.key, raw_change, **options)

"""Errors raised by coordinator: one base class, each subclass also a matching builtin."""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base class of every error coordinator raises on purpose."""


class ConfigurationError(CoordinatorError, ValueError):
    """A setting or argument is invalid; the message names it and what to change."""


class NotLeaderError(CoordinatorError, RuntimeError):
    """Work that needs the lease was attempted by a process that does not hold it."""

    def __init__(self, what: str = "this operation") -> None:
        super().__init__(
            f"{what} needs the leader's lease, and this process does not hold it "
            "(it was never elected, stepped down, or its term ended)"
        )


class RedisUnavailableError(CoordinatorError, ConnectionError):
    """Redis could not be reached; the operation may be retried once it is back."""


class InvalidEventError(CoordinatorError, ValueError):
    """An event to publish is invalid: bad channel name, not JSON, or too large."""


class EventTooLargeError(InvalidEventError):
    """An event's encoded size exceeds ``relay_max_event_bytes``."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"event is {size} bytes encoded, over the limit of {limit} bytes "
            "(COORDINATOR_RELAY_MAX_EVENT_BYTES); send a reference to the data instead"
        )


class InvalidEventIdError(CoordinatorError, ValueError):
    """A Last-Event-ID is not a stream id of the form ``<ms>-<seq>``."""

    def __init__(self, value: str) -> None:
        self.value = value
        super().__init__(
            f"Last-Event-ID {value[:64]!r} is not an event id; ids look like '1700000000000-0'"
        )


class OnceFailedError(CoordinatorError, RuntimeError):
    """A cluster-wide run-once task failed in the process that ran it."""

    def __init__(self, name: str, error: str, instance_id: str) -> None:
        self.name = name
        self.error = error
        self.instance_id = instance_id
        super().__init__(f"run-once task {name!r} failed on {instance_id}: {error}")

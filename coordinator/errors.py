"""Errors raised by coordinator: one base class, each subclass also a matching builtin."""

from __future__ import annotations

from redis.exceptions import RedisClusterException, RedisError


class CoordinatorError(Exception):
    """Base class of every error coordinator raises on purpose."""


class ConfigurationError(CoordinatorError, ValueError):
    """A setting or argument is invalid; the message names it and what to change."""


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


class InvalidStateError(CoordinatorError, ValueError):
    """A shared-state write is invalid: bad key name, or a value that is not JSON."""


class StateTooLargeError(InvalidStateError):
    """A shared-state value is over ``state_max_value_bytes``, or a new key would take
    the state over ``state_max_keys``."""

    def __init__(self, message: str, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(message)


class StateConflictError(CoordinatorError, RuntimeError):
    """A compare-and-set on shared state found another version than the one expected."""

    def __init__(self, key: str, expected: int, current: int) -> None:
        self.key = key
        self.expected = expected
        self.current = current
        super().__init__(
            f"state key {key!r} is at version {current}, not {expected}: read it again "
            "and retry with its current version"
        )


class JobLookupError(CoordinatorError, LookupError):
    """No job, code-declared or runtime, has this id."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with the id {job_id!r}; GET /api/jobs lists them")


class ConflictingIdError(CoordinatorError, KeyError):
    """A runtime job's id is taken (by another runtime job, or by a job declared in code)."""

    def __init__(self, job_id: str, declared_in_code: bool = False) -> None:
        self.job_id = job_id
        self.declared_in_code = declared_in_code
        where = "a job declared in code" if declared_in_code else "another runtime job"
        fix = "choose another id" if declared_in_code else "choose another id, or pass replace"
        super().__init__(f"job id {job_id!r} is taken by {where}; {fix}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DeclaredJobError(CoordinatorError, ValueError):
    """A job declared in code cannot be removed at runtime (every process declares it)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(
            f"job {job_id!r} is declared in code on every process and cannot be removed at "
            "runtime; pause it instead, or remove it from the code"
        )


class InvalidJobError(CoordinatorError, ValueError):
    """A runtime job is invalid; ``field`` names the part (``trigger.run_date``, ``kwargs``)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class TaskLookupError(InvalidJobError, LookupError):
    """A runtime job names a task that is not registered (``@coordinator.task(name)``)."""

    def __init__(self, task: str, known: list[str]) -> None:
        self.task = task
        listed = ", ".join(repr(k) for k in sorted(known)[:20]) or "none"
        super().__init__(
            "task",
            f"no task named {task!r} is registered on this process (registered: {listed}); "
            "register it with @coordinator.task(name) on every process",
        )


class JobArgumentsTooLargeError(InvalidJobError):
    """A runtime job's ``args`` and ``kwargs`` are over the size limit once encoded."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            "kwargs",
            f"args and kwargs are {size} bytes as JSON, over the limit of {limit} bytes; "
            "pass a reference to the data (a row id) instead",
        )


class JobLimitError(CoordinatorError, RuntimeError):
    """The namespace already holds the most runtime jobs allowed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"{limit} runtime jobs exist, the most allowed; remove some first, or raise "
            "the limit (LeaderScheduler(max_runtime_jobs=...))"
        )


REDIS_UNREACHABLE: tuple[type[BaseException], ...] = (RedisError, OSError, RedisClusterException)
"""What a Redis call raises when the server cannot be reached or answer: redis-py's
errors and socket errors (``OSError`` covers ``ConnectionError`` and ``TimeoutError``),
and redis-py's cluster errors (no node reachable, a slot not served), which do not
derive from ``RedisError``.
The one tuple every retry loop and health check catches. Public methods that
document :class:`RedisUnavailableError` translate it; the rest let redis-py's
errors pass through unchanged."""

"""Settings: one validated, frozen object read from the environment.

Every component takes a :class:`CoordinatorSettings`. Build one from the
environment (``CoordinatorSettings()``) or explicitly
(``CoordinatorSettings(lease_ttl_ms=3000, renew_interval_ms=500, ...)``);
keyword arguments win over the environment.

Environment variables use the prefix ``COORDINATOR_`` (``COORDINATOR_LEASE_TTL_MS``);
the Redis URL is also read from plain ``REDIS_URL``.

Timing rules, checked at construction (as client-go's leaderelection does):
``renew_interval_ms`` < ``renew_deadline_ms`` < ``lease_ttl_ms`` and
``retry_period_ms`` < ``lease_ttl_ms``. The gap between the renew deadline and
the lease TTL is the safety margin a leader has to stop its work before another
process may take the lease.

Every problem is reported at once, in one :class:`ConfigurationError` that
names each variable and what to change; a timing problem comes with values
that fit together (fix them all as suggested and the settings are valid).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from contextvars import ContextVar
from typing import Literal

from pydantic import (
    AliasChoices,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from coordinator.errors import ConfigurationError
from coordinator.store.connection import check_redis_url

Role = Literal["all", "api", "worker"]

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
"""Rule for namespaces, election names, job ids and channel names."""

_NAME_RE = re.compile(NAME_PATTERN)


def name_error(kind: str, value: object) -> str | None:
    """The one message for a ``kind`` name (namespace, channel, job id...) that breaks
    :data:`NAME_PATTERN`, or ``None`` when ``value`` is a valid name."""
    if isinstance(value, str) and _NAME_RE.fullmatch(value):
        return None
    return (
        f"{kind} {value!r} is not valid: use 1-128 characters from letters, digits and "
        "'._:-', starting with a letter or digit"
    )


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it matches :data:`NAME_PATTERN`, else raise ``ConfigurationError``."""
    problem = name_error(kind, value)
    if problem is not None:
        raise ConfigurationError(problem)
    return value


def default_instance_id() -> str:
    """``hostname-pid-random``; on Kubernetes (``POD_NAME`` set) the pod name plus pid."""
    host = os.environ.get("POD_NAME") or socket.gethostname()
    if os.environ.get("POD_NAME"):
        return f"{host}-{os.getpid()}"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


_REDIS_URL_NAMES = ("COORDINATOR_REDIS_URL", "REDIS_URL")

_UNCHECKED: ContextVar[frozenset[str]] = ContextVar("_UNCHECKED", default=frozenset())
"""Fields whose own value was invalid: timing rules that involve them are not checked."""


def variable(field: str) -> str:
    """The environment variable that sets ``field`` (for messages)."""
    if field == "redis_url":
        return "REDIS_URL / COORDINATOR_REDIS_URL"
    return f"COORDINATOR_{field.upper()}"


def timing_problems(
    lease_ttl_ms: int,
    renew_deadline_ms: int,
    renew_interval_ms: int,
    retry_period_ms: int,
    unchecked: frozenset[str] = frozenset(),
) -> list[str]:
    """Every violation of the timing rules, each naming the variable to change and a value.

    The suggested values fit together: a violation that would appear once another
    is fixed (a renew interval above the renew deadline that must come down) is
    reported now, not on the next try. Rules that involve a field in ``unchecked``
    (its own value was invalid) are skipped.
    """
    ttl, deadline, interval, retry = (
        lease_ttl_ms,
        renew_deadline_ms,
        renew_interval_ms,
        retry_period_ms,
    )
    problems: list[str] = []
    fit_ttl = ttl
    if "lease_ttl_ms" in unchecked:
        # Only the rule that does not involve the lease TTL can be checked.
        fit_ttl = max(3, deadline + 1)
        unchecked |= {"retry_period_ms"}
    elif ttl < 3:  # renew_interval < renew_deadline < lease_ttl, in whole milliseconds
        fit_ttl = max(5000, deadline + 1, retry + 1, interval + 2)
        problems.append(
            f"lease_ttl_ms ({ttl}) leaves no room for renew_interval_ms < renew_deadline_ms "
            f"< lease_ttl_ms; raise COORDINATOR_LEASE_TTL_MS (e.g. {fit_ttl})"
        )
    fit_deadline = deadline
    if "renew_deadline_ms" not in unchecked and deadline >= fit_ttl:
        fit_deadline = fit_ttl * 7 // 10
        problems.append(
            f"renew_deadline_ms ({deadline}) must be less than lease_ttl_ms ({ttl}): a leader "
            "must stop before its lease can expire; lower COORDINATOR_RENEW_DEADLINE_MS "
            f"(e.g. {fit_deadline}) or raise COORDINATOR_LEASE_TTL_MS"
        )
    elif "renew_deadline_ms" not in unchecked and deadline < 2:
        fit_deadline = fit_ttl * 7 // 10
        problems.append(
            f"renew_deadline_ms ({deadline}) leaves no room for renew_interval_ms below it; "
            f"raise COORDINATOR_RENEW_DEADLINE_MS (e.g. {fit_deadline})"
        )
    if not unchecked & {"renew_interval_ms", "renew_deadline_ms"} and interval >= fit_deadline:
        fit_interval = max(1, min(fit_ttl // 5, fit_deadline - 1))
        if fit_deadline == deadline:
            why = f"renew_deadline_ms ({deadline})"
        else:
            why = f"renew_deadline_ms, which must come down below lease_ttl_ms ({ttl}),"
        problems.append(
            f"renew_interval_ms ({interval}) must be less than {why} so a leader gets more "
            f"than one renewal attempt; lower COORDINATOR_RENEW_INTERVAL_MS (e.g. {fit_interval})"
        )
    if "retry_period_ms" not in unchecked and retry >= fit_ttl:
        problems.append(
            f"retry_period_ms ({retry}) must be less than lease_ttl_ms ({ttl}) so followers "
            f"check the lease before it expires; lower COORDINATOR_RETRY_PERIOD_MS "
            f"(e.g. {max(1, fit_ttl // 5)})"
        )
    return problems


class CoordinatorSettings(BaseSettings):
    """All of coordinator's settings, validated and immutable.

    Raises:
        ConfigurationError: (a ``ValueError``) naming the setting to change, when a
            value is out of range or the timing rules above do not hold.
    """

    model_config = SettingsConfigDict(
        env_prefix="COORDINATOR_", frozen=True, extra="ignore", populate_by_name=True
    )

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices(*_REDIS_URL_NAMES, "redis_url"),
        description=(
            "redis://, rediss:// (TLS), unix:// or redis+sentinel:// URL; redis+cluster:// "
            '(and rediss+cluster://) for a Redis Cluster (see "Redis connections").'
        ),
    )
    namespace: str = Field(default="coordinator", description="Prefix of every Redis key.")
    instance_id: str = Field(
        default_factory=default_instance_id,
        description="Names this process in leases, run history, logs and presence.",
    )
    role: Role = Field(
        default="all",
        description="all: serve and lead; api: never campaign or run jobs; worker: lead, no HTTP.",
    )
    election_name: str = Field(
        default="scheduler", description="The election the scheduler's leader is chosen in."
    )

    lease_ttl_ms: int = Field(
        default=5000,
        gt=0,
        description="Lease lifetime on the server: the worst case for a vanished host.",
    )
    renew_interval_ms: int = Field(default=1000, gt=0, description="How often the leader renews.")
    renew_deadline_ms: int = Field(
        default=3500,
        gt=0,
        description="The leader steps down when it could not renew for this long (< lease TTL).",
    )
    retry_period_ms: int = Field(
        default=1000,
        gt=0,
        description="The heir follower checks the holder's connection 4 times per period; "
        "the other followers campaign once every 10 periods and on notices.",
    )
    backoff_max_ms: int = Field(default=5000, gt=0, description="Cap of the retry backoff.")
    min_replicas: int = Field(
        default=0,
        ge=0,
        description="Replicas that must confirm a publish or a fire claim (WAIT) before it "
        "counts; 1 with Sentinel, so a failover cannot lose an acknowledged write. An "
        "unconfirmed publish is a 503; an unconfirmed claim's fire does not run (a runtime "
        "date job's is claimed again).",
    )
    replica_timeout_ms: int = Field(default=1000, gt=0, description="How long WAIT waits.")

    relay_history: int = Field(default=1000, gt=0, description="Events kept per channel.")
    relay_stream_ttl_s: int = Field(default=86400, gt=0, description="Idle channel expiry.")
    relay_max_event_bytes: int = Field(
        default=64 * 1024, gt=0, description="Largest event (name plus JSON data); over it: 413."
    )
    relay_client_queue: int = Field(default=1000, gt=0, description="Events buffered per client.")
    sse_ping_s: float = Field(
        default=15.0, gt=0, description="Heartbeat comment period on idle SSE streams."
    )
    sse_retry_ms: int = Field(
        default=1000, gt=0, description="The SSE `retry` sent to clients: their reconnect delay."
    )
    relay_keepalive_s: float = Field(
        default=5.0, gt=0, description="Pub/Sub PING interval; twice this without a reply = down."
    )
    relay_subscribe_timeout_s: float = Field(
        default=5.0, gt=0, description="How long a new subscriber waits for the listener."
    )

    job_history: int = Field(default=1000, gt=0, description="Job runs kept in Redis.")

    # -- operating it (logs, presence, per-client limits across all processes) ----
    log_format: Literal["text", "json"] = Field(
        default="text", description="json: one JSON object a line."
    )
    log_level: str = Field(
        default="INFO",
        pattern=r"(?i)^(debug|info|warning|error|critical)$",
        description="debug, info, warning, error or critical.",
    )
    presence_interval_s: float = Field(
        default=5.0, gt=0, description="Heartbeat period of this instance in the presence set."
    )
    sse_max_connections_per_client: int = Field(
        default=0, ge=0, description="Open SSE streams per client, all processes; 0: no limit."
    )
    publish_rate_per_client: float = Field(
        default=0.0, ge=0, description="Publishes a second per client, all processes; 0: off."
    )
    publish_burst: int = Field(default=0, ge=0, description="Publish burst; 0: rate rounded up.")
    metrics: bool = Field(
        default=False,
        description="Serve GET /metrics: Prometheus text for every process of the server "
        "(coordinator.web.metrics).",
    )
    # -- shared state, sessions, cluster-wide limits -------------------------------
    state_max_keys: int = Field(
        default=1000, gt=0, description="Shared-state keys (every process holds them all)."
    )
    state_max_value_bytes: int = Field(
        default=64 * 1024, gt=0, description="Largest shared-state value (JSON); over it: 413."
    )
    session_lifetime_s: int = Field(
        default=14 * 86400, gt=0, description="Session lifetime from login (cookie and Redis)."
    )
    session_cookie_name: str = Field(
        default="session", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Session cookie name."
    )
    session_cookie_secure: bool = Field(
        default=False, description="Mark the session cookie Secure (sent over HTTPS only)."
    )
    limits_fail_open: bool = Field(
        default=False,
        description="When the limiter cannot reach Redis: false refuses (503), true allows.",
    )

    def __init__(self, **values: object) -> None:
        try:
            super().__init__(**values)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise ConfigurationError(self._every_problem(exc, values)) from None

    @classmethod
    def _every_problem(cls, exc: ValidationError, values: dict[str, object]) -> str:
        """One message for every problem: the fields' own and the timing rules'.

        pydantic checks the rules between fields only when every field is valid;
        so the rules are checked again with the invalid fields at their defaults,
        skipping the rules that involve them.
        """
        problems = _describe(exc)
        bad = frozenset(_field_of(err["loc"]) for err in exc.errors() if err["loc"])
        if bad:
            fallback = {
                name: cls.model_fields[name].get_default(call_default_factory=True)
                for name in bad
                if name in cls.model_fields
            }
            token = _UNCHECKED.set(bad)
            try:
                BaseSettings.__init__(cls.__new__(cls), **{**values, **fallback})
            except ValidationError as again:
                problems += [p for p in _describe(again) if p not in problems]
            finally:
                _UNCHECKED.reset(token)
        count = f" ({len(problems)} problems)" if len(problems) > 1 else ""
        return f"invalid coordinator settings{count}: " + "; ".join(problems)

    @field_validator("namespace", "election_name")
    @classmethod
    def _check_name(cls, value: str, info: ValidationInfo) -> str:
        return check_name(str(info.field_name), value)

    @field_validator("instance_id")
    @classmethod
    def _check_instance_id(cls, value: str) -> str:
        if not value or len(value) > 200:
            raise ValueError("must be 1-200 characters")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        return check_redis_url(value)

    @model_validator(mode="after")
    def _check_timing(self) -> CoordinatorSettings:
        problems = timing_problems(
            self.lease_ttl_ms,
            self.renew_deadline_ms,
            self.renew_interval_ms,
            self.retry_period_ms,
            _UNCHECKED.get(),
        )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def lease_ttl(self) -> float:
        return self.lease_ttl_ms / 1000

    @property
    def renew_interval(self) -> float:
        return self.renew_interval_ms / 1000

    @property
    def renew_deadline(self) -> float:
        return self.renew_deadline_ms / 1000

    @property
    def retry_period(self) -> float:
        return self.retry_period_ms / 1000

    @property
    def campaigns(self) -> bool:
        """True when this process may lead (roles ``all`` and ``worker``)."""
        return self.role != "api"


def _field_of(loc: tuple[int | str, ...]) -> str:
    name = str(loc[0]) if loc else ""
    return "redis_url" if name in _REDIS_URL_NAMES else name


def _describe(exc: ValidationError) -> list[str]:
    """One line per problem, naming the field and its environment variable."""
    parts = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        field = _field_of(err["loc"])
        if not field:  # a rule between fields: its message names them
            parts.extend(msg.split("\n"))
            continue
        got = err.get("input")
        shown = (
            f" (got {got!r})"
            if field != "redis_url"
            and isinstance(got, str | int | float)
            and len(str(got)) < 80
            and repr(got) not in msg
            else ""
        )
        parts.append(f"{field} ({variable(field)}): {msg}{shown}")
    return parts

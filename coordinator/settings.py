"""Settings: one validated, frozen object read from the environment.

Every component takes a :class:`CoordinatorSettings`. Build one from the
environment (``CoordinatorSettings()``) or explicitly
(``CoordinatorSettings(lease_ttl_ms=3000, renew_interval_ms=500, ...)``);
keyword arguments win over the environment.

Environment variables use the prefix ``COORDINATOR_`` (``COORDINATOR_LEASE_TTL_MS``);
the Redis URL is also read from plain ``REDIS_URL``.

Timing rules, checked at construction (as client-go's leaderelection does):
``retry_period_ms`` and ``renew_interval_ms`` < ``renew_deadline_ms`` < ``lease_ttl_ms``.
The gap between the renew deadline and the lease TTL is the safety margin a
leader has to stop its work before another process may take the lease.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigurationError

Role = Literal["all", "api", "worker"]

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
"""Rule for namespaces, election names, job ids and channel names."""

_NAME_RE = re.compile(NAME_PATTERN)


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it matches :data:`NAME_PATTERN`, else raise ``ConfigurationError``."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ConfigurationError(
            f"{kind} {value!r} is not valid: use 1-128 characters from letters, digits and "
            "'._:-', starting with a letter or digit"
        )
    return value


def default_instance_id() -> str:
    """``hostname-pid-random``; on Kubernetes (``POD_NAME`` set) the pod name plus pid."""
    host = os.environ.get("POD_NAME") or socket.gethostname()
    if os.environ.get("POD_NAME"):
        return f"{host}-{os.getpid()}"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


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
        validation_alias=AliasChoices("COORDINATOR_REDIS_URL", "REDIS_URL", "redis_url"),
        description="redis://, rediss:// (TLS), unix:// or redis+sentinel:// URL.",
    )
    namespace: str = Field(default="coordinator", description="Prefix of every Redis key.")
    instance_id: str = Field(default_factory=default_instance_id)
    role: Role = Field(
        default="all",
        description="all: serve and lead; api: never campaign or run jobs; worker: lead, no HTTP.",
    )
    election_name: str = Field(default="scheduler")

    lease_ttl_ms: int = Field(default=5000, gt=0)
    renew_interval_ms: int = Field(default=1000, gt=0)
    renew_deadline_ms: int = Field(default=3500, gt=0)
    retry_period_ms: int = Field(default=1000, gt=0)
    backoff_max_ms: int = Field(default=5000, gt=0, description="Cap of the retry backoff.")
    min_replicas: int = Field(
        default=0, ge=0,
        description="Replicas that must confirm a publish or a fire claim (WAIT) before it "
        "counts; 1 with Sentinel, so a failover cannot lose an acknowledged write.",
    )  # fmt: skip
    replica_timeout_ms: int = Field(default=1000, gt=0, description="How long WAIT waits.")

    relay_history: int = Field(default=1000, gt=0, description="Events kept per channel.")
    relay_stream_ttl_s: int = Field(default=86400, gt=0, description="Idle channel expiry.")
    relay_max_event_bytes: int = Field(default=64 * 1024, gt=0)
    relay_client_queue: int = Field(default=1000, gt=0, description="Events buffered per client.")
    sse_ping_s: float = Field(default=15.0, gt=0)
    sse_retry_ms: int = Field(default=1000, gt=0)
    relay_keepalive_s: float = Field(
        default=5.0, gt=0, description="Pub/Sub PING interval; twice this without a reply = down."
    )
    relay_subscribe_timeout_s: float = Field(
        default=5.0, gt=0, description="How long a new subscriber waits for the listener."
    )

    job_history: int = Field(default=1000, gt=0, description="Job runs kept in Redis.")
    job_claim_ttl_s: int = Field(default=7 * 86400, gt=0, description="Life of a fire claim.")

    # -- operating it (logs, presence, per-client limits; limits are per process) ----
    log_format: Literal["text", "json"] = Field(
        default="text", description="json: one JSON object a line."
    )
    log_level: str = Field(default="INFO", pattern=r"(?i)^(debug|info|warning|error|critical)$")
    presence_interval_s: float = Field(
        default=5.0, gt=0, description="Heartbeat period of this instance in the presence set."
    )
    sse_max_connections_per_client: int = Field(
        default=0, ge=0, description="Open SSE streams per client address and process; 0: no limit."
    )
    publish_rate_per_client: float = Field(
        default=0.0, ge=0, description="Publishes a second per client address and process; 0: off."
    )
    publish_burst: int = Field(default=0, ge=0, description="Publish burst; 0: rate rounded up.")

    def __init__(self, **values: object) -> None:
        from pydantic import ValidationError

        try:
            super().__init__(**values)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from None

    @model_validator(mode="after")
    def _check(self) -> CoordinatorSettings:
        check_name("namespace", self.namespace)
        check_name("election_name", self.election_name)
        if not self.instance_id or len(self.instance_id) > 200:
            raise ValueError("instance_id must be 1-200 characters")
        if not self.renew_deadline_ms < self.lease_ttl_ms:
            raise ValueError(
                f"renew_deadline_ms ({self.renew_deadline_ms}) must be less than lease_ttl_ms "
                f"({self.lease_ttl_ms}): a leader must stop before its lease can expire; "
                "lower COORDINATOR_RENEW_DEADLINE_MS or raise COORDINATOR_LEASE_TTL_MS"
            )
        if not self.renew_interval_ms < self.renew_deadline_ms:
            raise ValueError(
                f"renew_interval_ms ({self.renew_interval_ms}) must be less than "
                f"renew_deadline_ms ({self.renew_deadline_ms}) so a leader gets more than one "
                "renewal attempt; lower COORDINATOR_RENEW_INTERVAL_MS"
            )
        if not self.retry_period_ms < self.lease_ttl_ms:
            raise ValueError(
                f"retry_period_ms ({self.retry_period_ms}) must be less than lease_ttl_ms "
                f"({self.lease_ttl_ms}); lower COORDINATOR_RETRY_PERIOD_MS"
            )
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


def _describe(exc: object) -> str:
    from pydantic import ValidationError

    assert isinstance(exc, ValidationError)
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc != "settings" else msg)
    return "invalid coordinator settings: " + "; ".join(parts)

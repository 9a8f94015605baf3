"""Every Redis key and Pub/Sub channel name coordinator uses, in one place.

All names start with ``{namespace}:``. The braces are a Redis Cluster hash tag:
every key of one namespace lives in one slot, so multi-key Lua scripts work on
Cluster too. Two apps with different namespaces never touch each other's keys.

TTLs, for reference:

- ``lease``: the lease TTL; renewed by the leader.
- ``fencing``: none (a counter that must outlive leases; reseeded from the
  server clock if lost).
- ``fire``: ``job_claim_ttl_s`` (a claim must outlive any chance of a retry).
- ``last_fire``, ``runs``: none (``runs`` is capped by length).
- ``once``: none while done; a running marker carries the runner's lease.
- ``stream``: ``relay_stream_ttl_s`` after the last publish, capped by length.
- ``instance``: three presence heartbeat periods; ``instances``: none (trimmed
  by each heartbeat to the last 10 minutes).
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import check_name


@dataclass(frozen=True)
class Keys:
    """Key names for one namespace."""

    namespace: str

    def __post_init__(self) -> None:
        check_name("namespace", self.namespace)

    @property
    def prefix(self) -> str:
        return "{" + self.namespace + "}:"

    # -- election -------------------------------------------------------------
    def lease(self, election: str) -> str:
        """String: the current holder's lease value (JSON), with a PX TTL."""
        return f"{self.prefix}lease:{election}"

    def fencing(self, election: str) -> str:
        """Integer counter: the last fencing token handed out for this election."""
        return f"{self.prefix}fencing:{election}"

    def election_notices(self, election: str) -> str:
        """Pub/Sub channel: a leader publishes here when it releases its lease."""
        return f"{self.prefix}notices:{election}"

    # -- scheduler ------------------------------------------------------------
    def fire(self, job_id: str, scheduled_ms: int) -> str:
        """String: the claim of one scheduled fire (``job id + scheduled time``)."""
        return f"{self.prefix}fire:{job_id}:{scheduled_ms}"

    def last_fire(self) -> str:
        """Hash: job id -> scheduled time (ms) of the last fire claimed."""
        return f"{self.prefix}last-fire"

    def runs(self) -> str:
        """List: run records (JSON), newest first, capped at ``job_history``."""
        return f"{self.prefix}runs"

    def once(self, name: str) -> str:
        """Hash: state of a cluster-wide run-once task."""
        return f"{self.prefix}once:{name}"

    def once_notices(self, name: str) -> str:
        """Pub/Sub channel: published when a run-once task finishes."""
        return f"{self.prefix}once-notices:{name}"

    # -- relay ----------------------------------------------------------------
    def stream(self, channel: str) -> str:
        """Stream: the retained events of one channel."""
        return f"{self.prefix}stream:{channel}"

    def events(self) -> str:
        """Pub/Sub channel carrying every channel's events of this namespace."""
        return f"{self.prefix}events"

    def streams_pattern(self) -> str:
        """``SCAN MATCH`` pattern of every channel's stream (for status tools)."""
        return f"{self.prefix}stream:*"

    # -- presence -------------------------------------------------------------
    def instances(self) -> str:
        """Sorted set: instance id -> last heartbeat (ms); entries older than the
        presence retention are trimmed by each heartbeat."""
        return f"{self.prefix}instances"

    def instance(self, instance_id: str) -> str:
        """String: one live instance's description (JSON); TTL 3 heartbeat periods."""
        return f"{self.prefix}instance:{instance_id}"

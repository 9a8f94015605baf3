"""Every Redis key and Pub/Sub channel name coordinator uses, in one place.

All names start with ``{namespace}:``. The braces are a Redis Cluster hash tag:
every key of one namespace lives in one slot, so multi-key Lua scripts work on
Cluster too. Two apps with different namespaces never touch each other's keys.

TTLs, for reference:

- ``lease``: the lease TTL; renewed by the leader.
- ``fencing``: none (a counter that must outlive leases; reseeded from the
  server clock if lost).
- ``last_fire``, ``runs``: none (``last_fire`` holds one field per job; ``runs``
  is capped by length).
- ``runtime_jobs``, ``paused_jobs``: none (bounded by the runtime job limit);
  ``run_requests``: none (each request is deleted when the leader claims it).
- ``once``: none while done; a running marker carries the runner's lease.
- ``stream``: ``relay_stream_ttl_s`` after the last publish, capped by length.
- ``instance``: three presence heartbeat periods; ``instances``: none (trimmed
  by each heartbeat to the last 10 minutes).
- ``state``: none (bounded by ``state_max_keys`` and ``state_max_value_bytes``).
- ``session``: the session lifetime (``session_lifetime_s``), set by starsessions.
- ``limits``: the rate window, set by the ``limits`` library.
- ``client_streams``: the lease TTL, pushed forward by each holder's heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.settings import check_name


@dataclass(frozen=True)
class Keys:
    """Key names for one namespace.

    ``sharded`` (Redis Cluster): each relay channel's stream and Pub/Sub channel
    carry a hash tag of their own, ``{<namespace>/<channel>}`` (names never hold
    ``/``), so channels, and publish load, spread over the shards; every other key
    stays in the namespace's slot.
    """

    namespace: str
    sharded: bool = False

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

    def heir(self, election: str) -> str:
        """String with a TTL: the follower that watches the holder closely (JSON:
        instance_id, hostname); the other followers wait for notices."""
        return f"{self.prefix}heir:{election}"

    def election_notices(self, election: str) -> str:
        """Pub/Sub channel: a leader publishes here when it releases its lease."""
        return f"{self.prefix}notices:{election}"

    # -- scheduler ------------------------------------------------------------
    def last_fire(self) -> str:
        """Hash: job id -> scheduled time (ms) of the job's last claimed fire. It is the
        whole fire-claim record: a fire at or before it is never claimed again."""
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

    def runtime_jobs(self) -> str:
        """Hash: runtime job id -> definition (JSON: task, trigger, args, kwargs). A date
        job's field is removed by the claim of its fire (see :meth:`due_dates`)."""
        return f"{self.prefix}jobs"

    def paused_jobs(self) -> str:
        """Set: ids of paused jobs, code-declared and runtime (a paused job's fires are
        refused by the claim script)."""
        return f"{self.prefix}jobs-paused"

    def due_dates(self) -> str:
        """Sorted set: runtime date job id -> its ``run_date`` (ms), while it is pending and
        not paused. The leader reads only the next seconds of it; the claim of the fire
        removes the entry, so a date job fires once per time it is added."""
        return f"{self.prefix}jobs-due"

    def recurring_jobs(self) -> str:
        """Set: ids of runtime jobs with a recurring (interval, cron) trigger; the leader
        holds all of these, and none of the date jobs beyond the next seconds."""
        return f"{self.prefix}jobs-recurring"

    def job_taken(self, job_id: str) -> str:
        """String, for a minute: ``"<lease value>|<rev>"`` of the claim that took a runtime
        date job's fire to run it, so that leader can hand the fire back if it never
        starts it; any change of the id deletes it (see ``job_change.lua``)."""
        return f"{self.prefix}job-taken:{job_id}"

    def jobs_index(self) -> str:
        """String: set once every definition of the namespace is indexed in
        :meth:`due_dates` and :meth:`recurring_jobs` (data from before the index)."""
        return f"{self.prefix}jobs-index"

    def run_requests(self) -> str:
        """Hash: "run now" request id -> request (JSON); taking one is its claim."""
        return f"{self.prefix}run-requests"

    def job_changes(self) -> str:
        """Pub/Sub channel: ``job:<id>`` after a runtime change, ``run:<request id>`` after
        a run request; the leader applies them at once."""
        return f"{self.prefix}job-changes"

    # -- relay ----------------------------------------------------------------
    def stream(self, channel: str) -> str:
        """Stream: the retained events of one channel."""
        if self.sharded:
            return f"{self._channel_tag(channel)}:stream"
        return f"{self.prefix}stream:{channel}"

    def channel_events(self, channel: str) -> str:
        """Pub/Sub channel carrying one relay channel's events (subscribed to only by
        processes with a local subscriber of it); a shard channel when ``sharded``
        (``SPUBLISH``/``SSUBSCRIBE``), in the slot of the channel's stream."""
        if self.sharded:
            return f"{self._channel_tag(channel)}:events"
        return f"{self.prefix}events:{channel}"

    def events_channel_of(self, name: bytes) -> str | None:
        """The relay channel whose :meth:`channel_events` is ``name``, else None."""
        return _channel_in(self.channel_events("\0"), name)

    def stream_channel_of(self, key: bytes) -> str | None:
        """The relay channel whose :meth:`stream` is ``key``, else None."""
        return _channel_in(self.stream("\0"), key)

    def _channel_tag(self, channel: str) -> str:
        return "{" + self.namespace + "/" + channel + "}"

    def events(self) -> str:
        """Pub/Sub channel on which versions before per-channel subscriptions published
        (and heard) every channel's events. Kept for rolling updates: current relays
        listen to it, and publish on it only while an older listener is subscribed."""
        return f"{self.prefix}events"

    def relay_listeners(self) -> str:
        """Pub/Sub channel no one publishes on: every current relay listener subscribes
        to it, so ``NUMSUB events() - NUMSUB relay_listeners()`` counts older listeners."""
        return f"{self.prefix}relay-listeners"

    def streams_pattern(self) -> str:
        """``SCAN MATCH`` pattern of every channel's stream (for status tools)."""
        return self.stream("*")

    # -- presence -------------------------------------------------------------
    def instances(self) -> str:
        """Sorted set: instance id -> last heartbeat (ms); entries older than the
        presence retention are trimmed by each heartbeat."""
        return f"{self.prefix}instances"

    def instance(self, instance_id: str) -> str:
        """String: one live instance's description (JSON); TTL 3 heartbeat periods."""
        return f"{self.prefix}instance:{instance_id}"

    # -- shared state, sessions, limits -----------------------------------------
    def state(self) -> str:
        """Hash: shared runtime state, ``key -> "<version>\\n<JSON value>"``, and the field
        ``~epoch`` (set when the hash is created: a new epoch means the data was lost and
        every process must reload). ``~`` cannot start a key, so it never collides."""
        return f"{self.prefix}state"

    def state_changes(self) -> str:
        """Pub/Sub channel: one message per shared-state change (on the relay's listener)."""
        return f"{self.prefix}state-changes"

    def session_prefix(self) -> str:
        """Prefix of the session keys starsessions writes: ``{prefix}session:<id>`` (string,
        JSON)."""
        return f"{self.prefix}session:"

    def limits_prefix(self) -> str:
        """Prefix the ``limits`` library puts before its own keys (``<prefix>:<its key>``)."""
        return f"{self.prefix}limits"

    def client_streams(self, client: str) -> str:
        """Sorted set: one client's open SSE streams on every process, stream id -> expiry
        (ms, server clock); expired members are removed whenever the set is counted."""
        return f"{self.prefix}client-streams:{client}"


def _channel_in(template: str, name: bytes) -> str | None:
    """The channel that ``template`` (a key or channel name made for the channel
    ``"\\0"``) names in ``name``, else None."""
    head, tail = template.encode("utf-8").split(b"\0")
    if len(name) <= len(head) + len(tail) or not name.startswith(head):
        return None
    if tail and not name.endswith(tail):
        return None
    return name[len(head) : len(name) - len(tail)].decode("utf-8", "replace")

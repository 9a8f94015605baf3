"""What the relay counts, as one typed object (read by metrics and status)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class RelayStats:
    """Counters of one process's :class:`~coordinator.relay.EventRelay`, since it was made.

    Plain, monotonically increasing ints (readers take deltas), plus
    ``delivery_lags``: seconds from publish (Redis clock, from the event id) to
    receipt by this process, for recent events with local subscribers; readers
    drain it (it keeps the last 4,096).
    """

    events_published: int = 0
    events_received: int = 0
    events_delivered: int = 0
    """Frames queued to local subscribers."""
    events_dropped: int = 0
    """Queued frames discarded when a slow subscriber was cut."""
    duplicates_dropped: int = 0
    clients_dropped: int = 0
    """Subscribers cut for falling behind (``"overflow"``)."""
    reconnects: int = 0
    backfilled_events: int = 0
    resets_sent: int = 0
    delivery_lags: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

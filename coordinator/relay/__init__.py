"""The event relay: publish, per-process fan-out, replay and the SSE wire format."""

from coordinator.relay.events import EventId
from coordinator.relay.relay import EventRelay
from coordinator.relay.subscription import Subscription

__all__ = ["EventId", "EventRelay", "Subscription"]

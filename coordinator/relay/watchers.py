"""Internal consumers of extra Pub/Sub channels on the relay's one listener connection.

The relay's listener already does what any Pub/Sub consumer in a process needs:
one connection, supervision, keepalive PINGs, reconnect with backoff, and a
readiness signal. A :class:`ChannelWatcher` rides on it (shared state does:
:mod:`coordinator.state.shared`) instead of opening a second connection with a
second copy of that logic.

Guarantees, in the order the listener calls them:

- ``subscribed()`` once every channel of the listener is confirmed subscribed:
  everything published from then on reaches ``message()`` until ``lost()``.
- ``message(data)`` for each message on the watcher's channel, in Redis order.
  Messages may also arrive between ``lost()`` and the next ``subscribed()``
  (while the listener confirms its subscriptions); they are real, in order, and
  the watcher should keep them.
- ``lost(reason)`` when the connection drops, stops answering, or the relay
  stops: anything published until the next ``subscribed()`` may be missed, so a
  watcher that keeps state must reload it after the next ``subscribed()``.

Callbacks run on the listener's task: they must not block or await; start a
task for slow work. An exception in a callback is logged and does not reach
the listener.

Limits, said plainly: the relay does not buffer for a watcher and does not
replay what it missed; that is what ``lost()`` is for.
"""

from __future__ import annotations

from typing import Protocol


class ChannelWatcher(Protocol):
    """One internal consumer of one Pub/Sub channel (see the module doc)."""

    def subscribed(self) -> None:
        """The channel is subscribed: messages published from now on will arrive."""

    def message(self, data: bytes) -> None:
        """One message published on the channel."""

    def lost(self, reason: str) -> None:
        """The subscription is gone: messages may be missed until ``subscribed()``."""

"""The channel -> subscriptions map of one bus in one process.

Each process has ONE :class:`Fanout` per bus, fed by ONE receiver whatever the number of
streams: delivering an event costs one dictionary lookup and one queue append per
subscription of its channel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol

from .. import mailbox
from ..encoding import chunk
from ..reasons import EndReason

if TYPE_CHECKING:
    from .base import Message, Subscription

log = logging.getLogger("flask_sse_push")


class Observer(Protocol):
    """What watches the deliveries (the app's :class:`~flask_sse_push.metrics.Metrics`)."""

    def delivered(self, message: Message, subs: Collection[Subscription]) -> None:
        """*message* was queued for *subs*; called once per event, with the lock held."""


class Fanout:
    """The subscriptions of one bus in this process, by channel.

    :param lock: guards the map; shared with the bus so that delivery and subscription can be
        made atomic with the history.
    :param on_slow: called with each subscription ended for overflowing its queue.
    :param keepalive: keep-alive period of the subscriptions taken in (``0``: none).
    """

    def __init__(
        self, lock: Any, on_slow: Callable[[Subscription], None], keepalive: float = 0.0
    ) -> None:
        self.lock = lock
        self._on_slow = on_slow
        self._by_channel: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        self._keepalive = keepalive
        self._held = 0
        #: Told of each event delivered, when the app has metrics.
        self.metrics: Observer | None = None

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, sub: object) -> bool:
        return sub in self._all

    def hold(self, limit: int) -> bool:
        """Hold a place for a subscription about to be taken in, unless the subscriptions
        taken in and the places held reach *limit*; return whether one is held. Callers
        hold :attr:`lock`."""
        if len(self._all) + self._held >= limit:
            return False
        self._held += 1
        return True

    def let_go(self) -> None:
        """Give back a place held by :meth:`hold`. Callers hold :attr:`lock`."""
        self._held -= 1

    def add(self, sub: Subscription, *, deliver: bool = True) -> None:
        """Take *sub* in (counted, kept alive, endable) and, with *deliver*, start delivering
        to it. Callers hold :attr:`lock`."""
        self._all.add(sub)
        mailbox.keep_alive(sub, self._keepalive)
        if deliver:
            self.activate(sub)

    def activate(self, sub: Subscription) -> None:
        """Start delivering to *sub*, taken in earlier and not removed since. Callers hold
        :attr:`lock`."""
        if sub in self._all:
            for channel in sub.channels:
                self._by_channel.setdefault(channel, set()).add(sub)

    def remove(self, sub: Subscription) -> None:
        """Stop delivering to *sub*; removing twice is harmless. Callers hold :attr:`lock`."""
        if sub not in self._all:
            return
        self._all.discard(sub)
        mailbox.forget(sub, self._keepalive)
        for channel in sub.channels:
            subs = self._by_channel.get(channel)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_channel[channel]

    def deliver(self, message: Message) -> None:
        """Queue *message* for every subscription of its channel. Callers hold
        :attr:`lock`."""
        subs = self._by_channel.get(message.channel)
        if not subs:
            return
        payload = message.payload
        framed = chunk(payload)  # once per event, for the streams written directly
        slow: list[Subscription] = []
        for sub in subs:
            if not sub.push(payload, framed):
                slow.append(sub)
        for sub in slow:
            self.remove(sub)
            try:
                self._on_slow(sub)
            except Exception:  # a receiver's bug must not break delivery to others
                log.exception("flask-sse-push: a stream_dropped receiver failed")
        if self.metrics is not None:  # once per event: never a metric per subscription
            self.metrics.delivered(message, subs)

    def end(self, reason: EndReason, predicate: Callable[[Subscription], bool]) -> int:
        """End and remove every subscription *predicate* selects; return how many.
        Callers hold :attr:`lock`."""
        chosen = [sub for sub in self._all if predicate(sub)]
        for sub in chosen:
            sub.end(reason)
            self.remove(sub)
        return len(chosen)

    def direct_count(self) -> int:
        """Subscriptions written to directly (see :mod:`~flask_sse_push.direct`)."""
        return sum(1 for sub in list(self._all) if sub.direct)

    def counts(self) -> dict[str, int]:
        """Open subscriptions per channel. Callers hold :attr:`lock`."""
        return {channel: len(subs) for channel, subs in self._by_channel.items()}

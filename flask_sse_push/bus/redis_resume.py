"""Resuming a subscription on the Redis bus with one stream: where live delivery starts
(atomically with the receiver's position) and what the history replays before it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import BusError
from ..reasons import EndReason
from .base import Reset, Resume, Subscription
from .redis_connect import refused
from .redis_history import Position, entry_id

if TYPE_CHECKING:
    from .redis import RedisBus

log = logging.getLogger("flask_sse_push")


def history_error(exc: Exception, sub: Subscription, where: object, last_event_id: str) -> BusError:
    """The error for a replay that Redis did not read: unreachable, the stream retries;
    refused (out of memory, a script error), *sub* ends as ``error``, since asking again
    would be refused again."""
    if not refused(exc):
        return BusError(f"could not read the history from Redis: {exc}")
    log.error(
        "flask-sse-push: Redis refused to read the history of %r (%s); ending a stream that "
        "resumed from %r",
        where,
        exc,
        last_event_id,
    )
    sub.end(EndReason.ERROR)
    return BusError(f"Redis refused to read the history: {exc}")


class Resumption:
    """Resuming one subscription after a ``Last-Event-ID``: the first call places it (live
    delivery starts, or it waits for the receiver), later calls only read the replay."""

    def __init__(self, bus: RedisBus, sub: Subscription, last_event_id: str) -> None:
        self.bus = bus
        self.sub = sub
        self.last_event_id = last_event_id
        #: The replay's bounds, once live delivery has started, and the reset before it.
        self.span: tuple[Position, Position, Reset | None] | None = None

    def __call__(self) -> Resume:
        try:
            if self.span is None:
                placed = self._place()
                if isinstance(placed, Resume):
                    return placed
                self.span = placed
            after, upto, reset = self.span
            replay = self._replay(after, upto)
            if reset is None or replay.reset is not None:
                return replay
            return Resume(replay.replay, reset)
        except self.bus.errors as exc:
            raise history_error(exc, self.sub, self.bus.key, self.last_event_id) from exc

    def _place(self) -> Resume | tuple[Position, Position, Reset | None]:
        """Start live delivery to the subscription after its ``Last-Event-ID``: a
        :class:`Resume` when there is nothing to replay, else the span of the history to
        replay (and the reset that goes before it, when the client resumes from the head
        instead).

        The client got its ``Last-Event-ID`` from some process, maybe one whose receiver is
        ahead of this one's. So live delivery starts after whichever is later, the resume point or
        this receiver's position (the cut); the history covers the span between them.
        """
        receiver = self.bus.receiver
        found, head = self.bus.history.locate(self.last_event_id)
        if receiver.last is None:
            raise BusError("the Redis receiver has not connected yet")
        with receiver.lock:
            cut = receiver.position
            if isinstance(found, Reset):
                # The client refetches its state as of the head: it gets what comes after
                # the head, live once this receiver is there, else replayed up to the cut.
                if cut <= head:
                    self._start_after(head, cut)
                    return Resume([], found)
                self.bus.fanout.activate(self.sub)
                return head, cut, found
            if cut <= found:
                # The receiver has not read past the resume point yet: it starts this
                # subscription's delivery when it does.
                receiver.waiting[self.sub] = found
                return Resume([], None)
            self.bus.fanout.activate(self.sub)
            return found, cut, None

    def _start_after(self, position: Position, cut: Position) -> None:
        """Deliver to the subscription what comes after *position*. Callers hold the lock."""
        if cut < position:
            self.bus.receiver.waiting[self.sub] = position
        else:
            self.bus.fanout.activate(self.sub)

    def _replay(self, after: Position, upto: Position) -> Resume:
        """The events of the subscription's channels after *after*, up to *upto* included."""
        entries = self.bus.history.read(self.sub.channels, after, upto)
        replay = [self.bus.message(entry, fields).payload for entry, fields in entries]
        # Trimming only removes the oldest entries: if nothing after the resume point is
        # gone now, nothing was gone while the range above was read either. (Nor was the
        # stream deleted and created again, or the resume point would be outside it.)
        reason = self.bus.history.info().gap(after)
        if reason is not None:
            return Resume([], Reset(reason, entry_id(upto)))
        return Resume(replay, None)

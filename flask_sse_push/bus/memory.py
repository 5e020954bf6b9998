"""The in-process bus (``memory://``), built on blinker.

It serves ONE process: an event published in one gunicorn worker reaches the clients of that
worker only. Several workers or hosts need the Redis bus.

Ids are ``<epoch>-<sequence>``: the epoch is random per process start, so an id from another
process, or from before a restart, is recognised as unknown and answered with a reset. The
sequence orders events across all channels, so one ``Last-Event-ID`` resumes every channel
of a connection.
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque

import blinker

from ..encoding import MAX_FIELD_LENGTH, with_id
from ..reasons import ResetReason
from .base import Bus, Message, Reset, Resume, Subscription
from .fanout import Fanout


class MemoryBus(Bus):
    """A bus that lives in this process: a blinker signal with one receiver, a fan-out map
    and a bounded history."""

    schemes = ("memory",)
    local = True

    _signal: blinker.Signal
    _epoch: str
    _seq: int
    _history: deque[tuple[int, Message]]
    #: Caller-given ids in the history -> the sequence of the newest event carrying each.
    _own: dict[str, int]

    def _start(self) -> None:
        self._epoch = secrets.token_hex(4)
        self._seq = 0
        self._history = deque(maxlen=self.settings.history_size)
        self._own = {}
        # One signal per app and process, with ONE receiver that fans out; held strongly,
        # since a weakly held bound method would vanish at the next garbage collection.
        self._signal = blinker.Signal(f"flask-sse-push events of {self.name}")
        self._signal.connect(self._receive, weak=False)

    def _receive(self, sender: object, *, message: Message, fanout: Fanout) -> None:
        fanout.deliver(message)

    def publish(self, channel: str, body: bytes, event_id: str | None = None) -> str:
        fanout = self.fanout
        with fanout.lock:
            self._seq += 1
            own = event_id is not None
            if event_id is None:
                event_id = f"{self._epoch}-{self._seq}"
            message = Message(channel, event_id, with_id(event_id, body))
            self._remember(message, own)
            self._signal.send(self, message=message, fanout=fanout)
        return event_id

    def _remember(self, message: Message, own: bool) -> None:
        """Add *message* to the history, and its id to the index when the caller gave it."""
        history = self._history
        if history and len(history) == history.maxlen:
            sequence, oldest = history[0]
            if self._own.get(oldest.id) == sequence:
                del self._own[oldest.id]
        history.append((self._seq, message))
        if own and history:
            self._own[message.id] = self._seq

    def subscribe(self, sub: Subscription, last_event_id: str | None) -> Resume:
        fanout = self.fanout
        with fanout.lock:
            resume = self._resume(sub, last_event_id)
            fanout.add(sub)
        return resume

    def _head_id(self) -> str:
        if self._history and self._history[-1][0] == self._seq:
            return self._history[-1][1].id
        return f"{self._epoch}-{self._seq}"

    def _position(self, last_event_id: str) -> int | None:
        """The sequence number *last_event_id* stands for, or ``None`` if unknown."""
        epoch, _, seq = last_event_id.rpartition("-")
        if epoch == self._epoch and seq.isdigit() and seq.isascii():
            number = int(seq)
            return number if number <= self._seq else None
        # A caller-given id: the newest event that carried it, still in the history.
        return self._own.get(last_event_id)

    def _resume(self, sub: Subscription, last_event_id: str | None) -> Resume:
        if last_event_id is None:
            return Resume([], None)
        if not last_event_id or len(last_event_id) > MAX_FIELD_LENGTH:
            return Resume([], Reset(ResetReason.MALFORMED, self._head_id()))
        position = self._position(last_event_id)
        if position is None:
            return Resume([], Reset(ResetReason.UNKNOWN, self._head_id()))
        if position == self._seq:
            return Resume([], None)
        first = self._history[0][0] if self._history else self._seq + 1
        if position < first - 1:
            return Resume([], Reset(ResetReason.TOO_OLD, self._head_id()))
        channels = sub.channels
        missed = itertools.islice(self._history, position - first + 1, None)
        return Resume([m.payload for _, m in missed if m.channel in channels], None)

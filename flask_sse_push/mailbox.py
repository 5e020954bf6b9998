"""The queue between whatever produces a stream's events and the stream that writes them.

Every open stream reads from one :class:`Mailbox`: the bus's fan-out fills it for channel
streams, a generator's producer for per-request streams. Filling never blocks, and the
stream's greenlet (or thread) is woken only when the mailbox goes from empty to non-empty.

While its reader waits with nothing queued, a mailbox given a direct writer
(:meth:`Mailbox.write_directly`) hands each event's chunk to the socket itself and leaves
the reader asleep (see :mod:`~flask_sse_push.direct`).

Keep-alives come from one sweeper per process and period (:func:`keep_alive`), which wakes
the mailboxes nothing was put into for a while: a timer on every wait would cost far more
per event.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable

from . import concurrency
from .reasons import EndReason

#: The most bytes one :meth:`Mailbox.take` joins; a backlog is written in pieces this size
#: rather than copied into one object as large as the whole queue.
TAKE_BYTES = 64 * 1024


class Mailbox:
    """A bounded queue of encoded events with a single reader.

    :param limit: how many events may wait.
    """

    __slots__ = (
        "__weakref__",
        "_direct",
        "_final",
        "_items",
        "_limit",
        "_send",
        "_wake",
        "active",
        "reason",
        "rest",
        "sent",
        "written",
    )

    def __init__(self, limit: int) -> None:
        #: ``None`` while open; why it ended otherwise.
        self.reason: EndReason | None = None
        self._final: EndReason | None = None
        self._limit = limit
        self._items: deque[bytes] = deque()
        self._wake = concurrency.new_event()
        #: Whether anything was put since the keep-alive sweeper last looked.
        self.active = False
        #: Publish time of a queued event sampled for the delivery-lag metric (``0.0``:
        #: none); the stream observes the lag once it has written the event.
        self.sent = 0.0
        #: The direct writer, once the stream allows it.
        self._direct: Callable[[bytes], int] | None = None
        #: The direct writer while the reader waits with nothing queued, else ``None``.
        self._send: Callable[[bytes], int] | None = None
        #: What a direct write left unsent of a chunk; the reader writes it, as is, before
        #: anything it takes.
        self.rest = b""
        #: Bytes of the events written directly (their payloads, as the server counts
        #: what it writes), for the server's access log.
        self.written = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def direct(self) -> bool:
        """Whether events may be written directly (see :meth:`write_directly`)."""
        return self._direct is not None

    def write_directly(self, send: Callable[[bytes], int]) -> None:
        """From now on, while the reader waits with nothing queued, :meth:`push` writes
        with *send* (a socket's non-blocking ``send``) rather than waking it."""
        self._direct = send

    def push(self, payload: bytes, chunk: bytes = b"") -> bool:
        """Queue *payload*, or write *chunk* (the same event, framed as the server would)
        at once when the mailbox writes directly; when the queue is full, end with
        :attr:`~flask_sse_push.EndReason.SLOW` instead and return ``False``."""
        if self.reason is not None:
            return True
        send = self._send
        if send is not None and chunk:
            self.active = True
            try:
                sent = send(chunk)
            except BlockingIOError:
                sent = 0
            except OSError:  # the client is gone
                self._send = None
                self.end(EndReason.CLOSED)
                return True
            if sent == len(chunk):
                self.written += len(payload)
                return True
            # The socket buffer is full: the reader takes over, and writes first what the
            # kernel did not take.
            if sent:
                self.written += len(payload)
                self._send = None
                self.rest = chunk[sent:]
                self._wake.set()
                return True
        if len(self._items) >= self._limit:
            self.end(EndReason.SLOW)
            return False
        self._put(payload)
        return True

    def offer(self, payload: bytes) -> bool:
        """Queue *payload* unless the queue is full; return whether it was queued. A
        producer that may wait for its reader uses this rather than :meth:`push`."""
        if self.reason is not None or len(self._items) >= self._limit:
            return False
        self._put(payload)
        return True

    def _put(self, payload: bytes) -> None:
        # Nothing is written directly while anything waits in the queue: it would overtake.
        self._send = None
        items = self._items
        items.append(payload)
        self.active = True
        if len(items) == 1:  # else the reader was woken already and has yet to take them
            self._wake.set()

    def ping(self) -> None:
        """Wake the reader with nothing to take: its stream writes a keep-alive."""
        self.active = True
        self._wake.set()

    def end(self, reason: EndReason) -> None:
        """End now; events still queued are not written (the history has them)."""
        if self.reason is None:
            self.reason = reason
            self._wake.set()

    def finish(self, reason: EndReason) -> None:
        """End with *reason* once the events queued so far have been taken."""
        if self._final is None:
            self._final = reason
            self._wake.set()

    def take(self, timeout: float | None = None) -> bytes | None:
        """Wait until events are queued, :meth:`ping` is called or *timeout* seconds pass,
        and return queued events joined (``b""`` if none, at most about
        ``TAKE_BYTES``), or ``None`` once ended. Meanwhile events may be written directly;
        the caller writes :attr:`rest` first when it is set."""
        items = self._items
        if not items and self.reason is None and self._final is None:
            self._wake.clear()
            # Checked again after clear(): a push between the first check and clear() set the
            # event before it was cleared, and its item is now in the queue.
            if not items and self.reason is None and self._final is None and not self.rest:
                self._send = self._direct
                try:
                    self._wake.wait(timeout)
                finally:
                    self._send = None
        if self.reason is not None:
            return None
        if not items:
            if self._final is not None:
                self.reason = self._final
                return None
            return b""
        # popleft() only: a producer in another thread may append meanwhile.
        first = items.popleft()
        if not items or len(first) >= TAKE_BYTES:
            return first
        parts = [first]
        size = len(first)
        while items and size < TAKE_BYTES:
            part = items.popleft()
            parts.append(part)
            size += len(part)
        return b"".join(parts)


class _Sweeper:
    """Wakes the quiet mailboxes of one keep-alive period."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.boxes: set[Mailbox] = set()
        self.lock = concurrency.new_lock()

    def run(self) -> None:
        # A quiet stream is pinged after one to two half-periods of silence, so it writes a
        # keep-alive at least once per period.
        while True:
            time.sleep(self.period / 2)
            with self.lock:
                boxes = list(self.boxes)
            for box in boxes:
                if box.active:
                    box.active = False
                else:
                    box.ping()


_sweepers: dict[tuple[int, float], _Sweeper] = {}


def _sweeper(period: float) -> _Sweeper:
    key = (os.getpid(), period)
    sweeper = _sweepers.get(key)
    if sweeper is None:
        candidate = _Sweeper(period)
        sweeper = _sweepers.setdefault(key, candidate)  # atomic: one sweeper wins
        if sweeper is candidate:
            concurrency.spawn(sweeper.run, name="sse-keepalive")
    return sweeper


def keep_alive(box: Mailbox, period: float) -> None:
    """Ping *box* whenever nothing was put into it for about *period* seconds, until
    :func:`forget` (``0`` for *period* does nothing)."""
    if period:
        sweeper = _sweeper(period)
        with sweeper.lock:
            sweeper.boxes.add(box)


def forget(box: Mailbox, period: float) -> None:
    """Stop the keep-alives of *box*."""
    if period:
        sweeper = _sweepers.get((os.getpid(), period))
        if sweeper is not None:
            with sweeper.lock:
                sweeper.boxes.discard(box)

"""The contract every bus backend implements, and the pieces they share.

A bus carries published events to the subscriptions of this process. Each process has one
:class:`Fanout` per bus: a map from channel to the subscriptions following it, fed by ONE
receiver, whatever the number of connections. Each subscription holds a bounded queue of
already-encoded events; a publisher never waits for a client.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, NamedTuple

from .. import _sync
from ..config import Settings

log = logging.getLogger("flask_sse_push")

#: Why a stream was ended by the server.
SLOW = "slow"
SHUTDOWN = "shutdown"
REVOKED = "revoked"
LIFETIME = "lifetime"
CLOSED = "closed"


class Message(NamedTuple):
    """A published event as the bus carries it.

    :param channel: the channel it was published to.
    :param id: its event id, as written on the wire.
    :param payload: the complete encoded event, ``id:`` line included.
    """

    channel: str
    id: str
    payload: bytes


class Reset(NamedTuple):
    """Replay was impossible: the client must refetch its state.

    :param reason: ``"unknown"`` (an id this bus never gave out, e.g. from before a restart),
        ``"too-old"`` (older than the history) or ``"malformed"``.
    :param head_id: the id of the newest event, from which the client resumes.
    """

    reason: str
    head_id: str


class Resume(NamedTuple):
    """What a new subscription gets before live events.

    :param replay: encoded events missed since the client's ``Last-Event-ID``.
    :param reset: set when replay was impossible.
    :param pending: set instead when the replay must be fetched later (from a remote bus):
        a callable returning the :class:`Resume`, raising :class:`~flask_sse_push.BusError`
        while the bus is unreachable.
    """

    replay: list[bytes]
    reset: Reset | None
    pending: Callable[[], Resume] | None = None


class Subscription:
    """One open stream's place on the bus: its channels and its bounded queue.

    Events are pushed by the bus's receiver and taken by the stream's generator. Pushing never
    blocks: when the queue is full the subscription ends with reason ``"slow"``, the client
    reconnects and gets what it missed from the history.

    :param channels: the channels followed.
    :param limit: how many events may wait in the queue.
    :param user: an identity, used to end a user's streams (see :meth:`Bus.end_streams`).
    """

    __slots__ = (
        "__weakref__",
        "_items",
        "_limit",
        "_wake",
        "active",
        "channels",
        "reason",
        "user",
    )

    def __init__(self, channels: Iterable[str], limit: int, user: object = None) -> None:
        self.channels = frozenset(channels)
        self.user = user
        #: ``None`` while open; why it ended otherwise.
        self.reason: str | None = None
        self._limit = limit
        self._items: deque[bytes] = deque()
        self._wake = _sync.new_event()
        #: Whether anything was queued since the keep-alive sweeper last looked.
        self.active = False

    def push(self, payload: bytes) -> bool:
        """Queue *payload*; return ``False`` when the queue overflowed and the stream ended."""
        if self.reason is not None:
            return True
        items = self._items
        if len(items) >= self._limit:
            self.end(SLOW)
            return False
        items.append(payload)
        self.active = True
        if len(items) == 1:  # else the reader was woken already and has yet to take them
            self._wake.set()
        return True

    def ping(self) -> None:
        """Wake the reader with nothing to take: its stream writes a keep-alive."""
        self.active = True
        self._wake.set()

    def end(self, reason: str) -> None:
        """End the stream for *reason*; queued events are dropped (history has them)."""
        if self.reason is None:
            self.reason = reason
            self._items.clear()
            self._wake.set()

    def take(self, timeout: float | None = None) -> bytes | None:
        """Wait until events are queued, :meth:`ping` is called or *timeout* seconds pass,
        and return the queued events joined (``b""`` if none), or ``None`` once the
        subscription has ended."""
        items = self._items
        if not items and self.reason is None:
            self._wake.clear()
            # Checked again after clear(): a push between the first check and clear() set the
            # event before it was cleared, and its item is now in the queue.
            if not items and self.reason is None:
                self._wake.wait(timeout)
        if self.reason is not None:
            return None
        if not items:
            return b""
        # popleft() only: a publisher thread may append meanwhile.
        first = items.popleft()
        if not items:
            return first
        return b"".join([first, *(items.popleft() for _ in range(len(items)))])


class Fanout:
    """The channel -> subscriptions map of one bus in one process.

    :param lock: guards the map; shared with the bus so that delivery and subscription can be
        made atomic with the history.
    :param on_slow: called with each subscription ended for overflowing its queue.
    """

    def __init__(
        self, lock: Any, on_slow: Callable[[Subscription], None], keepalive: float = 0.0
    ) -> None:
        self.lock = lock
        self._on_slow = on_slow
        self._by_channel: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        self._keepalive = keepalive
        self._sweeping = False

    def __len__(self) -> int:
        return len(self._all)

    def add(self, sub: Subscription, *, deliver: bool = True) -> None:
        """Take *sub* in (counted, kept alive, endable) and, with *deliver*, start delivering
        to it. Callers hold :attr:`lock`."""
        if self._keepalive and not self._sweeping:
            self._sweeping = True
            _sync.spawn(_sweep, weakref.ref(self), self._keepalive / 2, name="sse-keepalive")
        self._all.add(sub)
        if deliver:
            self.activate(sub)

    def activate(self, sub: Subscription) -> None:
        """Start delivering to *sub*, taken in earlier and not ended since. Callers hold
        :attr:`lock`."""
        if sub in self._all:
            for channel in sub.channels:
                self._by_channel.setdefault(channel, set()).add(sub)

    def _deactivate(self, sub: Subscription) -> None:
        for channel in sub.channels:
            subs = self._by_channel.get(channel)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_channel[channel]

    def remove(self, sub: Subscription) -> None:
        """Stop delivering to *sub*; removing twice is harmless. Callers hold :attr:`lock`."""
        if sub not in self._all:
            return
        self._all.discard(sub)
        self._deactivate(sub)

    def deliver(self, message: Message) -> None:
        """Queue *message* for every subscription of its channel. Callers hold
        :attr:`lock`."""
        subs = self._by_channel.get(message.channel)
        if not subs:
            return
        payload = message.payload
        slow: list[Subscription] = []
        for sub in subs:
            if not sub.push(payload):
                slow.append(sub)
        for sub in slow:
            self.remove(sub)
            try:
                self._on_slow(sub)
            except Exception:  # a receiver's bug must not break delivery to others
                log.exception("flask-sse-push: a client_dropped receiver failed")

    def end(self, reason: str, predicate: Callable[[Subscription], bool]) -> int:
        """End and remove every subscription *predicate* selects; return how many.
        Callers hold :attr:`lock`."""
        chosen = [sub for sub in self._all if predicate(sub)]
        for sub in chosen:
            sub.end(reason)
            self.remove(sub)
        return len(chosen)

    def counts(self) -> dict[str, int]:
        """Open subscriptions per channel."""
        return {channel: len(subs) for channel, subs in self._by_channel.items()}

    def idle(self) -> list[Subscription]:
        """The subscriptions nothing was queued for since the last call."""
        with self.lock:
            subs = list(self._all)
        quiet = []
        for sub in subs:
            if sub.active:
                sub.active = False
            else:
                quiet.append(sub)
        return quiet


def _sweep(ref: weakref.ref[Fanout], interval: float) -> None:
    """Wake the streams that were quiet for a whole *interval* (half the keep-alive
    period), so that they write a keep-alive: one sleeper per process instead of a timer on
    every wait of every stream. A quiet stream so writes one every two intervals, and never
    stays silent longer than that. Ends when the fan-out is gone."""
    while True:
        time.sleep(interval)
        fanout = ref()
        if fanout is None:
            return
        for sub in fanout.idle():
            sub.ping()
        del fanout


class Bus(ABC):
    """The contract of a bus backend.

    A backend is chosen by the scheme of ``SSE_BUS_URL``; see :func:`register_bus`. Its
    per-process state (locks, connections, greenlets) is created lazily by :meth:`_start`,
    at first use inside the process, and again after a ``fork``.

    :param url: the bus URL.
    :param settings: the app's settings.
    :param name: a name for the app (its import name), used in logs and keys.
    """

    #: URL schemes this backend serves.
    schemes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, url: str, settings: Settings, *, name: str) -> None:
        self.url = url
        self.settings = settings
        self.name = name
        self._pid: int | None = None
        self._fanout: Fanout | None = None
        #: Called with each subscription ended for being slow (set by the extension).
        self.on_slow: Callable[[Subscription], None] = lambda sub: None

    @property
    def fanout(self) -> Fanout:
        """This process's fan-out, created (with the rest of the state) at first use."""
        if self._pid != os.getpid() or self._fanout is None:
            # The fan-out refers back to the bus only weakly: a receiver holding the fan-out
            # must not keep a discarded app's bus alive.
            slow = weakref.WeakMethod(self._slow)
            self._fanout = Fanout(
                _sync.new_lock(), lambda sub: _call(slow, sub), self.settings.keepalive
            )
            self._pid = os.getpid()
            self._start()
        return self._fanout

    def _slow(self, sub: Subscription) -> None:
        self.on_slow(sub)

    @abstractmethod
    def _start(self) -> None:
        """Create the per-process state; called with the new :attr:`fanout` in place."""

    @abstractmethod
    def publish(self, channel: str, body: bytes, event_id: str | None = None) -> str:
        """Publish an encoded event *body* (no ``id:`` line) to *channel*.

        :param event_id: the caller's id, or ``None`` to have the bus assign one.
        :returns: the event's id.
        :raises PublishError: when the event could not be published.
        """

    @abstractmethod
    def subscribe(self, sub: Subscription, last_event_id: str | None) -> Resume:
        """Start delivering to *sub* and return what it missed after *last_event_id*.

        No event is lost or repeated between the replay and the live events.
        """

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop delivering to *sub*."""
        fanout = self.fanout
        with fanout.lock:
            fanout.remove(sub)

    def end_streams(
        self, reason: str = REVOKED, *, channel: str | None = None, user: object = None
    ) -> int:
        """End this process's streams that follow *channel* and/or belong to *user*
        (all streams when both are ``None``); return how many were ended."""

        def chosen(sub: Subscription) -> bool:
            if channel is not None and channel not in sub.channels:
                return False
            return user is None or sub.user == user

        fanout = self.fanout
        with fanout.lock:
            return fanout.end(reason, chosen)

    def connection_count(self) -> int:
        """Open streams in this process."""
        return len(self.fanout)

    def channel_counts(self) -> dict[str, int]:
        """Open streams per channel in this process."""
        fanout = self.fanout
        with fanout.lock:
            return fanout.counts()

    def cluster_stats(self) -> dict[str, Any] | None:
        """Open streams of every process sharing this bus, or ``None`` when the bus serves
        only this process."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the backend's resources (connections, greenlets)."""


def _call(method: weakref.WeakMethod[Any], sub: Subscription) -> None:
    bound = method()
    if bound is not None:
        bound(sub)


_REGISTRY: dict[str, Callable[[str, Settings, str], Bus]] = {}


def register_bus(scheme: str, factory: Callable[[str, Settings, str], Bus]) -> None:
    """Make ``SSE_BUS_URL = "<scheme>://..."`` use *factory* ``(url, settings, name)``."""
    _REGISTRY[scheme] = factory


def registered_schemes() -> list[str]:
    """The schemes a bus URL may use."""
    return sorted(_REGISTRY)


def factory_for(scheme: str) -> Callable[[str, Settings, str], Bus] | None:
    """The factory registered for *scheme*, if any."""
    return _REGISTRY.get(scheme)

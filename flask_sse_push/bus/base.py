"""The contract every bus backend implements, and the records they exchange.

A bus carries published events to the subscriptions of this process through its
:class:`~flask_sse_push.bus.fanout.Fanout`. A backend is a subclass of :class:`Bus` that
names its URL schemes in :attr:`Bus.schemes`; declaring the class registers it.

Under gevent, the methods of the contract called from another OS thread than the one of
the greenlets (gevent's thread pool, a native executor) run in a greenlet of that thread
while the caller waits (see :func:`~flask_sse_push.concurrency.at_home`): a backend's locks,
connections and greenlets are only ever used where they belong.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, NamedTuple

from .. import concurrency
from ..config import SSE_BUS_URL, Settings
from ..errors import ConfigurationError
from ..mailbox import Mailbox
from ..reasons import EndReason, ResetReason
from .fanout import Fanout, Observer

BusFactory = Callable[[str, Settings, str], "Bus"]

#: The methods of the contract that run at home whatever thread calls them.
_HOMED = (
    "publish",
    "subscribe",
    "unsubscribe",
    "end_streams",
    "stream_count",
    "hold_place",
    "let_go",
    "channel_counts",
    "cluster_stats",
    "health",
    "close",
)


class Message(NamedTuple):
    """A published event as the bus carries it.

    :param channel: the channel it was published to.
    :param id: its event id, as written on the wire.
    :param payload: the complete encoded event, ``id:`` line included
        (see :func:`~flask_sse_push.encoding.with_id`).
    :param time: when it was published (Unix time, seconds) if the bus carried it, for
        the delivery-lag metric; ``0.0`` means just now, in this process.
    """

    channel: str
    id: str
    payload: bytes
    time: float = 0.0


class Reset(NamedTuple):
    """Replay was impossible: the client must refetch its state.

    :param reason: why.
    :param head_id: the id of the newest event, from which the client resumes.
    """

    reason: ResetReason
    head_id: str


class Resume(NamedTuple):
    """What a new subscription gets before live events.

    :param replay: encoded events missed since the client's ``Last-Event-ID`` or, after a
        reset, since the reset's ``head_id`` (events the bus delivered before this
        subscription was placed).
    :param reset: set when replay from ``Last-Event-ID`` was impossible.
    :param pending: set instead when the replay must be fetched later (from a remote bus):
        a callable returning the :class:`Resume`, raising :exc:`~flask_sse_push.BusError`
        while the bus is unreachable.
    """

    replay: list[bytes]
    reset: Reset | None
    pending: Callable[[], Resume] | None = None


class Subscription(Mailbox):
    """One stream's place on the bus: the channels it follows, whose it is, and the
    :class:`~flask_sse_push.mailbox.Mailbox` the bus fills for it.

    When its queue overflows it ends with :attr:`~flask_sse_push.EndReason.SLOW`; the
    client reconnects and gets what it missed from the history.

    :param channels: the channels followed.
    :param limit: how many events may wait in the queue.
    :param user: an identity, used to end a user's streams (see :meth:`Bus.end_streams`).
    """

    __slots__ = ("channels", "user")

    def __init__(self, channels: Iterable[str], limit: int, user: object = None) -> None:
        super().__init__(limit)
        self.channels = frozenset(channels)
        self.user = user


class Bus(ABC):
    """The contract of a bus backend.

    A subclass that sets :attr:`schemes` is registered for them when it is declared. Its
    per-process state (locks, connections, greenlets) is created lazily by :meth:`_start`,
    at first use inside the process, and again after a ``fork``.

    :param url: the bus URL.
    :param settings: the app's settings.
    :param name: a name for the app (its import name), used in logs and keys.
    """

    #: URL schemes this backend serves; declaring the class registers it for them.
    schemes: ClassVar[tuple[str, ...]] = ()
    #: Modules the backend imports (at first use), each with the extra that installs it.
    dependencies: ClassVar[Mapping[str, str]] = {}
    #: Whether the bus serves this process only (events do not reach other processes).
    local: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _run_at_home(cls)
        for scheme in cls.__dict__.get("schemes", ()):
            register_bus(scheme, cls.create)

    @classmethod
    def create(cls, url: str, settings: Settings, name: str) -> Bus:
        """Make the bus for *url* after checking that :attr:`dependencies` are installed.

        :raises ConfigurationError: naming the extra to install when one is missing.
        """
        for module, extra in cls.dependencies.items():
            if importlib.util.find_spec(module) is None:
                raise ConfigurationError(
                    f"{SSE_BUS_URL} = {url!r} needs the {module!r} package: "
                    f"pip install 'flask-sse-push[{extra}]'"
                )
        return cls(url, settings, name=name)

    def __init__(self, url: str, settings: Settings, *, name: str) -> None:
        self.url = url
        self.settings = settings
        self.name = name
        self._pid: int | None = None
        self._fanout: Fanout | None = None
        #: The process whose state is complete; set last, so other threads wait for it.
        self._ready_pid: int | None = None
        # A plain lock is enough: the state is built without waiting on anything, and under
        # gevent other threads reach the bus only through its home (see at_home).
        self._start_lock = threading.RLock()
        #: Called with each subscription ended for being slow (set by the extension).
        self.on_slow: Callable[[Subscription], None] = lambda sub: None
        #: Told of every delivery when the app has metrics (set by the extension).
        self.metrics: Observer | None = None

    @property
    def fanout(self) -> Fanout:
        """This process's fan-out, created (with the rest of the state) at first use; threads
        arriving meanwhile wait until the state is complete."""
        pid = os.getpid()
        fanout = self._fanout
        if self._ready_pid == pid and fanout is not None:
            return fanout
        with self._start_lock:
            if self._pid != pid or self._fanout is None:
                # The fan-out refers back to the bus only weakly: a receiver holding the
                # fan-out must not keep a discarded app's bus alive.
                self._fanout = Fanout(
                    concurrency.new_lock(), weak_callback(self._slow), self.settings.keepalive
                )
                self._fanout.metrics = self.metrics
                self._pid = pid
                self._start()  # may use self.fanout: it is in place already
                self._ready_pid = pid
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
        self,
        reason: EndReason = EndReason.REVOKED,
        *,
        channel: str | None = None,
        user: object = None,
    ) -> int:
        """End the streams that follow *channel* and/or belong to *user* (all streams when
        both are ``None``); return how many this process ended. A revocation
        (:attr:`~flask_sse_push.EndReason.REVOKED`) also reaches the other processes of a
        shared bus (see :meth:`_revoke_elsewhere`)."""
        ended = self._end_here(reason, channel, user)
        if reason is EndReason.REVOKED:
            self._revoke_elsewhere(channel, user)
        return ended

    def _end_here(self, reason: EndReason, channel: str | None, user: object) -> int:
        """End this process's matching streams; return how many."""

        def chosen(sub: Subscription) -> bool:
            if channel is not None and channel not in sub.channels:
                return False
            return user is None or sub.user == user

        fanout = self.fanout
        with fanout.lock:
            return fanout.end(reason, chosen)

    def _revoke_elsewhere(self, channel: str | None, user: object) -> None:  # noqa: B027
        """Tell the other processes sharing the bus to end these streams too (a bus serving
        one process has none).

        :raises BusError: when they could not be told.
        """

    def stream_count(self) -> int:
        """Open streams in this process."""
        return len(self.fanout)

    def direct_count(self) -> int:
        """Open streams of this process that the fan-out writes to directly (see
        :mod:`~flask_sse_push.direct`)."""
        return self.fanout.direct_count()

    def hold_place(self, limit: int) -> bool:
        """Hold a place for a stream about to subscribe, unless this process's open streams
        and held places reach *limit*; return whether one is held. Checking the limit and
        holding the place are one step, so requests that wait between the check and
        :meth:`subscribe` (in a hook) cannot exceed it. Give it back with :meth:`let_go`
        once subscribed (or failed)."""
        fanout = self.fanout
        with fanout.lock:
            return fanout.hold(limit)

    def let_go(self) -> None:
        """Give back a place held by :meth:`hold_place`."""
        fanout = self.fanout
        with fanout.lock:
            fanout.let_go()

    def channel_counts(self) -> dict[str, int]:
        """Open streams per channel in this process."""
        fanout = self.fanout
        with fanout.lock:
            return fanout.counts()

    def cluster_stats(self) -> dict[str, Any] | None:
        """Open streams of every process sharing this bus, or ``None`` when the bus serves
        only this process."""
        return None

    def health(self) -> str | None:
        """Why this process cannot use the bus now, or ``None`` when it can (the answer of
        ``<prefix>/health``; keep secrets and channel names out of it). A bus serving
        this process only is always there."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the backend's resources (connections, greenlets)."""


def _run_at_home(cls: type) -> None:
    """Make the contract's methods that *cls* defines run at home (see the module's doc)."""
    for name in _HOMED:
        method = cls.__dict__.get(name)
        if inspect.isfunction(method) and not getattr(method, "__isabstractmethod__", False):
            setattr(cls, name, concurrency.homed(method))


_run_at_home(Bus)


def weak_callback(method: Callable[[Subscription], None]) -> Callable[[Subscription], None]:
    """A callback calling the bound *method* while its object lives, without keeping the
    object alive (a receiver holding it must not keep a discarded app or bus)."""
    ref = weakref.WeakMethod(method)

    def call(sub: Subscription) -> None:
        bound = ref()
        if bound is not None:
            bound(sub)

    return call


_REGISTRY: dict[str, BusFactory] = {}


def register_bus(scheme: str, factory: BusFactory) -> None:
    """Make ``SSE_BUS_URL = "<scheme>://..."`` use *factory* ``(url, settings, name)``.

    A :class:`Bus` subclass with :attr:`Bus.schemes` is registered by declaring it; this
    function is for factories that are not such a class.
    """
    _REGISTRY[scheme] = factory


def registered_schemes() -> list[str]:
    """The schemes a bus URL may use."""
    return sorted(_REGISTRY)


def factory_for(scheme: str) -> BusFactory | None:
    """The factory registered for *scheme*, if any."""
    return _REGISTRY.get(scheme)

"""Synchronisation primitives that suit the running server.

Under gevent (``monkey.patch_all()`` done, as gunicorn's gevent worker does at start) the
primitives are gevent's own; otherwise they are the standard ``threading`` ones, for Flask's
threaded development server. They are always made at first use, inside the process and
after any monkeypatching, never at import time.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Protocol

from greenlet import getcurrent


class Waitable(Protocol):
    """The part of ``threading.Event`` that subscriptions use."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def gevent_active() -> bool:
    """Tell whether gevent has patched ``threading`` in this process."""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey is not None and monkey.is_module_patched("threading"))


def new_event() -> Waitable:
    """Return a fresh, unset event of the right kind for this process."""
    if gevent_active():
        return Park()
    return threading.Event()


class Park:
    """A one-waiter event for gevent: the waiting greenlet parks in the hub and ``set()``
    schedules its switch directly.

    It does what ``gevent.event.Event`` does for a single waiter at well under half the
    cost, which matters because every delivered event wakes one stream. ``set()`` may be
    called from any thread: from a thread other than the hub's (gevent's thread pool, a
    library's native thread) it goes through the loop's thread-safe callback, which also
    wakes the loop at once.
    """

    __slots__ = ("_callback", "_flag", "_hub", "_ident", "_schedule", "_thread", "_waiter")

    def __init__(self) -> None:
        from gevent.hub import get_hub
        from gevent.monkey import get_original

        self._hub = get_hub()
        self._schedule = self._hub.loop.run_callback
        # threading.get_ident names the greenlet once gevent has patched it.
        self._ident = get_original("_thread", "get_ident")
        self._thread = self._ident()
        self._flag = False
        #: The parked greenlet's ``switch``, while one is parked.
        self._waiter: Any = None
        #: The scheduled wake-up, until it has run.
        self._callback: Any = None

    def set(self) -> None:
        """Set the flag and wake the waiter, if one is parked."""
        if self._ident() != self._thread:
            self._hub.loop.run_callback_threadsafe(self.set)
            return
        self._flag = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self._callback = self._schedule(waiter)

    def clear(self) -> None:
        """Reset the flag."""
        self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        """Park until :meth:`set` or *timeout* seconds; return the flag."""
        if self._flag:
            return True
        waiter = getcurrent().switch
        timer = None
        if timeout is not None:
            timer = self._hub.loop.timer(max(timeout, 0.0))
            timer.start(self._expire, waiter)
        self._waiter = waiter
        try:
            self._hub.switch()
        except BaseException:
            # Woken by something else (kill, a Timeout): a wake-up scheduled meanwhile must
            # not land later in whatever this greenlet waits on next.
            if self._callback is not None:
                self._callback.stop()
            raise
        finally:
            self._waiter = None
            self._callback = None
            if timer is not None:
                timer.close()
        return self._flag

    def _expire(self, waiter: Any) -> None:
        if self._waiter is waiter:
            self._waiter = None
            waiter()


def new_lock() -> Any:
    """Return a fresh lock of the right kind for this process (a context manager)."""
    if gevent_active():
        from gevent.lock import RLock

        return RLock()
    return threading.RLock()


def spawn(target: Any, *args: Any, name: str) -> Any:
    """Run *target* in the background: a greenlet under gevent, else a daemon thread."""
    if gevent_active():
        import gevent

        return gevent.spawn(target, *args)
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


def cooperate() -> None:
    """Under gevent, let every greenlet that is ready run before this one goes on (with
    threads the scheduler does that by itself)."""
    if gevent_active():
        import gevent

        gevent.sleep(0)

"""Synchronisation primitives that suit the running server.

Under gevent (``monkey.patch_all()`` done, as gunicorn's gevent worker does at start) the
primitives are gevent's own; otherwise they are the standard ``threading`` ones, for Flask's
threaded development server. They are always made at first use, inside the process and
after any monkeypatching, never at import time.

Under gevent the server's greenlets all run in the main thread, around its hub: that thread
is the process's *home*. gevent's objects (locks, greenlets, the hub) are not for other OS
threads (gevent's thread pool, a native executor, a C library's thread), so what such a
thread asks of a bus runs at home instead (:func:`at_home`), and waking a stream from
there goes through the hub's thread-safe callback (:class:`Park`).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, TypeVar

from greenlet import getcurrent

P = ParamSpec("P")
T = TypeVar("T")


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
        home()
        return Park()
    return threading.Event()


class Home:
    """The main thread of a process under gevent, and its hub."""

    __slots__ = ("_ident", "hub", "thread")

    def __init__(self, thread: int, hub: Any) -> None:
        from gevent.monkey import get_original

        self.thread = thread
        self.hub = hub
        # threading.get_ident names the greenlet once gevent has patched it.
        self._ident: Callable[[], int] = get_original("_thread", "get_ident")

    def here(self) -> bool:
        """Whether the calling code runs in this thread."""
        return self._ident() == self.thread


_homes: dict[int, Home] = {}


def home() -> Home | None:
    """This process's home under gevent, learnt in the main thread at the first call there
    (the extension's set-up and every primitive made call it); ``None`` without gevent, or
    while nothing called it in the main thread (other threads then act by themselves)."""
    place = _homes.get(os.getpid())
    if place is None and gevent_active():
        from gevent.hub import MAIN_THREAD_IDENT, get_hub
        from gevent.monkey import get_original

        if get_original("_thread", "get_ident")() == MAIN_THREAD_IDENT:
            place = _homes[os.getpid()] = Home(MAIN_THREAD_IDENT, get_hub())
    return place


def away() -> bool:
    """Whether this code runs in another OS thread than the home of gevent's greenlets."""
    place = home()
    return place is not None and not place.here()


def at_home(func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call *func* and return its result, or raise its exception. Called from another OS
    thread than the home under gevent, it runs in a new greenlet at home while this thread
    waits; anywhere else it is called directly."""
    place = home()
    if place is None or place.here():
        return func(*args, **kwargs)
    from gevent import spawn_raw
    from gevent.monkey import get_original

    done = get_original("_thread", "allocate_lock")()
    done.acquire()
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(func(*args, **kwargs))
        except BaseException as exc:  # raised in the calling thread
            errors.append(exc)
        finally:
            done.release()

    place.hub.loop.run_callback_threadsafe(spawn_raw, run)
    done.acquire()
    if errors:
        raise errors[0]
    return results[0]


def soon(func: Callable[[], object]) -> None:
    """Call *func* soon, from any thread: under gevent in a new greenlet at home (the caller
    does not wait), else at once."""
    place = home()
    if place is None:
        func()
        return
    from gevent import spawn_raw

    place.hub.loop.run_callback_threadsafe(spawn_raw, func)


def homed(method: Callable[P, T]) -> Callable[P, T]:
    """Decorate *method* so that it always runs at home (see :func:`at_home`)."""

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        return at_home(method, *args, **kwargs)

    return call


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
    """Return a fresh lock of the right kind for this process (a context manager). Under
    gevent it is for greenlets of the home thread only."""
    if gevent_active():
        from gevent.lock import RLock

        home()
        return RLock()
    return threading.RLock()


def spawn(target: Any, *args: Any, name: str) -> Any:
    """Run *target* in the background: a greenlet under gevent, else a daemon thread."""
    if gevent_active():
        import gevent

        home()
        return gevent.spawn(target, *args)
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


def cooperate() -> None:
    """Under gevent, let every greenlet that is ready run before this one goes on (with
    threads the scheduler does that by itself). In another OS thread it does nothing: a
    ``gevent.sleep`` there would make that thread a hub of its own, and leak it."""
    if gevent_active() and not away():
        import gevent

        gevent.sleep(0)

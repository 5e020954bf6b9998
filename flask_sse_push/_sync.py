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
        from gevent.event import Event

        event: Waitable = Event()
        return event
    return threading.Event()


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

"""Process-wide concerns: ending every stream at shutdown, and noticing several workers.

Shutdown is a property of the process, not of one app, so the buses of all apps in the
process are tracked here (weakly) for :func:`end_all_streams`.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Protocol

from . import concurrency
from .bus import Bus
from .reasons import EndReason

log = logging.getLogger("flask_sse_push")

_buses: weakref.WeakSet[Bus] = weakref.WeakSet()
_responses: weakref.WeakSet[Stoppable] = weakref.WeakSet()
_stopping: list[int] = []


class Stoppable(Protocol):
    """An open stream that can be told to end, or cut."""

    def stop(self) -> None: ...

    def abort(self) -> None: ...


def track_response(response: Stoppable) -> None:
    """Include an open stream in :func:`end_all_streams` and :func:`abort_stalled_streams`."""
    _responses.add(response)


def abort_stalled_streams() -> None:
    """Cut the connections of streams still open after :func:`end_all_streams`: their
    clients stopped reading, so their last writes are stuck (the server would otherwise
    wait for them until its graceful timeout)."""
    for response in list(_responses):
        response.abort()


def track(bus: Bus) -> None:
    """Include *bus* in :func:`end_all_streams`."""
    _buses.add(bus)


@concurrency.homed
def end_all_streams(reason: EndReason = EndReason.SHUTDOWN) -> int:
    """End every open stream of every app in this process, so that a server that is shutting
    down or reloading can exit at once; clients reconnect by themselves. Returns how many
    channel streams were ended (per-request streams of :func:`~flask_sse_push.sse_response`
    are ended too, with the default *reason*).

    With the default *reason* the process also counts as stopping from then on (see
    :func:`stopping`): streams that still arrive are told to come back later at once.
    """
    if reason is EndReason.SHUTDOWN:
        mark_stopping()
        for response in list(_responses):
            response.stop()
    return sum(bus.end_streams(reason) for bus in list(_buses))


def mark_stopping() -> None:
    """Note that this process is shutting down."""
    if not stopping():
        _stopping.append(os.getpid())


def stopping() -> bool:
    """Whether this process is shutting down (a forked child does not inherit it)."""
    return os.getpid() in _stopping


def sibling_workers() -> int:
    """How many processes share this one's parent and command line (this one included).

    A pre-forking server such as gunicorn runs its workers that way. Linux only (it reads
    ``/proc``); elsewhere, or when anything cannot be read, it answers 1.
    """
    try:
        me = os.getpid()
        parent = os.getppid()
        with open(f"/proc/{me}/cmdline", "rb") as f:
            cmdline = f.read()
        count = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    # The ppid is the 2nd field after the parenthesised command name.
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                if ppid != parent:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read() == cmdline:
                        count += 1
            except (OSError, ValueError, IndexError):
                continue
        return max(count, 1)
    except OSError:
        return 1

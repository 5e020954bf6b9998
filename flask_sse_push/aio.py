"""The event loop that runs the async generators of per-request streams.

All of a process's async generators share ONE asyncio event loop, run by one real OS thread
that starts at first use, inside the process (again in a forked child). Each stream is a
task on it, so hundreds run at once for the price of their tasks, and a stream that ends
cancels its task where it awaits.

Under gevent the thread is a native one of its own, not one of gevent's hub thread pool:
that pool has ten threads and also resolves host names (``getaddrinfo``), so long-running
jobs there would starve DNS and every other user of the pool. The loop also uses the
standard selector rather than gevent's, so it never runs a gevent hub of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Coroutine
from typing import Any

from . import concurrency

_loops: dict[int, asyncio.AbstractEventLoop] = {}


def _new_loop() -> asyncio.AbstractEventLoop:
    if concurrency.gevent_active():
        from gevent.monkey import get_original

        return asyncio.SelectorEventLoop(get_original("selectors", "DefaultSelector")())
    return asyncio.new_event_loop()


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


def _start_thread(loop: asyncio.AbstractEventLoop) -> None:
    if concurrency.gevent_active():
        from gevent.monkey import get_original

        # threading.Thread would make a greenlet once gevent has patched it.
        get_original("_thread", "start_new_thread")(_serve, (loop,))
    else:
        threading.Thread(target=_serve, args=(loop,), name="sse-asyncio", daemon=True).start()


def shared_loop() -> asyncio.AbstractEventLoop:
    """This process's loop for async generators, started at first use."""
    pid = os.getpid()
    loop = _loops.get(pid)
    if loop is None:
        candidate = _new_loop()
        loop = _loops.setdefault(pid, candidate)  # atomic: one loop wins
        if loop is candidate:
            _start_thread(loop)
        else:
            candidate.close()
    return loop


#: The running tasks (the loop holds them only weakly), touched in the loop's thread only.
_tasks: set[asyncio.Task[None]] = set()


class Job:
    """A coroutine running as a task on the shared loop; :meth:`cancel` from any thread.

    :param coro: the coroutine; it starts soon, in the loop's thread.
    """

    def __init__(self, coro: Coroutine[Any, Any, None]) -> None:
        self._loop = shared_loop()
        self._task: asyncio.Task[None] | None = None
        self._loop.call_soon_threadsafe(self._start, coro)

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        self._task = task = self._loop.create_task(coro)
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)

    def cancel(self) -> None:
        """Cancel the task: ``CancelledError`` where it awaits (safe to call more than once,
        before it started, or after it ended)."""
        with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter exit)
            self._loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        # Callbacks run in the order they were scheduled: the task exists by now.
        if self._task is not None:
            self._task.cancel()

"""Ending the streams when a gunicorn worker stops, with or without the configuration module.

gunicorn tells a worker to stop by clearing its ``alive`` flag: the worker's SIGTERM handler
does it (a graceful shutdown, and the old workers of a ``SIGHUP`` reload), and so do
``max_requests`` and the code reloader. The gevent worker then stops accepting and waits up
to ``graceful_timeout`` for the open requests, which streams never finish. So each gevent
worker runs a watcher greenlet that reads that flag every :data:`SHUTDOWN_POLL` seconds and,
once it is clear, ends every stream (:func:`~flask_sse_push.lifecycle.end_all_streams`).

The configuration module's ``post_worker_init`` starts the watcher when the worker boots.
Without the module, the first stream of the worker starts it: it finds the worker through
the signal handlers gunicorn installed before loading the app, which are methods of the
worker object (:func:`find_worker`). Nothing of gunicorn's is replaced or wrapped; the
watcher only reads. Wrapping the SIGTERM handler would be lost whenever something installs
its own later, would run wherever the signal interrupts (the hub included, where a greenlet
must not block) and would miss the other ways a worker stops; ``gevent.signal_handler``
would take SIGTERM away from gunicorn altogether (libev replaces Python's handler, so the
worker would never learn that it must stop).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

from flask import current_app, has_app_context

from .config import SSE_MAX_CONNECTIONS
from .lifecycle import abort_stalled_streams, end_all_streams
from .state import get_state

log = logging.getLogger("flask_sse_push")

#: How often a worker checks whether it was told to stop.
SHUTDOWN_POLL = 0.2
#: Seconds streams get to end by themselves at shutdown before stuck ones are cut.
ABORT_AFTER = 2.0
#: The signals whose handlers gunicorn's workers install as their own methods.
_WORKER_SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT)
#: The command that adds what the first stream cannot (see :func:`at_first_stream`).
_MODULE_HINT = (
    "Serve with 'gunicorn -c python:flask_sse_push.gunicorn_conf' (or import its settings "
    "and post_worker_init into your configuration): it selects the gevent worker, sets "
    "worker_connections above SSE_MAX_CONNECTIONS, ends the streams at shutdown from the "
    "worker's start, and checks these settings when each worker boots."
)

#: The processes (by pid) whose set-up was claimed: a forked child makes its own.
_claimed: dict[int, object] = {}


def find_worker() -> Any | None:
    """The gunicorn worker that runs this process, or ``None`` elsewhere.

    gunicorn's workers install bound methods of themselves as their handlers of SIGTERM,
    SIGQUIT and SIGINT before they load the app; the first of these handlers that still
    is one names the worker. Reading a handler changes nothing.
    """
    base = sys.modules.get("gunicorn.workers.base")
    if base is None:
        return None
    for signum in _WORKER_SIGNALS:
        worker = getattr(signal.getsignal(signum), "__self__", None)
        if isinstance(worker, base.Worker):
            return worker
    return None


def is_gevent_worker(worker: Any) -> bool:
    """Whether *worker* is one of gunicorn's gevent workers."""
    ggevent = sys.modules.get("gunicorn.workers.ggevent")
    return ggevent is not None and isinstance(worker, ggevent.GeventWorker)


def set_up(worker: Any) -> None:
    """Start the watcher of gunicorn's *worker* when it is a gevent worker, once per
    process (a later call, or the first stream, does nothing)."""
    if _claim():
        _start(worker)


def _claim() -> bool:
    """Whether this is the first call in this process (``setdefault`` is atomic, so one
    caller wins whatever the threads)."""
    token = object()
    return _claimed.setdefault(os.getpid(), token) is token


def _start(worker: Any) -> None:
    if is_gevent_worker(worker):
        import gevent

        gevent.spawn(_watch, worker)


def _watch(worker: Any) -> None:
    import gevent

    while worker.alive:
        gevent.sleep(SHUTDOWN_POLL)
    ended = end_all_streams()
    log.info("flask-sse-push: worker %s ended %d streams for shutdown", worker.pid, ended)
    # gunicorn goes on accepting for up to a second after it was told to stop; a stream
    # that slips in then is answered with a retry hint by the view, and ended here at the
    # latest, until the process exits. Streams whose client stopped reading cannot end
    # (their last write is stuck): their connections are cut after ABORT_AFTER seconds.
    waited = 0.0
    while True:
        gevent.sleep(SHUTDOWN_POLL)
        waited += SHUTDOWN_POLL
        end_all_streams()
        if waited >= ABORT_AFTER:
            abort_stalled_streams()


def not_gevent_warning(worker: Any) -> str | None:
    """The warning for a gunicorn *worker* that is not a gevent worker, else ``None``."""
    if is_gevent_worker(worker):
        return None
    return (
        f"flask-sse-push: worker class {type(worker).__name__} is not gevent; every open "
        "stream holds a whole worker. Run gunicorn with -k gevent."
    )


def connections_warning(worker: Any, max_streams: int) -> str | None:
    """The warning for a gunicorn *worker* whose ``worker_connections`` are not above the
    extension's *max_streams*, else ``None``."""
    slots = getattr(worker, "worker_connections", None)
    if not isinstance(slots, int) or slots > max_streams:
        return None
    return (
        f"flask-sse-push: gunicorn worker_connections ({slots}) is not above "
        f"{SSE_MAX_CONNECTIONS} ({max_streams}): gunicorn will stop accepting connections "
        "before the extension's limit, and no ordinary request can get through when the "
        f"streams fill it. Raise worker_connections (e.g. SSE_WORKER_CONNECTIONS="
        f"{max_streams + 100} with the configuration module, --worker-connections "
        f"{max_streams + 100} without) or lower {SSE_MAX_CONNECTIONS}."
    )


def at_first_stream() -> None:
    """Called for every new stream; at the first of a gunicorn worker that its configuration
    did not set up, start the watcher, and log one warning with what is missing."""
    if os.getpid() in _claimed or not _claim() or not _under_gunicorn():
        return
    worker = find_worker()
    if worker is None:
        problem: str | None = (
            "flask-sse-push: the gunicorn worker could not be found through its signal "
            "handlers (were they replaced?), so open streams hold up every shutdown and "
            "reload until graceful_timeout."
        )
    else:
        _start(worker)
        problem = not_gevent_warning(worker)
        state = get_state(current_app, required=False) if has_app_context() else None
        if problem is None and state is not None:
            problem = connections_warning(worker, state.settings.max_streams)
    if problem is not None:
        log.warning("%s %s", problem, _MODULE_HINT)


def _under_gunicorn() -> bool:
    """Whether a gunicorn master started this process (it names itself in the
    environment its workers inherit)."""
    software = os.environ.get("SERVER_SOFTWARE", "")
    return software.startswith("gunicorn/") and "gunicorn.arbiter" in sys.modules

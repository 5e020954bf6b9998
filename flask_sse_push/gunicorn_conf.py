"""A gunicorn configuration module for serving event streams.

Use it as is::

    gunicorn -c python:flask_sse_push.gunicorn_conf app:app

or import its settings and hooks (``post_worker_init``, ``on_starting``, ``on_reload``,
``child_exit``) into your own configuration file. It selects the gevent
worker, raises ``worker_connections`` above ``SSE_MAX_CONNECTIONS`` (gunicorn's default of
1000 would otherwise cap the streams first and silently queue the rest), and ends every open
stream as soon as a worker is told to stop (SIGTERM, or a SIGHUP reload), so that the worker
exits within a second or two instead of after ``graceful_timeout`` and the clients reconnect
to the new workers at once.

Environment variables: ``SSE_WORKER_CONNECTIONS`` (default 2000), ``GUNICORN_WORKERS``
(default 1), ``GUNICORN_BIND`` (default ``127.0.0.1:8000``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger("flask_sse_push")

worker_class = "gevent"
workers = int(os.environ.get("GUNICORN_WORKERS", "1"))
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
#: Every open stream holds one of these slots; keep room for ordinary requests.
worker_connections = int(os.environ.get("SSE_WORKER_CONNECTIONS", "2000"))

#: How often a worker checks whether it was told to stop.
SHUTDOWN_POLL = 0.2


#: Seconds streams get to end by themselves at shutdown before stuck ones are cut.
ABORT_AFTER = 2.0


def _watch(worker: Any) -> None:
    import gevent

    from .lifecycle import abort_stalled_streams, end_all_streams

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


def _check_limits(worker: Any) -> None:
    from flask import Flask

    from .config import SSE_MAX_CONNECTIONS
    from .state import get_state

    app = worker.wsgi
    state = get_state(app, required=False) if isinstance(app, Flask) else None
    if state is None:
        return
    workers = getattr(worker.cfg, "workers", 1)
    warning = state.local_bus_warning(f"is served by {workers} gunicorn workers")
    if workers > 1 and warning is not None:
        log.warning(warning)
    limit = state.settings.max_streams
    slots = getattr(worker, "worker_connections", None)
    if isinstance(slots, int) and slots <= limit:
        log.warning(
            "flask-sse-push: gunicorn worker_connections (%d) is not above %s (%d): gunicorn "
            "will stop accepting connections before the extension's limit, and no ordinary "
            "request can get through when the streams fill it. Raise worker_connections "
            "(e.g. SSE_WORKER_CONNECTIONS=%d) or lower %s.",
            slots,
            SSE_MAX_CONNECTIONS,
            limit,
            limit + 100,
            SSE_MAX_CONNECTIONS,
        )


def _forget_package(server: Any) -> None:
    """gunicorn hook (master): drop the package's modules that importing this configuration
    loaded into the master, so that every worker imports the package afresh from disk.
    Otherwise each forked worker would inherit them, and after a deploy and a SIGHUP reload
    the new workers would run the old modules mixed with new ones imported later. With
    ``preload_app`` the app already holds them, so they stay."""
    if getattr(server.cfg, "preload_app", False):
        return
    package = __name__.rpartition(".")[0]
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        if name != __name__:
            del sys.modules[name]


on_starting = _forget_package
on_reload = _forget_package


def post_worker_init(worker: Any) -> None:
    """gunicorn hook: watch for shutdown and check the connection limits."""
    _check_limits(worker)
    if worker.__class__.__name__.startswith("Gevent"):
        import gevent

        gevent.spawn(_watch, worker)
    else:
        log.warning(
            "flask-sse-push: worker class %s is not gevent; every open stream holds a whole "
            "worker. Run gunicorn with -k gevent.",
            worker.__class__.__name__,
        )


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook (master): with ``PROMETHEUS_MULTIPROC_DIR`` set, drop the gauges of a
    worker that exited from the metrics (:confval:`SSE_METRICS_PATH`), so that its streams
    no longer count as open; its counters stay in the sums."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        try:
            from prometheus_client import multiprocess
        except ImportError:
            return
        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]

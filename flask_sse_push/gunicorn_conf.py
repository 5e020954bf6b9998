"""A gunicorn configuration module for serving event streams.

Use it as is::

    gunicorn -c python:flask_sse_push.gunicorn_conf app:app

or import its settings and hooks (``post_worker_init``, ``on_starting``, ``on_reload``,
``child_exit``) into your own configuration file. It selects the gevent worker, raises
``worker_connections`` above ``SSE_MAX_CONNECTIONS`` (gunicorn's default of 1000 would
otherwise cap the streams first and silently queue the rest), checks these settings when
each worker boots, and starts the worker's shutdown watcher (:mod:`flask_sse_push.shutdown`)
right away: every open stream ends as soon as the worker is told to stop (SIGTERM, or a
SIGHUP reload), so that the worker exits within a second or two instead of after
``graceful_timeout`` and the clients reconnect to the new workers at once. Without the
module, the first stream of a gevent worker starts the same watcher.

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


def _check_limits(worker: Any) -> None:
    from flask import Flask

    from .shutdown import connections_warning
    from .state import get_state

    app = worker.wsgi
    state = get_state(app, required=False) if isinstance(app, Flask) else None
    if state is None:
        return
    workers = getattr(worker.cfg, "workers", 1)
    warnings = [
        state.local_bus_warning(f"is served by {workers} gunicorn workers")
        if workers > 1
        else None,
        connections_warning(worker, state.settings.max_streams),
    ]
    for warning in warnings:
        if warning is not None:
            log.warning(warning)


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
    """gunicorn hook: watch for shutdown (see :mod:`flask_sse_push.shutdown`) and check the
    connection limits."""
    from .shutdown import not_gevent_warning, set_up

    _check_limits(worker)
    set_up(worker)
    warning = not_gevent_warning(worker)
    if warning is not None:
        log.warning(warning)


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

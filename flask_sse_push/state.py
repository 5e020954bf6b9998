"""What the extension keeps for one app, in ``app.extensions["sse_push"]``."""

from __future__ import annotations

import logging
import os
import weakref
from collections import Counter
from typing import TYPE_CHECKING, Any, Literal, overload

from flask import Blueprint, Flask, current_app, has_app_context

from . import concurrency, lifecycle, signals
from .bus import Bus, Subscription, create_bus
from .bus.base import weak_callback
from .config import DEFAULTS, SSE_BUS_URL, SSE_MAX_CONNECTIONS, Settings
from .errors import BusError, ConfigurationError, NotRegisteredError

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("flask_sse_push")

#: Key of the extension's state in ``app.extensions``.
EXTENSION_KEY = "sse_push"
#: The per-process totals that :meth:`SSEState.stats` reports.
TOTALS = ("opened", "closed", "published", "dropped")


class SSEState:
    """What the extension keeps for one app.

    :param app: the app.
    :param blueprint: the registered :class:`~flask_sse_push.SSEBlueprint`.
    """

    def __init__(self, app: Flask, blueprint: Blueprint) -> None:
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        #: The settings, read once from ``app.config``.
        self.settings = Settings.from_mapping(app.config)
        self.blueprint = blueprint
        self.app_name = app.import_name
        #: The bus carrying this app's events.
        self.bus: Bus = create_bus(self.settings.bus_url, self.settings, app.import_name)
        #: Totals of this process (see :meth:`stats`), counted where each thing happens.
        self.totals: Counter[str] = Counter()
        #: The Prometheus metrics, when :confval:`SSE_METRICS_PATH` is set (else ``None``,
        #: and ``prometheus_client`` is never imported).
        self.metrics: Metrics | None = None
        if self.settings.metrics_path is not None:
            from .metrics import Metrics

            self.metrics = self.bus.metrics = Metrics.create()
        self._checked_pid: int | None = None
        # Weakly: the bus's receiver (a greenlet or thread) must not keep a discarded app.
        self._app = weakref.ref(app)
        self.bus.on_slow = weak_callback(self._dropped)
        lifecycle.track(self.bus)
        concurrency.home()  # learnt here when the app is made in the worker's main thread

    def _dropped(self, sub: Subscription) -> None:
        self.totals["dropped"] += 1
        if self.metrics is not None:
            self.metrics.dropped()
        app = self._app()
        if app is not None:
            signals.stream_dropped.send(app, channels=sub.channels)

    def local_bus_warning(self, situation: str) -> str | None:
        """The warning for an in-process bus used in *situation* (several processes), or
        ``None`` when the bus is shared between processes."""
        if not self.bus.local:
            return None
        return (
            f"flask-sse-push: {self.app_name} {situation} on the in-process bus "
            f"({SSE_BUS_URL} = {self.settings.bus_url!r}): an event sent in one process reaches "
            f"only the clients of that process. Run one worker, or set "
            f"{SSE_BUS_URL} to a redis:// URL."
        )

    def check_process(self) -> None:
        """Once per process: warn when the in-process bus runs in one of several workers."""
        pid = os.getpid()
        if self._checked_pid == pid:
            return
        self._checked_pid = pid
        workers = lifecycle.sibling_workers()
        warning = self.local_bus_warning(f"runs in {workers} worker processes")
        if workers > 1 and warning is not None:
            log.warning(warning)

    def stats(self) -> dict[str, Any]:
        """Open streams of this process (``pid``, ``streams``, ``channels``, ``bus``, and
        ``direct``: how many of them the fan-out writes to directly), the
        process's totals since it started (``totals``: streams ``opened`` and ``closed``,
        events ``published``, streams ``dropped`` as slow) and, with a bus shared by several
        processes, the open streams of all (``cluster``, or ``cluster_error`` when they
        cannot be read). ``connections`` repeats ``streams`` for older clients."""
        streams = self.bus.stream_count()
        stats: dict[str, Any] = {
            "pid": os.getpid(),
            "bus": self.settings.bus_url.split("://", 1)[0],
            "streams": streams,
            "connections": streams,
            "direct": self.bus.direct_count(),
            "channels": self.bus.channel_counts(),
            "totals": {name: self.totals[name] for name in TOTALS},
        }
        try:
            cluster = self.bus.cluster_stats()
        except BusError as exc:
            stats["cluster_error"] = str(exc)
        else:
            if cluster is not None:
                stats["cluster"] = cluster
        return stats

    def health(self) -> dict[str, Any]:
        """Whether this process can serve new streams (``healthy``) and, if not, why
        (``problems``): it is shutting down, it holds :confval:`SSE_MAX_CONNECTIONS`
        streams, or its bus is unreachable (see :meth:`~flask_sse_push.bus.Bus.health`).
        Also ``pid``, ``bus`` (the scheme), ``streams`` and ``max_streams``; never a
        channel or a user."""
        problems: list[str] = []
        if lifecycle.stopping():
            problems.append("shutting down")
        streams = self.bus.stream_count()
        limit = self.settings.max_streams
        if streams >= limit:
            problems.append(
                f"stream limit reached: {streams} open, {SSE_MAX_CONNECTIONS} = {limit}"
            )
        bus_problem = self.bus.health()
        if bus_problem is not None:
            problems.append(f"bus unreachable: {bus_problem}")
        return {
            "healthy": not problems,
            "problems": problems,
            "pid": os.getpid(),
            "bus": self.settings.bus_url.split("://", 1)[0],
            "streams": streams,
            "max_streams": limit,
        }


@overload
def get_state(app: Flask | None = None, *, required: Literal[True] = True) -> SSEState: ...


@overload
def get_state(app: Flask | None = None, *, required: bool) -> SSEState | None: ...


def get_state(app: Flask | None = None, *, required: bool = True) -> SSEState | None:
    """Return the extension's state of *app* (default: the current app).

    :param required: with ``False``, answer ``None`` when the blueprint is not registered.
    :raises NotRegisteredError: when there is no app context, or (if *required*) the
        blueprint is not registered on the app.
    """
    if app is None:
        if not has_app_context():
            raise NotRegisteredError(
                "flask-sse-push needs an app context to publish. Inside a view or a CLI "
                "command it is there already; in a script, thread or job wrap the call in "
                "'with app.app_context(): send_event(...)'."
            )
        app = current_app._get_current_object()  # type: ignore[attr-defined]
    state = app.extensions.get(EXTENSION_KEY)
    if state is None:
        if not required:
            return None
        raise NotRegisteredError(
            f"flask-sse-push is not set up on app {app.import_name!r}: register the blueprint "
            "first, e.g. 'app.register_blueprint(sse, url_prefix=\"/stream\")'."
        )
    if not isinstance(state, SSEState):
        raise ConfigurationError(f"app.extensions[{EXTENSION_KEY!r}] was overwritten")
    return state

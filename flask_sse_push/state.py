"""Per-app state (kept in ``app.extensions``) and the publishing API."""

from __future__ import annotations

import os
import weakref
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app, has_app_context

from . import _sync, lifecycle, signals
from .bus import Bus, create_bus
from .bus.base import REVOKED, Subscription
from .config import CHANNEL_RE, DEFAULTS, SSE_BUS_URL, Settings
from .encoding import check_field, check_id, check_retry, data_text, encode_body
from .errors import ConfigurationError, NotRegisteredError

if TYPE_CHECKING:
    from .blueprint import SSEBlueprint

#: Key of the extension's state in ``app.extensions``.
EXTENSION_KEY = "sse_push"


class SSEState:
    """What the extension keeps for one app.

    :param app: the app.
    :param blueprint: the registered :class:`~flask_sse_push.SSEBlueprint`.
    """

    def __init__(self, app: Flask, blueprint: SSEBlueprint) -> None:
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        #: The settings, read once from ``app.config``.
        self.settings = Settings.from_mapping(app.config)
        self.blueprint = blueprint
        self.app_name = app.import_name
        #: The bus carrying this app's events.
        self.bus: Bus = create_bus(self.settings.bus_url, self.settings, app.import_name)
        self._checked_pid: int | None = None
        # Weakly: the bus's receiver (a greenlet or thread) must not keep a discarded app.
        app_ref = weakref.ref(app)

        def dropped(sub: Subscription) -> None:
            sender = app_ref()
            if sender is not None:
                signals.client_dropped.send(sender, channels=sub.channels)

        self.bus.on_slow = dropped
        lifecycle.track(self.bus)
        #: Totals of this process, counted from the extension's own signals (see ``stats``).
        self.totals: Counter[str] = Counter()
        for name, signal in (
            ("opened", signals.connection_opened),
            ("closed", signals.connection_closed),
            ("published", signals.event_published),
            ("dropped", signals.client_dropped),
        ):
            signal.connect(self._counter(name), sender=app, weak=False)

    def _counter(self, name: str) -> Callable[..., None]:
        totals = self.totals

        def count(sender: Flask, **kwargs: Any) -> None:
            totals[name] += 1

        return count

    def check_process(self) -> None:
        """Once per process: warn when the in-process bus runs in one of several workers."""
        pid = os.getpid()
        if self._checked_pid == pid:
            return
        self._checked_pid = pid
        if self.settings.bus_url.startswith("memory:"):
            workers = lifecycle.sibling_workers()
            if workers > 1:
                lifecycle.log.warning(
                    "flask-sse-push: %s runs in %d worker processes on the in-process bus "
                    "(%s = 'memory://'): an event sent in one worker reaches only that "
                    "worker's clients. Run one worker, or set %s to a redis:// URL.",
                    self.app_name,
                    workers,
                    SSE_BUS_URL,
                    SSE_BUS_URL,
                )

    def stats(self) -> dict[str, Any]:
        """Open streams of this process (``pid``, ``connections``, ``channels``, ``bus``), the
        process's totals since it started (``totals``: streams ``opened`` and ``closed``,
        events ``published``, clients ``dropped`` as slow, counted from the signals) and,
        with a bus shared by several processes, the open streams of all (``cluster``)."""
        stats: dict[str, Any] = {
            "pid": os.getpid(),
            "bus": self.settings.bus_url.split("://", 1)[0],
            "connections": self.bus.connection_count(),
            "channels": self.bus.channel_counts(),
            "totals": {
                name: self.totals[name] for name in ("opened", "closed", "published", "dropped")
            },
        }
        cluster = self.bus.cluster_stats()
        if cluster is not None:
            stats["cluster"] = cluster
        return stats

    def publish(
        self,
        app: Flask,
        data: Any,
        *,
        event: str | None,
        id: str | int | None,
        retry: int | None,
        channel: str | None,
    ) -> str:
        """Validate, encode once and publish; see :func:`~flask_sse_push.send_event`."""
        if channel is None:
            channel = self.settings.default_channel
        check_channel(channel)
        kind = None if event is None else check_field("event", event)
        event_id = None if id is None else check_id(id)
        if retry is not None:
            retry = check_retry(retry)
        body = encode_body(data_text(data, app.json.dumps), kind, retry)
        event_id = self.bus.publish(channel, body, event_id)
        # Let the streams write what was queued before this greenlet goes on: under gevent a
        # tight loop of publishes would otherwise fill every queue before any stream ran.
        _sync.cooperate()
        if signals.event_published.receivers:
            signals.event_published.send(app, channel=channel, id=event_id, data=data, event=kind)
        return event_id


def check_channel(channel: object) -> str:
    """Validate a channel name.

    :raises TypeError: when it is not a ``str``.
    :raises ValueError: when it is empty, too long, or holds other characters than letters,
        digits and ``_-.:@/``.
    """
    if not isinstance(channel, str):
        raise TypeError(f"channel must be a str, got {type(channel).__name__}: {channel!r}")
    if not CHANNEL_RE.fullmatch(channel):
        raise ValueError(
            f"invalid channel {channel[:140]!r}: use 1-128 characters out of letters, digits "
            "and '_-.:@/'"
        )
    return channel


def get_state(app: Flask | None = None) -> SSEState:
    """Return the extension's state of *app* (default: the current app).

    :raises NotRegisteredError: when there is no app context, or the blueprint is not
        registered on the app.
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
        raise NotRegisteredError(
            f"flask-sse-push is not set up on app {app.import_name!r}: register the blueprint "
            "first, e.g. 'app.register_blueprint(sse, url_prefix=\"/stream\")'."
        )
    if not isinstance(state, SSEState):
        raise ConfigurationError(f"app.extensions[{EXTENSION_KEY!r}] was overwritten")
    return state


def send_event(
    data: Any,
    *,
    event: str | None = None,
    id: str | int | None = None,
    retry: int | None = None,
    channel: str | None = None,
) -> str:
    """Publish an event to every client following *channel*; return the event's id.

    Works from any view, thread or greenlet that has an app context. The event is encoded
    once, here, and never waits for a client.

    :param data: a ``str`` sent as is (several lines become several ``data:`` lines), or
        anything the app's JSON provider serializes.
    :param event: the event type (``addEventListener`` name in the browser); ``None`` or
        ``""`` give the default ``message``.
    :param id: the event's id; ``None`` (the default) lets the bus assign an ordered one,
        which ``Last-Event-ID`` replay relies on. ``0`` is a valid id.
    :param retry: reconnection delay in milliseconds for the clients (``0`` is valid).
    :param channel: the channel; ``None`` means ``SSE_DEFAULT_CHANNEL``.
    :raises NotRegisteredError: without an app context, or when the blueprint is not
        registered on the app.
    :raises TypeError: for a wrongly typed argument, or *data* JSON cannot serialize.
    :raises ValueError: for an ``event`` or ``id`` holding CR, LF or NUL, an empty ``id``,
        a negative ``retry`` or an invalid channel name.
    :raises PublishError: when the bus cannot take the event (Redis unreachable).
    """
    state = get_state()
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    return state.publish(app, data, event=event, id=id, retry=retry, channel=channel)


def end_streams(
    *, channel: str | None = None, user: object = None, app: Flask | None = None
) -> int:
    """End the open streams of a *channel* and/or a *user* (as returned by the blueprint's
    :meth:`~flask_sse_push.SSEBlueprint.identify` hook), for example after revoking access.

    Their clients reconnect and meet the authorization hook again. Give at least one of
    *channel* and *user*; to end every stream at shutdown see
    :func:`flask_sse_push.lifecycle.end_all_streams`. Returns how many streams this process
    ended.
    """
    if channel is None and user is None:
        raise ValueError("end_streams() needs channel=..., user=..., or both")
    return get_state(app).bus.end_streams(REVOKED, channel=channel, user=user)

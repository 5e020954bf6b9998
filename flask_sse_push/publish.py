"""The publishing API: :func:`send_event` and :func:`end_streams`."""

from __future__ import annotations

from typing import Any

from flask import Flask, current_app

from . import concurrency, signals
from .config import CHANNEL_RE
from .encoding import check_field, check_id, check_retry, data_text, encode_body
from .errors import PublishError
from .reasons import EndReason
from .state import get_state


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
    if channel is None:
        channel = state.settings.default_channel
    check_channel(channel)
    kind = None if event is None else check_field("event", event)
    event_id = None if id is None else check_id(id)
    if retry is not None:
        retry = check_retry(retry)
    body = encode_body(data_text(data, app.json.dumps), kind, retry)
    metrics = state.metrics
    try:
        event_id = state.bus.publish(channel, body, event_id)
    except PublishError:
        if metrics is not None:
            metrics.publish_failed()
        raise
    state.totals["published"] += 1
    if metrics is not None:
        metrics.published()
    # Let the streams write what was queued before this greenlet goes on: under gevent a
    # tight loop of publishes would otherwise fill every queue before any stream ran.
    concurrency.cooperate()
    if signals.event_published.receivers:
        signals.event_published.send(app, channel=channel, id=event_id, data=data, event=kind)
    return event_id


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
    return get_state(app).bus.end_streams(EndReason.REVOKED, channel=channel, user=user)

"""Signals the extension sends, in a private blinker namespace.

Each is sent with the Flask app as sender. Connect with ``weak=False`` when the receiver is a
closure or bound method that nothing else holds::

    from flask_sse_push import signals

    @signals.connection_opened.connect_via(app)
    def opened(app, channels, **extra):
        ...
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

connection_opened = _signals.signal(
    "connection-opened",
    doc="A stream was opened. Keyword arguments: ``channels`` (frozenset of str).",
)
connection_closed = _signals.signal(
    "connection-closed",
    doc="A stream ended. Keyword arguments: ``channels`` and ``reason``: ``'closed'`` when "
    "the client went away or the server closed it, else ``'slow'``, ``'shutdown'``, "
    "``'revoked'`` or ``'lifetime'``.",
)
event_published = _signals.signal(
    "event-published",
    doc="``send_event`` published an event. Keyword arguments: ``channel``, ``id``, ``data`` "
    "(as given) and ``event`` (the type or ``None``).",
)
client_dropped = _signals.signal(
    "client-dropped",
    doc="A stream was ended because its client read too slowly and its queue overflowed. "
    "Keyword arguments: ``channels``.",
)

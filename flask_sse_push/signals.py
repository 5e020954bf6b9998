"""Signals the extension sends, in a private blinker namespace.

Each is sent with the Flask app as sender. Connect with ``weak=False`` when the receiver is a
closure or bound method that nothing else holds::

    from flask_sse_push import signals

    @signals.stream_opened.connect_via(app)
    def opened(app, channels, **extra):
        ...

The names of version 0.1 (``connection_opened``, ``connection_closed``, ``client_dropped``)
still work: they are the same signals.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

stream_opened = _signals.signal(
    "stream-opened",
    doc="A stream was opened. Keyword arguments: ``channels`` (frozenset of str).",
)
stream_closed = _signals.signal(
    "stream-closed",
    doc="A stream ended. Keyword arguments: ``channels`` and ``reason``, an "
    ":class:`~flask_sse_push.EndReason` (a str): ``'closed'`` when the client went "
    "away or the server closed it, else ``'slow'``, ``'shutdown'``, ``'revoked'``, "
    "``'lifetime'`` or ``'lagged'``.",
)
event_published = _signals.signal(
    "event-published",
    doc="``send_event`` published an event. Keyword arguments: ``channel``, ``id``, ``data`` "
    "(as given) and ``event`` (the type or ``None``).",
)
stream_dropped = _signals.signal(
    "stream-dropped",
    doc="A stream was ended because its client read too slowly and its queue overflowed. "
    "Keyword arguments: ``channels``.",
)

#: Former name of :data:`stream_opened`.
connection_opened = stream_opened
#: Former name of :data:`stream_closed`.
connection_closed = stream_closed
#: Former name of :data:`stream_dropped`.
client_dropped = stream_dropped

"""Server-Sent Events for Flask.

::

    from flask_sse_push import sse, send_event

    app.register_blueprint(sse, url_prefix="/stream")
    send_event({"status": "paid"}, event="order", channel="orders")
"""

from __future__ import annotations

from .blueprint import RESET_EVENT, SSEBlueprint, sse
from .bus import register_bus
from .encoding import Event
from .errors import (
    BusError,
    ConfigurationError,
    NotRegisteredError,
    PublishError,
    SSEError,
)
from .lifecycle import end_all_streams
from .responses import sse_response
from .state import end_streams, get_state, send_event

__all__ = [
    "RESET_EVENT",
    "BusError",
    "ConfigurationError",
    "Event",
    "NotRegisteredError",
    "PublishError",
    "SSEBlueprint",
    "SSEError",
    "end_all_streams",
    "end_streams",
    "get_state",
    "register_bus",
    "send_event",
    "sse",
    "sse_response",
]

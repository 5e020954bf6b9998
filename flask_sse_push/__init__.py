"""Server-Sent Events for Flask.

::

    from flask_sse_push import sse, send_event

    app.register_blueprint(sse, url_prefix="/stream")
    send_event({"status": "paid"}, event="order", channel="orders")
"""

from __future__ import annotations

from .blueprint import SSEBlueprint, sse
from .bus import register_bus
from .encoding import RESET_EVENT, Event
from .errors import (
    BusError,
    ConfigurationError,
    NotRegisteredError,
    PublishError,
    SSEError,
)
from .lifecycle import end_all_streams
from .publish import end_streams, send_event
from .reasons import EndReason, ResetReason
from .responses import sse_response
from .state import get_state

#: The package's version, the one source of it (``setup.cfg`` reads it from here).
__version__ = "0.1.0"

__all__ = [
    "RESET_EVENT",
    "BusError",
    "ConfigurationError",
    "EndReason",
    "Event",
    "NotRegisteredError",
    "PublishError",
    "ResetReason",
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

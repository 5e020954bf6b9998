"""Driving a bus directly, as a stream does."""

from __future__ import annotations

import time

from flask_sse_push import BusError
from flask_sse_push.bus import Bus, Resume, Subscription


def resume(bus: Bus, sub: Subscription, last_event_id: str | None) -> Resume:
    """Subscribe *sub* to *bus* after *last_event_id* and return the replay, fetching a
    pending one (retried while the bus answers :exc:`BusError`, for up to 10 s) like a
    stream does."""
    result = bus.subscribe(sub, last_event_id)
    deadline = time.monotonic() + 10
    while result.pending is not None:
        try:
            result = result.pending()
        except BusError:
            assert time.monotonic() < deadline, "the replay never became available"
            time.sleep(0.02)
    return result

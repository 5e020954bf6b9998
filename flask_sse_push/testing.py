"""Helpers for testing apps that use flask-sse-push.

Capture what your views publish::

    from flask_sse_push.testing import captured_events

    with captured_events(app) as sent:
        client.post("/orders", json={...})
    assert sent[0].channel == "orders"

Read a stream from Flask's test client, bounded in count and time::

    from flask_sse_push.testing import read_events

    response = client.get("/stream?channel=orders", buffered=False)
    events = read_events(response, count=2, timeout=5)
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flask import Flask

from . import signals
from .parser import EventParser, ServerEvent


@dataclass(frozen=True)
class CapturedEvent:
    """An event published while :func:`captured_events` was active."""

    channel: str
    id: str
    data: Any
    event: str | None


@contextmanager
def captured_events(app: Flask) -> Iterator[list[CapturedEvent]]:
    """Collect every event *app* publishes inside the ``with`` block (they are still sent)."""
    sent: list[CapturedEvent] = []

    def record(sender: Flask, **kwargs: Any) -> None:
        sent.append(CapturedEvent(kwargs["channel"], kwargs["id"], kwargs["data"], kwargs["event"]))

    with signals.event_published.connected_to(record, sender=app):
        yield sent


class EventReader:
    """Reads a stream response of Flask's test client as parsed events.

    The body is read in a background thread so every wait is bounded by a timeout;
    :meth:`close` ends the stream. Use it as a context manager.

    :param response: a response from ``client.get(url, buffered=False)``.
    """

    def __init__(self, response: Any) -> None:
        self.response = response
        self.parser = EventParser()
        self._chunks: queue.Queue[bytes | None] = queue.Queue()
        self._pending: list[ServerEvent] = []
        self._ended = False
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for chunk in self.response.response:
                self._chunks.put(chunk)
        finally:
            self._chunks.put(None)

    def events(self, count: int | None = None, timeout: float = 5.0) -> list[ServerEvent]:
        """Return events as they come until *count* were read, the stream ended, or
        *timeout* seconds passed (then whatever was read)."""
        deadline = time.monotonic() + timeout
        out: list[ServerEvent] = []
        while count is None or len(out) < count:
            if self._pending:
                out.append(self._pending.pop(0))
                continue
            left = deadline - time.monotonic()
            if self._ended or left <= 0:
                break
            try:
                chunk = self._chunks.get(timeout=left)
            except queue.Empty:
                break
            if chunk is None:
                self._ended = True
            else:
                self._pending.extend(self.parser.feed(chunk))
        return out

    @property
    def ended(self) -> bool:
        """Whether the server ended the stream (as far as has been read)."""
        return self._ended

    def close(self) -> None:
        """End the stream and release it."""
        self.response.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(
    response: Any, *, count: int | None = None, timeout: float = 5.0
) -> list[ServerEvent]:
    """Read up to *count* events of a test-client stream within *timeout*, then close it."""
    with EventReader(response) as reader:
        return reader.events(count, timeout)

"""The body of every stream response: replay, live events and keep-alives."""

from __future__ import annotations

import contextlib
import itertools
import socket
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

from . import lifecycle
from .bus.base import CLOSED, LIFETIME, SHUTDOWN, Bus, Subscription
from .encoding import KEEPALIVE, comment
from .errors import BusError

#: Longest pause, in seconds, between attempts to fetch a replay from an unreachable bus.
RETRY_CAP = 2.0


def client_socket(environ: dict[str, Any], send_timeout: float) -> socket.socket | None:
    """The client's socket, where the server tells it (gunicorn, Werkzeug), with
    *send_timeout* applied to writes that stall (``0``: none)."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if not isinstance(sock, socket.socket):
        return None
    if send_timeout:
        with contextlib.suppress(OSError):
            sock.settimeout(send_timeout)
    return sock


class EventStream:
    """A WSGI response body that writes *head* at once, then the events queued for *sub*.

    A comment line goes out after every *keepalive* seconds of silence (``0``: never); it
    keeps proxies from closing the stream and lets the server notice a vanished client. The
    stream ends when the subscription is ended (slow client, shutdown, revocation), after
    *max_lifetime* seconds when that is set, or when the client goes away, which the server
    reports by calling :meth:`close`. In every case *sub* leaves the bus exactly once, even
    when the body was never iterated.

    :param sub: the connection's subscription, already on the bus.
    :param bus: the bus to leave at the end.
    :param head: bytes written at once (retry hint, and replay and initial state when known).
    :param catch_up: when set, returns bytes to write after *head* and before any live event
        (replay from a remote bus, then initial state); it is called again, with keep-alives
        in between, while it raises :class:`~flask_sse_push.BusError`.
    :param keepalive: seconds between keep-alive comments.
    :param max_lifetime: seconds before the stream ends for a reconnection, ``0`` for never.
    :param on_close: called once with *sub* when the stream is over.
    """

    def __init__(
        self,
        sub: Subscription,
        bus: Bus,
        head: bytes,
        *,
        catch_up: Callable[[], bytes] | None = None,
        keepalive: float,
        max_lifetime: float = 0.0,
        on_close: Callable[[Subscription], None] | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.sub = sub
        self._bus = bus
        self._on_close = on_close
        self._finished = False
        self._catch_up = catch_up
        self._sock = sock
        self._events = self._run(head, keepalive or None, max_lifetime)
        lifecycle.track_response(self)

    def stop(self) -> None:
        """End the stream at shutdown (see :func:`~flask_sse_push.end_all_streams`)."""
        self.sub.end(SHUTDOWN)

    def abort(self) -> None:
        """Cut the connection of a stream that did not end after :meth:`stop`, because its
        client stopped reading and a write is stuck: the write fails at once."""
        if not self._finished and self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def __iter__(self) -> Iterator[bytes]:
        return self._events

    def close(self) -> None:
        """Stop the stream and leave the bus (WSGI servers call this when done).

        Safe to call from another thread while the body is being iterated: the waiting
        iteration wakes up and ends.
        """
        self.sub.end(CLOSED)
        # "generator already executing" in another thread: woken by end(), it ends by itself.
        with contextlib.suppress(ValueError):
            self._events.close()
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._bus.unsubscribe(self.sub)
        if self._on_close is not None:
            self._on_close(self.sub)

    def _run(
        self, head: bytes, wait: float | None, max_lifetime: float
    ) -> Generator[bytes, None, None]:
        # Keep-alives: the bus's sweeper wakes a quiet stream with nothing to take, so the
        # wait below needs no timer of its own (a timer per wait costs a lot per event).
        sub = self.sub
        deadline = time.monotonic() + max_lifetime if max_lifetime else None
        try:
            yield head
            if self._catch_up is not None:
                caught_up = yield from self._wait_for_catch_up(self._catch_up, wait)
                if not caught_up:
                    yield comment(f" {sub.reason}")
                    return
            while True:
                timeout = None
                if deadline is not None:
                    timeout = deadline - time.monotonic()
                    if timeout <= 0:
                        sub.end(LIFETIME)
                data = sub.take(timeout)
                if data:
                    yield data
                elif data is None:
                    yield comment(f" {sub.reason}")
                    return
                elif wait is not None:
                    yield KEEPALIVE
        finally:
            self._finish()

    def _wait_for_catch_up(
        self, catch_up: Callable[[], bytes], wait: float | None
    ) -> Generator[bytes, None, bool]:
        """Write what *catch_up* returns once it succeeds; keep-alives meanwhile. Returns
        ``False`` if the subscription ended first."""
        quiet = 0.0
        for attempt in itertools.count():
            if self.sub.reason is not None:
                return False
            try:
                data = catch_up()
            except BusError:
                pause = min(0.1 * 2**attempt, RETRY_CAP)
                time.sleep(pause)
                quiet += pause
                if wait is not None and quiet >= wait:
                    quiet = 0.0
                    yield KEEPALIVE
                continue
            if data:
                yield data
            return True
        return False  # pragma: no cover - itertools.count() never ends

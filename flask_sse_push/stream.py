"""Stream bodies and the response that carries them.

Every open stream is a :class:`StreamBody`, a WSGI response body that writes its first line
at once, then what its :class:`~flask_sse_push.mailbox.Mailbox` receives, with keep-alives
in the quiet times, until the mailbox ends or the client leaves. It has two kinds:

- :class:`BusStream`, a client following channels: its mailbox is a
  :class:`~flask_sse_push.bus.Subscription` that the bus fills;
- :class:`GeneratorStream`, a per-request stream (:func:`~flask_sse_push.sse_response`):
  a producer running the app's generator fills its mailbox.

:func:`event_stream_response` wraps either (or a short fixed body) in the response.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import socket
import sys
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from typing import Any, Protocol

from flask import Response

from . import concurrency, direct, lifecycle, mailbox, shutdown
from .bus.base import Bus, Subscription
from .encoding import KEEPALIVE, end_comment
from .errors import BusError
from .mailbox import Mailbox
from .reasons import EndReason

#: Longest pause, in seconds, between attempts to fetch a replay from an unreachable bus.
RETRY_CAP = 2.0

CONTENT_TYPE = "text/event-stream; charset=utf-8"
HEADERS: Mapping[str, str] = {
    "Cache-Control": "no-cache",
    # nginx buffers proxied responses unless told not to.
    "X-Accel-Buffering": "no",
}


def client_socket(environ: Mapping[str, Any], send_timeout: float) -> socket.socket | None:
    """The client's socket, where the server tells it (gunicorn, Werkzeug), with
    *send_timeout* applied to writes that stall (``0``: none)."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if not isinstance(sock, socket.socket):
        return None
    if send_timeout:
        with contextlib.suppress(OSError):
            sock.settimeout(send_timeout)
    return sock


def event_stream_response(
    body: Iterable[bytes] | bytes, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A ``text/event-stream`` response of *body*, with the headers every stream needs
    (no caching, no proxy buffering) and then *headers*. A ``bytes`` body is complete and
    gets a ``Content-Length``; an iterable one, like every stream, does not."""
    response = Response(body, status, content_type=CONTENT_TYPE, direct_passthrough=True)
    response.headers.update(HEADERS)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


class StreamBody:
    """What every stream body does: write *head*, then the mailbox's events with
    keep-alives, until the mailbox ends; end at shutdown; release its resources exactly
    once, however it ends.

    A body is released when its iteration ends, when it is closed (WSGI servers do it when
    done, from any thread), or when it is thrown away unclosed (an ``after_request`` handler
    that raised, a middleware that dropped it): nothing the body holds refers back to it,
    so it is collected as soon as the last reference goes, and a finalizer releases it.

    :param box: the mailbox to write from.
    :param head: bytes written at once (retry hint, replay and initial state when known).
    :param keepalive: seconds of silence before a keep-alive comment (``0``: never).
    :param sock: the client's socket, cut by :meth:`abort`.
    :param direct: the client's socket when the fan-out may write to it directly (see
        :func:`~flask_sse_push.direct.candidate`).
    :param on_close: called once when the stream is over.
    :param lag: called with the seconds from publishing to writing of each sampled event
        (see :attr:`Mailbox.sent <flask_sse_push.mailbox.Mailbox.sent>`).
    """

    def __init__(
        self,
        box: Mailbox,
        head: bytes,
        *,
        keepalive: float,
        sock: socket.socket | None = None,
        direct: socket.socket | None = None,
        on_close: Callable[[], None] | None = None,
        lag: Callable[[float], None] | None = None,
    ) -> None:
        self.box = box
        self._head = head
        self._keepalive = keepalive
        self._sock = sock
        self._direct = direct
        self._lag = lag
        # The running iteration holds the body; the body holds it only weakly.
        self._iteration: weakref.ref[Generator[bytes, None, None]] | None = None
        self._end = weakref.finalize(self, _release_later, self._releases(), on_close)
        self._end.atexit = False
        lifecycle.track_response(self)
        shutdown.at_first_stream()

    def __iter__(self) -> Iterator[bytes]:
        events = self._iteration() if self._iteration is not None else None
        if events is not None:
            return events
        if not self._end.alive:  # closed before it was read
            return iter(())
        events = self._run(self._head)
        self._iteration = weakref.ref(events)
        return events

    def stop(self) -> None:
        """End the stream at shutdown (see :func:`~flask_sse_push.lifecycle.end_all_streams`)."""
        self.box.end(EndReason.SHUTDOWN)

    def abort(self) -> None:
        """Cut the connection of a stream that did not end after :meth:`stop`, because its
        client stopped reading and a write is stuck: the write fails at once."""
        if self._end.alive:
            self._hang_up()

    def close(self) -> None:
        """End the stream and release it (WSGI servers call this when done).

        Safe to call from another thread while the body is being iterated: the waiting
        iteration wakes up and ends.

        A stream that ended for shutdown also hangs up its connection, after the server
        wrote the last chunk: the server would otherwise keep it open for a next request
        (gunicorn up to its keep-alive timeout, holding up the exit), which would reach
        this stopping process instead of a new one.
        """
        self.box.end(EndReason.CLOSED)
        if self.box.reason is EndReason.SHUTDOWN:
            self._hang_up()
        # The iteration is left alone: closing it here could run into another thread's
        # next() ("generator already executing"). Woken by end(), it ends by itself, and an
        # iteration nobody reads any more is closed when it is collected.
        self._finish()

    def _hang_up(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def _finish(self) -> None:
        # detach() is atomic: exactly one caller gets the arguments, whatever the race.
        found = self._end.detach()
        if found is not None:
            _release(*found[2])

    def _releases(self) -> list[Callable[[], None]]:
        """What gives back the stream's resources (its place on the bus, its producer):
        callables that do not refer to the body."""
        return []

    def _opening(self) -> Generator[bytes, None, bool]:
        """Runs after the head, before the mailbox is read; returns ``False`` when the stream
        ended meanwhile."""
        return True
        yield b""  # pragma: no cover - makes this a generator

    def _timeout(self) -> float | None:
        """How long the next wait for the mailbox may last (``None``: no limit)."""
        return None

    def _run(self, head: bytes) -> Generator[bytes, None, None]:
        box = self.box
        response: Any = None
        try:
            yield head
            if not (yield from self._opening()):
                yield end_comment(str(box.reason))
                return
            if self._direct is not None:
                # The frame asking for the next bytes is whatever iterates this body.
                found = direct.writer(self._direct, sys._getframe().f_back, self)
                if found is not None:
                    box.write_directly(found[0])
                    response = found[1]
            while True:
                data = box.take(self._timeout())
                wrote = bool(box.rest)
                if data is None:
                    if wrote:
                        self._write_rest()
                    if box.reason is not EndReason.DONE:
                        yield end_comment(str(box.reason))
                    return
                # 0.0 unless a sampled event is among them (metrics): queued, or the one a
                # direct write cut short when nothing is queued.
                sent = box.sent if data or wrote else 0.0
                if sent:
                    box.sent = 0.0
                if wrote:
                    self._write_rest()
                if data:
                    yield data
                elif self._keepalive and not wrote:
                    yield KEEPALIVE
                if sent and self._lag is not None:
                    self._lag(time.time() - sent)  # written: the server asks for more
        finally:
            if response is not None:
                response.sent += box.written  # what the server's access log reports
            self._finish()

    def _write_rest(self) -> None:
        """Write what a direct write left of a chunk, as is (it is framed already). A failed
        write raises, as the server's own would: the server then drops the connection,
        where a normal end would write the last chunk after this cut one."""
        rest, self.box.rest = self.box.rest, b""
        try:
            assert self._direct is not None
            self._direct.sendall(rest)
        except OSError:
            self.box.end(EndReason.CLOSED)
            raise


class BusStream(StreamBody):
    """A stream of the channels a :class:`~flask_sse_push.bus.Subscription` follows.

    :param sub: the subscription, already on *bus*; it leaves the bus exactly once.
    :param bus: the bus.
    :param catch_up: when set, returns bytes to write after the head and before any live
        event (replay from a remote bus, then initial state); it is called again, with
        keep-alives in between, while it raises :exc:`~flask_sse_push.BusError`.
    :param max_lifetime: seconds before the stream ends for a reconnection, ``0`` for never.
    :param kwargs: see :class:`StreamBody`.
    """

    box: Subscription

    def __init__(
        self,
        sub: Subscription,
        bus: Bus,
        head: bytes,
        *,
        catch_up: Callable[[], bytes] | None = None,
        max_lifetime: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self._bus = bus
        self._catch_up = catch_up
        self._deadline = time.monotonic() + max_lifetime if max_lifetime else None
        super().__init__(sub, head, **kwargs)

    def _releases(self) -> list[Callable[[], None]]:
        return [functools.partial(self._bus.unsubscribe, self.box)]

    def _timeout(self) -> float | None:
        if self._deadline is None:
            return None
        timeout = self._deadline - time.monotonic()
        if timeout <= 0:
            self.box.end(EndReason.LIFETIME)
        return timeout

    def _opening(self) -> Generator[bytes, None, bool]:
        """Write what :attr:`catch_up` returns once it succeeds; keep-alives meanwhile."""
        if self._catch_up is None:
            return True
        quiet = 0.0
        for attempt in itertools.count():
            if self.box.reason is not None:
                return False
            if self._deadline is not None and time.monotonic() >= self._deadline:
                self.box.end(EndReason.LIFETIME)
                return False
            try:
                data = self._catch_up()
            except BusError:
                pause = min(0.1 * 2**attempt, RETRY_CAP)
                time.sleep(pause)
                quiet += pause
                if self._keepalive and quiet >= self._keepalive:
                    quiet = 0.0
                    yield KEEPALIVE
                continue
            if data:
                yield data
            return True
        return False  # pragma: no cover - itertools.count() never ends


class Producer(Protocol):
    """What runs a per-request stream's source and fills its mailbox."""

    def start(self) -> None:
        """Start filling the mailbox in the background."""

    def stop(self) -> None:
        """Stop soon; safe to call more than once, from any thread."""


class GeneratorStream(StreamBody):
    """A per-request stream: *producer* starts when the body is first iterated and fills
    the mailbox (a body never iterated holds nothing); it is stopped however the stream
    ends.

    :param producer: the producer.
    :param kwargs: see :class:`StreamBody`.
    """

    def __init__(self, box: Mailbox, head: bytes, producer: Producer, **kwargs: Any) -> None:
        self._producer = producer
        super().__init__(box, head, **kwargs)

    def stop(self) -> None:
        super().stop()
        self._producer.stop()

    def _opening(self) -> Generator[bytes, None, bool]:
        mailbox.keep_alive(self.box, self._keepalive)
        self._producer.start()
        return True
        yield b""  # pragma: no cover - makes this a generator

    def _releases(self) -> list[Callable[[], None]]:
        return [functools.partial(mailbox.forget, self.box, self._keepalive), self._producer.stop]


def _release(releases: list[Callable[[], None]], on_close: Callable[[], None] | None) -> None:
    for release in releases:
        release()
    if on_close is not None:
        on_close()


def _release_later(releases: list[Callable[[], None]], on_close: Callable[[], None] | None) -> None:
    """Release a body that was collected without being closed. The collector may run
    anywhere, in the hub or in another thread too, so this happens in a greenlet of its own
    (under gevent)."""
    concurrency.soon(functools.partial(_release, releases, on_close))

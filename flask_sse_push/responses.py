"""Per-request streams: turn a generator into a Server-Sent Events response.

For endpoints whose events belong to one request, such as a long computation's progress or
a model's tokens::

    @app.post("/generate")
    def generate():
        prompt = request.json["prompt"]

        def tokens():
            for token in model.generate(prompt):
                yield {"token": token}
            yield Event("done", event="end")

        return sse_response(tokens())

Plain and ``async`` generators both work. They run in a greenlet (gevent) or a thread of
their own, so keep-alives go out while the generator thinks, and they are stopped when the
client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import socket
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from typing import Any

from flask import Response as FlaskResponse
from flask import copy_current_request_context, current_app, has_request_context, request

from . import _sync, lifecycle
from .config import DEFAULTS, SSE_KEEPALIVE, SSE_RETRY, SSE_SEND_TIMEOUT
from .encoding import KEEPALIVE, Event, comment, encode_event, retry_line
from .state import EXTENSION_KEY
from .stream import client_socket

log = logging.getLogger("flask_sse_push")

_END = object()
#: Encoded events the generator may run ahead of a slow client before it waits.
_AHEAD = 64


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _encoder(dumps: Callable[[Any], str]) -> Callable[[Any], bytes]:
    def encode(item: Any) -> bytes:
        return encode_event(item if isinstance(item, Event) else Event(item), dumps)

    return encode


class _Producer:
    """Runs the source in the background and hands encoded events over a bounded queue."""

    def __init__(
        self, source: Iterable[Any] | AsyncIterable[Any], encode: Callable[[Any], bytes]
    ) -> None:
        self.source = source
        self.encode = encode
        self.queue: queue.Queue[object] = queue.Queue(maxsize=_AHEAD)
        self.stopped = False

    def _put(self, item: object) -> bool:
        while not self.stopped:
            try:
                self.queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            if isinstance(self.source, AsyncIterable):
                if _sync.gevent_active():
                    self._run_async_in_thread(self.source)
                else:
                    asyncio.run(self._run_async(self.source, self.queue.put_nowait))
            else:
                self._run_sync(self.source)
        except BaseException as exc:  # reported to the client as the stream's end
            self._put(_Failure(exc))
        finally:
            self._put(_END)

    def _run_sync(self, source: Iterable[Any]) -> None:
        iterator = iter(source)
        try:
            for item in iterator:
                if not self._put(self.encode(item)):
                    break
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def _run_async_in_thread(self, source: AsyncIterable[Any]) -> None:
        """Under gevent: run the event loop in a real thread of the hub's pool (asyncio
        allows one running loop per thread, and all greenlets share one) and move its events
        over to this greenlet."""
        import gevent
        from gevent.hub import get_hub
        from gevent.monkey import get_original

        hub = get_hub()
        notify = hub.loop.async_()
        handoff: deque[object] = deque()
        guard = get_original("_thread", "allocate_lock")()
        closed = False

        def wake() -> None:
            with guard:
                if not closed:
                    notify.send()

        def offer(data: bytes) -> None:
            if len(handoff) >= _AHEAD:
                raise queue.Full
            handoff.append(data)
            wake()

        def in_thread() -> None:
            try:
                asyncio.run(self._run_async(source, offer))
            except BaseException as exc:
                handoff.append(_Failure(exc))
            finally:
                handoff.append(_END)
                wake()

        if has_request_context():
            in_thread = copy_current_request_context(in_thread)
        hub.threadpool.spawn(in_thread)
        try:
            while True:
                while handoff:
                    item = handoff.popleft()
                    if item is _END:
                        return
                    if isinstance(item, _Failure):
                        raise item.error
                    if not self._put(item):
                        return  # stopped: the thread sees it and ends
                with gevent.Timeout(0.05, False):
                    hub.wait(notify)
        finally:
            with guard:
                closed = True
                notify.close()

    async def _run_async(self, source: AsyncIterable[Any], offer: Callable[[bytes], None]) -> None:
        iterator = source.__aiter__()
        try:
            async for item in iterator:
                # Waiting for room must not block the event loop for ever either.
                data = self.encode(item)
                while not self.stopped:
                    try:
                        offer(data)
                        break
                    except queue.Full:
                        await asyncio.sleep(0.01)
                if self.stopped:
                    break
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class _Body:
    """The response body: iterates *events*; :meth:`close` (the server's call when the
    client is gone) also works while another thread is iterating."""

    def __init__(
        self, events: Iterator[bytes], producer: _Producer, sock: socket.socket | None
    ) -> None:
        self._events = events
        self._producer = producer
        self._sock = sock
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        return self._events

    def stop(self) -> None:
        """End the stream soon (at shutdown): wake the reader, stop the generator."""
        self._producer.stopped = True
        with contextlib.suppress(queue.Full):
            self._producer.queue.put_nowait(_END)  # wakes a waiting reader

    def abort(self) -> None:
        """Cut the connection if the stream is still writing after :meth:`stop`."""
        if not self._done and self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._done = True
        self.stop()
        with contextlib.suppress(ValueError):  # "generator already executing" elsewhere
            close = getattr(self._events, "close", None)
            if close is not None:
                close()


def sse_response(
    source: Iterable[Any] | AsyncIterable[Any],
    *,
    keepalive: float | None = None,
    retry: int | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> FlaskResponse:
    """Stream the events *source* yields as a ``text/event-stream`` response.

    Items may be :class:`~flask_sse_push.Event` objects, ``str`` (sent as data) or anything
    the app's JSON provider serializes. Each is encoded like :func:`~flask_sse_push.send_event`
    does. The generator runs in the background inside a copy of the request context; a
    comment line goes out after every *keepalive* seconds of silence; when the client goes
    away the generator is closed (``GeneratorExit`` at its ``yield``). An exception in the
    generator ends the stream with an ``: error`` comment and is logged. Works for any
    method, POST included (read it with a ``fetch``-based client).

    :param source: a generator, async generator or other (async) iterable.
    :param keepalive: seconds between keep-alives; default ``SSE_KEEPALIVE`` (15).
    :param retry: reconnection delay to announce; default ``SSE_RETRY``.
    :param status: the response status.
    :param headers: extra response headers.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    state = app.extensions.get(EXTENSION_KEY)
    if state is not None:
        defaults: dict[str, Any] = {
            SSE_KEEPALIVE: state.settings.keepalive,
            SSE_RETRY: state.settings.retry,
        }
    else:
        defaults = {key: app.config.get(key, DEFAULTS[key]) for key in (SSE_KEEPALIVE, SSE_RETRY)}
    wait = defaults[SSE_KEEPALIVE] if keepalive is None else keepalive
    announce = defaults[SSE_RETRY] if retry is None else retry
    producer = _Producer(source, _encoder(app.json.dumps))
    run = producer.run
    if has_request_context():
        run = copy_current_request_context(run)
    head = retry_line(announce) if announce is not None else comment(" ok")

    def body() -> Iterator[bytes]:
        worker = _sync.spawn(run, name="sse-response")
        try:
            yield head
            while not producer.stopped:
                try:
                    item = producer.queue.get(timeout=wait or None)
                except queue.Empty:
                    yield KEEPALIVE
                    continue
                if item is _END or producer.stopped:
                    return
                if isinstance(item, _Failure):
                    log.error(
                        "flask-sse-push: the stream's generator failed",
                        exc_info=item.error,
                    )
                    yield comment(" error")
                    return
                assert isinstance(item, bytes)
                yield item
        finally:
            producer.stopped = True
            if hasattr(worker, "kill"):
                worker.kill(block=False)  # a greenlet: GeneratorExit/GreenletExit at its wait

    sock = None
    if has_request_context():
        settings = state.settings if state is not None else None
        timeout = settings.send_timeout if settings is not None else DEFAULTS[SSE_SEND_TIMEOUT]
        sock = client_socket(request.environ, timeout)
    stream = _Body(body(), producer, sock)
    lifecycle.track_response(stream)
    response = FlaskResponse(
        stream,
        status,
        content_type="text/event-stream; charset=utf-8",
        direct_passthrough=True,
    )
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response

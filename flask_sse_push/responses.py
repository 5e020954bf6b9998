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

Plain and ``async`` generators both work. A plain one runs in a greenlet (gevent) or a
thread of its own, an async one as a task on the process's shared event loop; so
keep-alives go out while the generator thinks, and it is stopped when the client goes away.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from flask import Response, current_app, has_request_context, request
from flask.ctx import RequestContext
from flask.globals import request_ctx

from . import concurrency
from .config import DEFAULTS, SSE_KEEPALIVE, SSE_RETRY, SSE_SEND_TIMEOUT
from .encoding import Event, check_retry, encode_event, stream_head
from .mailbox import Mailbox
from .reasons import EndReason
from .state import get_state
from .stream import GeneratorStream, client_socket, event_stream_response

if TYPE_CHECKING:
    from . import aio

log = logging.getLogger("flask_sse_push")

#: Encoded events the generator may run ahead of a slow client before it waits.
AHEAD = 64
#: How often a producer that ran ahead looks again for room.
_ROOM_POLL = 0.01


class _Producer:
    """Runs the source in the background and puts its encoded events into *box*, waiting
    for room when the client reads slowly: a plain iterable in a greenlet (gevent) or a
    thread, an async one as a task on the process's shared event loop (:mod:`.aio`). Either
    runs inside a copy of the request context, when there is one."""

    def __init__(
        self,
        source: Iterable[Any] | AsyncIterable[Any],
        box: Mailbox,
        encode: Callable[[Any], bytes],
    ) -> None:
        self.source = source
        self.box = box
        self.encode = encode
        self.stopped = False
        self._worker: Any = None
        self._job: aio.Job | None = None
        self._context: RequestContext | None = None
        if has_request_context():
            self._context = request_ctx.copy()

    def start(self) -> None:
        """Start running the source."""
        if isinstance(self.source, AsyncIterable):
            # asyncio is imported the first time an async generator streams: a worker that
            # never runs one does not carry it.
            from . import aio

            self._job = aio.Job(self._run_async(self.source))
        else:
            self._worker = concurrency.spawn(self._run_sync, self.source, name="sse-response")

    def stop(self) -> None:
        """Stop the source where it waits: ``CancelledError`` in an async generator,
        ``GreenletExit`` under gevent; a thread stops at its next event."""
        self.stopped = True
        if self._job is not None:
            self._job.cancel()
        worker = self._worker
        if worker is not None and hasattr(worker, "kill"):
            self._worker = None
            worker.kill(block=False)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """Run the body inside the request context and end the mailbox after it."""
        try:
            with self._context or contextlib.nullcontext():
                yield
        except BaseException as exc:  # reported to the client as the stream's end
            if not self.stopped:
                log.error("flask-sse-push: the stream's generator failed", exc_info=exc)
                self.box.finish(EndReason.ERROR)
        else:
            self.box.finish(EndReason.DONE)

    def _run_sync(self, source: Iterable[Any]) -> None:
        with self._running():
            iterator = iter(source)
            try:
                for item in iterator:
                    data = self.encode(item)
                    while not self.box.offer(data):
                        if self.stopped or self.box.reason is not None:
                            return
                        time.sleep(_ROOM_POLL)
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()

    async def _run_async(self, source: AsyncIterable[Any]) -> None:
        import asyncio

        with self._running():
            iterator = source.__aiter__()
            try:
                async for item in iterator:
                    data = self.encode(item)
                    while not self.box.offer(data):
                        if self.stopped or self.box.reason is not None:
                            return
                        await asyncio.sleep(_ROOM_POLL)
            finally:
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    await aclose()


def _check_keepalive(value: object) -> float:
    """Validate a keep-alive period: a number of seconds ``>= 0`` (``bool`` is refused).

    :raises TypeError: when it is not an ``int`` or ``float``.
    :raises ValueError: when it is negative, infinite or NaN.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            "keepalive must be a number of seconds >= 0 (0 for none), got "
            f"{type(value).__name__}: {value!r}"
        )
    if not 0 <= value < math.inf:
        raise ValueError(f"keepalive must be a number of seconds >= 0 (0 for none), got {value}")
    return float(value)


def sse_response(
    source: Iterable[Any] | AsyncIterable[Any],
    *,
    keepalive: float | None = None,
    retry: int | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    """Stream the events *source* yields as a ``text/event-stream`` response.

    Items may be :class:`~flask_sse_push.Event` objects, ``str`` (sent as data) or anything
    the app's JSON provider serializes. Each is encoded like :func:`~flask_sse_push.send_event`
    does. The generator runs in the background inside a copy of the request context; a
    comment line goes out after every *keepalive* seconds of silence; when the client goes
    away the generator is closed (``GeneratorExit`` at its ``yield``). An exception in the
    generator ends the stream with an ``: error`` comment and is logged. Works for any
    method, POST included (read it with a ``fetch``-based client).

    :param source: a generator, async generator or other (async) iterable.
    :param keepalive: seconds between keep-alives, ``0`` for none; default
        ``SSE_KEEPALIVE`` (15).
    :param retry: reconnection delay to announce, in milliseconds; default ``SSE_RETRY``.
    :raises TypeError: for a *keepalive* or *retry* of the wrong type (see
        :func:`~flask_sse_push.send_event`).
    :raises ValueError: for a negative *keepalive* or *retry*.
    :param status: the response status.
    :param headers: extra response headers.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    state = get_state(app, required=False)
    config: dict[str, Any] = {
        key: app.config.get(key, DEFAULTS[key])
        for key in (SSE_KEEPALIVE, SSE_RETRY, SSE_SEND_TIMEOUT)
    }
    if state is not None:
        config.update(
            {
                SSE_KEEPALIVE: state.settings.keepalive,
                SSE_RETRY: state.settings.retry,
                SSE_SEND_TIMEOUT: state.settings.send_timeout,
            }
        )
    wait = config[SSE_KEEPALIVE] if keepalive is None else _check_keepalive(keepalive)
    announce = config[SSE_RETRY] if retry is None else retry
    dumps = app.json.dumps

    def encode(item: Any) -> bytes:
        return encode_event(item if isinstance(item, Event) else Event(item), dumps)

    box = Mailbox(AHEAD)
    sock = None
    if has_request_context():
        sock = client_socket(request.environ, config[SSE_SEND_TIMEOUT])
    head = stream_head(None if announce is None else check_retry(announce))
    body = GeneratorStream(
        box, head, _Producer(source, box, encode), keepalive=wait or 0.0, sock=sock
    )
    return event_stream_response(body, status, headers)

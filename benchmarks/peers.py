"""The peers ``scale.py`` compares flask-sse-push with, each served as its own docs say.

Every peer sends the same events (``id:`` and ``data:`` JSON with ``t`` and ``n``) on
``GET /stream?channel=C``, and has the benchmark's control routes (``/bench/ping``,
``/bench/modules``, ``POST /bench/start?rate=R&duration=D``) with a publisher inside the
server that makes the peer's own publish call. The app factories import their framework
lazily, inside the server process:

- :func:`create_flask_sse`: flask-sse (its blueprint at ``/stream``, ``sse.publish``) on the
  redis-server of ``REDIS_URL``; ``gunicorn -k gevent -w 1 'peers:create_flask_sse()'``.
  It opens one Redis pub/sub connection per stream and sends nothing (not even the response
  headers) before the first event.
- :func:`create_queue_app`: the pattern tutorials show, a Flask generator on a
  ``queue.Queue`` per client, fanned out over a list per channel;
  ``gunicorn -k gevent -w 1 'peers:create_queue_app()'``.
- :func:`create_starlette_app`: sse-starlette's ``EventSourceResponse`` over one async
  generator per client on an ``asyncio.Queue``, fanned out over a set of queues;
  ``uvicorn --factory peers:create_starlette_app`` (``uvicorn[standard]``: uvloop and
  httptools). ``sep="\\n"`` (its documented option, on the response and on each
  ``ServerSentEvent``) gives LF line ends, as the other servers write.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

from benchutil import Schedule, add_bench_routes, bench_args, event_data, target_channel
from flask import Flask, Response, request


def create_flask_sse() -> Flask:
    """flask-sse's blueprint on ``REDIS_URL``."""
    from flask_sse import sse

    app = Flask(__name__)
    app.config["REDIS_URL"] = os.environ["REDIS_URL"]
    app.register_blueprint(sse, url_prefix="/stream")

    def publish(n: int, channel: str) -> None:
        sse.publish(event_data(n), id=str(n + 1), channel=channel)

    add_bench_routes(app, publish)
    return app


def create_queue_app() -> Flask:
    """A generator per client on a ``queue.Queue``; a list of queues per channel."""
    app = Flask(__name__)
    listeners: dict[str, list[queue.Queue[str]]] = {}

    @app.get("/stream")
    def stream() -> Response:
        mine: queue.Queue[str] = queue.Queue()
        channel = request.args.get("channel", "bench")
        listeners.setdefault(channel, []).append(mine)

        def events() -> Iterator[str]:
            try:
                yield "retry: 3000\n\n"
                while True:
                    yield mine.get()
            finally:
                listeners[channel].remove(mine)

        return Response(events(), mimetype="text/event-stream")

    def publish(n: int, channel: str) -> None:
        message = f"id: {n + 1}\ndata: {json.dumps(event_data(n))}\n\n"
        for listener in listeners.get(channel, ()):
            listener.put(message)

    add_bench_routes(app, publish)
    return app


def create_starlette_app() -> Any:
    """sse-starlette: one async generator per client on an ``asyncio.Queue``."""
    from sse_starlette import EventSourceResponse, ServerSentEvent
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    listeners: dict[str, set[asyncio.Queue[ServerSentEvent]]] = {}

    async def stream(req: Request) -> EventSourceResponse:
        mine: asyncio.Queue[ServerSentEvent] = asyncio.Queue()
        channel = req.query_params.get("channel", "bench")

        async def events() -> AsyncIterator[ServerSentEvent]:
            listeners.setdefault(channel, set()).add(mine)
            try:
                yield ServerSentEvent(retry=3000, sep="\n")
                while True:
                    yield await mine.get()
            finally:
                listeners[channel].discard(mine)

        return EventSourceResponse(events(), sep="\n")

    def publish(n: int, channel: str) -> None:
        event = ServerSentEvent(data=json.dumps(event_data(n)), id=str(n + 1), sep="\n")
        for listener in listeners.get(channel, ()):
            listener.put_nowait(event)

    async def start(req: Request) -> Any:
        query = {key: req.query_params.getlist(key) for key in req.query_params}
        try:
            rate, duration, targets = bench_args(query)
        except ValueError as exc:
            return PlainTextResponse(f"{exc}\n", status_code=400)
        schedule = Schedule(rate, duration)
        for n in range(schedule.count):
            await asyncio.sleep(schedule.delay(n))
            schedule.timed(lambda n: publish(n, target_channel(n, targets)), n)
        return JSONResponse({**schedule.result(), "pid": os.getpid()})

    async def ping(req: Request) -> JSONResponse:
        return JSONResponse({"pid": os.getpid()})

    async def modules(req: Request) -> JSONResponse:
        return JSONResponse(sorted(sys.modules))

    return Starlette(
        routes=[
            Route("/stream", stream),
            Route("/bench/start", start, methods=["POST"]),
            Route("/bench/ping", ping),
            Route("/bench/modules", modules),
        ]
    )

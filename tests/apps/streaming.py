"""The app the end-to-end tests serve under gunicorn (and Flask's development server).

``SSE_*`` environment variables override the app's config; their values are JSON
(``SSE_KEEPALIVE=0.2``, ``SSE_BUS_URL='"redis://..."'``) or plain strings.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.wrappers import Response

from flask_sse_push import BusError, Event, end_streams, send_event, sse, sse_response
from flask_sse_push.config import from_environ

app = Flask(__name__)
app.config.update({"SSE_STATS": True, **from_environ()})
app.register_blueprint(sse, url_prefix="/stream")


@app.get("/health")
def health() -> Response:
    """Answer once the app is loaded."""
    return jsonify(pid=os.getpid())


@app.post("/publish")
def publish() -> tuple[Response, int]:
    """Publish the JSON body's ``data`` with its ``event``, ``id``, ``retry``, ``channel``."""
    body = request.get_json(force=True)
    kwargs = {k: body[k] for k in ("event", "id", "retry", "channel") if k in body}
    started = time.monotonic()
    try:
        event_id = send_event(body.get("data"), **kwargs)
    except (TypeError, ValueError) as exc:
        return jsonify(error=str(exc), kind=type(exc).__name__), 400
    except BusError as exc:
        seconds = time.monotonic() - started
        return jsonify(error=str(exc), kind=type(exc).__name__, seconds=seconds), 503
    return jsonify(id=event_id, pid=os.getpid()), 200


@app.post("/publish-many")
def publish_many() -> tuple[Response, int]:
    """Publish ``n`` events of ``size`` bytes to ``channel`` as fast as possible."""
    n = int(request.args.get("n", "100"))
    size = int(request.args.get("size", "10"))
    channel = request.args.get("channel", "sse")
    started = time.perf_counter()
    ids = [send_event(f"{i}:" + "x" * size, channel=channel) for i in range(n)]
    elapsed = time.perf_counter() - started
    return jsonify(first=ids[0], last=ids[-1], seconds=elapsed, pid=os.getpid()), 200


@app.post("/publish-sizes")
def publish_sizes() -> tuple[Response, int]:
    """Publish one event per item of the JSON body's ``sizes`` to ``channel``, the k-th
    (from ``first``) as ``<k>:<size>:`` and ``size`` times ``x``; ``how``: one after the
    other (``loop``), from several greenlets at once (``greenlets``) or from the OS threads
    of gevent's pool (``threads``). Answers the ``[k, id]`` pairs."""
    body = request.get_json(force=True)
    first, channel, how = int(body["first"]), body["channel"], body.get("how", "loop")

    def one(k: int, size: int) -> list[Any]:
        with app.app_context():
            return [k, send_event(f"{k}:{size}:" + "x" * size, channel=channel)]

    jobs = [(first + n, size) for n, size in enumerate(body["sizes"])]
    if how == "loop":
        done = [one(*job) for job in jobs]
    elif how == "greenlets":
        with ThreadPoolExecutor(8) as pool:  # greenlets, under gevent's patching
            done = list(pool.map(lambda job: one(*job), jobs))
    else:
        from gevent import get_hub

        threads = get_hub().threadpool
        done = [result.get() for result in [threads.spawn(one, *job) for job in jobs]]
    return jsonify(ids=done, pid=os.getpid()), 200


@app.post("/revoke")
def revoke() -> tuple[Response, int]:
    """End the streams of ``channel`` in every worker."""
    ended = end_streams(channel=request.args["channel"])
    return jsonify(ended=ended, pid=os.getpid()), 200


GENERATORS_CLOSED: list[str] = []


@app.route("/count", methods=["GET", "POST"])
def count() -> Response:
    """A per-request stream: ``n`` events from a plain generator, ``pause`` seconds apart."""
    n = int(request.args.get("n", "3"))
    pause = float(request.args.get("pause", "0"))
    who = request.args.get("who", "anon")

    def numbers() -> Iterator[Any]:
        try:
            for i in range(n):
                if pause:
                    time.sleep(pause)
                yield Event({"i": i, "who": who}, event="count") if i % 2 else str(i)
        finally:
            GENERATORS_CLOSED.append(who)

    return sse_response(numbers())


@app.post("/tokens")
def tokens() -> Response:
    """A per-request stream from an ``async`` generator, as FastAPI users write them."""
    words = request.get_json(force=True)["prompt"].split()

    async def generate() -> AsyncIterator[dict[str, str]]:
        for word in words:
            await asyncio.sleep(0.01)
            yield {"token": word}

    return sse_response(generate())


@app.get("/boom")
def boom() -> Response:
    """A generator that fails half-way."""

    def failing() -> Iterator[str]:
        yield "first"
        raise RuntimeError("boom")

    return sse_response(failing())


@app.get("/closed")
def closed() -> Response:
    """Which per-request generators were closed."""
    return jsonify(GENERATORS_CLOSED)


def _passing_through(wsgi_app: Any) -> Any:
    """A WSGI middleware that iterates the app's body itself, as a compressing or
    profiling middleware does."""

    def middleware(environ: Any, start_response: Any) -> Iterator[bytes]:
        body = wsgi_app(environ, start_response)
        try:
            yield from body
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    return middleware


def _mapping(wsgi_app: Any) -> Any:
    """A WSGI middleware that rewrites every piece of the body with ``map``: the app's body
    is iterated by C code, with no Python frame of the middleware in between."""

    def hide(piece: bytes) -> bytes:
        return piece.replace(b"secret", b"XXXXXX")

    def middleware(environ: Any, start_response: Any) -> Any:
        return map(hide, wsgi_app(environ, start_response))

    return middleware


if os.environ.get("TEST_CONTENT_LENGTH"):

    @app.after_request
    def content_length(response: Response) -> Response:
        """Give streams a length, as a careless ``after_request`` handler might."""
        if response.mimetype == "text/event-stream":
            response.headers["Content-Length"] = os.environ["TEST_CONTENT_LENGTH"]
        return response


if os.environ.get("TEST_WRAP_BODY") == "1":
    app.wsgi_app = _passing_through(app.wsgi_app)  # type: ignore[method-assign]
elif os.environ.get("TEST_WRAP_BODY") == "map":
    app.wsgi_app = _mapping(app.wsgi_app)  # type: ignore[method-assign]

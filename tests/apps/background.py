"""The app the tests of background work serve under gunicorn: async generators that wait a
long time, publishing from real OS threads, and responses that are thrown away.

``SSE_*`` environment variables override the app's config, as in :mod:`apps.streaming`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.wrappers import Response

from flask_sse_push import SSEBlueprint, send_event, sse_response
from flask_sse_push.config import from_environ

app = Flask(__name__)
app.config.update({"SSE_STATS": True, **from_environ()})
sse = SSEBlueprint()
app.register_blueprint(sse, url_prefix="/stream")


@sse.identify
def identify() -> str:
    """Who asks; takes ``identify_sleep`` seconds (a hook that waits for a database)."""
    time.sleep(float(request.args.get("identify_sleep", "0")))
    return request.args.get("user", "anon")


#: When each async generator's ``finally`` ran (``time.monotonic()``, system-wide on Linux).
FINALLY: dict[str, float] = {}


@app.get("/health")
def health() -> Response:
    """Answer once the app is loaded."""
    return jsonify(pid=os.getpid())


@app.get("/sleepy")
def sleepy() -> Response:
    """An async generator that sends one event, then awaits a long sleep."""
    who = request.args["who"]

    async def generate() -> AsyncIterator[str]:
        try:
            yield f"started {who} in {request.path}"  # the request context is there
            await asyncio.sleep(60)
            yield "woke"
        finally:
            FINALLY[who] = time.monotonic()

    return sse_response(generate(), keepalive=0.2)


@app.get("/finally")
def finally_() -> Response:
    """When the async generators' ``finally`` blocks ran."""
    return jsonify(FINALLY)


@app.get("/ticks")
def ticks() -> Response:
    """An async generator yielding ``n`` ticks, ``pause`` seconds apart."""
    n = int(request.args.get("n", "3"))
    pause = float(request.args.get("pause", "0.1"))

    async def generate() -> AsyncIterator[str]:
        for i in range(n):
            await asyncio.sleep(pause)
            yield f"tick {i}"

    return sse_response(generate(), keepalive=0)


@app.get("/resolve")
def resolve() -> Response:
    """How long ``getaddrinfo('localhost')`` takes in this worker (gevent's resolver runs it
    in the hub's thread pool)."""
    started = time.monotonic()
    socket.getaddrinfo("localhost", 80)
    return jsonify(seconds=time.monotonic() - started)


_EXECUTORS: dict[str, Any] = {}


def _in_thread(mode: str, job: Callable[[], None]) -> None:
    """Run *job* the way *mode* names, as apps do under gevent: ``pool`` (a thread of gevent's
    hub pool), ``executor`` (gevent's ``concurrent.futures`` executor, native threads even
    when monkey-patched), ``native`` (a bare native thread) or ``greenlet-executor`` (the
    standard executor, whose threads are greenlets once gevent has patched ``threading``).
    """
    from gevent import get_hub
    from gevent.monkey import get_original
    from gevent.threadpool import ThreadPoolExecutor as NativeExecutor

    if mode == "pool":
        get_hub().threadpool.spawn(job)
    elif mode == "native":
        get_original("_thread", "start_new_thread")(job, ())
    else:
        kind = NativeExecutor if mode == "executor" else ThreadPoolExecutor
        executor = _EXECUTORS.get(mode)
        if executor is None:
            executor = _EXECUTORS[mode] = kind(max_workers=2)
        executor.submit(job)


@app.post("/thread-publish")
def thread_publish() -> tuple[Response, int]:
    """Publish ``n`` events to ``channel`` from a job in another thread (``mode``, see
    :func:`_in_thread`; ``native-each`` publishes each event from a new native thread),
    ``gap`` seconds apart; each carries the ``time.monotonic()`` of its publishing."""
    from gevent.monkey import get_original

    sleep = get_original("time", "sleep")
    n = int(request.args.get("n", "10"))
    gap = float(request.args.get("gap", "0.01"))
    channel = request.args.get("channel", "threads")
    flask_app = app
    mode = request.args.get("mode", "pool")

    def publish(i: int) -> None:
        with flask_app.app_context():
            send_event({"i": i, "sent": time.monotonic()}, channel=channel)

    def job() -> None:
        for i in range(n):
            sleep(gap)
            publish(i)

    def one_thread_each() -> None:
        for i in range(n):
            sleep(gap)
            _in_thread("native", functools.partial(publish, i))

    if mode == "native-each":
        _in_thread("native", one_thread_each)
    else:
        _in_thread(mode, job)
    return jsonify(started=n), 202


@app.post("/publish-many")
def publish_many() -> tuple[Response, int]:
    """Publish ``n`` small events to ``channel`` from this greenlet, as fast as possible."""
    n = int(request.args.get("n", "100"))
    channel = request.args.get("channel", "busy")
    for i in range(n):
        send_event(str(i), channel=channel)
    return jsonify(published=n), 200


@app.after_request
def fail_after(response: Response) -> Response:
    """Fail after the view when asked (``?fail=1``): the view's response is thrown away."""
    if request.args.get("fail"):
        raise RuntimeError("after_request failed on purpose")
    return response


def _dropping(wsgi: Any) -> Any:
    """A WSGI middleware that, for ``?drop=1``, throws the app's body away without closing
    it and answers something else."""

    def middleware(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if "drop=1" not in environ.get("QUERY_STRING", ""):
            return wsgi(environ, start_response)  # type: ignore[no-any-return]
        wsgi(environ, lambda *args: None)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"dropped\n"]

    return middleware


app.wsgi_app = _dropping(app.wsgi_app)  # type: ignore[method-assign]

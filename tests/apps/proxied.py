"""The app the nginx tests serve under gunicorn: the stream blueprint at ``/stream``, a page
for the browser, and a publish route that stamps each event with the time it was sent.

``SSE_*`` environment variables override the app's config (JSON values, as in
``apps.streaming``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from flask import Flask, jsonify, request
from werkzeug.wrappers import Response

from flask_sse_push import send_event, sse, sse_response
from flask_sse_push.config import from_environ

app = Flask(__name__)
app.config.update({"SSE_STATS": True, **from_environ()})
app.register_blueprint(sse, url_prefix="/stream")

PAGE = "<!doctype html><meta charset=utf-8><title>behind nginx</title><p>flask-sse-push\n"


@app.get("/")
def page() -> Response:
    """An empty page on the proxied origin, where the tests open their ``EventSource``\\ s."""
    return Response(PAGE, mimetype="text/html")


@app.get("/health")
def health() -> Response:
    """Answer once the app is loaded."""
    return jsonify(pid=os.getpid())


@app.post("/publish")
def publish() -> Response:
    """Publish ``{"n": n, "sent_at": ms}`` to ``channel``; ``sent_at`` is the wall-clock time
    in milliseconds just before :func:`~flask_sse_push.send_event` is called."""
    channel = request.args.get("channel", "sse")
    n = int(request.args.get("n", "0"))
    event_id = send_event({"n": n, "sent_at": time.time() * 1000}, channel=channel)
    return jsonify(id=event_id)


@app.get("/stream/silent")
def silent() -> Response:
    """A stream without keep-alives: ``first``, then ``pause`` seconds of silence, then
    ``second``; under the blueprint's prefix, so a proxy handles it as it does the streams."""
    pause = float(request.args.get("pause", "10"))

    def words() -> Iterator[str]:
        yield "first"
        time.sleep(pause)
        yield "second"

    return sse_response(words(), keepalive=0)

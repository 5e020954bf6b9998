"""The Flask app benchmarked under gunicorn's gevent worker.

Served by ``broadcast.py`` as ``gunicorn -c python:flask_sse_push.gunicorn_conf -k gevent
--pythonpath benchmarks app:app``. Routes:

- ``GET /stream?channel=bench``: the extension's event stream.
- ``GET /bench/ping``: ``{"pid": <worker pid>}``, to tell that a worker is serving.
- ``POST /bench/start?rate=R&duration=D``: spawns a greenlet in this worker that publishes
  ``send_event({"t": time.time(), "n": n}, channel="bench")`` R times a second for D seconds,
  waits for it and answers ``{"published": ..., "elapsed_s": ..., "max_lag_ms": ...}``.

Environment: ``BENCH_MAX_CONNECTIONS`` (``SSE_MAX_CONNECTIONS``, default 5000),
``BENCH_KEEPALIVE`` (``SSE_KEEPALIVE``, default 15), ``SSE_BUS_URL`` (default
``memory://``; ``--mode redis`` sets ``redis://127.0.0.1:<port>/0``) and ``BENCH_METRICS``
(``1``: Prometheus metrics at ``/metrics``, with ``PROMETHEUS_MULTIPROC_DIR`` set by
``--metrics``).
"""

from __future__ import annotations

import os

from benchutil import CHANNEL, event_data, run_schedule
from flask import Flask, Response, jsonify, request

from flask_sse_push import send_event, sse


def create_app() -> Flask:
    """Build the benchmark app."""
    app = Flask(__name__)
    app.config["SSE_KEEPALIVE"] = float(os.environ.get("BENCH_KEEPALIVE", "15"))
    app.config["SSE_MAX_CONNECTIONS"] = int(os.environ.get("BENCH_MAX_CONNECTIONS", "5000"))
    bus_url = os.environ.get("SSE_BUS_URL")
    if bus_url:
        app.config["SSE_BUS_URL"] = bus_url
    if os.environ.get("BENCH_METRICS") == "1":
        app.config["SSE_METRICS_PATH"] = "/metrics"
    app.register_blueprint(sse, url_prefix="/stream")

    @app.get("/bench/ping")
    def ping() -> Response:
        return jsonify(pid=os.getpid())

    @app.post("/bench/start")
    def start() -> Response | tuple[str, int]:
        import gevent

        try:
            rate = float(request.args["rate"])
            duration = float(request.args["duration"])
        except (KeyError, ValueError):
            return "rate and duration are required numbers\n", 400
        if rate <= 0 or duration <= 0:
            return "rate and duration must be > 0\n", 400

        def publish(n: int) -> None:
            send_event(event_data(n), channel=CHANNEL)

        def run() -> dict[str, float | int]:
            with app.app_context():
                return run_schedule(rate, duration, publish)

        greenlet = gevent.spawn(run)
        result = greenlet.get(timeout=duration * 3 + 60)
        return jsonify({**result, "pid": os.getpid()})

    return app


app = create_app()

"""The Flask app benchmarked under gunicorn's gevent worker.

Served by ``broadcast.py`` and ``scale.py`` as ``gunicorn -c python:flask_sse_push.gunicorn_conf
-k gevent --pythonpath benchmarks app:app``. Routes:

- ``GET /stream?channel=bench``: the extension's event stream (any channel, e.g. ``user-7``).
- ``GET /bench/ping``: ``{"pid": <worker pid>}``, to tell that a worker is serving.
- ``GET /bench/modules``: the names in ``sys.modules`` of this worker.
- ``POST /bench/start?rate=R&duration=D[&targets=K]``: spawns a greenlet in this worker that
  publishes ``send_event({"t": time.time(), "n": n}, channel="bench")`` (with ``targets``: to
  the channel ``user-<n mod K>``) R times a second for D seconds, waits for it and answers
  ``{"published": ..., "elapsed_s": ..., "max_lag_ms": ..., "call_cpu_us": ...}``, where
  ``call_cpu_us`` is the mean CPU time of one ``send_event`` call (``time.thread_time()``
  around it, no HTTP request in it; ``send_event`` yields to let the streams write, so a
  broadcast's figure includes the deliveries it lets run, while with ``targets`` only the
  publishing greenlet's own time counts: ``benchutil.own_cpu``). See
  ``benchutil.add_bench_routes``.

Environment: ``BENCH_MAX_CONNECTIONS`` (``SSE_MAX_CONNECTIONS``, default 5000),
``BENCH_KEEPALIVE`` (``SSE_KEEPALIVE``, default 15), ``SSE_BUS_URL`` (default
``memory://``; ``--mode redis`` sets ``redis://127.0.0.1:<port>/0``) and ``BENCH_METRICS``
(``1``: Prometheus metrics at ``/metrics``, with ``PROMETHEUS_MULTIPROC_DIR`` set by
``--metrics``) and ``BENCH_TRACEMALLOC`` (``1``: ``POST /bench/snapshot``, see
``stream_memory.py``).
"""

from __future__ import annotations

import os

from benchutil import add_bench_routes, add_snapshot_route, event_data
from flask import Flask

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

    def publish(n: int, channel: str) -> None:
        send_event(event_data(n), channel=channel)

    add_bench_routes(app, publish)
    if os.environ.get("BENCH_TRACEMALLOC") == "1":
        add_snapshot_route(app)
    return app


app = create_app()

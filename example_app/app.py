"""A live dashboard: one EventSource follows several channels; a form and a JSON endpoint
publish with ``send_event``.

Run it with ``bash dev.sh example`` and open http://127.0.0.1:8000/.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, jsonify, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from flask_sse_push import Event, SSEBlueprint, send_event

CHANNELS = ("news", "alerts", "metrics")


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the example app; *config* overrides ``app.config``."""
    app = Flask(__name__)
    app.config.update(config or {})
    # A blueprint of its own per app keeps hooks apart when create_app() runs twice (tests);
    # a single app can simply use the ready `flask_sse_push.sse`.
    sse = SSEBlueprint()
    app.register_blueprint(sse, url_prefix="/stream")

    @sse.on_connect
    def hello(channels: frozenset[str]) -> list[Event]:
        # The current state goes to the new connection only, before live events.
        return [Event({"channels": sorted(channels), "time": time.time()}, event="hello")]

    @app.get("/")
    def index() -> str:
        return render_template("index.html", channels=CHANNELS)

    @app.post("/publish")
    def publish_form() -> Response:
        channel = request.form.get("channel", "news")
        if channel not in CHANNELS:
            return Response(f"unknown channel {channel!r}\n", 400, mimetype="text/plain")
        send_event(
            {"channel": channel, "text": request.form.get("text", ""), "time": time.time()},
            event="note",
            channel=channel,
        )
        return redirect(url_for("index"), 303)  # type: ignore[return-value]

    @app.post("/api/events")
    def publish_json() -> tuple[Response, int]:
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or "data" not in body:
            return jsonify(error='send a JSON object such as {"data": ..., "channel": "news"}'), 400
        channel = body.get("channel", "news")
        if channel not in CHANNELS:
            return jsonify(error=f"unknown channel {channel!r}; use one of {list(CHANNELS)}"), 400
        try:
            event_id = send_event(
                {"channel": channel, "data": body["data"]},
                event=body.get("event", "note"),
                channel=channel,
            )
        except (TypeError, ValueError) as exc:
            return jsonify(error=str(exc)), 400
        return jsonify(id=event_id), 201

    return app


app = create_app()

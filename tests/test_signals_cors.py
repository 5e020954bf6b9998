"""The extension's signals, and cross-origin streams with flask-cors."""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask_cors import CORS

from flask_sse_push import SSEBlueprint, send_event, signals
from flask_sse_push.testing import EventReader


def make_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update({"SSE_KEEPALIVE": 0.2, **config})
    app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
    return app


def test_connection_and_publish_signals() -> None:
    app = make_app()
    seen: list[tuple[str, dict[str, Any]]] = []

    def recorder(name: str) -> Any:
        def record(sender: Flask, **kwargs: Any) -> None:
            assert sender is app
            seen.append((name, kwargs))

        return record

    receivers = {
        "opened": recorder("opened"),
        "closed": recorder("closed"),
        "published": recorder("published"),
    }
    with (
        signals.connection_opened.connected_to(receivers["opened"], sender=app),
        signals.connection_closed.connected_to(receivers["closed"], sender=app),
        signals.event_published.connected_to(receivers["published"], sender=app),
        EventReader(app.test_client().get("/stream?channel=a", buffered=False)) as reader,
    ):
        with app.app_context():
            event_id = send_event({"x": 1}, channel="a", event="e")
        assert len(reader.events(count=1)) == 1
    assert seen == [
        ("opened", {"channels": frozenset({"a"})}),
        ("published", {"channel": "a", "id": event_id, "data": {"x": 1}, "event": "e"}),
        ("closed", {"channels": frozenset({"a"}), "reason": "closed"}),
    ]


def test_slow_client_signal() -> None:
    app = make_app(SSE_QUEUE_SIZE=2)
    dropped: list[frozenset[str]] = []

    def record(sender: Flask, *, channels: frozenset[str]) -> None:
        dropped.append(channels)

    with signals.client_dropped.connected_to(record, sender=app):
        response = app.test_client().get("/stream?channel=a", buffered=False)
        next(iter(response.response))  # opened, then never read again
        with app.app_context():
            for i in range(3):
                send_event(i, channel="a")
        response.close()
    assert dropped == [frozenset({"a"})]


def test_cross_origin_stream_with_credentials() -> None:
    app = make_app()
    CORS(
        app,
        resources={r"/stream*": {"origins": ["https://app.example"]}},
        supports_credentials=True,
    )
    client = app.test_client()
    response = client.get(
        "/stream?channel=a", headers={"Origin": "https://app.example"}, buffered=False
    )
    try:
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
        assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    finally:
        response.close()
    other = client.get(
        "/stream?channel=a", headers={"Origin": "https://evil.example"}, buffered=False
    )
    try:
        assert "Access-Control-Allow-Origin" not in other.headers
    finally:
        other.close()

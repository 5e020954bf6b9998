"""Edges of the public API: what ``sse_response`` accepts, text JSON cannot carry as UTF-8,
what a reset echoes of the client's id, and apps that come and go."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from flask_sse_push import Event, SSEBlueprint, lifecycle, send_event, signals, sse_response
from flask_sse_push.encoding import MAX_FIELD_LENGTH, RESET_EVENT, encode_event, reset_event
from flask_sse_push.testing import read_events


@pytest.fixture
def app() -> Flask:
    app = Flask(__name__)
    app.config["SSE_KEEPALIVE"] = 0
    app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
    return app


def one() -> Iterator[str]:
    yield "one"


@pytest.mark.parametrize("retry", ["5\ndata: injected", 2.5, True, -1])
def test_sse_response_checks_retry_like_send_event(app: Flask, retry: Any) -> None:
    with app.test_request_context("/"):
        with pytest.raises((TypeError, ValueError)) as by_send_event:
            send_event("x", retry=retry)
        with pytest.raises((TypeError, ValueError)) as by_sse_response:
            sse_response(one(), retry=retry)
    assert type(by_sse_response.value) is type(by_send_event.value)
    assert str(by_sse_response.value) == str(by_send_event.value)


@pytest.mark.parametrize(
    ("keepalive", "error"),
    [
        ("5", TypeError),
        (True, TypeError),
        (None, None),
        (-1, ValueError),
        (float("nan"), ValueError),
    ],
)
def test_sse_response_checks_keepalive(
    app: Flask, keepalive: Any, error: type[Exception] | None
) -> None:
    with app.test_request_context("/"):
        if error is None:
            sse_response(one(), keepalive=keepalive)
            return
        with pytest.raises(error, match="keepalive must be a number of seconds >= 0"):
            sse_response(one(), keepalive=keepalive)


@pytest.mark.parametrize("data", [{"text": "\ud800"}, ["a", "\udfff b"]])
def test_a_lone_surrogate_in_json_text_is_a_clear_value_error(app: Flask, data: Any) -> None:
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    with app.app_context():
        with pytest.raises(ValueError, match="lone surrogate") as raised:
            send_event(data)
        assert type(raised.value) is ValueError
        with pytest.raises(ValueError, match="lone surrogate"):
            encode_event(Event(data), app.json.dumps)
    # Text that UTF-8 carries goes through unchanged, not escaped.
    with app.app_context():
        assert "é" in encode_event(Event({"text": "é"}), app.json.dumps).decode()


def test_a_per_request_item_with_a_lone_surrogate_ends_the_stream_with_an_error(
    app: Flask,
) -> None:
    app.json.ensure_ascii = False  # type: ignore[attr-defined]

    @app.get("/bad")
    def bad() -> Any:
        return sse_response(iter([{"ok": 1}, {"bad": "\ud800"}]))

    events = read_events(app.test_client().get("/bad", buffered=False), timeout=5)
    assert [e.data for e in events] == ['{"ok": 1}']


def test_the_reset_event_echoes_at_most_max_field_length_of_the_id(app: Flask) -> None:
    asked = "x" * 10_000
    body = reset_event("malformed", asked, "head-1", json.dumps)
    assert len(body) < MAX_FIELD_LENGTH + 200
    response = app.test_client().get("/stream", headers={"Last-Event-ID": asked}, buffered=False)
    (event,) = read_events(response, count=1, timeout=5)
    assert event.type == RESET_EVENT
    notice = json.loads(event.data)
    assert notice["reason"] == "malformed"
    assert notice["lastEventId"] == "x" * MAX_FIELD_LENGTH


def test_apps_made_and_dropped_leave_nothing_behind() -> None:
    def receivers() -> dict[str, int]:
        return {
            name: len(signal.receivers)
            for name, signal in vars(signals).items()
            if isinstance(signal, type(signals.stream_opened))
        }

    gc.collect()
    before = receivers()
    buses_before = len(lifecycle._buses)
    for n in range(50):
        app = Flask(f"app{n}")
        app.config["SSE_KEEPALIVE"] = 0
        app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
        with app.app_context():
            send_event("hello")
        read_events(app.test_client().get("/stream", buffered=False), count=0, timeout=1)
        del app
    gc.collect()
    assert receivers() == before
    assert len(lifecycle._buses) == buses_before

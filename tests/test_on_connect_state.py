"""The on_connect hook's state is never older than an event written before it: a client's
final state after connecting equals that of a client connected all along, on both buses,
with updates published while it connects and during a Redis outage.

The updates here are absolute (each carries the whole state), as the hook's documentation
asks: the state can be followed by events it already includes, never preceded by newer ones.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from flask import Flask, g, request
from support.redis_server import RedisFactory

from flask_sse_push import Event, PublishError, SSEBlueprint, get_state, send_event
from flask_sse_push.testing import EventReader


def publish_in(app: Flask, data: Any, **kwargs: Any) -> str:
    with app.app_context():
        return send_event(data, **kwargs)


def open_stream(app: Flask, last_event_id: str | None = None) -> Any:
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    return app.test_client().get("/stream?channel=a", headers=headers, buffered=False)


class Counter:
    """A shared value that publishers set before they publish it, and the on_connect hook
    that sends it as the current state."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.value = 0

    def hook(self, channels: frozenset[str]) -> list[Event]:
        return [Event(self.value, event="state")]

    def update(self, value: int, *, retry_for: float = 0.0) -> str:
        self.value = value
        deadline = time.monotonic() + retry_for
        for _ in range(1000):
            try:
                return publish_in(self.app, value, channel="a")
            except PublishError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")


def final_state(reader: EventReader, expected: int, timeout: float = 10) -> int | None:
    """Apply the events (state and updates alike) until the state is *expected*, then a
    little longer; return the state reached."""
    state: int | None = None
    deadline = time.monotonic() + timeout
    for _ in range(1000):
        for event in reader.events(timeout=0.3):
            if event.type in ("state", "message"):
                state = int(event.data)
        if state == expected or time.monotonic() > deadline:
            break
    for event in reader.events(timeout=0.5):
        if event.type in ("state", "message"):
            state = int(event.data)
    return state


def _counter_app(url: str, **config: Any) -> tuple[Flask, Counter]:
    app = Flask(__name__)
    app.config.update({"SSE_BUS_URL": url, "SSE_KEEPALIVE": 0.2, **config})
    blueprint = SSEBlueprint()
    app.register_blueprint(blueprint, url_prefix="/stream")
    counter = Counter(app)
    blueprint.on_connect(counter.hook)
    return app, counter


def test_on_connect_state_after_an_update_during_the_connect(bus_url: str) -> None:
    """An update published after the view ran but before the stream was read: the client
    must end on it, as a client connected all along does."""
    app, counter = _counter_app(bus_url)
    try:
        first = counter.update(1)
        with EventReader(open_stream(app)) as along:
            assert final_state(along, 1) == 1
            response = open_stream(app, first)
            counter.update(2)
            with EventReader(response) as joined:
                assert final_state(joined, 2) == 2
            assert final_state(along, 2) == 2
    finally:
        get_state(app).bus.close()


@pytest.mark.redis
def test_on_connect_state_across_a_redis_outage(redis_server: RedisFactory) -> None:
    server = redis_server()
    app, counter = _counter_app(server.url, SSE_PUBLISH_TIMEOUT=1)
    try:
        first = counter.update(1)
        with EventReader(open_stream(app)) as along:
            assert final_state(along, 1) == 1
            server.client().save()  # the restart below keeps the stream
            server.stop()
            with EventReader(open_stream(app, first)) as joined:
                assert joined.events(timeout=1) == []
                with pytest.raises(PublishError):
                    counter.update(2)
                server.start()
                counter.update(2, retry_for=10)
                counter.update(3)
                assert final_state(joined, 3, timeout=20) == 3
            assert final_state(along, 3, timeout=20) == 3
    finally:
        get_state(app).bus.close()


def test_the_hook_runs_in_the_request_context(bus_url: str) -> None:
    """On the Redis bus with a Last-Event-ID the hook runs when the stream starts, after the
    view returned: ``request`` and what ``before_request`` put in ``g`` are still there."""
    app = Flask(__name__)
    app.config.update(SSE_BUS_URL=bus_url, SSE_KEEPALIVE=0.2)
    blueprint = SSEBlueprint()

    @app.before_request
    def load_user() -> None:
        g.user = request.args.get("user")

    @blueprint.on_connect
    def who(channels: frozenset[str]) -> list[Event]:
        return [Event({"user": g.user, "channels": sorted(channels)}, event="state")]

    app.register_blueprint(blueprint, url_prefix="/stream")
    try:
        first = publish_in(app, "1", channel="a")
        response = app.test_client().get(
            "/stream?channel=a&user=ann", headers={"Last-Event-ID": first}, buffered=False
        )
        with EventReader(response) as reader:
            (state,) = reader.events(count=1, timeout=10)
        assert state.json() == {"user": "ann", "channels": ["a"]}
    finally:
        get_state(app).bus.close()

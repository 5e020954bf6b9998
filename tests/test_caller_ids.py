"""Resuming from ids the caller gave to :func:`send_event`, on both buses: found through an
index, not by searching the history, so an unknown id costs the same whatever the history."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from flask_sse_push import SSEBlueprint, get_state, send_event
from flask_sse_push.bus.memory import MemoryBus
from flask_sse_push.testing import EventReader


@pytest.fixture
def app(bus_url: str) -> Iterator[Flask]:
    app = Flask(__name__)
    app.config.update(SSE_BUS_URL=bus_url, SSE_KEEPALIVE=0.2, SSE_HISTORY_SIZE=5)
    app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
    yield app
    get_state(app).bus.close()


def publish(app: Flask, data: Any, **kwargs: Any) -> str:
    with app.app_context():
        return send_event(data, channel="a", **kwargs)


def resume(app: Flask, last_event_id: str, count: int) -> list[tuple[str, str]]:
    response = app.test_client().get(
        "/stream?channel=a", headers={"Last-Event-ID": last_event_id}, buffered=False
    )
    with EventReader(response) as reader:
        return [(e.type, e.data) for e in reader.events(count=count, timeout=10)]


def test_a_repeated_caller_id_resumes_after_its_newest_event(app: Flask) -> None:
    publish(app, "1", id="same")
    publish(app, "2")
    publish(app, "3", id="same")
    publish(app, "4")
    assert resume(app, "same", 1) == [("message", "4")]


def memory_app(history_size: int) -> tuple[Flask, MemoryBus]:
    app = Flask(__name__)
    app.config.update(SSE_KEEPALIVE=0.2, SSE_HISTORY_SIZE=history_size)
    app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
    bus = get_state(app).bus
    assert isinstance(bus, MemoryBus)
    return app, bus


def test_caller_ids_leave_the_index_with_the_history() -> None:
    app, bus = memory_app(5)
    for i in range(10):
        publish(app, str(i), id=f"n-{i}")
    assert resume(app, "n-7", 2) == [("message", "8"), ("message", "9")]
    (reset,) = resume(app, "n-4", 1)
    assert reset[0] == "sse-reset"
    assert sorted(bus._own) == [f"n-{i}" for i in range(5, 10)]
    for i in range(10, 1000):
        publish(app, str(i), id=f"n-{i % 7}")
    assert len(bus._own) <= 5


def test_no_history_keeps_no_index() -> None:
    app, bus = memory_app(0)
    publish(app, "1", id="kept?")
    assert bus._own == {}
    (reset,) = resume(app, "kept?", 1)
    assert reset[0] == "sse-reset"

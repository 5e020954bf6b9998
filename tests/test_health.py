"""``GET <prefix>/health``: 200 while the process can serve streams and reach its bus, 503
with the reasons otherwise."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from support.flask_apps import AppFactory
from support.procs import wait_for
from support.redis_server import RedisFactory

from flask_sse_push import get_state
from flask_sse_push.bus.redis import RedisBus
from flask_sse_push.testing import EventReader

Made = Callable[..., Flask]


@pytest.fixture
def make() -> Iterator[Made]:
    factory = AppFactory(SSE_KEEPALIVE=0.2, SSE_PUBLISH_TIMEOUT=1)
    yield lambda **config: factory(**config)[0]
    factory.close()


def health(app: Flask) -> tuple[int, dict[str, Any]]:
    response = app.test_client().get("/stream/health")
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    return response.status_code, response.get_json()


def test_healthy_on_the_memory_bus_and_no_channel_in_the_answer(make: Made) -> None:
    app = make()
    with EventReader(app.test_client().get("/stream?channel=private-42", buffered=False)):
        response = app.test_client().get("/stream/health")
        assert response.status_code == 200
        assert response.get_json() == {
            "healthy": True,
            "problems": [],
            "pid": response.get_json()["pid"],
            "bus": "memory",
            "streams": 1,
            "max_streams": 1000,
        }
        assert b"private-42" not in response.get_data()


def test_off_answers_404(make: Made) -> None:
    app = make(SSE_HEALTH=False)
    response = app.test_client().get("/stream/health")
    assert response.status_code == 404
    assert "SSE_HEALTH" in response.get_data(as_text=True)


def test_at_the_stream_limit(make: Made) -> None:
    app = make(SSE_MAX_CONNECTIONS=2)
    client = app.test_client()
    with EventReader(client.get("/stream", buffered=False)):
        assert health(app)[0] == 200
        with EventReader(client.get("/stream", buffered=False)):
            status, body = health(app)
            assert status == 503
            assert body["problems"] == ["stream limit reached: 2 open, SSE_MAX_CONNECTIONS = 2"]
            assert not body["healthy"]
    assert wait_for(lambda: health(app)[0] == 200, 5)


def test_while_shutting_down() -> None:
    """After :func:`~flask_sse_push.end_all_streams`, in a process of its own (the
    process counts as stopping from then on)."""
    script = textwrap.dedent(
        """
        import json
        from flask import Flask
        from flask_sse_push import SSEBlueprint, end_all_streams

        app = Flask(__name__)
        app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
        client = app.test_client()
        before = client.get("/stream/health").status_code
        end_all_streams()
        after = client.get("/stream/health")
        print(json.dumps([before, after.status_code, after.get_json()["problems"]]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '[200, 503, ["shutting down"]]'


@pytest.mark.redis
def test_redis_up_stopped_and_back(make: Made, redis_server: RedisFactory) -> None:
    server = redis_server()
    app = make(SSE_BUS_URL=server.url)
    bus = get_state(app).bus
    assert isinstance(bus, RedisBus)
    with EventReader(app.test_client().get("/stream", buffered=False)):  # starts the receiver
        assert wait_for(lambda: bus.connected, 10)
        status, body = health(app)
        assert (status, body["bus"], body["streams"]) == (200, "redis", 1)
        server.stop()
        status, body = health(app)
        assert status == 503
        assert body["problems"] == [
            "bus unreachable: Redis did not answer PING within 1 s (ConnectionError)"
        ]
        # PING may answer before the receiver has reconnected (it backs off up to 5 s).
        assert wait_for(lambda: not bus.connected, 5)
        server.start()
        assert health(app)[1]["problems"] in (
            [],
            ["bus unreachable: the Redis receiver of this process is not connected"],
        )
        assert wait_for(lambda: health(app)[0] == 200, 15)


@pytest.mark.redis
def test_a_receiver_that_is_not_connected(make: Made, redis_server: RedisFactory) -> None:
    """Redis answers, but this process's receiver does not read: its streams get nothing."""
    app = make(SSE_BUS_URL=redis_server().url)
    bus = get_state(app).bus
    assert isinstance(bus, RedisBus)
    assert health(app)[0] == 200  # no receiver yet: nothing to read for
    with EventReader(app.test_client().get("/stream", buffered=False)):
        assert wait_for(lambda: bus.connected, 10)
        bus.receiver.stop()
        assert wait_for(lambda: not bus.connected, 5)
        status, body = health(app)
    assert status == 503
    assert body["problems"] == [
        "bus unreachable: the Redis receiver of this process is not connected"
    ]

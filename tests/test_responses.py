"""Per-request streams with ``sse_response``: plain and async generators, keep-alives,
errors and clients that go away, through the test client and a real gunicorn."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from flask import Flask, request
from sseparse import parse_all
from support.app import serve
from support.gunicorn import GunicornFactory
from support.http import raw_sse
from support.procs import wait_for

from flask_sse_push import Event, sse_response
from flask_sse_push.testing import EventReader, read_events


@pytest.fixture
def app() -> Flask:
    app = Flask(__name__)
    closed: list[str] = []
    app.config["closed"] = closed

    @app.route("/numbers", methods=["GET", "POST"])
    def numbers() -> Any:
        n = int(request.args.get("n", "3"))
        pause = float(request.args.get("pause", "0"))
        asked_by = request.headers.get("X-Who", "?")

        def generate() -> Iterator[Any]:
            try:
                for i in range(n):
                    time.sleep(pause)
                    # The request context is there while the generator runs.
                    yield {"i": i, "who": request.headers.get("X-Who", asked_by)}
            finally:
                closed.append(asked_by)

        return sse_response(generate(), keepalive=0.1, retry=500)

    @app.post("/tokens")
    def tokens() -> Any:
        async def generate() -> AsyncIterator[Any]:
            for word in ("hello", "world"):
                await asyncio.sleep(0.01)
                yield word
            yield Event({"done": True}, event="end", id=7)

        return sse_response(generate())

    @app.get("/boom")
    def boom() -> Any:
        def generate() -> Iterator[str]:
            yield "first"
            raise RuntimeError("boom")

        return sse_response(generate())

    @app.get("/bad-item")
    def bad_item() -> Any:
        return sse_response(iter([Event("x", event="a\nb")]))

    return app


def test_plain_generator_with_post_and_request_context(app: Flask) -> None:
    response = app.test_client().post("/numbers?n=3", headers={"X-Who": "ann"}, buffered=False)
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    events = read_events(response, count=3)
    assert [e.json() for e in events] == [{"i": i, "who": "ann"} for i in range(3)]
    assert events[0].retry == 500


def test_async_generator(app: Flask) -> None:
    events = read_events(app.test_client().post("/tokens", buffered=False), count=3)
    assert [(e.type, e.data) for e in events] == [
        ("message", "hello"),
        ("message", "world"),
        ("end", '{"done": true}'),
    ]
    assert events[-1].id == "7"


def test_keepalives_while_the_generator_thinks(app: Flask) -> None:
    response = app.test_client().get("/numbers?n=1&pause=0.5", buffered=False)
    with EventReader(response) as reader:
        assert len(reader.events(count=1, timeout=5)) == 1
        assert reader.parser.comments.count("") >= 3


def test_generator_error_ends_the_stream_with_a_comment(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    with EventReader(app.test_client().get("/boom", buffered=False)) as reader:
        events = reader.events(timeout=5)
        assert [e.data for e in events] == ["first"]
        assert reader.ended
        assert " error" in reader.parser.comments
    assert "generator failed" in caplog.text


def test_invalid_item_is_reported_not_sent(app: Flask) -> None:
    with EventReader(app.test_client().get("/bad-item", buffered=False)) as reader:
        assert reader.events(timeout=5) == []
        assert reader.ended
        assert " error" in reader.parser.comments


def test_client_going_away_closes_the_generator(app: Flask) -> None:
    response = app.test_client().get(
        "/numbers?n=1000&pause=0.01", headers={"X-Who": "bob"}, buffered=False
    )
    with EventReader(response) as reader:
        assert len(reader.events(count=2)) == 2
    assert wait_for(lambda: app.config["closed"] == ["bob"], 5)


@pytest.mark.e2e
def test_per_request_streams_under_gunicorn_gevent(gunicorn: GunicornFactory) -> None:
    server = serve(gunicorn, SSE_KEEPALIVE=0.2)
    answer = requests.post(
        server.url + "/tokens", json={"prompt": "a b c"}, stream=True, timeout=10
    )
    body = b"".join(answer.iter_content(None))
    assert [e.data for e in parse_all(body)] == [
        '{"token": "a"}',
        '{"token": "b"}',
        '{"token": "c"}',
    ]
    with raw_sse(server.url, "/count?n=2&pause=0.5&who=slow") as response:
        body = response.read_to_end(10)
    events = parse_all(body)
    assert [e.data for e in events] == ["0", '{"i": 1, "who": "slow"}']
    assert body.count(b":\n") >= 2  # keep-alives while the generator slept
    # A client that leaves: the generator is closed in the worker.
    with raw_sse(server.url, "/count?n=100000&pause=0.01&who=gone") as response:
        response.read_body_until(lambda body: b"data: 2" in body, 10)
    assert wait_for(lambda: "gone" in requests.get(server.url + "/closed", timeout=5).json(), 10)


@pytest.mark.e2e
def test_per_request_streams_end_at_shutdown(gunicorn: GunicornFactory) -> None:
    server = serve(gunicorn, SSE_KEEPALIVE=0.2)
    with raw_sse(server.url, "/count?n=1000&pause=0.5&who=long") as response:
        response.read_body_until(lambda body: b"data: 0" in body, 10)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        response.read_to_end(10)
        ended_after = time.monotonic() - started
    assert server.stop(timeout=15) < 5
    assert ended_after < 5
    assert "Worker graceful timeout" not in server.log_text()


@pytest.mark.e2e
def test_concurrent_async_generators_under_gevent(gunicorn: GunicornFactory) -> None:
    server = serve(gunicorn)

    def tokens(n: int) -> list[str]:
        answer = requests.post(
            server.url + "/tokens", json={"prompt": f"w{n} x{n} y{n} z{n}"}, timeout=20
        )
        return [e.data for e in parse_all(answer.content)]

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(tokens, range(6)))
    for n, got in enumerate(results):
        assert got == [f'{{"token": "{w}{n}"}}' for w in "wxyz"]

"""Stream bodies however they end: thrown away unread, closed from another thread while
they end by themselves, or read slowly; and the connection limit under concurrent
requests."""

from __future__ import annotations

import functools
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
import requests
from flask import Flask, Response, request
from support.gunicorn import GunicornFactory, GunicornServer
from support.http import RawResponse, raw_sse
from support.procs import HOST
from test_async_streams import serve_background
from werkzeug.test import TestResponse

from flask_sse_push import EndReason, SSEBlueprint, get_state, signals, sse_response
from flask_sse_push.bus import Bus, Subscription
from flask_sse_push.mailbox import TAKE_BYTES, Mailbox
from flask_sse_push.stream import BusStream


def open_stream_body(server: GunicornServer, path: str = "/stream?channel=x") -> bytes:
    """The first bytes of a new stream."""
    with raw_sse(server.url, path, timeout=10) as response:
        assert response.status == 200
        return response.read_body_until(lambda body: b"\n" in body, 10)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("query", "status"), [("fail=1", 500), ("drop=1", 200)], ids=["after_request", "middleware"]
)
def test_a_thrown_away_stream_gives_its_slot_back(
    gunicorn: GunicornFactory, query: str, status: int
) -> None:
    """An ``after_request`` handler that raises, or a middleware that drops the body without
    closing it: the stream's place on the bus comes back at once."""
    server = serve_background(gunicorn, SSE_MAX_CONNECTIONS=3)
    for _ in range(5):
        answer = requests.get(f"{server.url}/stream?channel=x&{query}", timeout=10)
        assert answer.status_code == status
    stats = requests.get(server.url + "/stream/stats", timeout=10).json()
    assert stats["streams"] == 0
    assert stats["totals"]["opened"] == stats["totals"]["closed"] == 5
    assert b"too many" not in open_stream_body(server)


@pytest.fixture
def app() -> Flask:
    app = Flask(__name__)
    app.config.update(SSE_MAX_CONNECTIONS=3, SSE_KEEPALIVE=0)
    app.register_blueprint(SSEBlueprint(), url_prefix="/stream")

    @app.after_request
    def fail_after(response: Response) -> Response:
        if request.args.get("fail"):
            raise RuntimeError("after_request failed on purpose")
        return response

    return app


def test_bodies_thrown_away_without_a_server(app: Flask) -> None:
    closed: list[object] = []
    signals.stream_closed.connect(lambda sender, **kw: closed.append(kw["reason"]), app, weak=False)
    wsgi = app.wsgi_app

    def dropping(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        wsgi(environ, start_response)  # the body is dropped unclosed
        return [b"dropped"]

    client = app.test_client()
    for _ in range(5):
        assert client.get("/stream?channel=x&fail=1").status_code == 500
    app.wsgi_app = dropping  # type: ignore[method-assign]
    for _ in range(5):
        assert client.get("/stream?channel=x").data == b"dropped"
    state = get_state(app)
    assert state.bus.stream_count() == 0
    assert state.totals["opened"] == state.totals["closed"] == len(closed) == 10


def race_to_the_end(bus: Bus, on_close: Callable[[], None]) -> None:
    """Let a body's iteration end while four threads close it."""
    sub = Subscription(["x"], 10)
    bus.subscribe(sub, None)
    body = BusStream(sub, bus, b":\n", keepalive=0, on_close=on_close)
    events = iter(body)
    assert next(events) == b":\n"
    start = threading.Barrier(5)

    def read_to_end() -> None:
        start.wait()
        sub.finish(EndReason.DONE)
        list(events)

    def close() -> None:
        start.wait()
        body.close()

    threads = [threading.Thread(target=read_to_end)]
    threads += [threading.Thread(target=close) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)


def test_a_body_ends_exactly_once_whatever_the_race(app: Flask) -> None:
    """close() from several threads while the body's own iteration ends: it is released and
    its on_close runs exactly once."""
    bus = get_state(app).bus
    calls: list[int] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for n in range(300):
            race_to_the_end(bus, functools.partial(calls.append, n))
    finally:
        sys.setswitchinterval(interval)
    assert sorted(calls) == list(range(300))
    assert bus.stream_count() == 0


def test_a_per_request_stream_never_read_holds_nothing(app: Flask) -> None:
    """HEAD, or a response thrown away: the generator never starts, and once the response is
    dropped nothing keeps it (no keep-alive registration, no producer)."""
    started: list[str] = []

    def numbers() -> Iterator[str]:
        started.append("started")
        yield "1"

    with app.test_request_context("/"):
        source = numbers()
        kept = weakref.ref(source)
        response = sse_response(source, keepalive=0.05)
    del source, response
    time.sleep(0.2)
    assert kept() is None
    assert started == []


def response_head(sock: socket.socket, method: str, path: str) -> list[tuple[str, str]]:
    """Send a request on *sock* and return the status line and headers of its answer."""
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    received = b""
    deadline = time.monotonic() + 10
    while b"\r\n\r\n" not in received and time.monotonic() < deadline:
        received += sock.recv(65536)
    status, *lines = received.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return [("status", status)] + [
        (name.lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines)
    ]


@pytest.mark.e2e
@pytest.mark.parametrize("path", ["/stream?channel=a", "/ticks?n=1&pause=0"])
def test_head_answers_the_headers_of_get(gunicorn: GunicornFactory, path: str) -> None:
    """Same status and headers as GET, minus the framing header the server adds to GET's
    body (Transfer-Encoding); no Content-Length on either. The connection stays usable."""
    server = serve_background(gunicorn)
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        got = dict(response_head(sock, "GET", path))
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        head = dict(response_head(sock, "HEAD", path))
        assert dict(response_head(sock, "GET", "/health"))["status"] == "HTTP/1.1 200 OK"
    assert got.pop("transfer-encoding") == "chunked"
    for headers in (got, head):
        headers.pop("date")
        assert "content-length" not in headers
    assert head == got


def test_take_races_end_from_other_threads() -> None:
    """end() and finish() from other threads while the reader takes and a producer pushes:
    take() never fails, and returns None once ended."""
    failures: list[BaseException] = []
    for round_ in range(200):
        box = Mailbox(1000)
        start = threading.Barrier(3)

        def read(box: Mailbox = box, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                for _ in range(10_000):
                    if box.take(0.01) is None:
                        return
            except BaseException as exc:  # reported below
                failures.append(exc)

        def push(box: Mailbox = box, start: threading.Barrier = start) -> None:
            start.wait()
            for n in range(200):
                box.push(b"x" * (n % 7 + 1))

        def end(box: Mailbox = box, start: threading.Barrier = start, n: int = round_) -> None:
            start.wait()
            time.sleep((n % 10) / 10_000)
            if n % 2:
                box.end(EndReason.CLOSED)
            else:
                box.finish(EndReason.DONE)

        threads = [threading.Thread(target=f) for f in (read, push, end)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert box.take(0) is None
    assert failures == []


def test_a_backlog_is_taken_in_pieces() -> None:
    """A slow stream's backlog is not joined into one object as large as the queue."""
    big = Mailbox(600)
    for _ in range(512):
        big.push(b"x" * 100_000)
    sizes = [len(big.take(0) or b"") for _ in range(512)]
    assert sizes == [100_000] * 512
    small = Mailbox(600)
    for _ in range(512):
        small.push(b"y" * 1000)
    first = small.take(0) or b""
    assert TAKE_BYTES <= len(first) < TAKE_BYTES + 1000
    app = Flask(__name__)
    app.register_blueprint(SSEBlueprint())
    bus = get_state(app).bus
    sub = Subscription(["x"], 600)
    bus.subscribe(sub, None)
    for _ in range(512):
        sub.push(b"data: " + b"z" * 100_000 + b"\n\n")
    sub.finish(EndReason.DONE)
    chunks = list(BusStream(sub, bus, b":\n", keepalive=0))
    assert max(len(chunk) for chunk in chunks) < 100_100


def concurrent_first_chunks(count: int, first_chunk: Callable[[], bytes]) -> list[bytes]:
    """Call *first_chunk* from *count* threads at once."""
    chunks: list[bytes] = []
    start = threading.Barrier(count)

    def ask() -> None:
        start.wait()
        chunks.append(first_chunk())

    threads = [threading.Thread(target=ask) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return chunks


def test_the_limit_holds_while_hooks_wait(app: Flask) -> None:
    """Requests whose identify hook waits, all at once: no more streams than the limit."""
    blueprint = app.blueprints["sse"]
    assert isinstance(blueprint, SSEBlueprint)
    blueprint.identify(lambda: time.sleep(0.2))
    client = app.test_client()
    responses: list[TestResponse] = []

    def first_chunk() -> bytes:
        response = client.get("/stream?channel=x", buffered=False)
        responses.append(response)
        return next(iter(response.response))

    try:
        chunks = concurrent_first_chunks(10, first_chunk)
        assert get_state(app).bus.stream_count() == 3
    finally:
        for response in responses:
            response.close()
    assert sum(b"too many" in chunk for chunk in chunks) == 7


@pytest.mark.e2e
def test_the_limit_holds_while_hooks_wait_under_gevent(gunicorn: GunicornFactory) -> None:
    server = serve_background(gunicorn, SSE_MAX_CONNECTIONS=3)
    streams: list[RawResponse] = []

    def first_chunk() -> bytes:
        stream = raw_sse(server.url, "/stream?channel=x&identify_sleep=0.3", timeout=10)
        streams.append(stream)
        return stream.read_body_until(lambda body: b"\n" in body, 10)

    try:
        chunks = concurrent_first_chunks(10, first_chunk)
        assert requests.get(server.url + "/stream/stats", timeout=10).json()["streams"] == 3
    finally:
        for stream in streams:
            stream.close()
    assert sum(b"too many" in chunk for chunk in chunks) == 7

"""Events written to the socket straight from the fan-out (``flask_sse_push.direct``).

Under gunicorn's gevent worker, a plain HTTP/1.1 ``GET`` stream is written by the fan-out
itself while its greenlet waits; a socket that cannot take a whole chunk hands the rest back
to the stream. These tests check the bytes on the wire: every chunk intact, every event once
and in order, whichever path wrote it, and the ordinary path wherever bypassing the server
would be unsafe.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest
import requests
from support.app import APP, CONF, publish, serve, stats
from support.gunicorn import GunicornFactory, answering
from support.http import RawResponse, raw_sse
from support.procs import wait_for

from flask_sse_push import EndReason
from flask_sse_push.encoding import chunk
from flask_sse_push.mailbox import Mailbox


def _numbers(body: bytes) -> list[int]:
    """The ``i`` of every ``data: <i>:xxx`` event in *body*, in order."""
    found = []
    for block in body.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                found.append(int(line[6:].split(b":", 1)[0]))
    return found


def _publish_many(url: str, n: int, size: int, channel: str) -> None:
    reply = requests.post(
        f"{url}/publish-many", params={"n": n, "size": size, "channel": channel}, timeout=60
    )
    reply.raise_for_status()


def _direct(url: str, count: int) -> bool:
    return stats(url)["direct"] == count


def test_a_stream_is_written_directly_and_its_chunks_are_whole(
    gunicorn: GunicornFactory, bus_url: str
) -> None:
    server = serve(gunicorn, SSE_BUS_URL=bus_url)
    with raw_sse(server.url, "/stream?channel=d") as response:
        response.read_body_until(lambda body: b"retry:" in body, 5)
        assert wait_for(lambda: _direct(server.url, 1), 5), stats(server.url)
        _publish_many(server.url, 200, 30, "d")
        body = response.read_body_until(lambda body: body.count(b"\n\n") >= 200, 10)
    assert _numbers(body) == list(range(200))
    # Each event went out as exactly one chunk of its own, as the server frames them.
    sizes = response.chunk_sizes
    assert len(sizes) >= 201
    assert all(size > 0 for size in sizes)


def test_a_reader_that_stalls_gets_every_event_intact(
    gunicorn: GunicornFactory, bus_url: str
) -> None:
    """A small receive buffer and big events: direct writes fill the socket, are cut short
    and fall back to the stream's greenlet, which writes the rest of the chunk as is."""
    server = serve(gunicorn, SSE_BUS_URL=bus_url, SSE_QUEUE_SIZE=5000, SSE_HISTORY_SIZE=5000)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(
        b"GET /stream?channel=big HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    )
    response = RawResponse(sock, 10)
    try:
        response.read_body_until(lambda body: b"retry:" in body, 5)
        assert wait_for(lambda: _direct(server.url, 1), 5), stats(server.url)
        # Published while the client reads nothing: several MB against a few KB of buffers.
        for _ in range(3):
            _publish_many(server.url, 100, 20_000, "big")
            _publish_many(server.url, 300, 700, "big")
        body = response.read_body_until(lambda body: body.count(b"\n\n") >= 1200, 60)
        assert _numbers(body) == [i for _ in range(3) for i in [*range(100), *range(300)]]
        # The stream went back to direct writing once it had caught up.
        assert wait_for(lambda: _direct(server.url, 1), 5), stats(server.url)
        publish(server.url, "after", channel="big")
        body = response.read_body_until(lambda body: b"data: after" in body, 5)
    finally:
        response.close()
    assert stats(server.url)["totals"]["dropped"] == 0


def test_a_client_that_vanishes_is_noticed_by_a_direct_write(gunicorn: GunicornFactory) -> None:
    server = serve(gunicorn)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /stream?channel=gone HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.recv(4096)
    assert wait_for(lambda: _direct(server.url, 1), 5), stats(server.url)
    # Reset, not closed: the server's next send fails at once.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    for _ in range(3):
        publish(server.url, "x", channel="gone")
    assert wait_for(lambda: stats(server.url)["streams"] == 0, 10), stats(server.url)
    assert stats(server.url)["totals"]["closed"] == 1


@pytest.mark.parametrize(
    ("request_line", "headers"),
    [
        ("GET /stream?channel=o HTTP/1.0", ""),
        ("GET /stream?channel=o HTTP/1.1", ""),
    ],
    ids=["http-1.0", "wrapped-by-middleware"],
)
def test_the_ordinary_path_where_bypassing_the_server_is_unsafe(
    gunicorn: GunicornFactory, request_line: str, headers: str
) -> None:
    wrap = request_line.endswith("1.1")
    server = serve(gunicorn, env={"TEST_WRAP_BODY": "1"} if wrap else {})
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(f"{request_line}\r\nHost: x\r\n{headers}\r\n".encode())
    response = RawResponse(sock, 5)
    try:
        response.read_body_until(lambda body: b"retry:" in body, 5)
        assert wait_for(lambda: stats(server.url)["streams"] == 1, 5)
        assert stats(server.url)["direct"] == 0
        for i in range(5):
            publish(server.url, f"{i}:x", channel="o")
        body = response.read_body_until(lambda body: body.count(b"\n\n") >= 5, 5)
    finally:
        response.close()
    assert _numbers(body) == list(range(5))
    assert response.chunked is wrap


def test_the_access_log_counts_the_bytes_written_directly(gunicorn: GunicornFactory) -> None:
    """gunicorn logs the body bytes it wrote (``%(B)s``); the stream adds those the fan-out
    wrote past it, so the access log tells the same as without direct writes."""
    server = answering(
        gunicorn(
            APP,
            config=CONF,
            args=["--access-logfile", "-", "--access-logformat", "ACCESS %(U)s %(B)s"],
        ),
        "/health",
    )
    with raw_sse(server.url, "/stream?channel=logged") as response:
        response.read_body_until(lambda body: b"retry:" in body, 5)
        assert wait_for(lambda: _direct(server.url, 1), 5), stats(server.url)
        _publish_many(server.url, 20, 1000, "logged")
        body = response.read_body_until(lambda body: body.count(b"\n\n") >= 20, 10)
        requests.post(f"{server.url}/revoke", params={"channel": "logged"}, timeout=5)
        body = response.read_to_end(10)

    def logged() -> list[int]:
        lines = [line for line in server.log_text().splitlines() if "ACCESS /stream " in line]
        return [int(line.rsplit(" ", 1)[1]) for line in lines]

    assert wait_for(lambda: logged() != [], 5), server.log_text()[-2000:]
    assert logged() == [len(body)]


# The mailbox on its own, with a stand-in for the socket's send.


def _waiting(box: Mailbox) -> tuple[threading.Thread, list[bytes | None]]:
    """A reader thread waiting in ``take``; returns once the mailbox writes directly."""
    taken: list[bytes | None] = []
    reader = threading.Thread(target=lambda: taken.append(box.take(5)), daemon=True)
    reader.start()
    assert wait_for(lambda: box._send is not None, 5)
    return reader, taken


def _box(send: Callable[[bytes], int]) -> Mailbox:
    box = Mailbox(8)
    box.write_directly(send)
    return box


def test_a_whole_write_leaves_the_reader_asleep() -> None:
    written: list[bytes] = []
    box = _box(lambda data: written.append(data) or len(data))
    reader, taken = _waiting(box)
    assert box.push(b"data: 1\n\n", chunk(b"data: 1\n\n"))
    assert written == [b"9\r\ndata: 1\n\n\r\n"]
    assert len(box) == 0 and box.rest == b""
    time.sleep(0.1)
    assert reader.is_alive()  # not woken
    box.end(EndReason.CLOSED)
    reader.join(5)
    assert taken == [None]


def test_a_short_write_hands_the_rest_to_the_reader() -> None:
    box = _box(lambda data: 4)
    reader, taken = _waiting(box)
    framed = chunk(b"data: 1\n\n")
    assert box.push(b"data: 1\n\n", framed)
    reader.join(5)
    assert taken == [b""]
    assert box.rest == framed[4:]
    # Later events queue behind the rest, for the reader.
    assert box.push(b"data: 2\n\n", chunk(b"data: 2\n\n"))
    assert box.take(0) == b"data: 2\n\n"


def test_a_full_socket_queues_the_event_and_wakes_the_reader() -> None:
    def full(data: bytes) -> int:
        raise BlockingIOError

    box = _box(full)
    reader, taken = _waiting(box)
    assert box.push(b"data: 1\n\n", chunk(b"data: 1\n\n"))
    reader.join(5)
    assert taken == [b"data: 1\n\n"]
    assert box.rest == b""


def test_a_failed_write_ends_the_mailbox() -> None:
    def broken(data: bytes) -> int:
        raise ConnectionResetError

    box = _box(broken)
    reader, taken = _waiting(box)
    assert box.push(b"data: 1\n\n", chunk(b"data: 1\n\n"))
    reader.join(5)
    assert taken == [None]
    assert box.reason is EndReason.CLOSED


def test_nothing_is_written_directly_unless_the_reader_waits() -> None:
    written: list[bytes] = []
    box = _box(lambda data: written.append(data) or len(data))
    assert box.push(b"data: 1\n\n", chunk(b"data: 1\n\n"))
    assert written == []
    assert box.take(0) == b"data: 1\n\n"


@pytest.mark.parametrize("queue", ["push", "offer"])
def test_an_event_queued_without_its_chunk_is_not_overtaken_by_a_direct_write(
    queue: str,
) -> None:
    """Anything queued (``push`` without the chunk, as a bus backend may call it, or
    ``offer``) stops the direct writes until the reader has taken it: the next event must not
    reach the socket before it."""
    written: list[bytes] = []
    box = _box(lambda data: written.append(data) or len(data))
    reader, taken = _waiting(box)
    assert getattr(box, queue)(b"data: 1\n\n")
    assert box.push(b"data: 2\n\n", chunk(b"data: 2\n\n"))
    reader.join(5)
    assert written == []
    assert taken[0] + (box.take(0) or b"") == b"data: 1\n\ndata: 2\n\n"

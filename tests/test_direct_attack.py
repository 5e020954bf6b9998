"""Attacks on the direct writes (``flask_sse_push.direct``), against real gunicorn processes.

Writing past the server is only safe when the bytes on the wire are exactly the ones it
would have written. These tests try to make them differ: middleware that rewrites the body,
writes that fail half-way through a chunk, a sampled event cut short, and a randomized
schedule of sizes, pauses and resets whose every byte is decoded strictly.
"""

from __future__ import annotations

import socket
import time

import requests
from prometheus_client.parser import text_string_to_metric_families
from support.app import publish, serve, stats
from support.gunicorn import GunicornFactory
from support.http import ChunkedDecoder, raw_sse
from support.procs import wait_for


def _direct(url: str, count: int) -> bool:
    return stats(url)["direct"] == count


def _stalled_stream(port: int, path: str, rcvbuf: int = 4096) -> tuple[socket.socket, bytes]:
    """A stream whose client has a small receive buffer and reads nothing until told;
    returns the socket and what came after the response head so far."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received = b""
    while b"retry:" not in received:
        data = sock.recv(65536)
        assert data, received
        received += data
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head, head
    return sock, body


def _read_until_eof(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    received = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(1 << 20)
        except (TimeoutError, ConnectionResetError):
            break
        if not data:
            break
        received += data
    return received


def test_a_middleware_that_maps_the_body_keeps_the_ordinary_path(
    gunicorn: GunicornFactory,
) -> None:
    """``map(rewrite, body)`` iterates the body from C: the body's caller is still gunicorn's
    request handler, but what it writes is the middleware's output, not the body's."""
    server = serve(gunicorn, env={"TEST_WRAP_BODY": "map"})
    with raw_sse(server.url, "/stream?channel=m") as response:
        response.read_body_until(lambda body: b"retry:" in body, 5)
        assert wait_for(lambda: stats(server.url)["streams"] == 1, 5)
        time.sleep(0.2)
        assert stats(server.url)["direct"] == 0
        publish(server.url, "a secret", channel="m")
        body = response.read_body_until(lambda body: b"\n\n" in body.split(b"\n", 1)[1], 5)
    assert b"data: a XXXXXX\n" in body, body
    assert b"secret" not in body


def test_a_rest_that_times_out_cuts_the_connection_like_a_failed_server_write(
    gunicorn: GunicornFactory,
) -> None:
    """A rest written by the stream times out (``SSE_SEND_TIMEOUT``): gunicorn's own write
    would have raised and dropped the connection. Nothing may follow the cut chunk, above all
    not the terminal ``0`` chunk, which would end the body in the middle of an event."""
    server = serve(gunicorn, SSE_SEND_TIMEOUT=1, SSE_KEEPALIVE=0)
    sock, body = _stalled_stream(server.port, "/stream?channel=t")
    try:
        assert wait_for(lambda: _direct(server.url, 1), 5), stats(server.url)
        payload = "y" * 6_000_000  # more than the kernel's largest send buffer
        event_id = publish(server.url, payload, channel="t")
        time.sleep(2.0)  # the rest's write times out after 1 s
        received = body + _read_until_eof(sock, 8)
    finally:
        sock.close()
    decoder = ChunkedDecoder()
    decoded = decoder.feed(received)
    assert decoded.startswith(b"retry: 3000\n")
    event = decoded[len(b"retry: 3000\n") :]
    expected = f"id: {event_id}\ndata: {payload}\n\n".encode()
    assert len(event) < len(expected), "the client stalled, its write timed out"
    assert expected.startswith(event), f"not a cut event: ...{event[-40:]!r}"
    assert not decoder.done


def _lag(url: str) -> tuple[float, float]:
    """Count and sum of the delivery-lag histogram."""
    text = requests.get(url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "sse_delivery_lag_seconds":
            values = {s.name: s.value for s in family.samples}
            return values["sse_delivery_lag_seconds_count"], values["sse_delivery_lag_seconds_sum"]
    raise AssertionError(text)


def test_a_sampled_event_cut_short_observes_its_own_lag(gunicorn: GunicornFactory) -> None:
    """The first event is sampled; written directly and cut short, its stream writes the
    rest. Its lag is that of the rest's write, not the time until the stream next writes
    queued events, seconds later."""
    server = serve(gunicorn, SSE_METRICS_PATH="/metrics", SSE_KEEPALIVE=0)
    sock, _ = _stalled_stream(server.port, "/stream?channel=l")
    try:
        assert wait_for(lambda: _direct(server.url, 1), 5), stats(server.url)
        publish(server.url, "y" * 6_000_000, channel="l")  # sampled, cut short
        time.sleep(0.3)
        sock.settimeout(5)
        got = 0
        while got < 6_000_000:
            got += len(sock.recv(1 << 20))
        time.sleep(3)
        # Not sampled: the first is cut short, the second queued behind it.
        publish(server.url, "z" * 6_000_000, channel="l")
        publish(server.url, "z" * 6_000_000, channel="l")
        while got < 18_000_000:
            got += len(sock.recv(1 << 20))
        assert wait_for(lambda: _direct(server.url, 1), 5), stats(server.url)
    finally:
        sock.close()
    count, total = _lag(server.url)
    assert count == 1
    assert total < 2.0, f"a lag of {total:.1f} s observed for an event written in 0.3 s"

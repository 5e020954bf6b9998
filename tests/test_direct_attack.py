"""Attacks on the direct writes (``flask_sse_push.direct``), against real gunicorn processes.

Writing past the server is only safe when the bytes on the wire are exactly the ones it
would have written. These tests try to make them differ: middleware that rewrites the body,
writes that fail half-way through a chunk, a sampled event cut short, and a randomized
schedule of sizes, pauses and resets whose every byte is decoded strictly.
"""

from __future__ import annotations

import signal
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support.app import APP, CONF, publish, serve, stats
from support.gunicorn import GunicornFactory
from support.http import ChunkedDecoder, raw_sse
from support.procs import wait_for
from support.tls import self_signed_certificate


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


BIG = 6_000_000  # more than the kernel's largest send buffer: a direct write is cut short


@pytest.mark.parametrize("ending", ["revoked", "lifetime", "slow", "shutdown", "reload"])
def test_a_stream_that_ends_while_a_rest_is_pending_ends_after_the_whole_chunk(
    gunicorn: GunicornFactory, ending: str
) -> None:
    """Whatever ends the stream while the rest of a cut chunk waits to be written (and
    keep-alives fall due), the client gets the whole event, then the end comment in a chunk
    of its own, then the last chunk."""
    server = serve(
        gunicorn,
        SSE_KEEPALIVE=0.05,
        SSE_QUEUE_SIZE=3,
        SSE_MAX_LIFETIME=1.5 if ending == "lifetime" else 0,
    )
    sock, body = _stalled_stream(server.port, "/stream?channel=e")
    try:
        assert wait_for(lambda: _direct(server.url, 1), 5), stats(server.url)
        event_id = publish(server.url, "y" * BIG, channel="e")
        if ending == "revoked":
            requests.post(server.url + "/revoke", params={"channel": "e"}, timeout=5)
        elif ending == "slow":
            for i in range(5):
                publish(server.url, f"small {i}", channel="e")
        elif ending == "shutdown":
            server.signal(signal.SIGTERM)
        elif ending == "reload":
            server.reload()
        time.sleep(1.0 if ending != "lifetime" else 2.0)  # keep-alives fall due meanwhile
        received = body + _read_until_eof(sock, 10)
    finally:
        sock.close()
    decoder = ChunkedDecoder()
    decoded = decoder.feed(received)
    assert decoder.done, received[-80:]
    event = f"id: {event_id}\ndata: {'y' * BIG}\n\n".encode()
    assert decoded.startswith(b"retry: 3000\n")
    rest = decoded[len(b"retry: 3000\n") :]
    while rest.startswith(b":\n"):  # keep-alives written before the event
        rest = rest[2:]
    assert rest.startswith(event), rest[:80]
    rest = rest[len(event) :]
    assert rest == f": {ending if ending != 'reload' else 'shutdown'}\n".encode(), rest[:200]
    sizes = decoder.chunk_sizes or []
    assert sizes[-2:] == [len(rest), 0], sizes[-5:]


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "direct", "then"),
    [
        (b"GET /stream?channel=p HTTP/1.1\r\nHost: x\r\n\r\n" + HEALTH, 1, b"HTTP/1.1 200"),
        (b"GET /stream?channel=p HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 1, b""),
        (b"GET http://x/stream?channel=p HTTP/1.1\r\nHost: x\r\n\r\n", 1, None),
        (b"GET /stream?channel=p HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n", 1, None),
        (
            b"GET /stream?channel=p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n" + HEALTH,
            1,
            b"HTTP/1.1 200",
        ),
        (b"GET /stream?channel=p HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 0, b""),
    ],
    ids=["pipelined", "connection-close", "absolute-form", "expect", "chunked-request", "1.0"],
)
def test_what_the_request_looks_like_changes_nothing_on_the_wire(
    gunicorn: GunicornFactory, request_bytes: bytes, direct: int, then: bytes | None
) -> None:
    """Requests that are odd but valid: the stream is written directly when it is plain
    chunked HTTP/1.1, and whatever the server writes after the stream (the answer to a
    pipelined request, or nothing when it closes) comes after the last chunk."""
    server = serve(gunicorn, SSE_MAX_LIFETIME=2, SSE_KEEPALIVE=0.05)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(request_bytes)
        assert wait_for(lambda: stats(server.url)["streams"] == 1, 5)
        time.sleep(0.1)  # the stream waits for events
        assert stats(server.url)["direct"] == direct
        ids = [publish(server.url, data, channel="p") for data in ("a", "y" * BIG, "b")]
        time.sleep(0.3)
        received = _read_until_eof(sock, 2 if then is None else 10)
    finally:
        sock.close()
    if received.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
        received = received[len(b"HTTP/1.1 100 Continue\r\n\r\n") :]
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), head
    events = b"".join(
        f"id: {event_id}\ndata: {data}\n\n".encode()
        for event_id, data in zip(ids, ("a", "y" * BIG, "b"), strict=True)
    )
    if not direct:  # not chunked: the body is the stream's bytes, up to the end
        assert body.replace(b":\n", b"") == b"retry: 3000\n" + events + b": lifetime\n"
        return
    decoder = ChunkedDecoder()
    decoded = decoder.feed(body)
    assert decoded.replace(b":\n", b"") == b"retry: 3000\n" + events + b": lifetime\n"
    assert decoder.done
    if then is not None:
        after = body[body.index(b"\r\n: lifetime\n\r\n0\r\n\r\n") + 20 :]
        assert after.startswith(then), after[:100]


@pytest.mark.parametrize("server_kind", ["tls", "gevent_pywsgi", "gthread", "content-length"])
def test_servers_that_frame_differently_keep_the_ordinary_path(
    gunicorn: GunicornFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    server_kind: str,
) -> None:
    """TLS, gunicorn's other worker classes, and a response given a length by an
    ``after_request`` handler: never written directly, and every event arrives."""
    args: list[str] = []
    env = {"SSE_STATS": "true", "SSE_KEEPALIVE": "0.2"}  # a gthread worker sees a gone client
    context: ssl.SSLContext | None = None
    if server_kind == "tls":
        cert, key = self_signed_certificate(tmp_path)
        args = ["--certfile", str(cert), "--keyfile", str(key)]
        context = ssl.create_default_context(cafile=str(cert))
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    elif server_kind == "content-length":
        env["TEST_CONTENT_LENGTH"] = "100000"
    else:
        args = ["-k", server_kind, "--threads", "8"]
    started = gunicorn(APP, env=env, args=args, config=CONF)
    url = started.url.replace("http:", "https:") if context else started.url
    assert wait_for(lambda: _answers(url), 20), started.log_text()
    sock: socket.socket = socket.create_connection(("127.0.0.1", started.port), timeout=5)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    try:
        sock.sendall(b"GET /stream?channel=k HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_for(lambda: stats(url)["streams"] == 1, 5)
        time.sleep(0.1)
        assert stats(url)["direct"] == 0
        for i in range(3):
            publish(url, f"{i}:x", channel="k")
        received = b""
        while received.count(b"\n\n") < 3:  # three events
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(received) from None
            assert data, received
            received += data
    finally:
        sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    if b"chunked" in head:
        body = ChunkedDecoder().feed(body)
    assert [line for line in body.split(b"\n") if line.startswith(b"data:")] == [
        b"data: 0:x",
        b"data: 1:x",
        b"data: 2:x",
    ]


def _answers(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_a_sampled_event_whose_direct_write_fails_observes_no_lag(
    gunicorn: GunicornFactory,
) -> None:
    """The client reset its connection: the direct write of the first (sampled) event fails
    and ends the stream. The event was never written, so no lag is observed for it."""
    server = serve(gunicorn, SSE_METRICS_PATH="/metrics", SSE_KEEPALIVE=0)
    sock, _ = _stalled_stream(server.port, "/stream?channel=r")
    assert wait_for(lambda: _direct(server.url, 1), 5), stats(server.url)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    time.sleep(0.2)
    publish(server.url, "never written", channel="r")
    assert wait_for(lambda: stats(server.url)["streams"] == 0, 5), stats(server.url)
    assert stats(server.url)["totals"]["closed"] == 1
    assert _lag(server.url) == (0, 0)

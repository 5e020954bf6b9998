"""Checks for the test infrastructure: helpers, fixtures and the raw client."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psutil
import pytest
import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry
from sseparse import ParsedEvent, SSEParser
from support.gunicorn import GunicornFactory
from support.http import ChunkedDecoder, StreamClosedError, dechunk, encode_chunk, raw_sse
from support.procs import HOST, free_port, wait_for
from support.redis_server import REDIS_MISSING_MESSAGE, RedisFactory, require_redis_server

COUNT_BODY = b"data: 1\n\ndata: 2\n\ndata: 3\n\n"


# -- free_port / raw client against a canned server ------------------------------


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind((HOST, port))


class CannedServer:
    """One-connection server replaying fixed byte pieces.

    :ivar request: The request bytes received (up to the blank line).
    """

    def __init__(self, pieces: Sequence[bytes], hold_open: bool) -> None:
        """Listen on a free port.

        :param pieces: Written one by one, with a short pause in between.
        :param hold_open: Keep the connection open until :meth:`close`.
        """
        self.pieces = pieces
        self.hold_open = hold_open
        self.request = b""
        self.release = threading.Event()
        self.listener = socket.create_server((HOST, 0))
        self.listener.settimeout(5)
        self.port: int = self.listener.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            for _ in range(100):
                if b"\r\n\r\n" in self.request:
                    break
                data = conn.recv(4096)
                if not data:
                    break
                self.request += data
            for piece in self.pieces:
                conn.sendall(piece)
                time.sleep(0.02)
            if self.hold_open:
                self.release.wait(10)

    def close(self) -> None:
        """Release the connection and stop listening."""
        self.release.set()
        self.thread.join(10)
        self.listener.close()


@contextmanager
def canned(pieces: Sequence[bytes], hold_open: bool = False) -> Iterator[CannedServer]:
    """Run a :class:`CannedServer` for the duration of the block.

    :param pieces: Response bytes, in pieces.
    :param hold_open: Keep the connection open after the last piece.
    :returns: The server.
    """
    server = CannedServer(pieces, hold_open)
    try:
        yield server
    finally:
        server.close()


def test_raw_sse_request_and_duplicate_headers() -> None:
    pieces = [
        b"HTTP/1.1 200 OK\r\nX-Dup: a\r\nx-dup:  b \r\nContent-Length: 5\r\n\r\n",
        b"hello",
    ]
    with canned(pieces) as server:
        with raw_sse(server.url, "/x?y=1", headers={"Last-Event-ID": "42"}) as resp:
            assert resp.status == 200
            assert resp.reason == "OK"
            assert resp.headers == [
                ("X-Dup", "a"),
                ("x-dup", "b"),
                ("Content-Length", "5"),
            ]
            assert resp.get_all("X-DUP") == ["a", "b"]
            assert not resp.chunked
            assert resp.read_to_end(5) == b"hello"
            assert resp.complete
        request = server.request.decode()
    assert request.startswith("GET /x?y=1 HTTP/1.1\r\n")
    assert f"Host: {HOST}:{server.port}\r\n" in request
    assert "Accept: text/event-stream\r\n" in request
    assert "Last-Event-ID: 42\r\n" in request


def test_raw_sse_chunked_split_anywhere() -> None:
    wire = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n"
        b"1A\r\n" + b"x" * 26 + b"\r\n"
        b"0\r\nTrailer: t\r\n\r\n"
    )
    pieces = [wire[i : i + 3] for i in range(0, len(wire), 3)]
    with canned(pieces) as server, raw_sse(server.url, "/") as resp:
        assert resp.chunked
        body = resp.read_body_until(lambda b: b.startswith(b"hello"), 5)
        assert body.startswith(b"hello")
        assert resp.read_to_end(5) == b"hello" + b"x" * 26
        assert resp.chunk_sizes == [5, 26, 0]
        assert resp.complete
        assert resp.raw_bytes == wire
        with pytest.raises(StreamClosedError):
            resp.read_body_until(lambda b: b"never" in b, 1)


def test_raw_sse_timeout_when_predicate_never_true() -> None:
    pieces = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"3\r\nabc\r\n"]
    with canned(pieces, hold_open=True) as server, raw_sse(server.url, "/") as resp:
        assert resp.read_body_until(lambda b: b == b"abc", 5) == b"abc"
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            resp.read_body_until(lambda b: b"more" in b, 0.3)
        assert not isinstance(info.value, StreamClosedError)
        assert 0.25 <= time.monotonic() - start < 3
        assert not resp.complete


def test_raw_sse_body_until_eof_without_length() -> None:
    pieces = [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"data: a\n\n", b"tail"]
    with canned(pieces) as server, raw_sse(server.url, "/") as resp:
        assert resp.read_to_end(5) == b"data: a\n\ntail"
        assert resp.eof


# -- the chunked-transfer decoder ---------------------------------------------------


def test_chunked_decoder_one_byte_at_a_time() -> None:
    wire = b"5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nTrailer: t\r\n\r\nafter the end"
    decoder = ChunkedDecoder()
    body = b"".join(decoder.feed(wire[i : i + 1]) for i in range(len(wire)))
    assert body == b"hello!"
    assert decoder.done
    assert decoder.chunk_sizes == [5, 1, 0]
    assert decoder.feed(b"3\r\nabc\r\n") == b""


def test_chunked_decoder_without_sizes_and_unfinished() -> None:
    decoder = ChunkedDecoder(record_sizes=False)
    assert decoder.feed(encode_chunk(b"data: 1\n\n") + b"9\r\ndata") == b"data: 1\n\ndata"
    assert decoder.chunk_sizes is None
    assert not decoder.done
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert dechunk(head + b"A\r\n0123456789\r\n3\r\nab") == b"0123456789ab"


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"0x5\r\nhello\r\n", "bad chunk size line"),
        (b" 5\r\nhello\r\n", "bad chunk size line"),
        (b"\r\n", "bad chunk size line"),
        (b"5\r\nhello!\r\n", "missing CRLF after chunk"),
        (b"5\r\nhello\rX", "missing CRLF after chunk"),
    ],
)
def test_chunked_decoder_refuses_bad_framing(wire: bytes, message: str) -> None:
    decoder = ChunkedDecoder()
    with pytest.raises(ValueError, match=message):
        for i in range(len(wire)):
            decoder.feed(wire[i : i + 1])


# -- gunicorn fixture ---------------------------------------------------------------


@pytest.mark.e2e
def test_gunicorn_plain_ping_and_stream(gunicorn: GunicornFactory) -> None:
    server = gunicorn("apps.plain:app")
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert server.proc.poll() is None

    with raw_sse(server.url, "/ping") as resp:
        assert resp.status == 200
        assert resp.header("Content-Length") == "4"
        assert resp.read_to_end(5) == b"pong"

    with raw_sse(server.url, "/count") as resp:
        assert resp.status == 200
        assert resp.http_version == "HTTP/1.1"
        names = [name for name, _ in resp.headers]
        assert "Content-Type" in names
        assert resp.header("content-type") == "text/event-stream; charset=utf-8"
        assert resp.get_all("Transfer-Encoding") == ["chunked"]
        assert resp.header("Content-Length") is None
        body = resp.read_body_until(lambda b: b.count(b"\n\n") >= 3, 10)
        assert body == COUNT_BODY
        assert resp.read_to_end(5) == COUNT_BODY
        # One chunk per yielded piece, then the terminating zero chunk.
        assert resp.chunk_sizes == [9, 9, 9, 0]
        assert b"9\r\ndata: 2\n\n\r\n" in resp.raw_bytes
        assert resp.raw_bytes.endswith(b"0\r\n\r\n")

    parser = SSEParser()
    events = parser.feed(body)
    assert events == [
        ParsedEvent(type="message", data=str(n), last_event_id="", retry=None) for n in (1, 2, 3)
    ]
    assert parser.comments == []
    assert "Booting worker with pid" in server.log_text()

    elapsed = server.stop()
    assert 0 <= elapsed < 15
    assert server.proc.returncode is not None


@pytest.mark.e2e
def test_gunicorn_workers_reload_and_stop(gunicorn: GunicornFactory) -> None:
    server = gunicorn("apps.plain:app", workers=2, env={"INFRA_MARKER": "1"})
    before = server.worker_pids()
    assert len(before) == 2
    assert server.log_text().count("Booting worker with pid") >= 2
    for pid in before:
        assert psutil.Process(pid).environ().get("INFRA_MARKER") == "1"

    server.reload()
    assert wait_for(lambda: not set(server.worker_pids()) & set(before), 20)
    assert wait_for(lambda: len(server.worker_pids()) == 2, 20)
    with raw_sse(server.url, "/ping") as resp:
        assert resp.read_to_end(5) == b"pong"

    workers = server.worker_pids()
    elapsed = server.stop()
    assert elapsed < 15
    assert server.proc.returncode is not None
    assert not any(psutil.pid_exists(pid) and _is_alive(pid) for pid in workers)
    assert server.stop() == 0.0


def _is_alive(pid: int) -> bool:
    """Tell whether *pid* is a running (non-zombie) process.

    :param pid: Process id.
    :returns: ``True`` if alive.
    """
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.e2e
def test_gunicorn_start_failure_reports_log(gunicorn: GunicornFactory) -> None:
    with pytest.raises(RuntimeError) as info:
        gunicorn("apps.plain:app", args=["--no-such-option"], timeout=10)
    message = str(info.value)
    assert "exited with code" in message
    assert "--no-such-option" in message
    assert "unrecognized arguments" in message


@pytest.mark.e2e
def test_gunicorn_signal_quick_shutdown(gunicorn: GunicornFactory) -> None:
    server = gunicorn("apps.plain:app")
    # Sent right after start: the fixture waited until the worker installed
    # its own handlers, so the master's forwarded SIGQUIT is not lost.
    server.signal(signal.SIGINT)
    assert wait_for(lambda: server.proc.poll() is not None, 15), server.log_text()
    assert server.stop() == 0.0


@pytest.mark.e2e
def test_gunicorn_stop_after_master_killed_cleans_workers(gunicorn: GunicornFactory) -> None:
    server = gunicorn("apps.plain:app", workers=2)
    workers = server.worker_pids()
    assert len(workers) == 2
    server.signal(signal.SIGKILL)
    assert wait_for(lambda: server.proc.poll() is not None, 10)
    assert server.proc.returncode == -signal.SIGKILL
    assert server.worker_pids() == []
    assert server.stop() == 0.0
    assert wait_for(lambda: not any(_is_alive(pid) for pid in workers), 10)


# -- redis_server fixture -------------------------------------------------------------


@pytest.mark.redis
def test_redis_start_stop_restart(redis_server: RedisFactory) -> None:
    server = redis_server()
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    client = server.client()
    assert client.ping() is True
    assert client.set("k", "v") is True
    assert client.get("k") == b"v"

    server.stop()
    assert not server.running()
    probe = redis.Redis(
        host=HOST, port=server.port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            probe.ping()
    finally:
        probe.close()

    server.start()
    client = server.client()
    assert client.ping() is True
    assert client.get("k") is None  # no persistence across restarts


@pytest.mark.redis
def test_redis_two_servers_are_independent(redis_server: RedisFactory) -> None:
    a, b = redis_server(), redis_server()
    assert a.port != b.port
    a.client().set("k", "a")
    assert b.client().get("k") is None


def test_redis_missing_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", os.devnull)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as info:
        require_redis_server()
    assert "Debian package redis-server" in str(info.value)
    assert str(info.value.msg) == REDIS_MISSING_MESSAGE


def test_redis_missing_fails_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", os.devnull)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception) as info:
        require_redis_server()
    assert "Debian package redis-server" in str(info.value)

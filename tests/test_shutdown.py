"""Shutdown and reload of a real ``gunicorn -k gevent``, served both with the package's
configuration module and with the bare command: open streams end at once and cleanly."""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import requests
from sseparse import parse_all
from support.app import APP, CONF, publish, serve, stats
from support.clients import ManyStreams
from support.gunicorn import GunicornFactory, GunicornServer, answering
from support.http import raw_sse
from support.procs import wait_for

pytestmark = pytest.mark.e2e

#: Both commands: ``-c python:flask_sse_push.gunicorn_conf``, and none.
COMMANDS = pytest.mark.parametrize("config", [CONF, None], ids=["module", "bare"])
#: How every stream ends at shutdown: a comment, then the chunked terminator.
CLEAN_END = b": shutdown\n\r\n0\r\n\r\n"
#: What the one warning of a bare command names.
HINT = "gunicorn -c python:flask_sse_push.gunicorn_conf"


def open_streams(server: GunicornServer, count: int) -> ManyStreams:
    """*count* streams on channel ``a``, each once its head arrived."""
    streams = ManyStreams(server.port, "/stream?channel=a", count)
    try:
        assert streams.pump(lambda s: s.all_have(b"retry: 3000"), 30)
    except BaseException:
        streams.close()
        raise
    return streams


def check_the_one_warning(server: GunicornServer, config: str | None, workers: int = 1) -> None:
    """With the bare command, gunicorn's default of 1000 ``worker_connections`` is not
    above the extension's limit of 1000 streams: the first stream of each of the *workers*
    that had one said so, once."""
    log = server.log_text()
    if config is None:
        assert log.count(HINT) == workers, log
        assert "worker_connections (1000) is not above SSE_MAX_CONNECTIONS (1000)" in log
    else:
        assert HINT not in log, log


def asking_again() -> Callable[[ManyStreams], bool]:
    """For :meth:`ManyStreams.pump`: send a new request on each connection once its
    response ended, as a browser reusing the connection would; true once the server
    closed every connection."""
    asked: set[socket.socket] = set()

    def until(streams: ManyStreams) -> bool:
        for sock, data in streams.received.items():
            if sock not in asked and data.endswith(b"0\r\n\r\n"):
                asked.add(sock)
                with contextlib.suppress(OSError):
                    sock.send(b"GET /stream?channel=a HTTP/1.1\r\nHost: x\r\n\r\n")
        return len(streams.closed) == len(streams.received)

    return until


@COMMANDS
def test_sigterm_with_a_thousand_streams_ends_them_at_once(
    gunicorn: GunicornFactory, config: str | None
) -> None:
    server = serve(gunicorn, config=config, SSE_KEEPALIVE=5)
    streams = open_streams(server, 1000)
    try:
        if config is not None:  # the bare command's 1000 slots are all taken by now
            assert stats(server.url)["connections"] == 1000
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert streams.pump(lambda s: s.all_have(b"0\r\n\r\n"), 10)
        ended_after = time.monotonic() - started
        exited_after = server.stop(timeout=15)
    finally:
        streams.close()
    # Every stream got its last chunk: ended cleanly, not cut off.
    assert all(data.endswith(CLEAN_END) for data in streams.received.values())
    # gunicorn's graceful_timeout is 30 s: without the watcher the worker would wait for it.
    assert ended_after < 5
    assert exited_after < 5
    assert "Worker graceful timeout" not in server.log_text()
    check_the_one_warning(server, config)


@COMMANDS
def test_sighup_reload_with_a_thousand_streams_retires_the_old_worker_at_once(
    gunicorn: GunicornFactory, config: str | None
) -> None:
    server = serve(gunicorn, config=config, SSE_KEEPALIVE=5)
    (old_worker,) = server.worker_pids()
    streams = open_streams(server, 1000)
    try:
        started = time.monotonic()
        server.reload()
        # Each client asks again at once on the same connection, as a browser may do: the
        # server closed it after the last chunk instead of answering from the old worker,
        # so the client reconnects on a new connection, which the new worker accepts.
        assert streams.pump(asking_again(), 15)
        assert wait_for(lambda: not psutil.pid_exists(old_worker), 10)
        retired_after = time.monotonic() - started
    finally:
        streams.close()
    bad = [bytes(d[-300:]) for d in streams.received.values() if not d.endswith(CLEAN_END)]
    assert not bad, (len(bad), bad[:2])
    assert retired_after < 5
    assert server.running()
    with raw_sse(server.url, "/stream?channel=a") as response:
        response.read_body_until(lambda body: b"retry: 3000" in body, 10)
        answer = stats(server.url)
        assert (answer["connections"], answer["pid"] != old_worker) == (1, True)
        event_id = publish(server.url, "after the reload", channel="a")
        body = response.read_body_until(lambda body: b"after the reload" in body, 10)
    assert parse_all(body)[-1].last_event_id == event_id
    check_the_one_warning(server, config, workers=2)


@COMMANDS
def test_a_client_that_stopped_reading_does_not_hold_up_shutdown(
    gunicorn: GunicornFactory, config: str | None
) -> None:
    server = serve(gunicorn, config=config, SSE_QUEUE_SIZE=64)
    stalled = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"GET /stream?channel=load HTTP/1.1\r\nHost: x\r\n\r\n")
        assert stalled.recv(4096).startswith(b"HTTP/1.1 200")
        # 16 MB for a reader that never reads: the server's write to it gets stuck.
        answer = requests.post(
            f"{server.url}/publish-many?n=2000&size=8000&channel=load", timeout=30
        )
        assert answer.status_code == 200
        exited_after = server.stop(timeout=20)
    finally:
        stalled.close()
    # graceful_timeout is 30 s; the stuck write is cut 2 s after SIGTERM.
    assert exited_after < 8
    assert "Worker graceful timeout" not in server.log_text()


def test_a_worker_that_never_had_a_stream_exits_at_once(gunicorn: GunicornFactory) -> None:
    """It has no watcher, and needs none: gunicorn stops an idle worker by itself."""
    server = serve(gunicorn, config=None)
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    exited_after = server.stop(timeout=15)
    assert exited_after < 5
    assert "flask-sse-push" not in server.log_text()


def test_a_worker_whose_signal_handlers_were_replaced_says_so_once(
    gunicorn: GunicornFactory, tmp_path: Path
) -> None:
    """A configuration that wraps the worker's handlers in functions of its own hides the
    worker from the first stream: streams then wait for graceful_timeout, and the first
    stream says so (once), naming the configuration module."""
    config = tmp_path / "wrapping.py"
    config.write_text(
        "import signal\n"
        "graceful_timeout = 2\n"
        "worker_connections = 2000\n\n\n"
        "def post_worker_init(worker):\n"
        "    for signum in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):\n"
        "        previous = signal.getsignal(signum)\n"
        "        signal.signal(signum, lambda sig, frame, p=previous: p(sig, frame))\n"
    )
    server = answering(gunicorn(APP, config=str(config)), "/health")
    streams = open_streams(server, 3)
    try:
        exited_after = server.stop(timeout=15)
    finally:
        streams.close()
    log = server.log_text()
    assert log.count("the gunicorn worker could not be found") == 1, log
    assert log.count(HINT) == 1
    # The streams were not ended: the master waited for its graceful_timeout of 2 s.
    assert 1.5 < exited_after < 8

"""Async generators in ``sse_response`` under a real ``gunicorn -k gevent``: they share one
event loop per worker, many run at once, a client that leaves cancels its generator where
it awaits, and nothing else in the worker (DNS, other requests) waits for them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import requests
from flask import Flask, request
from support.app import CONF
from support.clients import ManyStreams
from support.gunicorn import GunicornFactory, GunicornServer, answering
from support.http import RawResponse, raw_sse
from support.procs import wait_for

from flask_sse_push import aio, sse_response
from flask_sse_push.testing import EventReader

APP = "apps.background:app"
#: Clients leaving while their generator awaits: more than gevent's thread pool (10).
LEAVING = 12


def serve_background(gunicorn: GunicornFactory, **sse: object) -> GunicornServer:
    """Serve :mod:`apps.background` with the package's gunicorn configuration."""
    env = {key: json.dumps(value) for key, value in sse.items()}
    return answering(gunicorn(APP, env=env, config=CONF), "/health")


def resolve_seconds(server: GunicornServer) -> float:
    """How long ``getaddrinfo('localhost')`` took in the worker."""
    answer = requests.get(server.url + "/resolve", timeout=10)
    seconds: float = answer.json()["seconds"]
    return seconds


@contextlib.contextmanager
def sleepy_streams(server: GunicornServer, count: int) -> Iterator[list[RawResponse]]:
    """Open *count* ``/sleepy`` streams, each read until its generator started."""
    streams: list[RawResponse] = []
    try:
        for n in range(count):
            stream = raw_sse(server.url, f"/sleepy?who=c{n}", timeout=10)
            streams.append(stream)
            stream.read_body_until(lambda body: b"data: started" in body, 10)
        yield streams
    finally:
        for stream in streams:
            stream.close()


@pytest.mark.e2e
def test_leaving_clients_cancel_their_generators_at_once(gunicorn: GunicornFactory) -> None:
    server = serve_background(gunicorn)
    with sleepy_streams(server, LEAVING) as streams:
        assert b"in /sleepy" in streams[0].body  # the request context was there
        assert resolve_seconds(server) < 1.0
        for stream in streams:
            stream.close()
        left = time.monotonic()

    def finals() -> dict[str, float]:
        answer: dict[str, float] = requests.get(server.url + "/finally", timeout=10).json()
        return answer

    assert wait_for(lambda: len(finals()) == LEAVING, 10), finals()
    delays = sorted(ran - left for ran in finals().values())
    # A departure shows at the second keep-alive written after it (0.2 s apart).
    assert delays[-1] < 2.0, delays
    assert resolve_seconds(server) < 1.0
    # A new async stream runs at once.
    with raw_sse(server.url, "/ticks?n=2&pause=0.05", timeout=10) as response:
        assert b"data: tick 1" in response.read_to_end(10)


@pytest.mark.e2e
@pytest.mark.slow
def test_hundreds_of_async_streams_run_at_once(gunicorn: GunicornFactory) -> None:
    server = serve_background(gunicorn)
    streams = ManyStreams(server.port, "/ticks?n=1000&pause=0.2", 220)
    try:
        assert streams.pump(lambda s: s.all_have(b"data: tick 5"), 40)
        assert resolve_seconds(server) < 1.0
        # Other requests are served meanwhile.
        started = time.monotonic()
        requests.get(server.url + "/health", timeout=10)
        assert time.monotonic() - started < 1.0
    finally:
        streams.close()
    assert "Traceback" not in server.log_text()


@pytest.fixture
def app() -> Flask:
    app = Flask(__name__)
    finished: dict[str, float] = {}
    app.config["finished"] = finished

    @app.get("/sleepy")
    def sleepy() -> Any:
        who = request.args["who"]

        async def generate() -> AsyncIterator[str]:
            try:
                yield f"{who} asked {request.path}"
                await asyncio.sleep(60)
            finally:
                finished[who] = time.monotonic()

        return sse_response(generate(), keepalive=0)

    return app


def test_async_generators_share_one_loop_without_gevent(app: Flask) -> None:
    client = app.test_client()
    readers = [EventReader(client.get(f"/sleepy?who=r{n}", buffered=False)) for n in range(30)]
    try:
        for n, reader in enumerate(readers):
            assert [e.data for e in reader.events(count=1, timeout=5)] == [f"r{n} asked /sleepy"]
    finally:
        for reader in readers:
            reader.close()
        closed = time.monotonic()
    finished = app.config["finished"]
    assert wait_for(lambda: len(finished) == 30, 5), finished
    assert max(finished.values()) - closed < 1.0


def test_the_shared_loop_is_rebuilt_in_a_forked_child() -> None:
    parent_loop = aio.shared_loop()
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:

            async def report() -> None:
                os.write(writing, b"child ok" if aio.shared_loop() is not parent_loop else b"same")

            aio.Job(report())
            time.sleep(2)
            code = 0
        finally:
            os._exit(code)
    os.close(writing)
    try:
        assert os.read(reading, 100) == b"child ok"
    finally:
        os.close(reading)
        os.waitpid(pid, 0)


def test_a_job_cancelled_before_it_started_never_runs() -> None:
    ran: list[str] = []

    async def job() -> None:
        ran.append("ran")

    # The loop's thread is held up while both calls reach it, so they run in order (a
    # free loop could otherwise start the job between them, on a busy machine).
    started, release = threading.Event(), threading.Event()

    async def hold() -> None:
        started.set()
        release.wait(5)

    aio.Job(hold())
    assert started.wait(5)
    aio.Job(job()).cancel()
    release.set()
    done: list[str] = []

    async def mark() -> None:
        done.append("done")

    aio.Job(mark())
    assert wait_for(lambda: done == ["done"], 5)
    assert ran == []

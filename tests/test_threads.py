"""Publishing from real OS threads (gevent's thread pool, a native executor, a native
thread) under a real ``gunicorn -k gevent``: the events reach the streams at once, in
order, also while greenlets publish at the same time."""

from __future__ import annotations

import json
import threading
import time

import psutil
import pytest
import requests
from e2e import Collector
from helpers import GunicornFactory, RawResponse, raw_sse
from test_async_streams import serve_background

#: Events published per run; the first WARM_UP are not measured.
EVENTS = 300
WARM_UP = 20


def arrival_delays(response: RawResponse, count: int, timeout: float) -> list[float]:
    """Read *count* events carrying their publishing time (``sent``) and return how long
    each took to arrive, in order."""
    collector = Collector()
    delays: list[float] = []

    def arrived(body: bytes) -> bool:
        before = len(collector.events)
        collector.update(body)
        now = time.monotonic()
        delays.extend(now - json.loads(e.data)["sent"] for e in collector.events[before:])
        return len(collector.events) >= count

    response.read_body_until(arrived, timeout)
    assert [json.loads(e.data)["i"] for e in collector.events] == list(range(count))
    return delays


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["pool", "executor", "native", "greenlet-executor"])
def test_thread_publishes_arrive_at_once(gunicorn: GunicornFactory, mode: str) -> None:
    server = serve_background(gunicorn, SSE_KEEPALIVE=0)
    channel = f"threads-{mode}"
    with raw_sse(server.url, f"/stream?channel={channel}", timeout=10) as response:
        response.read_body_until(lambda body: body.startswith(b"retry:"), 10)
        answer = requests.post(
            server.url + "/thread-publish",
            params={"mode": mode, "n": EVENTS, "gap": 0.01, "channel": channel},
            timeout=10,
        )
        assert answer.status_code == 202
        delays = arrival_delays(response, EVENTS, 60)
    assert p99(delays[WARM_UP:]) < 0.05, sorted(delays)[-10:]


@pytest.mark.e2e
def test_thread_and_greenlet_publishes_together(gunicorn: GunicornFactory) -> None:
    """A thread of gevent's pool and greenlets publish to the same bus at once: every event
    arrives once, the thread's in order, and none waits."""
    server = serve_background(gunicorn, SSE_KEEPALIVE=0, SSE_QUEUE_SIZE=100_000)
    with (
        raw_sse(server.url, "/stream?channel=mixed", timeout=10) as thread_side,
        raw_sse(server.url, "/stream?channel=busy", timeout=10) as busy_side,
    ):
        thread_side.read_body_until(lambda body: body.startswith(b"retry:"), 10)
        busy_side.read_body_until(lambda body: body.startswith(b"retry:"), 10)
        busy_errors: list[BaseException] = []

        def publish_busily() -> None:
            try:
                for _ in range(10):
                    requests.post(
                        server.url + "/publish-many",
                        params={"n": 200, "channel": "busy"},
                        timeout=30,
                    ).raise_for_status()
            except BaseException as exc:  # reported below
                busy_errors.append(exc)

        busy = threading.Thread(target=publish_busily)
        busy.start()
        try:
            requests.post(
                server.url + "/thread-publish",
                params={"mode": "pool", "n": EVENTS, "gap": 0.005, "channel": "mixed"},
                timeout=10,
            ).raise_for_status()
            delays = arrival_delays(thread_side, EVENTS, 60)
        finally:
            busy.join(60)
        assert not busy_errors
        busy_side.read_body_until(lambda body: body.count(b"\n\n") >= 2000, 30)
    assert p99(delays[WARM_UP:]) < 0.05, sorted(delays)[-10:]
    assert "Traceback" not in server.log_text()


@pytest.mark.e2e
def test_short_lived_native_threads_leave_nothing_behind(gunicorn: GunicornFactory) -> None:
    """Each event from a new native thread: they all arrive at once, and the worker holds no
    more files afterwards (a gevent hub made in each thread would leak two)."""
    server = serve_background(gunicorn, SSE_KEEPALIVE=0)
    (pid,) = server.worker_pids()
    with raw_sse(server.url, "/stream?channel=each", timeout=10) as response:
        response.read_body_until(lambda body: body.startswith(b"retry:"), 10)
        files_before = psutil.Process(pid).num_fds()
        requests.post(
            server.url + "/thread-publish",
            params={"mode": "native-each", "n": 200, "gap": 0.005, "channel": "each"},
            timeout=10,
        ).raise_for_status()
        delays = arrival_delays(response, 200, 60)
        files_after = psutil.Process(pid).num_fds()
    assert files_after - files_before < 10, (files_before, files_after)
    assert p99(delays[WARM_UP:]) < 0.05, sorted(delays)[-10:]

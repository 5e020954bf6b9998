"""Publishing from real OS threads (gevent's thread pool, a native executor, a native
thread) under a real ``gunicorn -k gevent``: the events reach the streams at once, in
order, also while greenlets publish at the same time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
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


AT_HOME = textwrap.dedent(
    """
    from gevent import monkey; monkey.patch_all()
    import gevent
    from gevent._hub_local import get_hub_if_exists
    from gevent.monkey import get_original
    from flask import Flask
    from flask_sse_push import send_event, sse
    from flask_sse_push.bus import Subscription
    from flask_sse_push.concurrency import at_home, away
    from flask_sse_push.state import get_state

    app = Flask("threads")
    app.config["SSE_KEEPALIVE"] = 0
    app.register_blueprint(sse)
    sub = Subscription(["a"], 100)
    get_state(app).bus.subscribe(sub, None)
    ident = get_original("_thread", "get_ident")
    main = ident()
    seen = []

    def where():
        return ident() == main, away()

    def fail():
        raise KeyError("from home")

    def job():
        seen.append(("thread", ident() != main, away()))
        seen.append(("home", at_home(where)))
        try:
            at_home(fail)
        except KeyError as exc:
            seen.append(("raised", str(exc)))
        with app.app_context():
            send_event("from a thread", channel="a")
            seen.append(("ended", get_state(app).bus.end_streams(channel="a")))
        seen.append(("hub made here", get_hub_if_exists() is not None))

    done = get_original("_thread", "allocate_lock")()
    done.acquire()
    get_original("_thread", "start_new_thread")(lambda: (job(), done.release()), ())
    for _ in range(500):
        if done.acquire(False):
            break
        gevent.sleep(0.01)
    print(seen, sub.take(0), sub.reason)
    """
)


def test_other_threads_run_bus_calls_at_home() -> None:
    result = subprocess.run(
        [sys.executable, "-c", AT_HOME], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "[('thread', True, True), ('home', (True, False)), ('raised', \"'from home'\"), "
        "('ended', 1), ('hub made here', False)] None revoked"
    ), result.stderr

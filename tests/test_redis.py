"""The Redis bus against real ``redis-server`` processes: replay rules, outages, many
workers, connection counts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from sseparse import parse_all
from support.app import publish, serve
from support.clients import Crowd
from support.gunicorn import GunicornFactory
from support.http import raw_sse
from support.procs import wait_for
from support.redis_server import RedisFactory, RedisServer

from flask_sse_push import (
    ConfigurationError,
    PublishError,
    SSEBlueprint,
    get_state,
    send_event,
)
from flask_sse_push.testing import EventReader

pytestmark = pytest.mark.redis
TESTS = Path(__file__).parent


@pytest.fixture
def redis_app(shared_redis: RedisServer) -> Iterator[Flask]:
    shared_redis.client().flushdb()
    app = Flask(__name__)
    app.config.update(SSE_BUS_URL=shared_redis.url, SSE_KEEPALIVE=0.2, SSE_PUBLISH_TIMEOUT=1)
    app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
    yield app
    get_state(app).bus.close()


def publish_in(app: Flask, data: Any, **kwargs: Any) -> str:
    with app.app_context():
        return send_event(data, **kwargs)


def resume(app: Flask, last_event_id: str, count: int, channels: str = "a") -> list[Any]:
    client = app.test_client()
    query = "&".join(f"channel={c}" for c in channels.split(","))
    response = client.get(
        f"/stream?{query}", headers={"Last-Event-ID": last_event_id}, buffered=False
    )
    with EventReader(response) as reader:
        return reader.events(count=count, timeout=5)


def test_missing_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.delitem(sys.modules, "flask_sse_push.bus.redis", raising=False)
    app = Flask(__name__)
    app.config["SSE_BUS_URL"] = "redis://127.0.0.1:1/0"
    with pytest.raises(ConfigurationError, match=r"pip install 'flask-sse-push\[redis\]'"):
        app.register_blueprint(SSEBlueprint())


def test_ids_are_stream_ids_and_replay_crosses_channels(redis_app: Flask) -> None:
    ids = [publish_in(redis_app, str(i), channel="ab"[i % 2]) for i in range(6)]
    assert all(i.count("-") == 1 and i.replace("-", "").isdigit() for i in ids)
    events = resume(redis_app, ids[1], 4, channels="a,b")
    assert [e.data for e in events] == ["2", "3", "4", "5"]
    assert [e.id for e in events] == ids[2:]
    events = resume(redis_app, ids[1], 2, channels="a")
    assert [e.data for e in events] == ["2", "4"]


def test_caller_ids_shaped_like_stream_ids_are_refused(redis_app: Flask) -> None:
    with pytest.raises(ValueError, match="form of the Redis bus's own ids"):
        publish_in(redis_app, "x", id="2024-1")
    assert publish_in(redis_app, "x", id="order-2024-1") == "order-2024-1"


def test_caller_given_ids_resume(redis_app: Flask) -> None:
    publish_in(redis_app, "1", id="order-1", channel="a")
    publish_in(redis_app, "2", id="order-2", channel="a")
    publish_in(redis_app, "3", channel="a")
    events = resume(redis_app, "order-1", 2)
    assert (events[0].data, events[0].id) == ("2", "order-2")
    assert events[1].data == "3"


@pytest.mark.parametrize(
    ("last_event_id", "reason"),
    [("99999999999999-0", "unknown"), ("nonsense", "unknown"), ("x" * 300, "malformed")],
)
def test_unknown_and_malformed_ids_get_a_reset(
    redis_app: Flask, last_event_id: str, reason: str
) -> None:
    head = publish_in(redis_app, "only", channel="a")
    (event,) = resume(redis_app, last_event_id, 1)
    assert event.type == "sse-reset"
    assert f'"reason": "{reason}"' in event.data
    assert event.id == head


def test_ids_older_than_the_history_get_a_reset(redis_app: Flask) -> None:
    first = publish_in(redis_app, "first", channel="a")
    # The stream keeps at least 1,000 entries and trims in whole nodes of 100.
    with redis_app.app_context():
        for i in range(1300):
            send_event(i, channel="b")
    (event,) = resume(redis_app, first, 1)
    assert event.type == "sse-reset"
    assert '"reason": "too-old"' in event.data


def test_publish_with_redis_down_raises_in_bounded_time(redis_server: RedisFactory) -> None:
    server = redis_server()
    app = Flask(__name__)
    app.config.update(SSE_BUS_URL=server.url, SSE_PUBLISH_TIMEOUT=1)
    app.register_blueprint(SSEBlueprint())
    try:
        publish_in(app, "up")
        server.stop()
        started = time.monotonic()
        with pytest.raises(PublishError, match="could not publish to Redis") as info:
            publish_in(app, "down")
        assert time.monotonic() - started < 3
        assert info.value.__cause__ is not None
        server.start()
        assert wait_for(lambda: _publishes(app), 10)
    finally:
        get_state(app).bus.close()


def _publishes(app: Flask) -> bool:
    try:
        publish_in(app, "back")
    except PublishError:
        return False
    return True


@pytest.mark.e2e
def test_one_receive_connection_per_worker_and_a_small_publish_pool(
    gunicorn: GunicornFactory, redis_server: RedisFactory
) -> None:
    redis = redis_server()
    server = serve(gunicorn, workers=4, SSE_BUS_URL=redis.url)
    crowd = Crowd(server.port, [f"/stream?channel=c{i % 7}&channel=all" for i in range(200)])
    try:
        assert wait_for(lambda: _cluster_streams(server.url, "all") == 200, 15)
        for i in range(40):
            publish(server.url, i, channel="all")
        assert crowd.pump(lambda c: all(len(x.events) == 40 for x in c.clients), 30)
        names = [
            client["name"]
            for client in redis.client().client_list()
            if client["name"].startswith("flask-sse-push:")
        ]
        workers = {str(pid) for pid in server.worker_pids()}
        stats = requests.get(server.url + "/stream/stats", timeout=5).json()
        assert stats["cluster"]["channels"]["all"] == 200
        assert stats["cluster"]["connections"] == 200
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "flask",
                "--app",
                "apps.streaming",
                "sse",
                "stats",
                "--url",
                server.url,
            ],
            cwd=TESTS,
            env=dict(os.environ, PYTHONPATH=str(TESTS), SSE_BUS_URL=f'"{redis.url}"'),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert cli.returncode == 0, cli.stderr
        assert "(redis bus): 200 streams" in cli.stdout
        assert "  all: 200" in cli.stdout
        serving = {
            origin.rsplit(":", 2)[1]
            for origin, process in stats["cluster"]["processes"].items()
            if process["channels"].get("all")
        }
        assert len(serving) >= 2, "the kernel gave the streams to fewer than two workers"
        receivers = Counter(n.rsplit(":", 1)[1] for n in names if ":receive:" in n)
        publishers = Counter(n.rsplit(":", 1)[1] for n in names if ":publish:" in n)
        # 200 streams: one receiving connection per worker that serves streams, no more.
        assert set(receivers) == serving
        assert set(receivers.values()) == {1}
        assert set(publishers) <= workers
        assert all(count <= 10 for count in publishers.values())
    finally:
        crowd.close()


@pytest.mark.e2e
@pytest.mark.slow
def test_four_workers_every_client_gets_every_event_even_across_a_worker_restart(
    gunicorn: GunicornFactory, redis_server: RedisFactory
) -> None:
    redis = redis_server()
    server = serve(gunicorn, workers=4, SSE_BUS_URL=redis.url, SSE_KEEPALIVE=1)
    paths = ["/stream?channel=a" if i % 2 else "/stream?channel=a&channel=b" for i in range(200)]
    crowd = Crowd(server.port, paths)
    expected_a: list[str] = []
    expected_b: list[str] = []
    try:
        assert wait_for(lambda: _cluster_streams(server.url, "a") == 200, 15)
        for i in range(20):
            expected_a.append(publish(server.url, f"w{i}", channel="a"))
            expected_b.append(publish(server.url, f"wb{i}", channel="b"))
        script = subprocess.run(
            [sys.executable, "-m", "apps.publish_script", "a", "20"],
            cwd=TESTS,
            env=dict(os.environ, PYTHONPATH=str(TESTS), SSE_BUS_URL=f'"{redis.url}"'),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        expected_a.extend(script.stdout.split())
        crowd.pump(lambda c: False, 1.0)
        # Restart one worker in the middle: its clients reconnect to any worker and resume.
        processes = requests.get(server.url + "/stream/stats", timeout=5).json()["cluster"]
        busiest = max(
            processes["processes"].items(), key=lambda item: item[1]["channels"].get("a", 0)
        )
        victim = int(busiest[0].rsplit(":", 2)[1])
        assert victim in server.worker_pids()
        os.kill(victim, 15)
        for i in range(10):
            expected_a.append(publish(server.url, f"during{i}", channel="a"))
        assert crowd.pump(lambda c: any(x.connects > 1 for x in c.clients), 15)
        for i in range(10):
            expected_a.append(publish(server.url, f"after{i}", channel="a"))
        expected_all = sorted(expected_a + expected_b, key=_position)

        def done(crowd: Crowd) -> bool:
            return all(
                len(c.events) >= (len(expected_all) if "b" in c.path else len(expected_a))
                for c in crowd.clients
            )

        assert crowd.pump(done, 60), Counter(len(c.events) for c in crowd.clients)
    finally:
        crowd.close()
    moved = [c for c in crowd.clients if c.connects > 1]
    assert moved, "the restarted worker had clients that reconnected"
    for client in crowd.clients:
        got = [e.last_event_id for e in client.events if e.type == "message"]
        assert got == (expected_all if "b" in client.path else expected_a), client.path
        assert all(e.type == "message" for e in client.events)


def _position(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def _cluster_streams(url: str, channel: str) -> int:
    """Open streams on *channel* over all workers, as they last reported them."""
    stats = requests.get(url + "/stream/stats", timeout=5).json()
    return int(stats["cluster"]["channels"].get(channel, 0))


@pytest.mark.e2e
@pytest.mark.slow
def test_redis_outage_streams_stay_open_and_nothing_accepted_is_lost(
    gunicorn: GunicornFactory, redis_server: RedisFactory
) -> None:
    redis = redis_server()
    server = serve(
        gunicorn, workers=2, SSE_BUS_URL=redis.url, SSE_KEEPALIVE=0.3, SSE_PUBLISH_TIMEOUT=1
    )
    crowd = Crowd(server.port, ["/stream?channel=a"] * 20)
    try:
        assert wait_for(lambda: _cluster_streams(server.url, "a") == 20, 15)
        before = publish(server.url, "before", channel="a")
        assert crowd.pump(lambda c: all(len(x.events) == 1 for x in c.clients), 10)
        redis.stop()
        # Open streams stay open: keep-alives go on, nobody is disconnected.
        crowd.pump(lambda c: False, 1.5)
        assert all(c.connects == 1 for c in crowd.clients)
        # A new stream during the outage: 200 and keep-alives, never a 500.
        with raw_sse(server.url, "/stream?channel=a", {"Last-Event-ID": before}) as fresh:
            assert fresh.status == 200
            body = fresh.read_body_until(lambda body: body.count(b":\n") >= 2, 5)
            assert parse_all(body) == []
            # Publishing fails fast with the package's own error.
            answer = requests.post(server.url + "/publish", json={"data": "x"}, timeout=10)
            assert answer.status_code == 503
            assert answer.json()["kind"] == "PublishError"
            assert answer.json()["seconds"] < 3
            redis.start()
            accepted = [publish(server.url, f"after{i}", channel="a") for i in range(10)]
            body = fresh.read_body_until(lambda body: accepted[-1].encode() in body, 20)
        # Redis came back without the stream (no persistence): the client's id is from the
        # old one, so it gets a reset, then what follows the reset's id.
        reset, *events = parse_all(body)
        assert reset.type == "sse-reset"
        assert '"reason": "unknown"' in reset.data
        head = reset.last_event_id
        after = accepted.index(head) + 1 if head in accepted else 0
        assert [e.last_event_id for e in events] == accepted[after:]
        assert crowd.pump(lambda c: all(len(x.events) == 11 for x in c.clients), 20)
    finally:
        crowd.close()
    for client in crowd.clients:
        assert [e.last_event_id for e in client.events] == [before, *accepted]
        assert client.connects == 1


@pytest.mark.e2e
def test_revoking_a_channel_ends_its_streams_on_every_worker(
    gunicorn: GunicornFactory, redis_server: RedisFactory
) -> None:
    redis = redis_server()
    server = serve(gunicorn, workers=2, SSE_BUS_URL=redis.url)
    crowd = Crowd(server.port, ["/stream?channel=secret"] * 10 + ["/stream?channel=open"] * 4)
    try:
        assert wait_for(lambda: _cluster_streams(server.url, "secret") == 10, 15)
        assert requests.post(server.url + "/revoke?channel=secret", timeout=5).status_code == 200
        secret = [c for c in crowd.clients if "secret" in c.path]
        assert crowd.pump(lambda c: all(x.connects >= 2 for x in secret), 10)
        assert all(c.connects == 1 for c in crowd.clients if "open" in c.path)
    finally:
        crowd.close()


def test_a_receiver_left_behind_by_trimming_never_skips_silently(redis_app: Flask) -> None:
    """A burst much larger than the stream keeps: the receiver either delivers every event
    or ends its streams with ``lagged`` (so clients resync); it never leaves a silent gap."""
    publish_in(redis_app, "start", channel="a")
    app_state = get_state(redis_app)
    response = redis_app.test_client().get("/stream?channel=a", buffered=False)
    with EventReader(response) as reader:
        assert wait_for(lambda: app_state.bus.stream_count() == 1, 5)
        time.sleep(0.3)
        client = app_state.bus._client  # the same stream and entry format as send_event
        pipe = client.pipeline(transaction=False)
        for i in range(20000):
            pipe.xadd(app_state.bus.key, {"c": "a", "b": f"data: {i}\n\n"}, maxlen=1000)
        pipe.execute()
        events = reader.events(count=20000, timeout=20)
        numbers = [int(e.data) for e in events]
        if " lagged" in reader.parser.comments:
            # Ended for a resync: what came before the end has no gap.
            assert reader.ended
            assert numbers == list(range(len(numbers)))
        else:
            assert numbers == list(range(20000))


DISCARD_SCRIPT = """
import gc, sys, threading, time
from flask import Flask
from flask_sse_push import SSEBlueprint
from flask_sse_push.testing import EventReader

def receivers():
    return sum(t.name == "sse-redis-discarded_app" for t in threading.enumerate())

app = Flask("discarded_app")
app.config.update(SSE_BUS_URL=sys.argv[1], SSE_KEEPALIVE=0)
app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
with EventReader(app.test_client().get("/stream", buffered=False)) as reader:
    reader.events(timeout=0.2)
started = receivers()
del app, reader
for _ in range(100):
    gc.collect()
    if receivers() == 0:
        break
    time.sleep(0.1)
print(started, receivers())
"""


def test_a_discarded_app_takes_its_receiver_along(shared_redis: RedisServer) -> None:
    result = subprocess.run(
        [sys.executable, "-c", DISCARD_SCRIPT, shared_redis.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "0"], result.stderr


def test_after_a_reset_only_events_newer_than_the_reset_arrive(shared_redis: RedisServer) -> None:
    """The reset tells the client to refetch its state as of the newest event: events up to
    that one must not follow, even when this process's receiver is still catching up."""
    shared_redis.client().flushdb()
    app = Flask(__name__)
    app.config.update(SSE_BUS_URL=shared_redis.url, SSE_KEEPALIVE=0.2, SSE_HISTORY_SIZE=20000)
    app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
    bus = get_state(app).bus
    try:
        publish_in(app, "warm-up", channel="a")
        with EventReader(app.test_client().get("/stream?channel=a", buffered=False)):
            # A burst the receiver needs a moment for, then a client with an unknown id.
            pipe = bus._client.pipeline(transaction=False)
            for i in range(10000):
                pipe.xadd(bus.key, {"c": "a", "b": f"data: old{i}\n\n"}, maxlen=20000)
            pipe.execute()
            response = app.test_client().get(
                "/stream?channel=a", headers={"Last-Event-ID": "nonsense"}, buffered=False
            )
            with EventReader(response) as reader:
                (reset,) = reader.events(count=1, timeout=10)
                assert reset.type == "sse-reset"
                after = publish_in(app, "after", channel="a")
                events = reader.events(count=1, timeout=10)
                assert [(e.data, e.id) for e in events] == [("after", after)]
    finally:
        bus.close()

"""The Redis bus when ids, the stream or Redis itself misbehave: ids Redis would refuse,
unknown ids, a deleted or recreated stream, a key of the wrong type, Redis refusing or
delaying commands, and resumes racing a publisher. Every case ends in an event, a reset, a
clear error or a clean end of the stream; never in a silent gap or an endless wait."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask, request
from support.app import Apps
from support.procs import wait_for
from support.redis_server import RedisFactory, RedisServer

from flask_sse_push import (
    BusError,
    PublishError,
    SSEBlueprint,
    end_streams,
    get_state,
    send_event,
)
from flask_sse_push.bus import Subscription
from flask_sse_push.bus.redis import RedisBus
from flask_sse_push.parser import ServerEvent
from flask_sse_push.testing import EventReader

pytestmark = pytest.mark.redis

Made = Callable[..., Flask]


@pytest.fixture
def make(shared_redis: RedisServer) -> Iterator[Made]:
    """Build apps on the shared Redis (flushed first); their buses are closed at the end."""
    shared_redis.client().flushdb()
    apps = Apps(shared_redis.url)
    yield apps
    apps.close()


@pytest.fixture
def redis_app(make: Made) -> Flask:
    return make()


def redis_bus(app: Flask) -> RedisBus:
    bus = get_state(app).bus
    assert isinstance(bus, RedisBus)
    return bus


def publish_in(app: Flask, data: Any, **kwargs: Any) -> str:
    with app.app_context():
        return send_event(data, **kwargs)


def open_stream(app: Flask, last_event_id: str | None = None, query: str = "channel=a") -> Any:
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    return app.test_client().get(f"/stream?{query}", headers=headers, buffered=False)


def read_until_end(reader: EventReader, timeout: float) -> list[ServerEvent]:
    """Every event until the stream ends, or *timeout* seconds."""
    deadline = time.monotonic() + timeout
    events: list[ServerEvent] = []
    for _ in range(10_000):
        left = deadline - time.monotonic()
        if reader.ended or left <= 0:
            break
        events += reader.events(timeout=min(left, 0.5))
    return events


def assert_delivers(reader: EventReader, app: Flask, data: str) -> str:
    """Publish *data*; the open stream of *reader* receives it (and nothing else) and stays
    open. Returns its id."""
    event_id = publish_in(app, data, channel="a")
    events = reader.events(count=1, timeout=15)
    assert [(e.data, e.id) for e in events] == [(data, event_id)]
    assert not reader.ended
    return event_id


def connected(app: Flask) -> bool:
    return redis_bus(app).connected


# -- ids Redis would refuse, and ids at the limits ------------------------------------------


@pytest.mark.parametrize(
    "last_event_id",
    [
        "99999999999999999999-0",
        "18446744073709551616-0",
        "0-18446744073709551616",
        "1" * 30 + "-1",
    ],
)
def test_ids_redis_would_refuse_get_a_malformed_reset_at_once(
    redis_app: Flask, last_event_id: str
) -> None:
    head = publish_in(redis_app, "only", channel="a")
    with EventReader(open_stream(redis_app, last_event_id)) as reader:
        events = reader.events(count=1, timeout=10)
    assert [(e.type, e.id) for e in events] == [("sse-reset", head)]
    assert events[0].json() == {"reason": "malformed", "lastEventId": last_event_id}


def test_ids_at_the_64_bit_limits(redis_app: Flask) -> None:
    head = publish_in(redis_app, "only", channel="a")
    largest = "18446744073709551615-18446744073709551615"
    with EventReader(open_stream(redis_app, largest)) as reader:
        (reset,) = reader.events(count=1, timeout=10)
    # Well formed, but newer than anything in the stream.
    assert (reset.type, reset.id, reset.json()["reason"]) == ("sse-reset", head, "unknown")
    with EventReader(open_stream(redis_app, "0-0")) as reader:
        assert [(e.data, e.id) for e in reader.events(count=1, timeout=10)] == [("only", head)]
    for shaped in (largest, "18446744073709551616-0", "1" * 30 + "-1"):
        with pytest.raises(ValueError, match="form of the Redis bus's own ids"):
            publish_in(redis_app, "x", id=shaped)


def test_a_refused_replay_ends_the_stream_with_a_logged_error(
    redis_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis refusing a command (not being unreachable) must not be retried forever."""
    bus = redis_bus(redis_app)
    before = publish_in(redis_app, "before", channel="a")
    admin = bus._client
    admin.delete(bus.key)
    admin.set(bus.key, "not a stream")
    with EventReader(open_stream(redis_app, before)) as reader:
        events = read_until_end(reader, 15)
        assert reader.ended, "the stream waits for a replay Redis keeps refusing"
    assert events == []
    assert reader.parser.comments[-1] == " error"
    assert "WRONGTYPE" in caplog.text


# -- the wrong type, refused and slow commands -----------------------------------------------


def test_a_stream_key_of_another_type(redis_app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    bus = redis_bus(redis_app)
    publish_in(redis_app, "first", channel="a")
    admin = bus._client
    with EventReader(open_stream(redis_app)) as live:
        assert wait_for(lambda: connected(redis_app) and bus.stream_count() == 1, 10)
        admin.delete(bus.key)
        admin.set(bus.key, "not a stream")
        with pytest.raises(PublishError, match="WRONGTYPE") as info:
            publish_in(redis_app, "refused", channel="a")
        assert bus.key in str(info.value)
        # Open streams stay open (keep-alives), and a new one without an id opens.
        time.sleep(1.5)
        assert not live.ended
        with EventReader(open_stream(redis_app)) as fresh:
            assert fresh.events(timeout=0.5) == []
            assert not fresh.ended
        # Someone repairs the key: the receiver reads the new stream, open streams go on.
        admin.delete(bus.key)
        published = assert_delivers(live, redis_app, "after")
    with EventReader(open_stream(redis_app, published)) as again:
        assert again.events(timeout=0.5) == []
        latest = publish_in(redis_app, "latest", channel="a")
        assert [e.id for e in again.events(count=1, timeout=10)] == [latest]
    assert "WRONGTYPE" in caplog.text


def test_redis_refusing_writes(redis_app: Flask) -> None:
    """Out of memory with ``noeviction``: publishing fails with a clear error, open streams
    stay open and get the events published once Redis takes writes again."""
    bus = redis_bus(redis_app)
    publish_in(redis_app, "first", channel="a")
    admin = bus.connect(role="test-admin")
    old = admin.config_get("maxmemory*")
    with EventReader(open_stream(redis_app)) as live:
        assert wait_for(lambda: connected(redis_app) and bus.stream_count() == 1, 10)
        try:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)
            with pytest.raises(PublishError, match="maxmemory") as info:
                publish_in(redis_app, "refused", channel="a")
            assert "was not sent" in str(info.value)
            # Long enough for the receiver to report stream counts (a write) a few times: a
            # refused report must not cost it its connection (nor delay delivery).
            assert not wait_for(lambda: not connected(redis_app), 3)
            assert not live.ended
        finally:
            admin.config_set("maxmemory", old["maxmemory"])
            admin.config_set("maxmemory-policy", old["maxmemory-policy"])
            admin.close()
        accepted = publish_in(redis_app, "accepted", channel="a")
        events = live.events(count=1, timeout=3)
        assert [(e.data, e.id) for e in events] == [("accepted", accepted)]
    assert "refused" not in [e.data for e in events]


def test_replies_slower_than_the_publish_timeout(redis_app: Flask) -> None:
    bus = redis_bus(redis_app)
    publish_in(redis_app, "first", channel="a")
    admin = bus.connect(role="test-admin")
    with EventReader(open_stream(redis_app)) as live:
        assert wait_for(lambda: connected(redis_app) and bus.stream_count() == 1, 10)
        try:
            admin.client_pause(10_000, all=False)  # writes only; lifted when the publish failed
            started = time.monotonic()
            with pytest.raises(PublishError, match="did not answer within") as info:
                publish_in(redis_app, "slow", channel="a")
            elapsed = time.monotonic() - started
        finally:
            admin.client_unpause()
            admin.close()
        assert elapsed < 6, "SSE_PUBLISH_TIMEOUT is 1 s"
        assert "SSE_PUBLISH_TIMEOUT" in str(info.value)
        accepted = publish_in(redis_app, "accepted", channel="a")
        events = live.events(count=1, timeout=10)
        if events and events[0].data == "slow":  # Redis may still carry out a timed-out add
            events += live.events(count=1, timeout=10)
        assert [e.data for e in events][-1:] == ["accepted"]
        assert events[-1].id == accepted
        assert not live.ended


# -- unknown ids cost no history -------------------------------------------------------------


def _sent_bytes(server: RedisServer) -> int:
    return int(server.client().info("stats")["total_net_output_bytes"])


def test_connects_with_unknown_ids_do_not_read_the_history(
    make: Made, redis_server: RedisFactory
) -> None:
    """With 1,000 events of 4 KB in the stream, 100 connects with ids the stream does not
    hold must not make Redis send the history (about 4 MB each)."""
    server = redis_server()
    app = make(server.url)
    bus = redis_bus(app)
    body = "x" * 4096
    with app.app_context():
        for i in range(1000):
            send_event(body, channel="a", id=f"order-{i}" if i % 2 else None)
    before = _sent_bytes(server)
    for i in range(100):
        with EventReader(open_stream(app, f"bogus-{i}")) as reader:
            (reset,) = reader.events(count=1, timeout=10)
            assert reset.json()["reason"] == "unknown"
    sent = _sent_bytes(server) - before
    assert sent < 1_000_000, f"Redis sent {sent} bytes for 100 connects"
    # Caller-given ids are still found.
    with EventReader(open_stream(app, "order-997")) as reader:
        events = reader.events(count=2, timeout=10)
    assert [e.id for e in events][-1] == "order-999"
    assert bus.stream_count() == 0 or wait_for(lambda: bus.stream_count() == 0, 5)


def test_caller_ids_stay_found_while_their_index_rotates(make: Made) -> None:
    app = make(SSE_HISTORY_SIZE=1000)
    with app.app_context():
        ids = [send_event(i, channel="a", id=f"n-{i}") for i in range(2500)]
        send_event("last", channel="a")
    # The newest 1,000 caller ids resume, older ones get a reset: the index stays bounded.
    for position in (1700, 2000, 2498):
        with EventReader(open_stream(app, ids[position])) as reader:
            events = reader.events(count=1, timeout=10)
        assert events[0].id == ids[position + 1], position
    with EventReader(open_stream(app, ids[10])) as reader:
        (reset,) = reader.events(count=1, timeout=10)
    assert reset.type == "sse-reset"
    index = redis_bus(app)._client
    sizes = [index.hlen(key) for key in index.keys(redis_bus(app).key + ":ids*")]
    assert sum(sizes) <= 2000


# -- resumes racing a publisher --------------------------------------------------------------


def _ids(payloads: list[bytes]) -> list[str]:
    return [
        line[4:]
        for payload in payloads
        for line in payload.decode().split("\n")
        if line.startswith("id: ")
    ]


def _resume_and_follow(
    bus: RedisBus, published: list[str], rng: random.Random
) -> tuple[int, list[str]]:
    """Resume a little before the newest published event and follow a few events; return
    the index of the resume point and the ids received."""
    start = max(0, len(published) - 1 - rng.randrange(30))
    sub = Subscription(["a"], 100_000)
    resume = bus.subscribe(sub, published[start])
    received: list[bytes] = []
    deadline = time.monotonic() + 20
    try:
        assert resume.pending is not None
        for _ in range(10_000):
            try:
                replay = resume.pending()
                break
            except BusError:
                assert time.monotonic() < deadline, "Redis is up: the resume must succeed"
                time.sleep(0.01)
        assert replay.reset is None, replay.reset
        received += replay.replay
        quiet_until = time.monotonic() + 2
        for _ in range(10_000):
            data = sub.take(0.05)
            if data:
                received.append(data)
            if len(received) >= 20 or time.monotonic() > min(quiet_until, deadline):
                break
    finally:
        bus.unsubscribe(sub)
    return start, _ids(received)


def test_resumes_racing_a_publisher_get_every_event_once_in_order(redis_app: Flask) -> None:
    """Many resumes while events are delivered: each gets the events after its resume
    point exactly once, in order (a position recorded apart from the delivery lost one)."""
    bus = redis_bus(redis_app)
    published = [publish_in(redis_app, "start", channel="a")]
    bus.receiver.start  # noqa: B018 - starts the receiver
    assert wait_for(lambda: connected(redis_app), 10)
    done = threading.Event()
    results: list[tuple[int, list[str]]] = []

    def publisher() -> None:
        try:
            with redis_app.app_context():
                for i in range(3000):
                    published.append(send_event(i, channel="a"))
                    if i % 50 == 0:
                        time.sleep(0.005)
        finally:
            done.set()

    def resumer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(2000):
            if done.is_set():
                return
            results.append(_resume_and_follow(bus, published, rng))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: the race needs a switch at the seam
    try:
        threads = [threading.Thread(target=publisher)]
        threads += [threading.Thread(target=resumer, args=(seed,)) for seed in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert not any(thread.is_alive() for thread in threads)
    assert len(results) >= 50
    wrong = [
        (published[start], got[:3])
        for start, got in results
        if got != published[start + 1 : start + 1 + len(got)]
    ]
    assert wrong == [], f"{len(wrong)} of {len(results)} resumes missed or repeated events"


# -- a deleted or recreated stream -----------------------------------------------------------


def test_resuming_from_a_deleted_stream_that_grew_again_is_a_reset(redis_app: Flask) -> None:
    old = [publish_in(redis_app, f"old{i}", channel="a") for i in range(3)]
    redis_bus(redis_app)._client.flushdb()
    time.sleep(0.01)  # the new stream's ids start in a later millisecond
    new = [publish_in(redis_app, f"new{i}", channel="a") for i in range(5)]
    with EventReader(open_stream(redis_app, old[1])) as reader:
        (event,) = reader.events(count=1, timeout=10)
    assert (event.type, event.id) == ("sse-reset", new[-1])
    assert event.json()["reason"] == "unknown"


def test_the_receiver_follows_a_recreated_stream_with_smaller_ids(redis_app: Flask) -> None:
    """The old stream's ids were ahead of the new stream's (a server whose clock was
    ahead): the receiver must not wait for ids past its old position forever, and a stream
    waiting for a resume point in the old stream ends so that its client resyncs."""
    bus = redis_bus(redis_app)
    publish_in(redis_app, "first", channel="a")
    with EventReader(open_stream(redis_app)) as live:
        assert wait_for(lambda: connected(redis_app) and bus.stream_count() == 1, 10)
        future = "99999999999999-0"
        bus._client.xadd(bus.key, {"c": "a", "b": "data: future\n\n"}, id=future)
        assert [e.data for e in live.events(count=1, timeout=10)] == ["future"]
        with EventReader(open_stream(redis_app, future)) as waiting:
            # Nothing after the newest entry yet: it waits for the receiver to pass it.
            assert waiting.events(timeout=0.5) == []
            bus._client.flushdb()
            assert_delivers(live, redis_app, "new")
            assert read_until_end(waiting, 10) == []
            assert waiting.parser.comments[-1] == " lagged"
        assert_delivers(live, redis_app, "newer")


def test_a_failover_that_lost_the_newest_entries(
    make: Made, redis_server: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A new primary lacking the newest entries (asynchronous replication), played by
    restoring the stream as it was a few events earlier: open streams are neither replayed
    the history again nor ended; they go on with the new primary's events. The stream did
    not exist when the receiver started: it learns the stream's epoch as it reads."""
    server = redis_server()
    app = make(server.url)
    bus = redis_bus(app)
    with EventReader(open_stream(app)) as live:
        assert wait_for(lambda: connected(app) and bus.stream_count() == 1, 10)
        kept = assert_delivers(live, app, "kept")
        admin = server.client()
        earlier = admin.dump(bus.key)
        lost = [assert_delivers(live, app, f"lost{i}") for i in range(3)]
        admin.restore(bus.key, 0, earlier, replace=True)
        assert wait_for(lambda: "lost the newest entries" in caplog.text, 15), caplog.text
        # A client resuming from a lost id before the new primary has anything newer.
        with EventReader(open_stream(app, lost[-1])) as again:
            (reset,) = again.events(count=1, timeout=10)
        assert (reset.type, reset.id, reset.json()["reason"]) == ("sse-reset", kept, "unknown")
        after = assert_delivers(live, app, "after")
        assert not live.ended
    with EventReader(open_stream(app, lost[0])) as resumed:
        assert [e.id for e in resumed.events(count=1, timeout=10)] == [after]


def test_streams_through_a_restart_without_persistence(
    make: Made, redis_server: RedisFactory
) -> None:
    """Open streams go on with the new stream's events; a client resuming from an id of the
    old stream gets a reset."""
    server = redis_server()
    app = make(server.url)
    bus = redis_bus(app)
    first = publish_in(app, "first", channel="a")
    with EventReader(open_stream(app)) as live:
        assert [e.id for e in live.events(count=1, timeout=0.5)] == []
        assert wait_for(lambda: connected(app) and bus.stream_count() == 1, 10)
        server.stop()
        server.start()
        new = assert_delivers(live, app, "new")
    with EventReader(open_stream(app, first)) as again:
        (reset,) = again.events(count=1, timeout=10)
        assert (reset.type, reset.id, reset.json()["reason"]) == ("sse-reset", new, "unknown")
        assert_delivers(again, app, "newest")


# -- revocation across apps and processes ----------------------------------------------------


def _user_app(make: Made) -> Flask:
    app = make(SSE_REDIS_KEY="shared-events")
    blueprint = app.blueprints["sse"]
    assert isinstance(blueprint, SSEBlueprint)
    blueprint.identify(lambda: request.args.get("user"))
    return app


REVOKED_ELSEWHERE = """
import sys, time
from flask import Flask, request
from flask_sse_push import SSEBlueprint, get_state
from flask_sse_push.testing import EventReader

app = Flask("elsewhere")
app.config.update(SSE_BUS_URL=sys.argv[1], SSE_REDIS_KEY="shared-events", SSE_KEEPALIVE=0.2)
blueprint = SSEBlueprint()
blueprint.identify(lambda: request.args.get("user"))
app.register_blueprint(blueprint, url_prefix="/stream")
client = app.test_client()
with EventReader(client.get("/stream?channel=a&user=alice", buffered=False)) as alice, \\
        EventReader(client.get("/stream?channel=a&user=bob", buffered=False)) as bob:
    bus = get_state(app).bus
    for _ in range(200):
        if bus.connected and bus.stream_count() == 2:
            break
        time.sleep(0.05)
    print("ready", flush=True)
    for _ in range(300):
        alice.events(timeout=0.1)
        if alice.ended:
            break
    bob.events(timeout=0.5)
    print(alice.parser.comments[-1:], bob.ended, flush=True)
get_state(app).bus.close()
"""


def test_end_streams_reaches_other_apps_on_the_key_and_other_processes(
    make: Made, shared_redis: RedisServer
) -> None:
    app_a = _user_app(make)
    app_b = _user_app(make)
    child = subprocess.Popen(
        [sys.executable, "-c", REVOKED_ELSEWHERE, shared_redis.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with (
            EventReader(open_stream(app_a, query="channel=a&user=alice")) as a_alice,
            EventReader(open_stream(app_b, query="channel=a&user=alice")) as b_alice,
            EventReader(open_stream(app_b, query="channel=a&user=bob")) as b_bob,
        ):
            assert wait_for(lambda: connected(app_a) and connected(app_b), 10)
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            with app_a.app_context():
                assert end_streams(user="alice") == 1
            # A stream alice opens again in app A right away is not ended by app A's own
            # order coming back through the stream.
            with EventReader(open_stream(app_a, query="channel=a&user=alice")) as a_again:
                read_until_end(b_alice, 10)
                read_until_end(a_alice, 10)
                assert a_alice.ended and b_alice.ended
                assert a_alice.parser.comments[-1] == b_alice.parser.comments[-1] == " revoked"
                # However late app A's receiver reads its own order, it ends nothing more.
                bus_a = redis_bus(app_a)
                assert wait_for(lambda: bus_a.stream_count() == 1, 5)
                ((_entry, order),) = bus_a._client.xrevrange(bus_a.key, count=1)
                assert bus_a.is_control(order)
                bus_a.control(order)
                assert bus_a.stream_count() == 1
                marker = publish_in(app_a, "still here", channel="a")
                assert [e.id for e in a_again.events(count=1, timeout=10)] == [marker]
                assert [e.id for e in b_bob.events(count=1, timeout=10)] == [marker]
                assert not a_again.ended and not b_bob.ended
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert out.strip() == "[' revoked'] False", err


# -- stats and lifetime while Redis is down --------------------------------------------------


def test_stats_while_redis_is_down(make: Made, redis_server: RedisFactory) -> None:
    server = redis_server()
    app = make(server.url, SSE_STATS=True)
    bus = redis_bus(app)
    with EventReader(open_stream(app, query="channel=a&channel=b")):
        assert wait_for(lambda: connected(app) and bus.stream_count() == 1, 10)
        server.stop()
        started = time.monotonic()
        response = app.test_client().get("/stream/stats")
        assert time.monotonic() - started < 5
    assert response.status_code == 200
    stats = response.get_json()
    assert (stats["streams"], stats["channels"]) == (1, {"a": 1, "b": 1})
    assert "cluster" not in stats
    assert "could not read stream counts from Redis" in stats["cluster_error"]


def test_max_lifetime_while_the_replay_waits_for_redis(
    make: Made, redis_server: RedisFactory
) -> None:
    server = redis_server()
    app = make(server.url, SSE_MAX_LIFETIME=2)
    first = publish_in(app, "first", channel="a")
    server.stop()
    started = time.monotonic()
    with EventReader(open_stream(app, first)) as reader:
        events = read_until_end(reader, 15)
        assert reader.ended
    assert time.monotonic() - started < 10
    assert events == []
    assert reader.parser.comments[-1] == " lifetime"

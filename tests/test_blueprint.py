"""The blueprint, send_event and the in-process bus through Flask's test client."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_sse_push import (
    ConfigurationError,
    Event,
    NotRegisteredError,
    SSEBlueprint,
    end_streams,
    get_state,
    send_event,
    signals,
    sse,
)
from flask_sse_push.testing import EventReader, captured_events, read_events


def make_app(**config: Any) -> tuple[Flask, SSEBlueprint]:
    app = Flask(__name__)
    app.config.update({"SSE_KEEPALIVE": 0.2, **config})
    blueprint = SSEBlueprint()
    app.register_blueprint(blueprint, url_prefix="/stream")
    return app, blueprint


Maker = Callable[..., tuple[Flask, SSEBlueprint]]


@pytest.fixture
def make(bus_url: str) -> Iterator[Maker]:
    """Build apps on the backend under test (each test runs on every backend)."""
    made: list[Flask] = []

    def factory(**config: Any) -> tuple[Flask, SSEBlueprint]:
        app, blueprint = make_app(SSE_BUS_URL=bus_url, **config)
        made.append(app)
        return app, blueprint

    yield factory
    for app in made:
        get_state(app).bus.close()


@pytest.fixture
def app(make: Maker) -> Flask:
    return make()[0]


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def connections(app: Flask) -> int:
    return get_state(app).bus.stream_count()


def publish(app: Flask, data: Any, **kwargs: Any) -> str:
    with app.app_context():
        return send_event(data, **kwargs)


def test_headers_and_first_bytes(client: FlaskClient) -> None:
    response = client.get("/stream", buffered=False)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Connection" not in response.headers
    assert "Content-Length" not in response.headers
    first = next(iter(response.response))
    assert first == b"retry: 3000\n"
    response.close()


def test_head_request_sends_headers_and_subscribes_nothing(app: Flask, client: FlaskClient) -> None:
    response = client.head("/stream?channel=a")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.data == b""
    assert connections(app) == 0


def test_several_channels_each_event_once_in_order(app: Flask, client: FlaskClient) -> None:
    with EventReader(client.get("/stream?channel=a&channel=b&channel=a", buffered=False)) as r:
        publish(app, "1", channel="a")
        publish(app, "2", channel="c")
        publish(app, {"n": 3}, channel="b", event="json")
        publish(app, "4", channel="a")
        events = r.events(count=3, timeout=5)
    assert [e.data for e in events] == ["1", '{"n": 3}', "4"]
    assert events[1].type == "json"
    assert events[1].json() == {"n": 3}


def test_default_channel_both_ways(app: Flask, client: FlaskClient) -> None:
    with EventReader(client.get("/stream", buffered=False)) as reader:
        publish(app, "hi")
        publish(app, "other", channel="elsewhere")
        events = reader.events(count=1, timeout=5)
        assert [e.data for e in events] == ["hi"]
        assert reader.events(count=1, timeout=0.3) == []


def test_keepalive_comment_on_a_quiet_stream(client: FlaskClient) -> None:
    with EventReader(client.get("/stream", buffered=False)) as reader:
        assert reader.events(timeout=0.7) == []
        assert reader.parser.comments.count("") >= 2
        assert reader.parser.retry == 3000


def test_keepalive_period(client: FlaskClient) -> None:
    with EventReader(client.get("/stream", buffered=False)) as reader:
        assert reader.events(timeout=1.0) == []
        # One comment every SSE_KEEPALIVE (0.2 s): about 5 in a second, not twice as many.
        assert 2 <= reader.parser.comments.count("") <= 7


def test_a_failing_signal_receiver_leaves_no_subscription(make: Maker) -> None:
    app, _ = make()

    def fail(sender: Flask, **kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    with signals.connection_opened.connected_to(fail, sender=app):
        response = app.test_client().get("/stream")
    assert response.status_code == 500
    assert connections(app) == 0


def test_keepalive_off(make: Maker) -> None:
    app, _ = make(SSE_KEEPALIVE=0)
    with EventReader(app.test_client().get("/stream", buffered=False)) as reader:
        assert reader.events(timeout=0.5) == []
        assert reader.parser.comments == []


def test_falsy_values_are_sent(app: Flask, client: FlaskClient) -> None:
    with EventReader(client.get("/stream", buffered=False)) as reader:
        assert publish(app, "", id=0, retry=0) == "0"
        publish(app, 0)
        publish(app, [], event="")
        events = reader.events(count=3, timeout=5)
    assert [(e.data, e.id, e.type) for e in events] == [
        ("", "0", "message"),
        ("0", events[1].id, "message"),
        ("[]", events[2].id, "message"),
    ]
    assert events[0].retry == 0


def test_send_event_returns_ordered_ids() -> None:
    app, _ = make_app()
    ids = [publish(app, i) for i in range(3)]
    epochs = {i.rsplit("-", 1)[0] for i in ids}
    assert len(epochs) == 1
    assert [int(i.rsplit("-", 1)[1]) for i in ids] == [1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"event": "a\ndata: x"}, ValueError, "CR, LF or NUL"),
        ({"id": "7\r"}, ValueError, "CR, LF or NUL"),
        ({"id": ""}, ValueError, "must not be empty"),
        ({"retry": True}, TypeError, "retry must be an int"),
        ({"retry": "5"}, TypeError, "retry must be an int"),
        ({"retry": -5}, ValueError, ">= 0"),
        ({"channel": "a b"}, ValueError, "invalid channel"),
        ({"channel": 5}, TypeError, "channel must be a str"),
    ],
)
def test_bad_send_event_raises_and_sends_nothing(
    app: Flask, client: FlaskClient, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with EventReader(client.get("/stream", buffered=False)) as reader, captured_events(app) as sent:
        with pytest.raises(error, match=match):
            publish(app, "x", **kwargs)
        assert reader.events(count=1, timeout=0.3) == []
    assert sent == []


def test_unserializable_data(app: Flask) -> None:
    with pytest.raises(TypeError, match="object cannot be serialized"):
        publish(app, object())


def test_send_event_outside_app_context() -> None:
    make_app()
    with pytest.raises(NotRegisteredError, match=r"app\.app_context"):
        send_event("x")


def test_send_event_without_blueprint() -> None:
    app = Flask(__name__)
    with app.app_context(), pytest.raises(NotRegisteredError, match="register_blueprint"):
        send_event("x")


def test_registering_twice_is_refused() -> None:
    app = Flask(__name__)
    app.register_blueprint(sse, url_prefix="/stream")
    with pytest.raises(ConfigurationError, match="already registered"):
        app.register_blueprint(sse, url_prefix="/other", name="other")


def test_the_ready_blueprint_serves_several_apps() -> None:
    apps = [Flask(f"app{i}") for i in range(2)]
    for each in apps:
        each.register_blueprint(sse, url_prefix="/events")
    assert get_state(apps[0]).bus is not get_state(apps[1]).bus
    assert apps[0].test_client().head("/events").status_code == 200


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"SSE_BUS_URL": "kafka://x"}, "unknown scheme 'kafka'"),
        ({"SSE_BUS_URL": "nope"}, "must be a URL"),
        ({"SSE_KEEPALIVE": -1}, "SSE_KEEPALIVE must be a number >= 0"),
        ({"SSE_QUEUE_SIZE": 0}, "SSE_QUEUE_SIZE must be a whole number >= 1"),
        ({"SSE_RETRY": 1.5}, "SSE_RETRY"),
        ({"SSE_DEFAULT_CHANNEL": "a b"}, "SSE_DEFAULT_CHANNEL"),
    ],
)
def test_configuration_errors(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        make_app(**config)


def test_config_defaults_are_filled_in() -> None:
    app, _ = make_app()
    assert app.config["SSE_BUS_URL"] == "memory://"
    assert app.config["SSE_DEFAULT_CHANNEL"] == "sse"
    assert app.config["SSE_HISTORY_SIZE"] == 1000


@pytest.mark.parametrize(
    ("query", "status", "match"),
    [
        ("channel=a%20b", 400, "invalid channel"),
        ("channel=" + "x" * 129, 400, "invalid channel"),
        ("channel=", 400, "invalid channel"),
        ("channel=%ff%fe", 400, "invalid channel"),
        ("&".join(["channel=c"] * 300), 400, "too many channels"),
    ],
)
def test_bad_channels_get_400(
    app: Flask, client: FlaskClient, query: str, status: int, match: str
) -> None:
    response = client.get(f"/stream?{query}")
    assert response.status_code == status
    assert match in response.get_data(as_text=True)
    assert connections(app) == 0


def test_closed_streams_leave_the_bus(app: Flask, client: FlaskClient) -> None:
    for _ in range(50):
        response = client.get("/stream?channel=a&channel=b", buffered=False)
        next(iter(response.response))
        response.close()
    never_read = client.get("/stream", buffered=False)
    assert connections(app) == 1
    never_read.close()
    assert connections(app) == 0
    assert get_state(app).bus.channel_counts() == {}


def test_publish_from_many_threads(app: Flask, client: FlaskClient) -> None:
    def worker(n: int) -> None:
        for i in range(25):
            publish(app, f"{n}:{i}")

    with EventReader(client.get("/stream", buffered=False)) as reader:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        events = reader.events(count=100, timeout=10)
    assert sorted(e.data for e in events) == sorted(f"{n}:{i}" for n in range(4) for i in range(25))
    # Bus ids order events: <epoch>-<seq> in memory, <ms>-<seq> in Redis.
    positions = [tuple(int(part, 16) for part in e.id.split("-")) for e in events]
    assert positions == sorted(positions)


def test_on_connect_events_go_to_the_new_connection_only(make: Maker) -> None:
    app, blueprint = make()

    @blueprint.on_connect
    def state(channels: frozenset[str]) -> Iterator[Any]:
        yield Event({"channels": sorted(channels)}, event="state")
        yield "plain"

    client = app.test_client()
    with EventReader(client.get("/stream?channel=x", buffered=False)) as first:
        assert [e.type for e in first.events(count=2)] == ["state", "message"]
        with EventReader(client.get("/stream?channel=y", buffered=False)) as second:
            assert second.events(count=1)[0].json() == {"channels": ["y"]}
        assert first.events(count=1, timeout=0.3) == []


def test_authorize_hook_denies_with_403_before_subscribing(make: Maker) -> None:
    app, blueprint = make()
    asked: list[str] = []

    @blueprint.authorize
    def can_read(channel: str) -> bool:
        asked.append(channel)
        return not channel.startswith("private")

    client = app.test_client()
    response = client.get("/stream?channel=news&channel=private-1")
    assert response.status_code == 403
    assert "private-1" in response.get_data(as_text=True)
    assert asked == ["news", "private-1"]
    assert connections(app) == 0
    with EventReader(client.get("/stream?channel=news", buffered=False)) as reader:
        publish(app, "ok", channel="news")
        assert [e.data for e in reader.events(count=1)] == ["ok"]


def test_end_streams_of_a_channel_or_user(make: Maker) -> None:
    app, blueprint = make()

    @blueprint.identify
    def who() -> str:
        from flask import request

        return request.args.get("user", "anon")

    client = app.test_client()
    with (
        EventReader(client.get("/stream?channel=a&user=ann", buffered=False)) as ann,
        EventReader(client.get("/stream?channel=b&user=bob", buffered=False)) as bob,
    ):
        with app.app_context():
            assert end_streams(user="ann") == 1
            with pytest.raises(ValueError, match="needs channel"):
                end_streams()
        ann.events(timeout=2)
        assert ann.ended
        assert "revoked" in " ".join(ann.parser.comments)
        publish(app, "still here", channel="b")
        assert [e.data for e in bob.events(count=1)] == ["still here"]
        with app.app_context():
            assert end_streams(channel="b") == 1
        bob.events(timeout=2)
        assert bob.ended
    assert connections(app) == 0


def test_connection_limit_answers_200_with_retry_and_ends(make: Maker) -> None:
    app, _ = make(SSE_MAX_CONNECTIONS=2)
    client = app.test_client()
    with (
        EventReader(client.get("/stream", buffered=False)),
        EventReader(client.get("/stream", buffered=False)),
    ):
        response = client.get("/stream")
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        body = response.get_data()
        assert body.startswith(b"retry: ")
        assert 3000 <= int(body.split(b"\n")[0].split(b": ")[1]) <= 8000
        assert b"too many streams" in body
    assert connections(app) == 0


def test_read_events_helper_bounds_time(app: Flask, client: FlaskClient) -> None:
    events = read_events(client.get("/stream", buffered=False), count=1, timeout=0.3)
    assert events == []
    assert connections(app) == 0


def test_stats_endpoint_is_off_by_default(client: FlaskClient) -> None:
    response = client.get("/stream/stats")
    assert response.status_code == 404
    assert "SSE_STATS" in response.get_data(as_text=True)


def test_stats_endpoint_counts_streams_per_channel(make: Maker, bus_url: str) -> None:
    app, _ = make(SSE_STATS=True)
    client = app.test_client()
    with (
        EventReader(client.get("/stream?channel=a&channel=b", buffered=False)),
        EventReader(client.get("/stream?channel=a", buffered=False)),
    ):
        stats = client.get("/stream/stats").get_json()
        assert stats["connections"] == 2
        assert stats["channels"] == {"a": 2, "b": 1}
        assert stats["bus"] == bus_url.split("://")[0]
        with app.app_context():
            send_event("x", channel="a")
    stats = client.get("/stream/stats").get_json()
    assert stats["connections"] == 0
    assert stats["totals"] == {"opened": 2, "closed": 2, "published": 1, "dropped": 0}


def test_no_gap_or_repeat_between_replay_and_live_events(make: Maker) -> None:
    """Clients resume while a publisher runs at full speed: each gets every event after its
    Last-Event-ID exactly once, in order, across the hand-over from history to live."""
    app, _ = make(SSE_HISTORY_SIZE=2000, SSE_QUEUE_SIZE=2000)
    client = app.test_client()
    total = 400
    ids: list[str] = []
    done = threading.Event()

    def publisher() -> None:
        with app.app_context():
            for i in range(total):
                ids.append(send_event(str(i), channel="a"))
                if i % 20 == 0:
                    time.sleep(0.005)
        done.set()

    assert wait_for_ids(ids, publisher_thread(publisher), 5)
    readers: list[tuple[int, EventReader]] = []
    try:
        for _ in range(8):
            start = len(ids) - 1  # resume from the newest id seen so far
            response = client.get(
                "/stream?channel=a", headers={"Last-Event-ID": ids[start]}, buffered=False
            )
            readers.append((start, EventReader(response)))
            time.sleep(0.01)
        assert done.wait(20)
        for start, reader in readers:
            events = reader.events(count=total - 1 - start, timeout=20)
            assert [e.data for e in events] == [str(i) for i in range(start + 1, total)]
            assert [e.id for e in events] == ids[start + 1 :]
            assert reader.events(count=1, timeout=0.2) == []
    finally:
        for _, reader in readers:
            reader.close()


def publisher_thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def wait_for_ids(ids: list[str], thread: threading.Thread, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not ids and time.monotonic() < deadline:
        time.sleep(0.001)
    return bool(ids)


def test_a_failing_client_dropped_receiver_breaks_nothing(make: Maker) -> None:
    app, _ = make(SSE_QUEUE_SIZE=2)

    def fail(sender: Flask, **kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    client = app.test_client()
    with (
        signals.client_dropped.connected_to(fail, sender=app),
        EventReader(client.get("/stream?channel=a", buffered=False)) as fast,
    ):
        stalled = client.get("/stream?channel=a", buffered=False)
        next(iter(stalled.response))
        for i in range(4):  # the third overflows the stalled reader's queue
            with app.app_context():
                event_id = send_event(i, channel="a")
            assert [e.id for e in fast.events(count=1)] == [event_id]
        stalled.close()


def test_on_connect_hook_returning_a_single_value_is_a_clear_error(make: Maker) -> None:
    app, blueprint = make()

    @blueprint.on_connect
    def state(channels: frozenset[str]) -> Any:
        return "ready"

    app.config["PROPAGATE_EXCEPTIONS"] = True
    with pytest.raises(TypeError, match="return a list"):
        app.test_client().get("/stream")
    assert connections(app) == 0


def test_settings_from_environment_variables() -> None:
    from flask_sse_push.config import from_environ

    environ = {
        "SSE_KEEPALIVE": "5",
        "SSE_STATS": "true",
        "SSE_RETRY": "null",
        "SSE_BUS_URL": "redis://redis:6379/0",
        "OTHER": "1",
    }
    assert from_environ(environ) == {
        "SSE_KEEPALIVE": 5,
        "SSE_STATS": True,
        "SSE_RETRY": None,
        "SSE_BUS_URL": "redis://redis:6379/0",
    }

"""The example app: public channels, the private per-user channel (Flask-Login), publishing
endpoints, and the metrics publisher behind the live chart."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from example_app.app import NAME, User, create_app
from example_app.metrics import (
    EXTENSION_KEY,
    MetricsPublisher,
    start_metrics_publisher,
    stop_metrics_publisher,
)
from flask_sse_push import get_state
from flask_sse_push.testing import EventReader


@pytest.fixture
def app() -> Flask:
    # No background publisher: these tests count the events they read.
    return create_app(
        {"TESTING": True, "SECRET_KEY": "test", "SSE_KEEPALIVE": 0.2, "METRICS_INTERVAL": 0}
    )


@pytest.fixture
def metrics_app() -> Iterator[Flask]:
    """The app with its metrics publisher sending a sample every 0.05 s once it started."""
    app = create_app({"TESTING": True, "SECRET_KEY": "test", "METRICS_INTERVAL": 0.05})
    yield app
    stop_metrics_publisher(app)


def test_dashboard_names_the_channels(app: Flask) -> None:
    client = app.test_client()
    page = client.get("/").get_data(as_text=True)
    assert "news, alerts, metrics" in page
    assert 'id="chart-streams"' in page
    script = client.get("/static/dashboard.js")
    assert script.status_code == 200
    assert "new EventSource" in script.get_data(as_text=True)
    script.close()


def test_json_and_form_publish_to_the_dashboard(app: Flask) -> None:
    client = app.test_client()
    with EventReader(client.get("/stream?channel=news&channel=alerts", buffered=False)) as reader:
        assert reader.events(count=1)[0].type == "hello"
        answer = client.post("/api/events", json={"channel": "alerts", "data": {"text": "hi"}})
        assert answer.status_code == 201
        assert client.post("/publish", data={"channel": "news", "text": "yo"}).status_code == 303
        events = reader.events(count=2)
    assert [e.json()["channel"] for e in events] == ["alerts", "news"]  # type: ignore[index]
    assert events[0].id == answer.get_json()["id"]


@pytest.mark.parametrize(
    "body",
    [{"channel": "nope", "data": 1}, {"data": 1, "user": "a b"}, {"channel": "news"}, [1]],
)
def test_json_endpoint_refuses_bad_input(app: Flask, body: object) -> None:
    answer = app.test_client().post("/api/events", json=body)
    assert answer.status_code == 400
    assert answer.get_json()["error"]


def test_private_channel_needs_the_right_login(app: Flask) -> None:
    ann = app.test_client()
    bob = app.test_client()
    assert ann.get("/stream?channel=user:ann").status_code == 403
    assert ann.post("/login", data={"name": "ann"}).status_code == 303
    assert bob.post("/login", data={"name": "bob"}).status_code == 303
    assert bob.get("/stream?channel=user:ann").status_code == 403
    assert "user:ann" in ann.get("/").get_data(as_text=True)
    with EventReader(ann.get("/stream?channel=news&channel=user:ann", buffered=False)) as reader:
        reader.events(count=1)
        sent = bob.post("/api/events", json={"user": "ann", "data": {"text": "psst"}})
        assert sent.get_json()["channel"] == "user:ann"
        (event,) = reader.events(count=1)
        assert event.json() == {"channel": "user:ann", "data": {"text": "psst"}}
        # Logging out ends the user's open streams.
        assert ann.post("/logout").status_code == 303
        reader.events(timeout=2)
        assert reader.ended
    assert get_state(app).bus.stream_count() == 0
    assert ann.get("/stream?channel=user:ann").status_code == 403


def test_the_hooks_read_flask_logins_current_user(app: Flask) -> None:
    """Access follows the user id Flask-Login keeps in the signed session, nothing else."""
    client = app.test_client()
    with client.session_transaction() as session:
        session["user"] = "ann"  # what the example kept before Flask-Login: no access now
    assert client.get("/stream?channel=user:ann").status_code == 403
    with client.session_transaction() as session:
        session["_user_id"] = "ann"
    response = client.get("/stream?channel=user:ann", buffered=False)
    try:
        assert response.status_code == 200
    finally:
        response.close()
    assert client.get("/stream/stats").status_code == 403
    with client.session_transaction() as session:
        session["_user_id"] = "admin"
    assert client.get("/stream/stats").status_code == 200
    with client.session_transaction() as session:
        session["_user_id"] = "not a name"  # the user loader refuses it: anonymous
    assert client.get("/stream?channel=user:not a name").status_code == 400
    assert client.get("/stream?channel=user:admin").status_code == 403


def test_a_forged_session_is_refused(app: Flask) -> None:
    """The session is signed with SECRET_KEY: a cookie signed with another key is ignored."""
    other = create_app({"TESTING": True, "SECRET_KEY": "other", "METRICS_INTERVAL": 0})
    forger = other.test_client()
    assert forger.post("/login", data={"name": "ann"}).status_code == 303
    cookie = forger.get_cookie("session")
    assert cookie is not None
    client = app.test_client()
    client.set_cookie("session", cookie.value)
    assert client.get("/stream?channel=user:ann").status_code == 403


def test_logout_ends_only_that_users_streams(app: Flask) -> None:
    ann = app.test_client()
    bob = app.test_client()
    assert ann.post("/login", data={"name": "ann"}).status_code == 303
    assert bob.post("/login", data={"name": "bob"}).status_code == 303
    first = EventReader(ann.get("/stream?channel=news", buffered=False))
    second = EventReader(ann.get("/stream?channel=user:ann", buffered=False))
    third = EventReader(bob.get("/stream?channel=news&channel=user:bob", buffered=False))
    with first, second, third:
        for reader in (first, second, third):
            reader.events(count=1)
        assert get_state(app).bus.stream_count() == 3
        assert ann.post("/logout").status_code == 303
        first.events(timeout=2)
        second.events(timeout=2)
        assert first.ended
        assert second.ended
        assert not third.ended
        assert get_state(app).bus.stream_count() == 1
        bob.post("/publish", data={"channel": "news", "text": "still here"})
        assert third.events(count=1)[0].json()["text"] == "still here"  # type: ignore[index]


def test_the_user_class_is_flask_logins(app: Flask) -> None:
    user = User("ann")
    assert user.get_id() == "ann"
    assert user.is_authenticated
    assert user.channel == "user:ann"


def test_stats_are_for_the_admin_only(app: Flask) -> None:
    """The stats name the open private channels, so who is logged in."""
    visitor = app.test_client()
    assert visitor.get("/stream/stats").status_code == 403
    assert visitor.post("/login", data={"name": "ann"}).status_code == 303
    assert visitor.get("/stream/stats").status_code == 403
    admin = app.test_client()
    assert admin.post("/login", data={"name": "admin"}).status_code == 303
    answer = admin.get("/stream/stats")
    assert answer.status_code == 200
    assert answer.get_json()["streams"] == 0


@pytest.mark.parametrize("name", ["jürgen", "ann bob", "x" * 33, "", "a:b", "٣"])
def test_names_whose_channel_would_be_refused_cannot_log_in(app: Flask, name: str) -> None:
    client = app.test_client()
    answer = client.post("/login", data={"name": name})
    assert answer.status_code == 400
    assert "ASCII letters" in answer.get_data(as_text=True)
    assert client.post("/api/events", json={"user": name, "data": 1}).status_code == 400


@given(st.from_regex(NAME, fullmatch=True))
@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_accepted_name_gets_a_readable_private_channel(app: Flask, name: str) -> None:
    client = app.test_client()
    assert client.post("/login", data={"name": name}).status_code == 303
    response = client.get(f"/stream?channel=user:{name}", buffered=False)
    try:
        assert response.status_code == 200
    finally:
        response.close()


def test_the_publisher_starts_on_the_first_request_once(metrics_app: Flask) -> None:
    assert EXTENSION_KEY not in metrics_app.extensions
    client = metrics_app.test_client()
    client.get("/")
    publisher = metrics_app.extensions[EXTENSION_KEY]
    assert isinstance(publisher, MetricsPublisher)
    client.get("/")
    assert start_metrics_publisher(metrics_app) is publisher
    stop_metrics_publisher(metrics_app)
    assert not publisher.running()
    assert EXTENSION_KEY not in metrics_app.extensions


def test_no_publisher_when_the_interval_is_zero(app: Flask) -> None:
    app.test_client().get("/")
    assert start_metrics_publisher(app) is None
    assert EXTENSION_KEY not in app.extensions


def test_metrics_count_the_public_streams_and_name_no_user(metrics_app: Flask) -> None:
    zed = metrics_app.test_client()
    assert zed.post("/login", data={"name": "zed"}).status_code == 303
    private = EventReader(zed.get("/stream?channel=news&channel=user:zed", buffered=False))
    metrics = EventReader(zed.get("/stream?channel=metrics", buffered=False))
    with private, metrics:
        # Samples come from the publisher the first request started; wait for one taken
        # after both streams were open.
        sample: dict[str, object] = {}
        for _ in range(100):
            (event,) = metrics.events(count=1, timeout=5)
            if event.type == "metrics":
                assert "zed" not in event.data
                assert "user:" not in event.data
                sample = json.loads(event.data)
                if sample["streams"] == 2:
                    break
    assert sample["streams"] == 2
    assert sample["channels"] == {"news": 1, "alerts": 0, "metrics": 1}
    assert set(sample) == {"time", "pid", "streams", "rate", "channels"}


def test_the_rate_counts_the_events_published_besides_the_samples(app: Flask) -> None:
    with app.app_context():
        publisher = MetricsPublisher(app, 60, ["news"])
        publisher.publish()
        publisher.publish()
        assert publisher.last is not None
        assert publisher.last["rate"] == 0
        client = app.test_client()
        for text in ("a", "b", "c"):
            client.post("/publish", data={"channel": "news", "text": text})
        publisher._at -= 1.0  # as if a second passed: the rate is per second
        publisher.publish()
        assert 2.5 < publisher.last["rate"] <= 3

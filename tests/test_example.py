"""The example app: public channels, the private per-user channel, publishing endpoints."""

from __future__ import annotations

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from example_app.app import NAME, create_app
from flask_sse_push import get_state
from flask_sse_push.testing import EventReader


@pytest.fixture
def app() -> Flask:
    return create_app({"TESTING": True, "SECRET_KEY": "test", "SSE_KEEPALIVE": 0.2})


def test_dashboard_names_the_channels(app: Flask) -> None:
    page = app.test_client().get("/").get_data(as_text=True)
    assert "news, alerts, metrics" in page
    assert "new EventSource" in page


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

"""Property tests: what send_event accepts comes out of an independent parser unchanged,
and what it refuses never reaches the wire."""

from __future__ import annotations

import re
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sseparse import parse_all

from flask_sse_push import SSEBlueprint, get_state, send_event
from flask_sse_push.bus import Subscription

FORBIDDEN = re.compile(r"[\r\n\x00]")


def has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def field_ok(value: str) -> bool:
    return not FORBIDDEN.search(value) and len(value) <= 256 and not has_surrogate(value)


def id_ok(value: str) -> bool:
    """Printable ASCII without surrounding spaces: it comes back in a request header."""
    return (
        field_ok(value)
        and value != ""
        and value.isascii()
        and value.isprintable()
        and value.strip(" ") == value
    )


@pytest.fixture(scope="module")
def app() -> Flask:
    app = Flask(__name__)
    app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
    return app


def wire(app: Flask, data: Any, **kwargs: Any) -> tuple[bytes, BaseException | None]:
    """Publish and return the bytes a subscriber of the channel got, and any error."""
    bus = get_state(app).bus
    sub = Subscription(["p"], 10)
    bus.subscribe(sub, None)
    error: BaseException | None = None
    try:
        with app.app_context():
            send_event(data, channel="p", **kwargs)
    except (TypeError, ValueError) as exc:
        error = exc
    finally:
        bus.unsubscribe(sub)
    data = sub.take(0)
    assert data is not None
    return data, error


many = settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])


@many
@given(
    data=st.text(),
    event=st.none() | st.text(),
    event_id=st.none() | st.text() | st.text(st.characters(min_codepoint=32, max_codepoint=126)),
)
def test_accepted_events_round_trip_and_refused_ones_never_reach_the_wire(
    app: Flask, data: str, event: str | None, event_id: str | None
) -> None:
    accepted = (
        not has_surrogate(data)
        and (event is None or field_ok(event))
        and (event_id is None or id_ok(event_id))
    )
    raw, error = wire(app, data, event=event, id=event_id)
    if not accepted:
        assert error is not None
        assert raw == b""
        return
    assert error is None
    (parsed,) = parse_all(raw)
    # CR and CRLF cannot cross the wire inside data: the format turns them into LF.
    assert parsed.data == data.replace("\r\n", "\n").replace("\r", "\n")
    assert parsed.type == (event or "message")
    if event_id is not None:
        assert parsed.last_event_id == event_id
    else:
        assert parsed.last_event_id.rsplit("-", 1)[1].isdigit()


@many
@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
        ),
        max_leaves=12,
    ).filter(lambda value: not isinstance(value, str))  # a str is sent as is, not as JSON
)
def test_json_data_round_trips(app: Flask, value: Any) -> None:
    raw, error = wire(app, value)
    assert error is None
    (parsed,) = parse_all(raw)
    assert app.json.loads(parsed.data) == value


@many
@given(retry=st.integers(min_value=-(10**12), max_value=10**12) | st.booleans() | st.floats())
def test_retry_values(app: Flask, retry: Any) -> None:
    raw, error = wire(app, "x", retry=retry)
    if isinstance(retry, int) and not isinstance(retry, bool) and retry >= 0:
        assert error is None
        assert parse_all(raw)[0].retry == retry
    else:
        assert error is not None
        assert raw == b""

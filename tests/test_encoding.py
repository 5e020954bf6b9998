"""The encoder against the rules of the event-stream format."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
from sseparse import parse_all

from flask_sse_push.encoding import (
    KEEPALIVE,
    Event,
    check_field,
    check_id,
    check_retry,
    comment,
    data_text,
    encode_body,
    encode_event,
    retry_line,
    with_id,
)


def dumps(value: Any) -> str:
    return json.dumps(value)


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        ("one", [b"data: one"]),
        ("a\nb", [b"data: a", b"data: b"]),
        ("a\r\nb", [b"data: a", b"data: b"]),
        ("a\rb", [b"data: a", b"data: b"]),
        ("a\n\nb", [b"data: a", b"data: ", b"data: b"]),
        ("trailing\n", [b"data: trailing", b"data: "]),
        ("", [b"data: "]),
        (" lead", [b"data:  lead"]),
    ],
)
def test_data_lines_split_at_cr_lf_crlf_only(text: str, lines: list[bytes]) -> None:
    body = encode_body(text)
    assert body == b"\n".join(lines) + b"\n\n"
    (event,) = parse_all(body)
    assert event.data == text.replace("\r\n", "\n").replace("\r", "\n")


@pytest.mark.parametrize(
    "sep", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]
)
def test_unicode_line_separators_stay_inside_one_data_line(sep: str) -> None:
    text = f"left{sep}right"
    body = encode_body(text)
    assert body.count(b"data:") == 1
    (event,) = parse_all(body)
    assert event.data == text


def test_empty_string_is_delivered_as_empty_message() -> None:
    (event,) = parse_all(encode_body(""))
    assert event.data == ""
    assert event.type == "message"


def test_event_type_and_retry_lines() -> None:
    body = encode_body("x", "order", 0)
    assert body == b"event: order\nretry: 0\ndata: x\n\n"
    (event,) = parse_all(body)
    assert (event.type, event.retry) == ("order", 0)


def test_empty_event_type_is_the_default_message_type() -> None:
    (event,) = parse_all(encode_body("x", ""))
    assert event.type == "message"


def test_id_zero_and_ids_are_written() -> None:
    event = encode_event(Event("x", id=0), dumps)
    assert event.startswith(b"id: 0\n")
    assert parse_all(event)[0].last_event_id == "0"
    assert with_id(None, b"data: x\n\n") == b"data: x\n\n"


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "a\x00b", "\n", "x" * 257])
@pytest.mark.parametrize("field", ["event", "id"])
def test_injection_in_event_or_id_is_refused(field: str, bad: str) -> None:
    with pytest.raises(ValueError, match=field):
        check_field(field, bad)
    with pytest.raises(ValueError):
        encode_event(Event("x", **{field: bad}), dumps)


def test_wrong_types_are_refused() -> None:
    with pytest.raises(TypeError, match="event must be a str"):
        check_field("event", 3)
    with pytest.raises(TypeError, match="id must be a str or an int"):
        check_id(1.5)
    with pytest.raises(TypeError, match="id must be"):
        check_id(True)
    assert check_id(7) == "7"


@pytest.mark.parametrize("bad", ["café-1", "x\x01", "x\x7f", " lead", "trail ", "tab\t"])
def test_ids_that_would_not_survive_the_last_event_id_header_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        check_id(bad)


def test_empty_id_is_refused() -> None:
    with pytest.raises(ValueError, match="resets the client's Last-Event-ID"):
        check_id("")


@pytest.mark.parametrize("bad", [True, False, 1.0, "5", None])
def test_retry_must_be_an_int(bad: object) -> None:
    with pytest.raises(TypeError, match="retry must be an int"):
        check_retry(bad)


def test_negative_retry_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        check_retry(-1)
    assert check_retry(0) == 0


def test_json_data_and_str_data() -> None:
    assert data_text("as is\n", dumps) == "as is\n"
    assert json.loads(data_text({"a": [1, 2]}, dumps)) == {"a": [1, 2]}
    assert data_text(0, dumps) == "0"
    assert data_text(None, dumps) == "null"


def test_unserializable_data_raises_type_error_naming_the_type() -> None:
    with pytest.raises(TypeError, match="datetime cannot be serialized"):
        data_text(datetime(2020, 1, 1), dumps)


def test_comments_and_retry_lines_dispatch_nothing() -> None:
    assert comment("hi") == b":hi\n"
    assert comment("a\nb") == b":a\n:b\n"
    assert retry_line(1500) == b"retry: 1500\n"
    stream = comment("a\nb") + retry_line(1500) + b"\n" + KEEPALIVE + b"\n"
    assert parse_all(stream) == []


def test_keepalive_and_retry_between_events_change_nothing() -> None:
    first = encode_event(Event("1", id="a"), dumps)
    second = encode_event(Event("2"), dumps)
    events = parse_all(retry_line(10) + first + KEEPALIVE + KEEPALIVE + second)
    assert [(e.data, e.last_event_id, e.retry) for e in events] == [("1", "a", 10), ("2", "a", 10)]


def test_utf8_is_encoded_once_and_round_trips() -> None:
    text = "naïve ☃ 😀"
    body = encode_event(Event(text, event="ünï", id="i d"), dumps)
    (event,) = parse_all(body)
    assert (event.data, event.type, event.last_event_id) == (text, "ünï", "i d")


def test_package_parser_keeps_a_crlf_split_by_an_empty_chunk() -> None:
    from flask_sse_push.parser import EventParser

    parser = EventParser()
    events = [
        *parser.feed(b"data: a\r"),
        *parser.feed(b""),
        *parser.feed(b"\ndata: b\r\n\r\n"),
    ]
    assert [e.data for e in events] == ["a\nb"]

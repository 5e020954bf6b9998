"""Tests for the reference ``text/event-stream`` parser in :mod:`sseparse`."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sseparse import ParsedEvent, SSEParser, parse_all


def ev(
    data: str,
    type: str = "message",
    last_event_id: str = "",
    retry: int | None = None,
) -> ParsedEvent:
    """Build an expected event with the spec defaults.

    :param data: Expected data.
    :param type: Expected event type.
    :param last_event_id: Expected last event ID.
    :param retry: Expected last applied retry.
    :returns: The event.
    """
    return ParsedEvent(type=type, data=data, last_event_id=last_event_id, retry=retry)


def feed_pieces(pieces: list[bytes]) -> tuple[SSEParser, list[ParsedEvent]]:
    """Feed *pieces* one by one to a fresh parser.

    :param pieces: Consecutive parts of a stream.
    :returns: The parser and all events it dispatched.
    """
    parser = SSEParser()
    events: list[ParsedEvent] = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    return parser, events


# -- Examples from the HTML standard -------------------------------------------


def test_spec_example_stock_ticker_multiline_data() -> None:
    stream = b"data: YHOO\ndata: +2\ndata: 10\n\n"
    assert parse_all(stream) == [ev("YHOO\n+2\n10")]


def test_spec_example_comment_and_ids() -> None:
    stream = (
        b": test stream\n"
        b"\n"
        b"data: first event\n"
        b"id: 1\n"
        b"\n"
        b"data:second event\n"
        b"id\n"
        b"\n"
        b"data:  third event\n"
        b"\n"
    )
    parser = SSEParser()
    events = parser.feed(stream)
    assert events == [
        ev("first event", last_event_id="1"),
        ev("second event", last_event_id=""),
        ev(" third event", last_event_id=""),
    ]
    assert parser.comments == [" test stream"]


def test_spec_example_empty_data_blocks() -> None:
    stream = b"data\n\ndata\ndata\n\ndata:"
    parser = SSEParser()
    assert parser.feed(stream) == [ev(""), ev("\n")]
    # The last block is not followed by a blank line and is never dispatched.
    assert parser.pending_line == "data:"


def test_spec_example_space_after_colon_is_optional() -> None:
    stream = b"data:test\n\ndata: test\n\n"
    assert parse_all(stream) == [ev("test"), ev("test")]


def test_spec_example_event_types() -> None:
    stream = (
        b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n"
    )
    assert parse_all(stream) == [
        ev("73857293", type="add"),
        ev("2153", type="remove"),
        ev("113411", type="add"),
    ]


# -- Line endings ---------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_each_line_ending(eol: bytes) -> None:
    stream = b"event: e" + eol + b"data: a" + eol + b"data: b" + eol + eol
    assert parse_all(stream) == [ev("a\nb", type="e")]


def test_mixed_line_endings() -> None:
    stream = b"data: a\rdata: b\r\ndata: c\n\r\ndata: d\r\r"
    assert parse_all(stream) == [ev("a\nb\nc"), ev("d")]


def test_lf_cr_is_two_line_endings() -> None:
    # "\n\r" is LF followed by a lone CR, i.e. a blank line: dispatch.
    assert parse_all(b"data: x\n\r") == [ev("x")]


def test_crlf_split_between_pieces_is_one_line_ending() -> None:
    parser, events = feed_pieces([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])
    assert events == [ev("a\nb")]
    assert parser.pending_line == ""


def test_cr_at_end_of_piece_then_other_text() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    # The CR ended the line; "data: b" starts a new line, not a blank one.
    assert parser.feed(b"data: b\n") == []
    assert parser.feed(b"\n") == [ev("a\nb")]


def test_cr_then_cr_in_next_piece_dispatches() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\r") == [ev("a")]


def test_cr_at_end_then_empty_pieces_keep_crlf_pairing() -> None:
    _, events = feed_pieces([b"data: a\r", b"", b"\n", b"\n"])
    assert events == [ev("a")]


def test_unterminated_event_at_end_is_not_dispatched() -> None:
    assert parse_all(b"data: a\n") == []
    assert parse_all(b"data: a") == []


# -- Decoding ---------------------------------------------------------------------


def test_leading_bom_stripped_once() -> None:
    bom = "\ufeff".encode()
    assert parse_all(bom + b"data: a\n\n") == [ev("a")]
    # A second BOM is part of the first line: the field name becomes
    # "\ufeffdata", which is unknown and ignored.
    assert parse_all(bom + bom + b"data: a\n\n") == []


def test_bom_split_across_pieces() -> None:
    _, events = feed_pieces([b"\xef", b"\xbb", b"\xbfdata: a\n\n"])
    assert events == [ev("a")]


def test_bom_later_in_stream_is_kept() -> None:
    assert parse_all(b"data: \xef\xbb\xbfa\n\n") == [ev("\ufeffa")]


def test_utf8_split_inside_sequence() -> None:
    payload = "h\u00e9llo \u20ac \U0001f600".encode()
    stream = b"data: " + payload + b"\n\n"
    pieces = [stream[i : i + 1] for i in range(len(stream))]
    _, events = feed_pieces(pieces)
    assert events == [ev("h\u00e9llo \u20ac \U0001f600")]


def test_invalid_utf8_becomes_replacement_character() -> None:
    assert parse_all(b"data: a\xffb\n\n") == [ev("a\ufffdb")]
    # A truncated sequence followed by ASCII is replaced too.
    assert parse_all(b"data: \xe2\x82x\n\n") == [ev("\ufffdx")]


# -- Fields -----------------------------------------------------------------------


def test_only_one_leading_space_removed() -> None:
    assert parse_all(b"data:   a \n\n") == [ev("  a ")]


def test_colon_inside_value_is_kept() -> None:
    assert parse_all(b"data: a: b:c\n\n") == [ev("a: b:c")]


def test_field_without_colon_has_empty_value() -> None:
    assert parse_all(b"data\ndata\ndata\n\n") == [ev("\n\n")]
    assert parse_all(b"event\ndata: x\n\n") == [ev("x")]


def test_field_names_are_case_sensitive_and_unknown_ignored() -> None:
    stream = b"Data: no\nEVENT: no\nfoo: bar\ndata : no\ndata: yes\n\n"
    assert parse_all(stream) == [ev("yes")]


def test_comments_are_collected_and_do_not_dispatch() -> None:
    parser = SSEParser()
    assert parser.feed(b": ping\n\n:\n\n:x: y\n\n") == []
    assert parser.comments == [" ping", "", "x: y"]


def test_comment_between_data_lines_does_not_break_event() -> None:
    assert parse_all(b"data: a\n: keepalive\ndata: b\n\n") == [ev("a\nb")]


def test_event_type_without_data_is_not_dispatched_and_reset() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: lonely\n\n") == []
    assert parser.feed(b"data: x\n\n") == [ev("x")]


def test_event_type_reset_after_dispatch() -> None:
    assert parse_all(b"event: a\ndata: 1\n\ndata: 2\n\n") == [
        ev("1", type="a"),
        ev("2"),
    ]


def test_empty_event_field_means_message() -> None:
    assert parse_all(b"event:\ndata: x\n\n") == [ev("x")]


def test_last_event_id_persists_and_empty_id_clears() -> None:
    stream = b"id: 7\ndata: a\n\ndata: b\n\nid:\ndata: c\n\nid: 9\n\ndata: d\n\n"
    parser = SSEParser()
    assert parser.feed(stream) == [
        ev("a", last_event_id="7"),
        ev("b", last_event_id="7"),
        ev("c", last_event_id=""),
        ev("d", last_event_id="9"),
    ]
    assert parser.last_event_id == "9"


def test_id_after_data_in_same_block_applies() -> None:
    assert parse_all(b"data: a\nid: 3\n\n") == [ev("a", last_event_id="3")]


def test_id_with_null_is_ignored() -> None:
    stream = b"id: 1\n\nid: 2\x003\ndata: a\n\n"
    assert parse_all(stream) == [ev("a", last_event_id="1")]


def test_id_keeps_spaces_after_first() -> None:
    assert parse_all(b"id:  x y \ndata: a\n\n") == [ev("a", last_event_id=" x y ")]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"retry: 1500", 1500),
        (b"retry:0", 0),
        (b"retry: 007", 7),
        (b"retry", None),
        (b"retry:", None),
        (b"retry: ", None),
        (b"retry: -1", None),
        (b"retry: +5", None),
        (b"retry: 1.5", None),
        (b"retry: 10a", None),
        (b"retry:  10", None),
        (b"retry: 10 ", None),
        ("retry: \u0661\u0662".encode(), None),  # Arabic-Indic digits
        ("retry: \uff11".encode(), None),  # fullwidth digit one
    ],
)
def test_retry_only_ascii_digits(line: bytes, expected: int | None) -> None:
    parser = SSEParser()
    events = parser.feed(line + b"\ndata: x\n\n")
    assert parser.retry == expected
    assert events == [ev("x", retry=expected)]


def test_invalid_retry_keeps_previous_value() -> None:
    parser = SSEParser()
    events = parser.feed(b"retry: 100\ndata: a\n\nretry: x\ndata: b\n\nretry: 5\n\n")
    assert events == [ev("a", retry=100), ev("b", retry=100)]
    assert parser.retry == 5


def test_retry_without_data_is_applied_but_not_dispatched() -> None:
    parser = SSEParser()
    assert parser.feed(b"retry: 3000\n\n") == []
    assert parser.retry == 3000
    assert parser.feed(b"data: a\n\n") == [ev("a", retry=3000)]


def test_only_one_trailing_lf_stripped() -> None:
    assert parse_all(b"data: a\ndata:\n\n") == [ev("a\n")]


def test_parsed_event_is_frozen() -> None:
    event = ev("a")
    with pytest.raises(AttributeError):
        event.data = "b"  # type: ignore[misc]


# -- Incrementality ---------------------------------------------------------------

_SAMPLE = (
    "\ufeff: hello\r\n"
    "retry: 250\r"
    "event: greet\n"
    "id: \u00e9\u20ac\r\n"
    "data: caf\u00e9 \U0001f600\r"
    "data\r\n"
    "\r\n"
    "data:  two\n"
    "\r"
    "id\n"
    "data: three\r\n"
    "\n"
    "data: incomplete"
).encode()

_SAMPLE_EVENTS = [
    ev("caf\u00e9 \U0001f600\n", type="greet", last_event_id="\u00e9\u20ac", retry=250),
    ev(" two", last_event_id="\u00e9\u20ac", retry=250),
    ev("three", last_event_id="", retry=250),
]


def test_sample_whole() -> None:
    parser = SSEParser()
    assert parser.feed(_SAMPLE) == _SAMPLE_EVENTS
    assert parser.comments == [" hello"]


def test_sample_byte_by_byte() -> None:
    parser, events = feed_pieces([_SAMPLE[i : i + 1] for i in range(len(_SAMPLE))])
    assert events == _SAMPLE_EVENTS
    assert parser.comments == [" hello"]
    assert parser.pending_line == "data: incomplete"


@settings(max_examples=200, deadline=None, database=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(_SAMPLE)), max_size=20))
def test_sample_any_split(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(_SAMPLE)]
    pieces = [_SAMPLE[a:b] for a, b in itertools.pairwise(bounds)]
    parser, events = feed_pieces(pieces)
    assert events == _SAMPLE_EVENTS
    assert parser.comments == [" hello"]

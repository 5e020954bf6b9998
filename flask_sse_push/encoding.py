"""Encoding of events to the ``text/event-stream`` wire format.

An event is encoded once, when it is published; every connection then writes the same bytes.
The rules follow the WHATWG HTML specification, section "Server-sent events".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Line breaks of the event-stream format: CRLF, lone LF, lone CR, and no others
#: (``str.splitlines`` would also split at U+2028, U+0085 and friends).
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FORBIDDEN_IN_FIELD = re.compile(r"[\r\n\x00]")
_HEADER_SAFE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")

#: Event type of the reset signal: replay from the client's ``Last-Event-ID`` was impossible
#: (too old, unknown or malformed), so the client should refetch its state.
RESET_EVENT = "sse-reset"

#: The longest ``event`` or ``id`` value accepted.
MAX_FIELD_LENGTH = 256

#: A keep-alive: one comment line. No blank line follows it: a blank line after an event
#: with an id makes some clients (httpx-sse) report an empty event, while a lone comment
#: line between blocks touches nothing in any conforming parser.
KEEPALIVE = b":\n"


@dataclass(frozen=True, slots=True)
class Event:
    """One event to send, as given to :func:`~flask_sse_push.send_event` or returned by an
    on-connect hook.

    :param data: a ``str`` sent as is, or anything the app's JSON provider can serialize.
    :param event: the event type; ``None`` or ``""`` make the browser dispatch ``message``.
    :param id: the event id (``str`` or ``int``); ``None`` lets the bus assign one.
    :param retry: reconnection delay in milliseconds for the client, a non-negative ``int``.
    """

    data: Any
    event: str | None = None
    id: str | int | None = None
    retry: int | None = None


def check_field(name: str, value: object) -> str:
    """Validate an ``event`` or ``id`` value and return it as text.

    :raises TypeError: when *value* is not a ``str`` (or, for ``id``, an ``int``).
    :raises ValueError: when it holds CR, LF or NUL, which would inject fields, or is too long.
    """
    if name == "id" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        allowed = "a str or an int" if name == "id" else "a str"
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__}: {value!r}")
    if _FORBIDDEN_IN_FIELD.search(value):
        raise ValueError(
            f"{name} must not contain CR, LF or NUL (they would start new fields on the "
            f"wire), got {value!r}"
        )
    if len(value) > MAX_FIELD_LENGTH:
        raise ValueError(f"{name} must be at most {MAX_FIELD_LENGTH} characters long")
    _check_utf8(name, value)
    return value


def _check_utf8(name: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{name} is not valid Unicode text (it holds a lone surrogate at position "
            f"{exc.start}), so it cannot be sent as UTF-8"
        ) from None


def check_id(value: object) -> str:
    """Validate a caller-given event id.

    The browser sends the id back in the ``Last-Event-ID`` request header, so it must be
    something a header carries unchanged: printable ASCII, without leading or trailing
    spaces. An empty id is refused too: on the wire it would clear the client's resume point.

    :raises TypeError: see :func:`check_field`.
    :raises ValueError: see :func:`check_field`, or when the id is empty or would not
        survive the trip back in a header.
    """
    text = check_field("id", value)
    if not text:
        raise ValueError(
            "id must not be empty: an empty id resets the client's Last-Event-ID; "
            "pass id=None to let the bus assign one"
        )
    if not _HEADER_SAFE.fullmatch(text):
        raise ValueError(
            f"id {text!r} must be printable ASCII without leading or trailing spaces: the "
            "browser sends it back in the Last-Event-ID header, which would change or "
            "refuse other characters"
        )
    return text


def check_retry(value: object) -> int:
    """Validate a ``retry`` value: a non-negative ``int`` (``bool`` is refused).

    :raises TypeError: when it is not an ``int``.
    :raises ValueError: when it is negative.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"retry must be an int number of milliseconds, got {type(value).__name__}: {value!r}"
        )
    if value < 0:
        raise ValueError(f"retry must be >= 0 milliseconds, got {value}")
    return value


def data_text(data: object, dumps: Callable[[Any], str]) -> str:
    """Return the text of *data*: a ``str`` as is, anything else through *dumps* (JSON).

    :raises TypeError: when *dumps* cannot serialize *data*.
    :raises ValueError: when the text holds a lone surrogate (it has no UTF-8 form); JSON
        text can, when the provider leaves non-ASCII characters unescaped
        (``ensure_ascii = False``).
    """
    if isinstance(data, str):
        text = data
    else:
        try:
            text = dumps(data)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"data of type {type(data).__name__} cannot be serialized to JSON ({exc}); "
                "pass a str, or register a JSON provider that handles it"
            ) from exc
    if not text.isascii():  # known without a scan: only other text needs the check
        _check_utf8("data", text)
    return text


def encode_body(text: str, event: str | None = None, retry: int | None = None) -> bytes:
    """Encode the fields of an event other than ``id``, ending with the blank line.

    *text* becomes one ``data:`` line per line (split at CRLF, CR and LF only), so ``""`` is
    one empty ``data:`` line, which the browser dispatches as an empty message. Arguments
    must already be validated.
    """
    parts: list[str] = []
    if event:
        parts.append(f"event: {event}\n")
    if retry is not None:
        parts.append(f"retry: {retry}\n")
    for line in _LINE_BREAK.split(text):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def with_id(event_id: str | bytes | None, body: bytes) -> bytes:
    """Prefix an encoded *body* with its ``id:`` line (nothing when *event_id* is ``None``).
    Buses call this with the id they assign or carry; it must already be validated."""
    if event_id is None:
        return body
    if isinstance(event_id, str):
        event_id = event_id.encode("utf-8")
    return b"id: " + event_id + b"\n" + body


def chunk(payload: bytes) -> bytes:
    """*payload* as one HTTP/1.1 chunk, framed as the WSGI server frames what a body yields
    (for the writes that bypass it, see :mod:`~flask_sse_push.direct`)."""
    return b"%X\r\n%s\r\n" % (len(payload), payload)


def encode_event(event: Event, dumps: Callable[[Any], str], event_id: str | None = None) -> bytes:
    """Validate and encode a whole :class:`Event`; *event_id* overrides ``event.id``.

    :raises TypeError: for a wrongly typed field or data JSON cannot serialize.
    :raises ValueError: for a field that would inject others, or a negative retry.
    """
    kind = None if event.event is None else check_field("event", event.event)
    retry = None if event.retry is None else check_retry(event.retry)
    if event_id is None and event.id is not None:
        event_id = check_id(event.id)
    return with_id(event_id, encode_body(data_text(event.data, dumps), kind, retry))


def comment(text: str = "") -> bytes:
    """Encode comment lines (every line of *text* becomes one); no blank line follows."""
    lines = _LINE_BREAK.split(text)
    return "".join(f":{line}\n" for line in lines).encode("utf-8")


def retry_line(milliseconds: int) -> bytes:
    """Encode a ``retry:`` line. A browser applies it when it reads the line; no blank line
    follows, so it dispatches nothing of its own (it joins the next event's block)."""
    return f"retry: {milliseconds}\n".encode("ascii")


def stream_head(retry: int | None) -> bytes:
    """The first bytes of every stream: the ``retry:`` hint, or a comment without one, so
    that the headers and a first chunk reach the client at once."""
    return retry_line(retry) if retry is not None else comment(" ok")


def end_comment(reason: str) -> bytes:
    """The comment line a stream's last chunk carries: why it ended."""
    return comment(f" {reason}")


def reset_event(
    reason: str, last_event_id: str | None, head_id: str, dumps: Callable[[Any], str]
) -> bytes:
    """The ``RESET_EVENT`` (``sse-reset``) telling a client that replay after *last_event_id* was
    impossible for *reason*; it resumes from *head_id*. At most ``MAX_FIELD_LENGTH``
    characters of the client's id are echoed."""
    if last_event_id is not None:
        last_event_id = last_event_id[:MAX_FIELD_LENGTH]
    notice = {"reason": reason, "lastEventId": last_event_id}
    return with_id(head_id, encode_body(dumps(notice), RESET_EVENT))

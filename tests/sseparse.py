"""Reference parser for the WHATWG ``text/event-stream`` format.

This module is deliberately independent of :mod:`flask_sse_push`: tests use it
as the ground truth for what a conforming ``EventSource`` would see when it
reads the bytes a server produced.  It follows the "Parsing an event stream"
and "Interpreting an event stream" sections of the HTML Living Standard
(https://html.spec.whatwg.org/multipage/server-sent-events.html):

* the stream is decoded as UTF-8, invalid sequences become U+FFFD, and one
  leading U+FEFF BYTE ORDER MARK is dropped;
* lines end at CRLF, a lone LF, or a lone CR;
* a blank line dispatches the pending event, a line beginning with ``:`` is a
  comment, anything else is a ``field:value`` pair (one leading space of the
  value is removed; a line without a colon is a field with an empty value);
* ``event``, ``data``, ``id`` and ``retry`` are processed as the standard says
  and every other field is ignored.

Bytes may be fed in arbitrary pieces: a piece may end inside a UTF-8 sequence
or between the CR and the LF of a CRLF pair.  A CR that ends a piece
terminates its line at once (so an event that is already complete is
dispatched without waiting for more bytes); if the next piece then starts with
LF, that LF is recognised as the second half of the CRLF pair and skipped.
This yields exactly the same sequence of lines as buffering the CR would.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["ParsedEvent", "SSEParser", "parse_all"]

_LINE_END = re.compile(r"\r\n|\r|\n")
_ASCII_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class ParsedEvent:
    """One event dispatched by :class:`SSEParser`.

    :ivar type: The event type (``"message"`` when no ``event`` field was
        given).
    :ivar data: The data buffer with its single trailing LF removed.
    :ivar last_event_id: The parser's last event ID at dispatch time.  It
        persists across events until an ``id`` field changes it.
    :ivar retry: The reconnection time (milliseconds) most recently applied by
        a valid ``retry`` field before this event was dispatched, or ``None``
        if no valid ``retry`` field has been seen yet.
    """

    type: str
    data: str
    last_event_id: str
    retry: int | None


class SSEParser:
    """Incremental, spec-conforming ``text/event-stream`` parser.

    Feed it raw bytes with :meth:`feed`; each call returns the events that
    became complete.  Besides the events, the parser keeps:

    :ivar comments: The text of every comment line, in order, i.e. everything
        after the leading ``:`` exactly as sent (a ``": ping"`` line is
        recorded as ``" ping"``).
    :ivar retry: The most recently applied reconnection time in milliseconds,
        or ``None``.
    :ivar last_event_id: The current last event ID buffer.
    """

    def __init__(self) -> None:
        """Create a parser positioned at the start of a stream."""
        self.comments: list[str] = []
        self.retry: int | None = None
        self.last_event_id: str = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._bom_checked = False
        self._skip_lf = False
        self._pending = ""
        self._data = ""
        self._event_type = ""

    @property
    def pending_line(self) -> str:
        """Return the decoded text of the current, unterminated line.

        :returns: Text received after the last line terminator.
        """
        return self._pending

    def feed(self, data: bytes) -> list[ParsedEvent]:
        """Consume the next piece of the stream.

        :param data: Raw bytes, split anywhere.
        :returns: The events dispatched by the lines completed by this piece,
            in stream order (possibly empty).
        """
        text = self._decoder.decode(data)
        if not text:
            return []
        if not self._bom_checked:
            self._bom_checked = True
            if text[0] == "\ufeff":
                text = text[1:]
                if not text:
                    return []
        if self._skip_lf:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
                if not text:
                    return []

        buffer = self._pending + text
        events: list[ParsedEvent] = []
        start = 0
        for match in _LINE_END.finditer(buffer):
            line = buffer[start : match.start()]
            start = match.end()
            if match.group() == "\r" and start == len(buffer):
                # The LF of a CRLF pair may be in the next piece.
                self._skip_lf = True
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        self._pending = buffer[start:]
        return events

    def _process_line(self, line: str) -> ParsedEvent | None:
        """Interpret one complete line.

        :param line: The line without its terminator.
        :returns: The dispatched event, if the line was blank and an event was
            pending.
        """
        if line == "":
            return self._dispatch()
        if line[0] == ":":
            self.comments.append(line[1:])
            return None
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        self._process_field(name, value)
        return None

    def _process_field(self, name: str, value: str) -> None:
        """Apply one field to the parser state.

        :param name: The field name (case-sensitive).
        :param value: The field value, leading space already removed.
        """
        if name == "event":
            self._event_type = value
        elif name == "data":
            self._data += value + "\n"
        elif name == "id":
            if "\x00" not in value:
                self.last_event_id = value
        elif name == "retry" and _ASCII_DIGITS.fullmatch(value):
            self.retry = int(value)
        # Any other field name is ignored.

    def _dispatch(self) -> ParsedEvent | None:
        """Dispatch the pending event, as on a blank line.

        :returns: The event, or ``None`` if the data buffer was empty.
        """
        data, event_type = self._data, self._event_type
        self._data = ""
        self._event_type = ""
        if data == "":
            return None
        if data.endswith("\n"):
            data = data[:-1]
        return ParsedEvent(
            type=event_type or "message",
            data=data,
            last_event_id=self.last_event_id,
            retry=self.retry,
        )


def parse_all(data: bytes) -> list[ParsedEvent]:
    """Parse a complete stream with a fresh :class:`SSEParser`.

    An event that is not followed by a blank line is discarded, as the
    standard requires at end of stream.

    :param data: The whole stream.
    :returns: Every dispatched event, in order.
    """
    return SSEParser().feed(data)

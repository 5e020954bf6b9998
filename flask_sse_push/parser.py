"""A parser of the ``text/event-stream`` format, as a browser's ``EventSource`` reads it.

Used by the testing helpers and ``flask sse listen``.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """A dispatched event.

    :param type: the event type (``"message"`` by default).
    :param data: the data, lines joined by LF.
    :param id: the last event id in force when it was dispatched.
    :param retry: the last reconnection delay received, if any.
    """

    type: str
    data: str
    id: str
    retry: int | None = None

    def json(self) -> object:
        """The data decoded as JSON."""
        import json

        return json.loads(self.data)


class EventParser:
    """An incremental parser: :meth:`feed` bytes as they arrive, get the events dispatched."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._started = False
        self._skip_lf = False
        self._data: list[str] = []
        self._type = ""
        self.last_id = ""
        self.retry: int | None = None
        #: Comment lines seen, without their leading colon.
        self.comments: list[str] = []

    def feed(self, chunk: bytes) -> list[ServerEvent]:
        """Parse *chunk* and return the events it completed."""
        text = self._decoder.decode(chunk)
        if not text:
            return []
        if not self._started:
            self._started = True
            text = text.removeprefix("\ufeff")
        events: list[ServerEvent] = []
        for line in self._lines(text):
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _lines(self, text: str) -> Iterator[str]:
        if self._skip_lf and text.startswith("\n"):
            text = text[1:]
        self._skip_lf = False
        buffer = self._pending + text
        start = 0
        length = len(buffer)
        while True:
            cr = buffer.find("\r", start)
            lf = buffer.find("\n", start)
            if cr < 0 and lf < 0:
                break
            end = lf if cr < 0 or (0 <= lf < cr) else cr
            yield buffer[start:end]
            if buffer[end] == "\r":
                if end + 1 < length:
                    start = end + 2 if buffer[end + 1] == "\n" else end + 1
                else:
                    self._skip_lf = True
                    start = end + 1
            else:
                start = end + 1
        self._pending = buffer[start:]

    def _line(self, line: str) -> ServerEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:])
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id":
            if "\x00" not in value:
                self.last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> ServerEvent | None:
        data, kind = self._data, self._type
        self._data, self._type = [], ""
        if not data:
            return None
        return ServerEvent(kind or "message", "\n".join(data), self.last_id, self.retry)


def parse(chunks: Iterable[bytes]) -> Iterator[ServerEvent]:
    """Parse a whole stream given as chunks of bytes."""
    parser = EventParser()
    for chunk in chunks:
        yield from parser.feed(chunk)

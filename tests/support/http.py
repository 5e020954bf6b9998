"""A raw HTTP/1.1 client for event streams, and THE chunked-transfer decoder.

:func:`raw_sse` sends a request over a plain socket and returns a :class:`RawResponse` that
keeps every byte received, so tests can check the exact framing a server wrote.
:class:`ChunkedDecoder` is the one decoder of ``Transfer-Encoding: chunked`` used by the tests
and by the benchmark's client; :func:`encode_chunk` frames one chunk, as a server does.

This module needs nothing beyond the standard library: the benchmark's client process and
its bare server import it.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from urllib.parse import urlsplit

__all__ = [
    "ChunkedDecoder",
    "RawResponse",
    "StreamClosedError",
    "dechunk",
    "encode_chunk",
    "header_values",
    "is_chunked",
    "parse_head",
    "raw_sse",
]

#: A chunk-size line: hexadecimal digits (``int(x, 16)`` alone would also take ``0x``, ``_``,
#: ``+`` and spaces), then any chunk extensions.
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]+)[ \t]*(?:;.*)?", re.DOTALL)


class StreamClosedError(TimeoutError):
    """The body ended before the awaited condition became true.

    Subclasses :class:`TimeoutError` because, to a caller waiting for data,
    it means the same thing: the data did not arrive.

    :ivar body: The decoded body received before the end.
    """

    def __init__(self, message: str, body: bytes = b"") -> None:
        super().__init__(message)
        self.body = body


class ChunkedDecoder:
    """Incremental decoder of a ``Transfer-Encoding: chunked`` body (RFC 9112, section 7.1).

    Feed it the body's bytes as they arrive, cut anywhere; it returns the payload and keeps
    any partial framing for the next call.  The benchmark's client feeds it every ``recv``
    of a thousand streams, so the loop walks positions instead of copying the buffer.

    :param record_sizes: Keep every chunk's size in :attr:`chunk_sizes`; a long-running
        client turns this off, or the list grows without bound.
    :ivar done: The last chunk and the trailer section have arrived; later bytes are ignored.
    :ivar chunk_sizes: The sizes of the chunks so far, in order (a final ``0`` marks the
        last chunk); ``None`` when not recorded.
    """

    __slots__ = ("_crlf", "_left", "_partial", "_trailer", "chunk_sizes", "done")

    def __init__(self, *, record_sizes: bool = True) -> None:
        """Start before the first chunk-size line."""
        #: An unfinished size line or trailer line.
        self._partial = b""
        #: Payload bytes still due in the current chunk.
        self._left = 0
        #: The part of the CRLF after a chunk's payload still due.
        self._crlf = b""
        #: The last chunk came: what follows are trailer lines up to a blank one.
        self._trailer = False
        self.done = False
        self.chunk_sizes: list[int] | None = [] if record_sizes else None

    def feed(self, data: bytes) -> bytes:
        """Consume the next bytes of the message body.

        :param data: Raw body bytes, as received.
        :returns: The payload bytes decoded from them.
        :raises ValueError: On malformed framing (a bad size line, no CRLF after a chunk).
        """
        buf = self._partial + data if self._partial else data
        self._partial = b""
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while pos < end and not self.done:  # every pass consumes at least one byte
            if self._left:
                take = min(self._left, end - pos)
                out.append(buf[pos : pos + take])
                self._left -= take
                pos += take
                if not self._left:
                    self._crlf = b"\r\n"
            elif self._crlf:
                got = buf[pos : pos + len(self._crlf)]
                if not self._crlf.startswith(got):
                    raise ValueError(f"missing CRLF after chunk: {got!r}")
                self._crlf = self._crlf[len(got) :]
                pos += len(got)
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    self._partial = buf[pos:]
                    break
                if self._trailer:
                    self.done = eol == pos
                    pos = eol + 2
                    continue
                size = self._size(buf, pos, eol)
                pos = eol + 2
                stop = pos + size
                if size and buf[stop : stop + 2] == b"\r\n":
                    # The whole chunk is here (the usual case): take it in one step.
                    out.append(buf[pos:stop])
                    pos = stop + 2
                else:
                    self._left = size
        return out[0] if len(out) == 1 else b"".join(out)

    def _size(self, buf: bytes, start: int, eol: int) -> int:
        """Read the chunk-size line ``buf[start:eol]`` (extensions are ignored).

        :param buf: The buffer.
        :param start: Where the line starts.
        :param eol: Where its CRLF starts.
        :returns: The chunk's size (``0``: the last chunk; trailer lines follow).
        :raises ValueError: If the size is not hexadecimal digits.
        """
        match = _SIZE_LINE.fullmatch(buf, start, eol)
        if match is None:
            raise ValueError(f"bad chunk size line {buf[start:eol]!r}")
        size = int(match[1], 16)
        if self.chunk_sizes is not None:
            self.chunk_sizes.append(size)
        self._trailer = not size
        return size


def encode_chunk(data: bytes) -> bytes:
    """Frame *data* as one HTTP/1.1 chunk.

    :param data: The payload (not empty: an empty chunk is the last one).
    :returns: Size line, payload and CRLF.
    """
    return b"%X\r\n%s\r\n" % (len(data), data)


def dechunk(raw: bytes) -> bytes:
    """Return the body of a raw HTTP/1.1 response with chunked transfer encoding.

    :param raw: Every byte received: status line, headers and the body so far.
    :returns: The payload of the chunks received (the last chunk need not have come).
    :raises ValueError: On malformed framing.
    """
    return ChunkedDecoder().feed(raw.split(b"\r\n\r\n", 1)[1])


def parse_head(head: bytes) -> tuple[str, int, str, list[tuple[str, str]]]:
    """Parse a response's status line and header fields.

    :param head: The bytes before the blank line ending the header block.
    :returns: The HTTP version, the status code, the reason phrase, and the headers as
        ``(name, value)`` pairs in wire order, names exactly as sent, values with
        surrounding whitespace removed.
    :raises ValueError: If the status line is malformed.
    """
    lines = head.decode("iso-8859-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"bad status line {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name, value.strip(" \t")))
    return parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "", headers


def body_after_ok_head(received: bytes) -> bytes | None:
    """The body bytes of *received* once its whole header block is there (``None`` before),
    checking that the status is 200.

    :raises AssertionError: For another status.
    """
    if b"\r\n\r\n" not in received:
        return None
    head, body = received.split(b"\r\n\r\n", 1)
    assert head.split(b" ", 2)[1:2] == [b"200"], head
    return body


def header_values(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    """Return every value of header *name* (case-insensitive), in order.

    :param headers: ``(name, value)`` pairs.
    :param name: Header name.
    :returns: The values.
    """
    lowered = name.lower()
    return [v for n, v in headers if n.lower() == lowered]


def is_chunked(headers: Sequence[tuple[str, str]]) -> bool:
    """Tell whether a response with *headers* has a chunked body (its last coding).

    :param headers: ``(name, value)`` pairs.
    :returns: ``True`` if ``chunked`` is the last transfer coding.
    """
    codings = [
        c.strip().lower() for v in header_values(headers, "Transfer-Encoding") for c in v.split(",")
    ]
    return bool(codings) and codings[-1] == "chunked"


class RawResponse:
    """An HTTP/1.1 response read straight off a socket by :func:`raw_sse`.

    :ivar status: The status code.
    :ivar reason: The reason phrase.
    :ivar http_version: E.g. ``"HTTP/1.1"``.
    :ivar headers: ``(name, value)`` pairs in wire order, names exactly as
        sent, values with surrounding whitespace removed.
    :ivar raw_bytes: Every byte received on the wire so far (status line and
        headers included, chunk framing not removed).
    :ivar body: The decoded body received so far.
    :ivar chunked: Whether the body uses chunked transfer encoding.
    :ivar complete: Whether the whole body has been received (last chunk,
        ``Content-Length`` reached, or connection closed).
    :ivar eof: Whether the peer closed the connection.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        """Read the status line and headers from *sock*.

        :param sock: A connected socket on which the request was sent.
        :param timeout: Maximum seconds to wait for the complete header.
        :raises TimeoutError: If the header does not arrive in time.
        :raises ValueError: If the status line is malformed.
        """
        self._sock = sock
        self.raw_bytes = b""
        self.body = b""
        self.eof = False
        self.complete = False
        head, rest = self._read_head(timeout)
        self.http_version, self.status, self.reason, self.headers = parse_head(head)
        self.chunked = is_chunked(self.headers)
        self._decoder = ChunkedDecoder() if self.chunked else None
        length = self.header("Content-Length")
        self._length: int | None = None if self.chunked or length is None else int(length)
        if self.status in (204, 304) or 100 <= self.status < 200:
            self._length = 0
        self._absorb(rest)

    def _read_head(self, timeout: float) -> tuple[bytes, bytes]:
        """Receive until the blank line ending the header block.

        :param timeout: Maximum seconds.
        :returns: The header block (without the final CRLFCRLF) and any body
            bytes received after it.
        :raises TimeoutError: If it does not arrive in time.
        :raises StreamClosedError: If the peer closes first.
        """
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            end = self.raw_bytes.find(b"\r\n\r\n")
            if end >= 0:
                return self.raw_bytes[:end], self.raw_bytes[end + 4 :]
            data = self._recv(deadline)
            if data is None:
                raise TimeoutError(
                    f"no complete response header within {timeout}s; got {self.raw_bytes!r}"
                )
            if not data:
                raise StreamClosedError(f"connection closed in header; got {self.raw_bytes!r}")
            self.raw_bytes += data
        raise TimeoutError("response header too large")

    def _recv(self, deadline: float) -> bytes | None:
        """Receive once, waiting until *deadline* at most.

        :param deadline: :func:`time.monotonic` value.
        :returns: The bytes, ``b""`` at EOF, ``None`` on timeout.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
        return data

    def _absorb(self, data: bytes) -> None:
        """Add wire body bytes to :attr:`body`.

        :param data: Raw body bytes.
        """
        if self._decoder is not None:
            self.body += self._decoder.feed(data)
            self.complete = self._decoder.done
        elif self._length is not None:
            self.body += data[: max(0, self._length - len(self.body))]
            self.complete = len(self.body) >= self._length
        else:
            self.body += data

    @property
    def chunk_sizes(self) -> list[int]:
        """Return the sizes of the chunks received so far (chunked only).

        :returns: Sizes in order; a final ``0`` marks the last chunk.
        """
        return list(self._decoder.chunk_sizes or ()) if self._decoder else []

    def header(self, name: str) -> str | None:
        """Return the first value of header *name* (case-insensitive).

        :param name: Header name.
        :returns: The value or ``None``.
        """
        values = self.get_all(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        """Return every value of header *name* (case-insensitive), in order.

        :param name: Header name.
        :returns: The values.
        """
        return header_values(self.headers, name)

    def read_body_until(self, predicate: Callable[[bytes], bool], timeout: float) -> bytes:
        """Receive until ``predicate(body)`` is true.

        :param predicate: Called with the whole decoded body received so far.
        :param timeout: Maximum seconds to wait.
        :returns: The decoded body received so far.
        :raises TimeoutError: If the predicate is not true in time.
        :raises StreamClosedError: (a :class:`TimeoutError`) if the body ended
            or the connection closed before the predicate became true.
        """
        deadline = time.monotonic() + timeout
        for _ in range(1_000_000):
            if predicate(self.body):
                return self.body
            if self.complete or self.eof:
                raise StreamClosedError(
                    f"body ended before the condition was met; body={self.body!r}", self.body
                )
            data = self._recv(deadline)
            if data is None:
                raise TimeoutError(f"condition not met within {timeout}s; body={self.body!r}")
            if not data:
                if self._length is None and not self.chunked:
                    self.complete = True
                continue
            self.raw_bytes += data
            self._absorb(data)
        raise TimeoutError("too many reads")

    def read_to_end(self, timeout: float) -> bytes:
        """Receive until the body is complete or the connection closes.

        :param timeout: Maximum seconds to wait.
        :returns: The decoded body.
        :raises TimeoutError: If it does not end in time.
        """
        deadline = time.monotonic() + timeout
        for _ in range(1_000_000):
            if self.complete or self.eof:
                return self.body
            data = self._recv(deadline)
            if data is None:
                raise TimeoutError(f"body did not end within {timeout}s; body={self.body!r}")
            if data:
                self.raw_bytes += data
                self._absorb(data)
            elif self._length is None and not self.chunked:
                self.complete = True
        raise TimeoutError("too many reads")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._sock.close()

    def __enter__(self) -> RawResponse:
        """Return ``self``.

        :returns: This response.
        """
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the connection."""
        self.close()


def raw_sse(
    url: str,
    path: str,
    headers: dict[str, str] | None = None,
    timeout: float = 5,
) -> RawResponse:
    """Send ``GET path HTTP/1.1`` over a plain socket and read the header.

    Sends ``Host`` and ``Accept: text/event-stream`` unless *headers* has
    them (compared case-insensitively), then *headers* as given.

    :param url: ``http://host:port`` of the server.
    :param path: Request target, e.g. ``"/stream?channel=a"``.
    :param headers: Extra request headers.
    :param timeout: Seconds for connecting and for receiving the header.
    :returns: The response, with the connection still open for the body.
    :raises TimeoutError: If the header does not arrive in time.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"unsupported URL {url!r}")
    port = parts.port or 80
    host = parts.hostname
    given = dict(headers or {})
    names = {name.lower() for name in given}
    request_headers: list[tuple[str, str]] = []
    if "host" not in names:
        request_headers.append(("Host", f"{host}:{port}"))
    if "accept" not in names:
        request_headers.append(("Accept", "text/event-stream"))
    request_headers.extend(given.items())
    request = f"GET {path or '/'} HTTP/1.1\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in request_headers
    )
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(request.encode("latin-1") + b"\r\n")
        return RawResponse(sock, timeout)
    except BaseException:
        sock.close()
        raise

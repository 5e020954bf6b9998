"""Stream readers on raw sockets: one stream, many streams in one selector, and
reconnecting clients that resume with ``Last-Event-ID`` as a browser does."""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

from sseparse import ParsedEvent, SSEParser

from support.http import StreamClosedError, body_after_ok_head, raw_sse
from support.procs import HOST, raise_nofile_limit

__all__ = [
    "Client",
    "Collector",
    "Crowd",
    "ManyStreams",
    "pump_selector",
    "read_events",
    "reconnecting_read",
]


def read_events(url: str, path: str, count: int, timeout: float = 10, **headers: str) -> Any:
    """Open a raw stream and return its first *count* parsed events and the response."""
    response = raw_sse(url, path, headers=headers or None, timeout=timeout)
    events = Collector()
    response.read_body_until(events.at_least(count), timeout)
    return events.events, response


class Collector:
    """Parses a growing body incrementally (re-parsing it whole on every read is quadratic)."""

    def __init__(self) -> None:
        self.parser = SSEParser()
        self.events: list[ParsedEvent] = []
        self._seen = 0

    def update(self, body: bytes) -> int:
        """Parse what *body* holds beyond what was seen; return the number of events."""
        self.events.extend(self.parser.feed(body[self._seen :]))
        self._seen = len(body)
        return len(self.events)

    def at_least(self, count: int) -> Callable[[bytes], bool]:
        """A predicate for ``read_body_until``: *count* events were parsed."""
        return lambda body: self.update(body) >= count


def reconnecting_read(
    url: str, path: str, count: int, last_event_id: str | None = None, timeout: float = 20
) -> list[ParsedEvent]:
    """Read *count* events the way a browser does: when the stream ends, reconnect with the
    last event id seen so far, until *count* events came or *timeout* passed."""
    deadline = time.monotonic() + timeout
    events: list[ParsedEvent] = []
    for _ in range(100):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        headers = {"Last-Event-ID": last_event_id} if last_event_id else None
        collector = Collector()
        try:
            with raw_sse(url, path, headers=headers, timeout=left) as response:
                response.read_body_until(collector.at_least(count - len(events)), left)
        except StreamClosedError as closed:
            collector.update(closed.body)
        except (TimeoutError, OSError):
            break
        got = collector.events
        events.extend(got)
        if got and got[-1].last_event_id:
            last_event_id = got[-1].last_event_id
        if len(events) >= count:
            break
        time.sleep(0.1)
    return events


def pump_selector(
    selector: selectors.BaseSelector,
    done: Callable[[], bool],
    timeout: float,
    on_data: Callable[[selectors.SelectorKey, socket.socket, bytes], None],
    on_end: Callable[[selectors.SelectorKey, socket.socket], None],
) -> bool:
    """Read the selector's sockets until ``done()`` or *timeout*; hand each read to
    *on_data* and each closed connection to *on_end*. Returns whether ``done()`` came."""
    deadline = time.monotonic() + timeout
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        for key, _ in selector.select(min(left, 0.2)):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                on_data(key, sock, data)
            else:
                on_end(key, sock)
    return True


class ManyStreams:
    """Many raw stream connections driven by one selector, for load and shutdown tests.

    :param port: the server's port on 127.0.0.1.
    :param path: the request target.
    :param count: how many connections.
    """

    def __init__(self, port: int, path: str, count: int) -> None:
        raise_nofile_limit(count + 256)
        self.selector = selectors.DefaultSelector()
        self.received: dict[socket.socket, bytearray] = {}
        self.closed: set[socket.socket] = set()
        request = f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n\r\n"
        for _ in range(count):
            sock = socket.create_connection((HOST, port), timeout=10)
            sock.sendall(request.encode())
            sock.setblocking(False)
            self.received[sock] = bytearray()
            self.selector.register(sock, selectors.EVENT_READ)

    def pump(self, until: Any, timeout: float) -> bool:
        """Read whatever arrives until ``until(self)`` is true or *timeout* passes."""

        def on_data(key: selectors.SelectorKey, sock: socket.socket, data: bytes) -> None:
            self.received[sock] += data

        def on_end(key: selectors.SelectorKey, sock: socket.socket) -> None:
            self.selector.unregister(sock)
            self.closed.add(sock)

        return pump_selector(self.selector, lambda: until(self), timeout, on_data, on_end)

    def all_have(self, marker: bytes) -> bool:
        """Whether every connection received *marker*."""
        return all(marker in data for data in self.received.values())

    def close(self) -> None:
        """Close every connection."""
        for sock in self.received:
            if sock not in self.closed:
                self.selector.unregister(sock)
            sock.close()
        self.selector.close()


class Client:
    """One reconnecting raw client: HTTP/1.0, so the body comes unchunked until the server
    closes it; on close it reconnects with the last event id it saw, like a browser.

    :param port: the server's port.
    :param path: the request target.
    :param host: the server's address.
    """

    def __init__(self, port: int, path: str, host: str = HOST) -> None:
        self.port = port
        self.path = path
        self.host = host
        self.events: list[ParsedEvent] = []
        #: When each event arrived (``time.time()``).
        self.times: list[float] = []
        self.last_id: str | None = None
        self.connects = 0
        self.sock: socket.socket | None = None
        self._buffer = b""
        self._in_body = False
        self._parser = SSEParser()

    def connect(self) -> socket.socket:
        """Open a connection, sending ``Last-Event-ID`` when an event was seen."""
        sock = socket.create_connection((self.host, self.port), timeout=10)
        extra = f"Last-Event-ID: {self.last_id}\r\n" if self.last_id else ""
        request = f"GET {self.path} HTTP/1.0\r\nHost: {self.host}\r\n{extra}\r\n"
        sock.sendall(request.encode())
        sock.setblocking(False)
        self.sock = sock
        self._buffer = b""
        self._in_body = False
        self._parser = SSEParser()
        self.connects += 1
        return sock

    def feed(self, data: bytes) -> None:
        """Take bytes from the socket."""
        if not self._in_body:
            self._buffer += data
            body = body_after_ok_head(self._buffer)
            if body is None:
                return
            data = body
            self._in_body = True
        for event in self._parser.feed(data):
            self.events.append(event)
            self.times.append(time.time())
            if event.last_event_id:
                self.last_id = event.last_event_id


class Crowd:
    """Many reconnecting :class:`Client` objects driven by one selector.

    :param port: the server's port.
    :param paths: one request target per client.
    :param host: the server's address.
    :param client: the client class.
    """

    def __init__(
        self, port: int, paths: list[str], host: str = HOST, client: type[Client] = Client
    ) -> None:
        raise_nofile_limit(len(paths) + 256)
        self.selector = selectors.DefaultSelector()
        self.clients = [client(port, path, host) for path in paths]
        for client in self.clients:
            self.selector.register(client.connect(), selectors.EVENT_READ, client)

    def pump(self, until: Callable[[Crowd], bool], timeout: float) -> bool:
        """Read and reconnect until ``until(self)`` or *timeout*."""

        def on_data(key: selectors.SelectorKey, sock: socket.socket, data: bytes) -> None:
            key.data.feed(data)

        def on_end(key: selectors.SelectorKey, sock: socket.socket) -> None:
            client: Client = key.data
            self.selector.unregister(sock)
            sock.close()
            if client.connects < 50:
                time.sleep(0.05)
                try:
                    self.selector.register(client.connect(), selectors.EVENT_READ, client)
                except OSError:
                    client.sock = None

        return pump_selector(self.selector, lambda: until(self), timeout, on_data, on_end)

    def close(self) -> None:
        """Close every connection."""
        for client in self.clients:
            if client.sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(client.sock)
                client.sock.close()
        self.selector.close()

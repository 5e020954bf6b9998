"""Pieces shared by the fuzz and stress tests: a module-scoped served app, raw requests,
a log of what was published, and the checker that tells whether one connection saw the
published events exactly once and in order.

Everything talks to 127.0.0.1 only; every wait is bounded in count and in time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests
from sseparse import ParsedEvent
from support.app import APP, CONF
from support.gunicorn import GunicornFactory, GunicornServer, answering
from support.http import RawResponse
from support.procs import HOST, wait_for

#: Event type of the reset an unresumable ``Last-Event-ID`` gets.
RESET = "sse-reset"

_ID_NUMBERS = re.compile(r"(?:[0-9a-f]+|[0-9]+)-([0-9]+)")


def serve_module(log_dir: Path, env: dict[str, str] | None = None, **sse: Any) -> GunicornServer:
    """Serve the streaming test app under ``gunicorn -k gevent`` (one worker, the package's
    gunicorn config) for a whole module; keyword arguments are ``SSE_*`` settings. The
    caller stops the server."""
    full_env = {key: json.dumps(value) for key, value in sse.items()}
    full_env.update(env or {})
    server = GunicornFactory(log_dir)(APP, env=full_env, config=CONF)
    try:
        return answering(server, "/health")
    except BaseException:
        server.stop(timeout=10)
        raise


class _Replaying:
    """A socket whose first reads return bytes read from it before."""

    def __init__(self, sock: socket.socket, pending: bytes) -> None:
        self.sock = sock
        self.pending = pending

    def recv(self, size: int) -> bytes:
        if self.pending:
            out, self.pending = self.pending[:size], self.pending[size:]
            return out
        return self.sock.recv(size)

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()


#: Seconds between the pieces of a request sent in pieces.
PIECE_PAUSE = 0.05


def send_raw(
    port: int, wire: bytes, timeout: float, *, splits: Sequence[int] = (), skip: int = 0
) -> tuple[socket.socket, RawResponse]:
    """Send *wire* as is to ``127.0.0.1:port`` and read the final response's head within
    *timeout* seconds (interim ``1xx`` answers other than ``101`` are skipped). The caller
    closes the socket; it is closed here on error.

    :param splits: offsets at which *wire* is cut into pieces sent ``PIECE_PAUSE`` apart.
    :param skip: how many whole responses (with a ``Content-Length``) to read past first,
        the answers to requests pipelined before the one of interest.
    :raises TimeoutError: when no final head came in time.
    :raises StreamClosedError: when the connection closed before it.
    """
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((HOST, port), timeout=timeout)
    try:
        start = 0
        for cut in [*sorted(c for c in splits if 0 < c < len(wire)), len(wire)]:
            with contextlib.suppress(OSError):  # the server may answer (400) and close first
                sock.sendall(wire[start:cut])
            if cut < len(wire):
                time.sleep(PIECE_PAUSE)
            start = cut
        pending = b""
        for _ in range(10 + skip):  # a few interim answers at most
            left = max(deadline - time.monotonic(), 0.01)
            response = RawResponse(_Replaying(sock, pending), left)  # type: ignore[arg-type]
            if 100 <= response.status < 200 and response.status != 101:
                pending = response.raw_bytes.split(b"\r\n\r\n", 1)[1]
            elif skip > 0:
                skip -= 1
                response.read_to_end(left)
                head = response.raw_bytes.index(b"\r\n\r\n") + 4
                pending = response.raw_bytes[head + len(response.body) :]
            else:
                return sock, response
        raise TimeoutError(f"too many interim answers to {wire[:200]!r}")
    except BaseException:
        sock.close()
        raise


def close_abruptly(sock: socket.socket) -> None:
    """Close with a TCP reset (``SO_LINGER`` 0), as a crashed or killed client does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def stream_count(url: str) -> tuple[int, int]:
    """The answering worker's open streams and pid, from the stats endpoint."""
    stats = requests.get(url + "/stream/stats", timeout=5).json()
    return int(stats["streams"]), int(stats["pid"])


def wait_streams_closed(url: str, timeout: float) -> int:
    """Wait until the answering worker has no open stream; return the count last seen."""
    seen = [-1]

    def closed() -> bool:
        seen[0] = stream_count(url)[0]
        return seen[0] == 0

    wait_for(closed, timeout, interval=0.1)
    return seen[0]


def log_since(server: GunicornServer, offset: int) -> tuple[str, int]:
    """The server's log after byte *offset*, and the new offset."""
    data = server.log_path.read_bytes()
    return data[offset:].decode("utf-8", errors="replace"), len(data)


def id_key(event_id: str) -> tuple[int, int] | None:
    """The order of a bus-assigned id: ``<epoch>-<seq>`` (memory) or ``<ms>-<seq>``
    (Redis). Memory ids order by their sequence alone; ``None`` for another form."""
    match = _ID_NUMBERS.fullmatch(event_id)
    if match is None:
        return None
    head, _, seq = event_id.rpartition("-")
    if head.isdigit() and len(head) >= 10:  # Redis: milliseconds since the epoch
        return int(head), int(seq)
    return 0, int(seq)


@dataclass(frozen=True)
class Published:
    """One event as published: its id, channel, (unique, :func:`compact`) data, and its
    place in the bus's order (:func:`id_key` of its id, or given for a caller-given id)."""

    id: str
    channel: str
    data: str
    key: tuple[int, int]


class PublishLog:
    """Every event published to one server, in the bus's order; safe to add to from
    several threads."""

    def __init__(self) -> None:
        self._entries: list[Published] = []
        self._lock = threading.Lock()
        self._sorted = True

    def add(self, entry: Published) -> None:
        """Log *entry*."""
        with self._lock:
            if self._entries and entry.key < self._entries[-1].key:
                self._sorted = False
            self._entries.append(entry)

    def ordered(self) -> list[Published]:
        """The entries in bus order."""
        with self._lock:
            if not self._sorted:
                self._entries.sort(key=lambda entry: entry.key)
                self._sorted = True
            return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def publish_logged(
    url: str, log: PublishLog, data: str, channel: str, session: requests.Session | None = None
) -> Published:
    """Publish *data* to *channel* through the test app's ``/publish`` route (bus-assigned
    id) and log it."""
    post = (session or requests).post
    response = post(url + "/publish", json={"data": data, "channel": channel}, timeout=15)
    assert response.status_code == 200, response.text
    event_id = response.json()["id"]
    key = id_key(event_id)
    assert key is not None, f"not a bus-assigned id: {event_id!r}"
    entry = Published(event_id, channel, compact(data), key)
    log.add(entry)
    return entry


def compact(data: str) -> str:
    """*data*, or a digest of it when it is long: what the logs and checks keep of it."""
    if len(data) <= 1024:
        return data
    return "sha1:" + hashlib.sha1(data.encode("utf-8", "surrogatepass")).hexdigest()


def compacted(event: ParsedEvent) -> ParsedEvent:
    """*event* with its data :func:`compact`."""
    return dataclasses.replace(event, data=compact(event.data))


@dataclass
class Connection:
    """What one connection of a client asked for and received.

    :param channels: the channels it followed.
    :param last_event_id: the ``Last-Event-ID`` it sent, if any.
    :param events: the events it parsed, in order.
    :param ended: the comment that ended it (``"slow"``, ``"revoked"``...), if the server
        ended it.
    """

    channels: frozenset[str]
    last_event_id: str | None
    events: list[ParsedEvent] = field(default_factory=list)
    ended: str | None = None


def check_connection(conn: Connection, log: Sequence[Published], history: int) -> list[str]:
    """What is wrong with what *conn* received, given every event published (*log*, in
    bus order, complete up to the connection's end). Empty when nothing is.

    Without a ``Last-Event-ID`` the events must be a contiguous run of the log filtered to
    the connection's channels (it started at an unknown point). With one that names a
    position of the bus (an id it gave out, or a reset's head id), they must be exactly
    the filtered events after it, from the first on; or a reset first (``too-old``, and
    only when more than *history* events came after it). With an id the bus never gave
    out, a reset must come first. After a reset, they must be exactly the filtered events
    after the reset's id. A connection may stop anywhere.
    """
    mine = [entry for entry in log if entry.channel in conn.channels]
    mine_index = {entry.id: i for i, entry in enumerate(mine)}
    events = list(conn.events)
    problems: list[str] = []
    start: tuple[int, int] | None = None  # events must start right after this position
    if conn.last_event_id is not None:
        resume = position_of(conn.last_event_id, log)
        if events and events[0].type == RESET:
            reset = events.pop(0)
            notice = json.loads(reset.data)
            if resume is not None:
                after = sum(entry.key > resume for entry in log)
                if notice.get("reason") != "too-old" or after < history:
                    problems.append(
                        f"reset {notice} for a resumable id {conn.last_event_id!r} "
                        f"with {after} events after it (history {history})"
                    )
            elif notice.get("reason") not in ("unknown", "malformed"):
                problems.append(f"reset {notice} for an id never given out")
            start = position_of(reset.last_event_id, log)
            if start is None:
                problems.append(f"the reset names {reset.last_event_id!r}, not a bus position")
                return problems
        elif resume is None:
            head = events[0] if events else None
            problems.append(f"an id never given out got no reset (first event {head})")
            return problems
        else:
            start = resume
    resets = [e for e in events if e.type == RESET]
    if resets:
        problems.append(f"unexpected reset(s) in the stream: {resets}")
        return problems
    for event in events:
        if event.last_event_id not in mine_index:
            problems.append(f"event {event} was never published to {sorted(conn.channels)}")
            return problems
        expected = mine[mine_index[event.last_event_id]]
        if expected.data != event.data:
            problems.append(f"event {event} carries other data than published: {expected}")
            return problems
    if not events:
        return problems
    got = [event.last_event_id for event in events]
    first = mine_index[got[0]]
    if start is not None:
        wanted = next((i for i, entry in enumerate(mine) if entry.key > start), len(mine))
        if first != wanted:
            missed = [entry.id for entry in mine[wanted:first]]
            expected_id = mine[wanted].id if wanted < len(mine) else None
            problems.append(
                f"the first event is {got[0]!r}, not {expected_id!r} "
                f"(missed {missed[:10]}, {len(missed)} in all)"
            )
    expected_ids = [entry.id for entry in mine[first : first + len(got)]]
    if got != expected_ids:
        problems.append(_sequence_difference(got, expected_ids))
    return problems


def position_of(event_id: str, log: Sequence[Published]) -> tuple[int, int] | None:
    """The bus position *event_id* names: an id in *log*, or one of the bus's own form
    (of this process's epoch on the in-process bus), for example a reset's head that was
    not an event; ``None`` for an id the bus never gave out."""
    for entry in log:
        if entry.id == event_id:
            return entry.key
    key = id_key(event_id)
    if key is None or not log:
        return None
    if key[0] == 0 and event_id.rpartition("-")[0] != log[0].id.rpartition("-")[0]:
        return None  # another process's epoch
    return key


def _sequence_difference(got: list[str], expected: list[str]) -> str:
    """A short description of where *got* departs from *expected*."""
    for i, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            lost = [x for x in expected[i:] if x not in set(got)]
            repeated = sorted({x for x in got if got.count(x) > 1})
            return (
                f"event {i} is {a!r} where {b!r} was expected; lost {lost[:10]}, "
                f"repeated {repeated[:10]}"
            )
    return f"got {len(got)} events, expected {len(expected)}"


def receiver_clients(client: redis.Redis) -> list[dict[str, Any]]:
    """The Redis connections of the bus's receivers (named ``flask-sse-push:receive:*``)."""
    return [
        entry
        for entry in client.client_list()
        if str(entry.get("name", "")).startswith("flask-sse-push:receive:")
    ]


def kill_receivers(client: redis.Redis) -> int:
    """Cut every receiver's Redis connection (``CLIENT KILL ID``); return how many."""
    killed = 0
    for entry in receiver_clients(client):
        killed += int(client.client_kill_filter(_id=entry["id"]))
    return killed

"""A randomized schedule against the direct writes, every byte decoded strictly.

Readers with small receive buffers read in bursts with random pauses (some reset the
connection, one half-closes it, one resumes with ``Last-Event-ID`` while events go out),
while events of random sizes, from one byte to more than a socket buffer holds, are
published one after the other, from many greenlets at once and from OS threads. Each
reader's bytes must be valid chunked framing whose every chunk holds whole lines and whole
events, and its events must be exactly the published ones, in order, each once.

The schedule is seeded (``DIRECT_STRESS_SEED`` picks another) and bounded in time.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time

import requests
from support.app import serve, stats
from support.gunicorn import GunicornFactory
from support.http import ChunkedDecoder, is_chunked, parse_head
from support.procs import wait_for

SEED = int(os.environ.get("DIRECT_STRESS_SEED", "20261130"))
#: Seconds the publishing may last, and the bytes it may publish (the readers with the
#: smallest buffers take about 1 MB/s); the readers then drain what is left.
BUDGET = 10.0
BYTES = 6_000_000
SIZES = (1, 10, 100, 700, 5_000, 60_000, 300_000, 1_500_000)
WEIGHTS = (20, 20, 20, 15, 10, 8, 4, 1)
CHANNEL = "s"


def _key(event_id: str) -> tuple[int, int]:
    """Publishing order of an id: ``<epoch>-<seq>`` (memory) or ``<ms>-<seq>`` (Redis)."""
    first, _, second = event_id.rpartition("-")
    return (int(first) if first.isdigit() else 0, int(second))


class Reader(threading.Thread):
    """A raw stream client reading in random bursts, keeping every byte it receives."""

    def __init__(
        self,
        port: int,
        rng: random.Random,
        *,
        rcvbuf: int,
        last_event_id: str | None = None,
        reset_after: float | None = None,
        half_close: bool = False,
    ) -> None:
        super().__init__(daemon=True)
        self.rng = rng
        self.last_event_id = last_event_id
        self.reset_after = reset_after
        self.raw = bytearray()
        self.drain = threading.Event()
        self.marker = b""
        self.done = threading.Event()
        self.drain_deadline = float("inf")
        self.error: BaseException | None = None
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        resume = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
        self.sock.sendall(
            f"GET /stream?channel={CHANNEL} HTTP/1.1\r\nHost: x\r\n{resume}\r\n".encode()
        )
        if half_close:
            self.sock.shutdown(socket.SHUT_WR)

    def run(self) -> None:
        rng, sock = self.rng, self.sock
        started = time.monotonic()
        try:
            while True:
                draining = self.drain.is_set()
                if not draining:
                    time.sleep(rng.choice((0, 0, 0, 0.001, 0.01, 0.05, 0.2)))
                sock.settimeout(0.2)
                try:
                    data = sock.recv(rng.choice((1, 7, 100, 4096, 65536, 1 << 20)))
                except TimeoutError:
                    data = None
                if data == b"":
                    return
                if data:
                    self.raw += data
                    if draining and self.marker and self.marker in self.raw[-65536:]:
                        return
                if self.reset_after is not None and time.monotonic() - started > self.reset_after:
                    # Reset, not closed: the server's next write fails.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if draining and time.monotonic() > self.drain_deadline:
                    raise TimeoutError("the last event did not arrive")
        except BaseException as exc:
            self.error = exc
        finally:
            sock.close()
            self.done.set()


def _events(reader: Reader) -> list[tuple[str, int]]:
    """The reader's bytes, decoded strictly: ``(id, k)`` of each event, in order."""
    head, sep, body = bytes(reader.raw).partition(b"\r\n\r\n")
    assert sep, reader.raw[:200]
    version, status, _, headers = parse_head(head)
    assert (version, status) == ("HTTP/1.1", 200), head
    assert is_chunked(headers), head
    decoder = ChunkedDecoder()
    payload = decoder.feed(body)  # raises on any framing error
    if reader.reset_after is None:
        # The last event's chunk is whole (what came after it, keep-alives, may be cut).
        assert body.count(reader.marker) == 1, body[-200:]
        decoder = ChunkedDecoder()
        payload = decoder.feed(body[: body.index(reader.marker) + len(reader.marker)])
        assert decoder._left == 0 and not decoder._crlf and not decoder._partial
    sizes = decoder.chunk_sizes or []
    # Every chunk holds whole lines; one that holds event lines holds whole events.
    position = 0
    for size in sizes:
        piece = payload[position : position + size]
        position += size
        if not size or position > len(payload):
            break
        assert piece.endswith(b"\n"), (size, piece[:60], piece[-60:])
        assert piece.startswith((b"id: ", b":", b"retry: ")), piece[:60]
        if piece.startswith(b"id: "):
            assert piece.endswith(b"\n\n"), (size, piece[:60], piece[-60:])
    events: list[tuple[str, int]] = []
    complete = payload[: payload.rfind(b"\n\n") + 2]
    for block in complete.split(b"\n\n")[:-1]:
        fields = [line for line in block.split(b"\n") if line and not line.startswith(b":")]
        if fields and fields[0].startswith(b"retry: "):
            fields = fields[1:]
        if not fields:
            continue
        assert len(fields) == 2, block[:200]
        assert fields[0].startswith(b"id: ") and fields[1].startswith(b"data: "), block[:200]
        k, size, xs = fields[1][6:].split(b":", 2)
        assert xs == b"x" * int(size), (k, size, len(xs))
        events.append((fields[0][4:].decode(), int(k)))
    assert b": slow" not in payload and b": closed" not in payload
    return events


def _publish(url: str, first: int, sizes: list[int], how: str) -> list[tuple[int, str]]:
    reply = requests.post(
        url + "/publish-sizes",
        json={"first": first, "sizes": sizes, "channel": CHANNEL, "how": how},
        timeout=60,
    )
    reply.raise_for_status()
    return [(k, event_id) for k, event_id in reply.json()["ids"]]


def test_a_random_schedule_keeps_every_byte_exact(gunicorn: GunicornFactory, bus_url: str) -> None:
    rng = random.Random(SEED + (1 if bus_url.startswith("redis") else 0))
    server = serve(
        gunicorn,
        SSE_BUS_URL=bus_url,
        SSE_KEEPALIVE=0.05,
        SSE_QUEUE_SIZE=100_000,
        SSE_HISTORY_SIZE=100_000,
    )
    readers = [
        Reader(server.port, random.Random(rng.random()), rcvbuf=rcvbuf)
        # Not below 4096: with 2048 (4 KB once doubled) and a window scaled by 1024, this
        # schedule can stall the connection for good in the kernel (the server's send queue
        # full, the reader's empty, the server probing the window), on the ordinary path as
        # well as the direct one.
        for rcvbuf in (4096, 8192, 65536, 1 << 20)
    ]
    readers.append(Reader(server.port, random.Random(rng.random()), rcvbuf=4096, half_close=True))
    readers += [
        Reader(server.port, random.Random(rng.random()), rcvbuf=4096, reset_after=after)
        for after in (rng.uniform(0.5, 4), rng.uniform(2, 8))
    ]
    late: list[Reader] = []
    published: list[tuple[int, str]] = []
    try:
        assert wait_for(lambda: stats(server.url)["direct"] == len(readers), 10), stats(server.url)
        for reader in readers:
            reader.start()
        started = time.monotonic()
        direct_seen = 0
        total = 0
        while time.monotonic() - started < BUDGET and total < BYTES:
            sizes = rng.choices(SIZES, WEIGHTS, k=rng.randint(1, 40))
            total += sum(sizes)
            how = rng.choice(("loop", "loop", "greenlets", "threads"))
            published += _publish(server.url, len(published), sizes, how)
            direct_seen = max(direct_seen, stats(server.url)["direct"])
            if not late and len(published) > 50:
                # Resumes from an event already published, while others go out.
                resume_from = published[rng.randrange(len(published))][1]
                late.append(
                    Reader(
                        server.port,
                        random.Random(rng.random()),
                        rcvbuf=4096,
                        last_event_id=resume_from,
                    )
                )
                late[0].start()
            time.sleep(rng.choice((0, 0, 0.01, 0.1, 0.3)))
        published += _publish(server.url, len(published), [3], "loop")
        marker = f"data: {len(published) - 1}:3:xxx\n\n\r\n".encode()
        for reader in readers + late:
            reader.marker = marker
            reader.drain_deadline = time.monotonic() + 30
            reader.drain.set()
        for reader in readers + late:
            assert reader.done.wait(40)
        assert direct_seen > 0
        totals = stats(server.url)["totals"]
    finally:
        for reader in readers + late:
            reader.drain.set()
            reader.sock.close()
    order = sorted(published, key=lambda pair: _key(pair[1]))
    every = [(event_id, k) for k, event_id in order]
    assert totals["dropped"] == 0, totals
    for reader in readers + late:
        assert reader.error is None, reader.error
        got = _events(reader)
        if reader.last_event_id is not None:
            expected = every[[e for e, _ in every].index(reader.last_event_id) + 1 :]
        else:
            expected = every
        if reader.reset_after is not None:
            expected = expected[: len(got)]
        assert got == expected, _difference(got, expected)


def _difference(got: list[tuple[str, int]], expected: list[tuple[str, int]]) -> str:
    for index, (one, other) in enumerate(zip(got, expected, strict=False)):
        if one != other:
            return f"event {index}: got {one}, expected {other}"
    return f"{len(got)} events, expected {len(expected)}"

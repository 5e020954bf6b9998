"""The benchmark's client process: N SSE connections in ONE epoll loop over raw sockets.

Started by ``broadcast.py``, driven by JSON lines on stdin, answering JSON lines on stdout:

- ``{"cmd": "connect", "port": P, "path": "/stream?channel=bench", "n": N, "timeout": S}``
  opens N more connections (at most ``inflight`` connects pending at a time) and answers once
  every connection has received its response headers and its first body bytes (the
  ``retry:`` hint the servers start with), or failed, or *timeout* passed. Options:
  ``"source": "127.0.0.2"`` binds the connections to that local address (each source
  address has its own ephemeral ports); a ``{i}`` in the path is replaced by the
  connection's number, counted from ``"first"`` (default 0), e.g.
  ``/stream?channel=user-{i}``; ``"ready": "sent"`` counts a connection as ready once its
  request is written, for servers that send nothing before the first event (flask-sse).
- ``{"cmd": "mark"}`` starts the measuring window (counters, latencies, client CPU).
- ``{"cmd": "drain", "expected": K, "quiet": Q, "timeout": S}`` answers, with the figures
  of the window, once every open connection has received K events, or nothing arrived
  for Q seconds, or S seconds passed; with ``"hist": true`` the answer also holds the
  latencies as a histogram, which the orchestrator merges over several client processes.
- ``{"cmd": "per_port"}`` answers ``{"received": {"<local port>": K, ...}}``: the events each
  ready connection received in the window, by its local port (the orchestrator maps the
  ports to the server's workers).
- ``{"cmd": "close"}`` closes every connection and exits.

Per connection it decodes HTTP/1.1 chunked encoding with the tests' decoder
(``support.http.ChunkedDecoder``, through ``benchutil``) or reads a plain body, splits the event
stream on blank lines (LF line ends, as both servers write), parses the ``data:`` JSON and
records receive time minus the embedded publish time ``t`` (both ``time.time()`` on the same
host). It notes gaps and repeats in the event numbers ``n``, comments (``: slow`` etc.) and
streams that end.
"""

from __future__ import annotations

import contextlib
import errno
import json
import json.scanner
import math
import os
import select
import socket
import sys
import time
from array import array
from collections import Counter
from typing import Any

from benchutil import HOST, ChunkedDecoder, encode_chunk, is_chunked, parse_head, raise_nofile_limit

#: Below glibc's mmap threshold (128 KiB): a bigger recv buffer costs mmap+mremap+munmap per call.
_RECV = 65536
#: json's C scanner (the stub types its argument wrongly).
_scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
#: Linux's IP_BIND_ADDRESS_NO_PORT (not in the socket module).
_IP_BIND_ADDRESS_NO_PORT = 24


class Conn:
    """One SSE connection's socket and parser state."""

    __slots__ = (
        "comments",
        "connected_at",
        "decoder",
        "dups",
        "ended",
        "gaps",
        "head",
        "headers_done",
        "last_n",
        "lport",
        "ready_at",
        "received",
        "request",
        "sock",
        "sse",
        "started",
        "status",
    )

    def __init__(self, sock: socket.socket, started: float) -> None:
        self.sock = sock
        self.started = started
        self.connected_at = 0.0
        self.ready_at = 0.0
        #: The local port, which tells the server's worker holding the other end.
        self.lport = 0
        #: The request to send once connected.
        self.request = b""
        self.head = b""
        self.headers_done = False
        self.status = 0
        #: Set once the headers announce a chunked body.
        self.decoder: ChunkedDecoder | None = None
        self.sse = b""
        self.received = 0
        self.last_n = -1
        self.gaps = 0
        self.dups = 0
        self.ended: str | None = None
        self.comments: Counter[str] | None = None


class Client:
    """The epoll loop, the connections and the figures."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        #: Open connections by file descriptor.
        self.conns: dict[int, Conn] = {}
        #: Connections that were ready and have ended since (their figures still count).
        self.closed: list[Conn] = []
        self.pending: list[socket.socket] = []
        self.port = 0
        self.path = ""
        self.source = ""
        self.first = 0
        self.ready_on_sent = False
        self.to_open = 0
        self.inflight = 0
        self.max_inflight = 256
        self.connect_errors: Counter[str] = Counter()
        self.failed = 0
        self.latencies = array("d")
        self.received = 0
        self.bytes = 0
        self.recvs = 0
        self.last_data = time.monotonic()
        self.bad_json = 0
        self.goal: dict[str, Any] | None = None
        self.goal_started = 0.0
        self.goal_hist = False
        self.mark_wall = time.monotonic()
        self.mark_cpu = time.process_time()
        self.mark_times = os.times()
        self.stdin_buf = b""
        self.running = True

    # -- commands -------------------------------------------------------------------------

    def reply(self, obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def command(self, cmd: dict[str, Any]) -> None:
        name = cmd.get("cmd")
        if name == "connect":
            self.port = int(cmd["port"])
            self.path = str(cmd["path"])
            self.source = str(cmd.get("source", ""))
            self.first = int(cmd.get("first", 0))
            self.ready_on_sent = cmd.get("ready") == "sent"
            self.to_open = int(cmd["n"])
            self.max_inflight = int(cmd.get("inflight", 256))
            self.set_goal(cmd)
            self.open_more()
        elif name == "mark":
            self.received = 0
            self.bytes = 0
            self.recvs = 0
            self.latencies = array("d")
            self.bad_json = 0
            for conn in self.everyone():
                conn.received = 0
                conn.gaps = 0
                conn.dups = 0
            self.mark_wall = time.monotonic()
            self.mark_cpu = time.process_time()
            self.mark_times = os.times()
            self.reply({"ok": True})
        elif name == "drain":
            self.set_goal(cmd)
        elif name == "per_port":
            # Events received in the window by each ready connection, by its local port.
            counts = {str(c.lport): c.received for c in self.everyone() if c.ready_at}
            self.reply({"ok": True, "received": counts})
        elif name == "close":
            for conn in list(self.conns.values()):
                self.drop(conn, None)
            self.reply({"ok": True, "closed": True})
            self.running = False
        else:
            self.reply({"ok": False, "error": f"unknown command {name!r}"})

    def everyone(self) -> list[Conn]:
        """Open connections plus the ready ones that have ended."""
        return [*self.conns.values(), *self.closed]

    def set_goal(self, cmd: dict[str, Any]) -> None:
        self.goal = cmd
        self.goal_hist = bool(cmd.get("hist"))
        self.goal_started = time.monotonic()
        self.check_goal(self.goal_started)

    def check_goal(self, now: float) -> None:
        goal = self.goal
        if goal is None:
            return
        timed_out = now - self.goal_started > float(goal.get("timeout", 30))
        if goal["cmd"] == "connect":
            ready = sum(1 for c in self.everyone() if c.ready_at)
            done = self.to_open == 0 and self.inflight == 0 and not self.pending
            if (done and ready + self.failed >= int(goal["n"])) or timed_out:
                self.goal = None
                self.reply(self.connect_report(now, timed_out))
        elif goal["cmd"] == "drain":
            expected = int(goal["expected"])
            live = [c for c in self.conns.values() if c.ended is None]
            quiet = now - self.last_data > float(goal.get("quiet", 2.0))
            complete = all(c.received >= expected for c in live)
            if (complete and live) or quiet or timed_out:
                self.goal = None
                self.reply(self.drain_report(now, expected, complete, quiet, timed_out))

    def connect_report(self, now: float, timed_out: bool) -> dict[str, Any]:
        conns = self.everyone()
        times = sorted(c.ready_at - c.started for c in conns if c.ready_at)
        return {
            "ok": not timed_out,
            "connected": sum(1 for c in conns if c.ready_at and c.ended is None),
            "failed": self.failed,
            "not_ready": sum(1 for c in conns if not c.ready_at),
            "ended": sum(1 for c in conns if c.ended),
            "seconds": now - self.goal_started,
            "ready_p50_ms": _quantile(times, 0.5) * 1000,
            "ready_p99_ms": _quantile(times, 0.99) * 1000,
            "ready_max_ms": (times[-1] if times else 0.0) * 1000,
            "statuses": dict(Counter(str(c.status) for c in conns)),
            "errors": dict(self.connect_errors),
            "timed_out": timed_out,
        }

    def drain_report(
        self, now: float, expected: int, complete: bool, quiet: bool, timed_out: bool
    ) -> dict[str, Any]:
        conns = self.everyone()
        lat = sorted(self.latencies)
        counts = [c.received for c in conns]
        comments: Counter[str] = Counter()
        for c in conns:
            if c.comments:
                comments.update(c.comments)
        wall = now - self.mark_wall
        cpu = time.process_time() - self.mark_cpu
        times = os.times()
        return {
            "ok": True,
            "received": self.received,
            "connections": len(conns),
            "expected_per_connection": expected,
            "complete": complete,
            "stopped_by": "complete" if complete else ("quiet" if quiet else "timeout"),
            "min_per_connection": min(counts) if counts else 0,
            "max_per_connection": max(counts) if counts else 0,
            "short_connections": sum(1 for n in counts if n < expected),
            "gaps": sum(c.gaps for c in conns),
            "duplicates": sum(c.dups for c in conns),
            "ended": dict(Counter(c.ended for c in conns if c.ended)),
            "comments": dict(comments),
            "bad_json": self.bad_json,
            "latency_p50_ms": _quantile(lat, 0.5) * 1000,
            "latency_p99_ms": _quantile(lat, 0.99) * 1000,
            "latency_max_ms": (lat[-1] if lat else 0.0) * 1000,
            "latency_mean_ms": (sum(lat) / len(lat) if lat else 0.0) * 1000,
            # To merge the latencies of several client processes (see latency_histogram).
            "latency_hist": latency_histogram(lat) if self.goal_hist else {},
            "recv_calls": self.recvs,
            "bytes": self.bytes,
            "client_cpu_s": cpu,
            "client_user_s": times.user - self.mark_times.user,
            "client_system_s": times.system - self.mark_times.system,
            "client_wall_s": wall,
            "client_cpu_util": cpu / wall if wall > 0 else 0.0,
        }

    # -- sockets --------------------------------------------------------------------------

    def open_more(self) -> None:
        now = time.monotonic()
        while self.to_open and self.inflight < self.max_inflight:
            self.to_open -= 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            if self.source:
                # Pick the port at connect time, per destination, not at bind time.
                sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.source, 0))
            err = sock.connect_ex((HOST, self.port))
            if err not in (0, errno.EINPROGRESS):
                self.connect_errors[errno.errorcode.get(err, str(err))] += 1
                self.failed += 1
                sock.close()
                continue
            conn = Conn(sock, now)
            conn.request = self.request_for(self.first)
            self.first += 1
            self.conns[sock.fileno()] = conn
            self.inflight += 1
            self.ep.register(sock.fileno(), _EPOLLOUT)

    def drop(self, conn: Conn, reason: str | None) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(fd)
        self.conns.pop(fd, None)
        conn.sock.close()
        if reason is not None:
            conn.ended = conn.ended or reason
            self.closed.append(conn)

    def writable(self, conn: Conn) -> None:
        sock = conn.sock
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.connect_errors[errno.errorcode.get(err, str(err))] += 1
            self.failed += 1
            self.inflight -= 1
            self.ep.unregister(sock.fileno())
            self.conns.pop(sock.fileno(), None)
            sock.close()
            self.open_more()
            return
        conn.connected_at = time.monotonic()
        with contextlib.suppress(OSError):
            conn.lport = sock.getsockname()[1]
        try:
            sock.sendall(conn.request)  # tiny; fits the empty send buffer
        except OSError as exc:
            self.lost_conn(conn, f"error:{errno.errorcode.get(exc.errno or 0, exc.errno)}")
            return
        conn.request = b""
        self.ep.modify(sock.fileno(), _EPOLLIN)
        if self.ready_on_sent:
            self.now_ready(conn)

    def request_for(self, index: int) -> bytes:
        """The request of connection number *index*."""
        return (
            f"GET {self.path.replace('{i}', str(index))} HTTP/1.1\r\n"
            f"Host: {HOST}:{self.port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
        ).encode()

    def now_ready(self, conn: Conn) -> None:
        """The stream is open: let another connect start."""
        conn.ready_at = time.monotonic()
        self.inflight -= 1
        self.open_more()

    def readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(_RECV)
        except BlockingIOError:
            return
        except OSError as exc:
            self.lost_conn(conn, f"error:{errno.errorcode.get(exc.errno or 0, exc.errno)}")
            return
        if not data:
            self.lost_conn(conn, "eof")
            return
        now = time.time()
        self.recvs += 1
        self.bytes += len(data)
        if not conn.headers_done:
            data = self.read_headers(conn, data)
            if not data:
                return
        if conn.decoder is not None:
            data = conn.decoder.feed(data)
            if conn.decoder.done:
                conn.ended = conn.ended or "last-chunk"
        if not conn.ready_at and data:
            # The first body bytes (``retry: ...``): the stream is open.
            self.now_ready(conn)
        self.parse(conn, data, now)
        if conn.ended:
            self.lost_conn(conn, conn.ended)

    def lost_conn(self, conn: Conn, reason: str) -> None:
        if conn.sse:
            # Lines after the last blank line (e.g. the ": slow" the server ends with).
            self.comments(conn, conn.sse)
            conn.sse = b""
        if not conn.ready_at:
            self.inflight -= 1
            self.connect_errors[f"before-ready:{reason}"] += 1
            self.failed += 1
            self.drop(conn, None)
            self.open_more()
            return
        self.drop(conn, reason)

    def read_headers(self, conn: Conn, data: bytes) -> bytes:
        conn.head += data
        end = conn.head.find(b"\r\n\r\n")
        if end < 0:
            return b""
        _, conn.status, _, headers = parse_head(conn.head[:end])
        rest = conn.head[end + 4 :]
        conn.head = b""
        conn.headers_done = True
        if is_chunked(headers):
            # Without the sizes: they would pile up for as long as the stream lasts.
            conn.decoder = ChunkedDecoder(record_sizes=False)
        return rest

    def parse(self, conn: Conn, data: bytes, now: float) -> None:
        buf = conn.sse + data if conn.sse else data
        if not buf.endswith(b"\n\n"):
            if b"\n\n" not in buf:
                conn.sse = buf
                return
            blocks = buf.split(b"\n\n")
            conn.sse = blocks.pop()
        else:
            conn.sse = b""
            blocks = buf.split(b"\n\n")
            blocks.pop()
        lat = self.latencies
        for block in blocks:
            if not block:
                continue
            if block[:1] == b":" or b"\n:" in block:
                self.comments(conn, block)
            start = block.find(b"data:")
            if start >= 0 and (start == 0 or block[start - 1] == 10):
                stop = block.find(b"\n", start)
                # One optional space after the colon (flask-sse writes none).
                value = start + (6 if block[start + 5 : start + 6] == b" " else 5)
                try:
                    # json's own C scanner: the JSON parser minus loads()'s wrapping.
                    obj = _scan(block[value : stop if stop >= 0 else None].decode(), 0)[0]
                    t = obj["t"]
                    n = obj["n"]
                except (ValueError, KeyError, TypeError, IndexError, StopIteration):
                    self.bad_json += 1
                    continue
                lat.append(now - t)
                conn.received += 1
                self.received += 1
                last = conn.last_n
                if n == last + 1:
                    conn.last_n = n
                elif n <= last:
                    conn.dups += 1
                else:
                    conn.gaps += n - last - 1
                    conn.last_n = n

    @staticmethod
    def comments(conn: Conn, block: bytes) -> None:
        """Count the comment lines of *block* other than bare keep-alives (``:``)."""
        for line in block.split(b"\n"):
            if line[:1] == b":" and line != b":":
                if conn.comments is None:
                    conn.comments = Counter()
                conn.comments[line.decode("utf-8", "replace")[:80]] += 1

    # -- loop -----------------------------------------------------------------------------

    def stdin_ready(self) -> None:
        data = os.read(0, 65536)
        if not data:
            self.running = False
            return
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            if line.strip():
                self.command(json.loads(line))

    def run(self) -> None:
        self.ep.register(0, _EPOLLIN)
        conns = self.conns
        readable = self.readable
        poll = self.ep.poll
        next_check = 0.0
        while self.running:
            had_data = False
            for fd, _mask in poll(0.02):
                if fd == 0:
                    self.stdin_ready()
                    continue
                conn = conns.get(fd)
                if conn is None:
                    continue
                if conn.connected_at:
                    had_data = True
                    readable(conn)
                else:
                    self.writable(conn)
            now = time.monotonic()
            if had_data:
                self.last_data = now
            # The goals look at every connection: at most every 20 ms, not every wake-up.
            if self.goal is not None and now >= next_check:
                next_check = now + 0.02
                self.check_goal(now)


#: Histogram buckets grow by this factor: quantiles merged from buckets are within 1%.
HIST_BASE = 1.02


def latency_histogram(latencies: list[float]) -> dict[str, int]:
    """Latencies (seconds) counted in buckets ``round(log(µs, HIST_BASE))`` (as text keys);
    at most 1 µs goes to bucket 0."""
    counts: Counter[str] = Counter()
    scale = 1 / math.log(HIST_BASE)
    for value in latencies:
        us = value * 1e6
        counts[str(round(math.log(us) * scale)) if us > 1 else "0"] += 1
    return dict(counts)


def histogram_quantile(counts: dict[str, int], q: float) -> float:
    """The *q* quantile (ms) of merged :func:`latency_histogram` counts (0.0 when empty)."""
    buckets = sorted((int(key), n) for key, n in counts.items())
    total = sum(n for _, n in buckets)
    if not total:
        return 0.0
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket, n in buckets:
        seen += n
        if seen >= rank:
            return float(HIST_BASE**bucket / 1000 if bucket else 0.0)
    return float(HIST_BASE ** buckets[-1][0] / 1000)


def _quantile(values: list[float] | array[float], q: float) -> float:
    """Nearest-rank quantile of sorted *values* (0.0 when empty)."""
    if not values:
        return 0.0
    index = min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))
    return float(values[index])


def self_test(rounds: int = 200) -> int:
    """Check the parser on a stream cut at random places (``--self-test``; pytest runs it).

    Prints the random seed and, for a failing cut, every figure that differs from the
    expected one with the pieces' sizes, so that a failure can be replayed.
    """
    import random

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    blocks = []
    for n in range(300):
        body = b'id: e-%d\ndata: {"n": %d, "t": %r}\n\n' % (n, n, time.time())
        if n % 7 == 0:
            body = b":\n" + body  # a keep-alive line joins the next block
        if n % 11 == 0:
            body += body  # two events in one chunk; the second is a repeat
        blocks.append(encode_chunk(body))
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + encode_chunk(b"retry: 3000\n")
    wire = head + b"".join(blocks) + encode_chunk(b": slow\n") + b"0\r\n\r\n"
    expected = {
        "received": 328,
        "dups": 28,
        "gaps": 0,
        "last_n": 299,
        "ready": True,
        "ended": "last-chunk",
        "comments": {": slow": 1},
    }

    class Replay:
        def __init__(self, pieces: list[bytes]) -> None:
            self.pieces = iter(pieces)

        def recv(self, size: int) -> bytes:
            return next(self.pieces, b"")

        def fileno(self) -> int:
            return -1

        def close(self) -> None:
            pass

    for _ in range(rounds):
        pieces, pos = [], 0
        while pos < len(wire):
            step = rng.choice([1, 2, 3, 5, 17, 64, 200, 1000, 5000])
            pieces.append(wire[pos : pos + step])
            pos += step
        client = Client()
        conn = Conn(Replay(pieces), 0.0)  # type: ignore[arg-type]
        conn.connected_at = 1.0
        client.inflight = 1
        for _ in range(len(pieces) + 1):
            if conn.ended:
                break
            client.readable(conn)
        client.ep.close()
        got = {
            "received": conn.received,
            "dups": conn.dups,
            "gaps": conn.gaps,
            "last_n": conn.last_n,
            "ready": bool(conn.ready_at),
            "ended": conn.ended,
            "comments": dict(conn.comments or {}),
        }
        wrong = {key: (got[key], want) for key, want in expected.items() if got[key] != want}
        if wrong:
            sizes = [len(piece) for piece in pieces]
            print(f"self-test FAILED (seed {seed}): got, expected: {wrong}", file=sys.stderr)
            print(f"pieces: {sizes}", file=sys.stderr)
            return 1
    print(f"self-test passed (seed {seed}, {rounds} cuts)", file=sys.stderr)
    return 0


def main() -> int:
    if "--self-test" in sys.argv[1:]:
        return self_test()
    raise_nofile_limit()
    client = Client()
    try:
        client.run()
    except KeyboardInterrupt:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Baseline: a bare gevent socket broadcaster (no WSGI, no framework).

``python benchmarks/bare.py --port PORT`` serves on 127.0.0.1:

- ``GET /stream?channel=C``: answers minimal SSE response headers and the same first block
  as flask-sse-push (``retry: 3000``), keeps the socket in the channel's list (a dict lookup
  per channel), and parks the connection's greenlet on ``recv`` to notice when the client
  goes away (as a real server has to).
- ``POST /bench/start?rate=R&duration=D[&targets=K]``: a publisher greenlet encodes each
  event ONCE (``id: <epoch>-<n>`` and ``data: {"n": .., "t": ..}``, the same shape as the
  extension's) and does one ``sendall`` per client of the channel ``bench`` (with
  ``targets``: of the channel ``user-<n mod K>``), R times a second for D seconds; then the
  answer is ``{"published": ..., "elapsed_s": ..., "max_lag_ms": ..., "call_cpu_us": ...}``
  (``call_cpu_us``: the CPU of one publish call, encoding included; with ``targets`` the
  publishing greenlet's own, see ``benchutil.own_cpu``).
- ``GET /bench/ping``: ``{"pid": ...}``; ``GET /bench/modules``: the loaded module names.

The stream uses HTTP/1.1 chunked encoding like gunicorn does, so both servers put the same
bytes on the wire per event; each event is one chunk. The listening socket gets
``TCP_NODELAY`` as gunicorn's does.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
from typing import Any
from urllib.parse import parse_qs

import gevent
from benchutil import (
    HOST,
    bench_args,
    encode_chunk,
    encode_data,
    event_data,
    raise_nofile_limit,
    run_schedule,
    target_channel,
)
from gevent import socket
from gevent.server import StreamServer

_MAX_HEAD = 65536
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)


def read_head(sock: socket.socket) -> bytes | None:
    """Read an HTTP request head; ``None`` when the client left or sent too much."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(4096)
        if not data or len(buf) > _MAX_HEAD:
            return None
        buf += data
    return buf.split(b"\r\n\r\n", 1)[0]


def respond(sock: socket.socket, status: str, body: bytes, content_type: str) -> None:
    """Send a complete response and let the handler close the connection."""
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode("latin-1") + body)


class Broadcaster:
    """The stream sockets by channel, and the publisher."""

    def __init__(self) -> None:
        self.channels: dict[str, dict[socket.socket, None]] = {}
        self.epoch = secrets.token_hex(4).encode()
        self.seq = 0

    def publish(self, n: int, channel: str) -> None:
        """Encode event *n* once and ``sendall`` it to every client of *channel*."""
        self.seq += 1
        body = b"id: %s-%d\ndata: %s\n\n" % (self.epoch, self.seq, encode_data(event_data(n)))
        frame = encode_chunk(body)
        clients = self.channels.get(channel)
        if not clients:
            return
        dead: list[socket.socket] = []
        for sock in list(clients):
            try:
                sock.sendall(frame)
            except OSError:
                dead.append(sock)
        for sock in dead:
            clients.pop(sock, None)

    def handle(self, sock: socket.socket, address: Any) -> None:
        """Serve one connection (StreamServer closes the socket when this returns)."""
        try:
            head = read_head(sock)
        except OSError:
            return
        if head is None:
            return
        try:
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        except ValueError:
            return
        path, _, query = target.partition("?")
        try:
            if method == "GET" and path == "/stream":
                self.stream(sock, parse_qs(query).get("channel", ["bench"])[0])
            elif method == "POST" and path == "/bench/start":
                self.start(sock, parse_qs(query))
            elif path == "/bench/ping":
                body = json.dumps({"pid": os.getpid()}).encode()
                respond(sock, "200 OK", body, "application/json")
            elif path == "/bench/modules":
                body = json.dumps(sorted(sys.modules)).encode()
                respond(sock, "200 OK", body, "application/json")
            else:
                respond(sock, "404 Not Found", b"not found\n", "text/plain")
        except OSError:
            pass

    def stream(self, sock: socket.socket, channel: str) -> None:
        """Start the event stream and hold the connection until the client goes away."""
        sock.sendall(_SSE_HEAD + encode_chunk(b"retry: 3000\n\n"))
        clients = self.channels.setdefault(channel, {})
        clients[sock] = None
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
        finally:
            clients.pop(sock, None)

    def start(self, sock: socket.socket, args: dict[str, list[str]]) -> None:
        """Run the publisher at the requested rate and answer with its figures."""
        try:
            rate, duration, targets = bench_args(args)
        except ValueError as exc:
            respond(sock, "400 Bad Request", f"{exc}\n".encode(), "text/plain")
            return

        def publish(n: int) -> None:
            self.publish(n, target_channel(n, targets))

        greenlet = gevent.spawn(run_schedule, rate, duration, publish, targets > 0)
        result = greenlet.get(timeout=duration * 3 + 60)
        body = json.dumps({**result, "pid": os.getpid()}).encode()
        respond(sock, "200 OK", body, "application/json")

    def close_all(self) -> None:
        """Close every stream (at shutdown)."""
        for clients in self.channels.values():
            for sock in list(clients):
                sock.close()
        self.channels.clear()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=2048, help="as gunicorn's default")
    args = parser.parse_args(argv)
    raise_nofile_limit()

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind((HOST, args.port))
    listener.listen(args.backlog)

    broadcaster = Broadcaster()
    server = StreamServer(listener, broadcaster.handle)

    def stop() -> None:
        broadcaster.close_all()
        server.stop(timeout=2)

    gevent.signal_handler(signal.SIGTERM, stop)
    gevent.signal_handler(signal.SIGINT, stop)
    print(f"bare: serving on {HOST}:{args.port} pid {os.getpid()}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

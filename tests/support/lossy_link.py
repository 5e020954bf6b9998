"""A user-space link emulator: a TCP proxy that adds latency and TCP-like loss to every
connection through it (this kernel has no ``netem``).

``python -m support.lossy_link LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT [SEED]``
    Accepts connections on LISTEN_HOST:LISTEN_PORT (port 0: any free one) and joins each to
    TARGET_HOST:TARGET_PORT. It answers ``{"started": port}`` on stdout, then takes JSON
    lines on stdin: ``{"cmd": "set", "delay": 0.05, ...}`` changes the settings (answers
    them), ``{"cmd": "cut"}`` resets every open connection (answers how many),
    ``{"cmd": "stats"}`` answers the counts, ``{"cmd": "stop"}`` (or the end of stdin)
    answers the counts and ends. It ends by itself after :data:`LIFETIME` seconds.

What the link does to each direction of each connection, as a network would:

- every chunk read (a segment, as TCP hands it over) is written ``delay`` seconds later,
  plus a uniform jitter of up to ``jitter`` either way;
- with probability ``stall_probability`` a segment is "lost": it arrives ``stall`` seconds
  late (TCP's retransmission timeout, 200 ms at least on Linux), and nothing after it in
  that direction passes before it (TCP delivers in order);
- with probability ``cut_probability`` a segment breaks the connection instead (both ends
  get a reset, as when a middlebox drops its state).

Bytes are never reordered or changed, and jitter never reorders them: a segment leaves no
earlier than the one before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import random
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LIFETIME", "Link", "LinkSettings"]

#: Seconds after which the process ends by itself, whatever a test did.
LIFETIME = 900.0
_CHUNK = 65536
_MAX_SEGMENTS = 100_000_000


@dataclass(frozen=True)
class LinkSettings:
    """What the link does; see the module's docstring. Times in seconds."""

    delay: float = 0.0
    jitter: float = 0.0
    stall_probability: float = 0.0
    stall: float = 0.2
    cut_probability: float = 0.0

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if not 0 <= value <= (1 if name.endswith("probability") else 60):
                raise ValueError(f"{name} = {value!r} is out of range")
        if self.jitter > self.delay:
            raise ValueError("jitter must not exceed delay (no negative delays)")


@dataclass
class _Stats:
    connections: int = 0
    segments: int = 0
    bytes: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    stalls: int = 0
    cuts: int = 0


class _Connection:
    """One proxied connection: a reader and a writer thread per direction."""

    def __init__(self, link: Link, client: socket.socket, server: socket.socket) -> None:
        self.link = link
        self.sockets = (client, server)
        self.closed = threading.Event()
        for name, src, dst in (("up", client, server), ("down", server, client)):
            pending: queue.Queue[tuple[float, bytes | None]] = queue.Queue()
            threading.Thread(target=self._read, args=(name, src, pending), daemon=True).start()
            threading.Thread(target=self._write, args=(dst, pending), daemon=True).start()

    def _read(self, name: str, src: socket.socket, pending: queue.Queue[Any]) -> None:
        last_due = 0.0
        for _ in range(_MAX_SEGMENTS):
            try:
                data = src.recv(_CHUNK)
            except OSError:
                data = b""
            now = time.monotonic()
            if not data:
                pending.put((max(now, last_due), None))
                return
            due, cut = self.link.schedule(name, len(data), now)
            if cut:
                self.cut()
                pending.put((now, None))  # lets the writer end
                return
            last_due = max(due, last_due)
            pending.put((last_due, data))

    def _write(self, dst: socket.socket, pending: queue.Queue[Any]) -> None:
        for _ in range(_MAX_SEGMENTS):
            due, data = pending.get()
            if self.closed.wait(max(0.0, due - time.monotonic())):
                return
            try:
                if data is None:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                self.cut()
                return

    def cut(self) -> None:
        """Reset both ends (``SO_LINGER`` 0: the peers get a reset, not an end of file)."""
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)  # wakes this side's reader; sends nothing
            sock.close()


class Link:
    """The proxy: listens on *listen*, joins every connection to *target*.

    :param listen: host and port (port 0: a free one; :attr:`port` says which).
    :param target: where connections go.
    :param seed: seed of the link's randomness, for a repeatable run.
    """

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], seed: int = 0) -> None:
        self.target = target
        self.settings = LinkSettings()
        self.stats = _Stats()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []
        self._listener = socket.create_server(listen, backlog=128)
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def schedule(self, direction: str, size: int, now: float) -> tuple[float, bool]:
        """When a segment of *size* bytes read at *now* is due, and whether it cuts the
        connection instead."""
        with self._lock:
            settings, draw = self.settings, self._random
            self.stats.segments += 1
            self.stats.bytes[direction] += size
            if draw.random() < settings.cut_probability:
                self.stats.cuts += 1
                return now, True
            due = now + settings.delay + draw.uniform(-settings.jitter, settings.jitter)
            if draw.random() < settings.stall_probability:
                self.stats.stalls += 1
                due += settings.stall
        return due, False

    def _accept(self) -> None:
        for _ in range(_MAX_SEGMENTS):
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.stats.connections += 1
                self._connections = [c for c in self._connections if not c.closed.is_set()]
                self._connections.append(_Connection(self, client, server))

    def configure(self, **settings: float) -> LinkSettings:
        """Change some settings (the others stay); return them all."""
        with self._lock:
            self.settings = dataclasses.replace(self.settings, **settings)
            return self.settings

    def cut(self) -> int:
        """Reset every open connection; return how many there were."""
        with self._lock:
            open_now = [c for c in self._connections if not c.closed.is_set()]
            self.stats.cuts += len(open_now)
        for connection in open_now:
            connection.cut()
        return len(open_now)

    def report(self) -> dict[str, Any]:
        """The counts so far, and the settings."""
        with self._lock:
            return {
                **dataclasses.asdict(self.stats),
                "open": sum(not c.closed.is_set() for c in self._connections),
                "settings": dataclasses.asdict(self.settings),
            }

    def close(self) -> None:
        """Stop accepting and reset every connection."""
        self._listener.close()
        self.cut()


def _answer(reply: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


def _serve(link: Link) -> None:
    deadline = time.monotonic() + LIFETIME
    for _ in range(int(LIFETIME / 0.5) + 1):
        if time.monotonic() > deadline or not select.select([sys.stdin], [], [], 0.5)[0]:
            continue
        line = sys.stdin.readline()
        command = json.loads(line) if line.strip() else {"cmd": "stop"}
        name = command.pop("cmd")
        if name == "stop":
            return
        try:
            if name == "set":
                _answer({"settings": dataclasses.asdict(link.configure(**command))})
            elif name == "cut":
                _answer({"cut": link.cut()})
            else:
                _answer(link.report())
        except (TypeError, ValueError) as exc:
            _answer({"error": str(exc)})


def main(argv: list[str]) -> None:
    listen = (argv[0], int(argv[1]))
    target = (argv[2], int(argv[3]))
    link = Link(listen, target, int(argv[4]) if len(argv) > 4 else 0)
    _answer({"started": link.port})
    try:
        _serve(link)
    finally:
        link.close()
        _answer(link.report())


if __name__ == "__main__":
    main(sys.argv[1:])

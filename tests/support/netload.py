"""Agents that the multi-host test starts inside its hosts (``ip netns exec``), driven by JSON
lines on stdin and answering JSON lines on stdout.

``python -m support.netload clients HOST PORT COUNT``
    COUNT reconnecting stream clients of ``/stream?channel=a`` on HOST:PORT (the load
    balancer), resuming with ``Last-Event-ID`` like browsers. Commands: ``{"cmd":
    "status"}`` answers how many are open, how many events they hold, how often they
    connected; ``{"cmd": "check", "expected": {id: publish time}}`` answers how many
    expected events each missed or got twice or out of order, and the delivery lag;
    ``{"cmd": "stop"}`` ends.
``python -m support.netload publish-http INTERVAL HOST:PORT,HOST:PORT...``
    Publishes through the app's ``/publish`` route of each host in turn.
``python -m support.netload publish-redis INTERVAL URL KEY``
    Publishes with :func:`flask_sse_push.send_event` straight to the Redis bus.

Both publishers publish ``{"src": ..., "n": ..., "t": ...}`` to channel ``a`` every INTERVAL
seconds; ``{"cmd": "acked"}`` answers ``{"acked": [[id, t, src], ...], "failed": [[t, src,
why], ...]}`` so far, ``{"cmd": "stop"}`` answers it and ends.

``python -m support.netload wait-http URL TIMEOUT [SERVER...]`` exits 0 once URL answers 200
(and, for haproxy's stats in CSV, says that every SERVER is up).
"""

from __future__ import annotations

import itertools
import json
import select
import selectors
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from support.clients import Client, Crowd, pump_selector

RECONNECT_DELAY = 0.5


def commands(timeout: float) -> dict[str, Any] | None:
    """The next command on stdin if one arrives within *timeout* seconds."""
    if not select.select([sys.stdin], [], [], timeout)[0]:
        return None
    line = sys.stdin.readline()
    return json.loads(line) if line.strip() else {"cmd": "stop"}


def answer(reply: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


class Browser(Client):
    """A :class:`Client` that takes an answer other than ``200`` as a browser would take a
    failed connection: it counts it and reconnects later."""

    refused = 0

    def connect(self) -> Any:
        self.ignoring = False
        return super().connect()

    def feed(self, data: bytes) -> None:
        if getattr(self, "ignoring", False):
            return
        try:
            super().feed(data)
        except AssertionError:
            self.refused += 1
            self.ignoring = True


class Clients(Crowd):
    """Browsers that reconnect after :data:`RECONNECT_DELAY` without blocking the others."""

    def __init__(self, host: str, port: int, count: int) -> None:
        super().__init__(port, ["/stream?channel=a"] * count, host, Browser)
        self.due: list[tuple[float, Client]] = []

    def pump(self, until: Callable[[Crowd], bool], timeout: float) -> bool:
        def on_data(key: Any, sock: Any, data: bytes) -> None:
            key.data.feed(data)

        def on_end(key: Any, sock: Any) -> None:
            self.selector.unregister(sock)
            sock.close()
            key.data.sock = None
            self.due.append((time.monotonic() + RECONNECT_DELAY, key.data))

        done = pump_selector(self.selector, lambda: until(self), timeout, on_data, on_end)
        now, due, self.due = time.monotonic(), self.due, []
        for at, client in due:
            if at > now:
                self.due.append((at, client))
                continue
            try:
                self.selector.register(client.connect(), selectors.EVENT_READ, client)
            except OSError:
                self.due.append((now + RECONNECT_DELAY, client))
        return done

    def status(self) -> dict[str, Any]:
        counts = [len(c.events) for c in self.clients]
        return {
            # Open, and answered: the server subscribed them before it wrote the head.
            "open": sum(c.sock is not None and c._in_body for c in self.clients),
            "events": [min(counts), max(counts)],
            "connects": sum(c.connects for c in self.clients),
            "refused": sum(getattr(c, "refused", 0) for c in self.clients),
        }

    def check(self, expected: dict[str, float]) -> dict[str, Any]:
        missing = dups = disorder = resets = short = 0
        sample: list[str] = []
        lags: list[float] = []
        for client in self.clients:
            ids = [e.last_event_id for e in client.events if e.type == "message"]
            resets += sum(e.type == "sse-reset" for e in client.events)
            dups += len(ids) - len(set(ids))
            order = [tuple(int(x) for x in i.split("-")) for i in ids]
            disorder += sum(a >= b for a, b in itertools.pairwise(order))
            lacking = set(expected) - set(ids)
            missing += len(lacking)
            short += bool(lacking)
            if lacking and not sample:
                first = min(lacking, key=lambda i: tuple(int(x) for x in i.split("-")))
                last = client.events[-1].last_event_id if client.events else None
                sample = [f"missing {len(lacking)} from {first}, connects {client.connects}"]
                sample.append(f"last event: {last}")
            for event, t in zip(client.events, client.times, strict=True):
                if event.type == "message" and event.last_event_id in expected:
                    lags.append(t - expected[event.last_event_id])
        lags.sort()
        return {
            "missing": missing,
            "clients_missing": short,
            "missing_sample": sample,
            "duplicates": dups,
            "out_of_order": disorder,
            "resets": resets,
            "lag_p50": lags[len(lags) // 2] if lags else None,
            "lag_max": lags[-1] if lags else None,
            **self.status(),
        }


def run_clients(host: str, port: int, count: int) -> None:
    clients = Clients(host, port, count)
    answer({"started": count})
    for _ in range(1_000_000):
        clients.pump(lambda crowd: bool(select.select([sys.stdin], [], [], 0)[0]), 0.5)
        command = commands(0)
        if command is None:
            continue
        if command["cmd"] == "stop":
            break
        if command["cmd"] == "status":
            answer(clients.status())
        elif command["cmd"] == "check":
            answer(clients.check(command["expected"]))
    clients.close()


def publish_http(target: str, payload: dict[str, Any]) -> str:
    request = urllib.request.Request(
        f"http://{target}/publish",
        data=json.dumps({"data": payload, "channel": "a"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=1) as response:
        return str(json.load(response)["id"])


def publish_redis(url: str, key: str) -> Callable[[str, dict[str, Any]], str]:
    from flask import Flask

    from flask_sse_push import SSEBlueprint, send_event

    app = Flask("publisher")
    app.config.update(SSE_BUS_URL=url, SSE_REDIS_KEY=key, SSE_PUBLISH_TIMEOUT=1)
    app.register_blueprint(SSEBlueprint())

    def publish(source: str, payload: dict[str, Any]) -> str:
        with app.app_context():
            return send_event(payload, channel="a")

    return publish


def run_publisher(interval: float, sources: list[str], send: Callable[..., str]) -> None:
    acked: list[tuple[str, float, str]] = []
    failed: list[tuple[float, str, str]] = []
    answer({"started": sources})
    for n in range(1_000_000):
        source = sources[n % len(sources)]
        t = time.time()
        try:
            acked.append((send(source, {"src": source, "n": n, "t": t}), t, source))
        except (OSError, urllib.error.URLError, RuntimeError) as exc:
            failed.append((t, source, str(exc)[:200]))
        except Exception as exc:  # PublishError: not a dependency of the HTTP publisher
            failed.append((t, source, f"{type(exc).__name__}: {exc}"[:200]))
        command = commands(max(0.0, interval - (time.time() - t)))
        if command is not None and command["cmd"] == "stop":
            break
        if command is not None and command["cmd"] == "acked":
            answer({"acked": acked, "failed": failed})
    answer({"acked": acked, "failed": failed})


def wait_http(url: str, timeout: float, servers: list[str]) -> None:
    """Wait until *url* answers 200 and, if *servers* are named, until the haproxy stats
    (CSV) at *url* say that each of them is up."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.1) + 1):
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                rows = [line.split(",") for line in response.read().decode().splitlines()]
                up = {row[1] for row in rows if len(row) > 17 and row[17] == "UP"}
                if response.status == 200 and set(servers) <= up:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer (with {servers} up) within {timeout} s")


def main(argv: list[str]) -> None:
    role = argv[0]
    if role == "wait-http":
        wait_http(argv[1], float(argv[2]), argv[3:])
    elif role == "clients":
        run_clients(argv[1], int(argv[2]), int(argv[3]))
    elif role == "publish-http":
        run_publisher(float(argv[1]), argv[2].split(","), publish_http)
    elif role == "publish-redis":
        run_publisher(float(argv[1]), ["script"], publish_redis(argv[2], argv[3]))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

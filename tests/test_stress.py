"""Concurrency stress on both buses, with threads and with greenlets.

Publishers, subscribers that leave and resume at random points (``Last-Event-ID``),
revocations (``end_streams``), slow readers that stop reading until their stream is
dropped (``: slow``) and, on Redis, kills of the receiver's connection
(``CLIENT KILL`` of ``flask-sse-push:receive:*``), all at once, for thousands of
operations. Then every connection must have seen the events of its channels exactly once
and in order (from its resume point on, or after a reset), every client must have caught
up with the last event of its channels, and no subscription may be left over.

- threads: the app in this process, each subscriber a thread reading a streamed response
  of Flask's test client, publishers calling ``send_event`` from threads;
- greenlets: a real ``gunicorn -k gevent``, subscribers on raw sockets driven by one
  selector, publishers posting to the app from threads.

CI sizes finish in well under a minute each; ``STRESS_SCALE=10`` (or more) makes a soak run
of ten times as many events, clients and disruptions::

    STRESS_SCALE=10 .venv/bin/python -m pytest --timeout=0 tests/test_stress.py
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import requests
from flask import Flask
from fuzzkit import (
    Connection,
    Published,
    PublishLog,
    check_connection,
    compact,
    compacted,
    id_key,
    kill_receivers,
    log_since,
    publish_logged,
    send_raw,
    serve_module,
    wait_streams_closed,
)
from sseparse import SSEParser
from support.clients import Collector
from support.http import body_after_ok_head
from support.procs import HOST, raise_nofile_limit, wait_for
from support.redis_server import RedisServer, require_redis_server

from flask_sse_push import SSEBlueprint, end_streams, get_state, send_event

SCALE = max(1, int(os.environ.get("STRESS_SCALE", "1")))
HISTORY = 1000
QUEUE = 16
CHANNELS = ["c0", "c1", "c2", "c3"]
#: Bytes of padding in every event.
PAD = 300
#: Slow readers also follow this channel of big events: the kernel buffers up to about
#: 4 MB for a client that stopped reading before a write blocks and its queue fills.
BULK = "bulk"
BULK_PAD = 64 * 1024
#: Resume ids no bus gave out: each gets a reset, after which nothing may be missed.
STRANGE_IDS = ["stale-id", "0-0-0", "\u00e9t\u00e9"]


@dataclass
class Plan:
    """How much of everything one run does."""

    events: int = 1500 * SCALE
    bulk_events: int = 150 * SCALE
    publishers: int = 3
    subscribers: int = 16 * min(SCALE, 4)
    slow: int = 3
    revokes: int = 15 * SCALE
    kills: int = 8 * SCALE
    #: Seconds the publishing phase lasts at least (publishers pace themselves).
    seconds: float = 8.0 * SCALE
    seed: int = 9


@dataclass
class Outcome:
    """What a run observed, for the checks."""

    log: PublishLog
    clients: list[Any]
    revokes: int = 0
    kills: int = 0
    errors: list[str] = field(default_factory=list)


#: How the subscribers that are not slow resume when they reconnect (see resume_point).
KINDS = ["steady", "rewind", "ahead", "stranger"]


def client_kinds(plan: Plan, rng: random.Random) -> list[str]:
    return ["slow"] * plan.slow + [rng.choice(KINDS) for _ in range(plan.subscribers - plan.slow)]


def resume_point(kind: str, seen: list[str], log: PublishLog, rng: random.Random) -> str | None:
    """The ``Last-Event-ID`` a client of *kind* reconnects with, having seen *seen*.

    ``steady`` and ``slow`` clients resume from the last event they saw; ``rewind`` ones
    from a random recent id (one they saw, or any event's: ids are positions in all
    channels), or none; ``ahead`` ones from the newest id published, which the bus of the
    answering process may not have delivered yet (as when the client got it from another
    worker); ``stranger`` ones, every other time, from an id no bus gave out (a reset).
    """
    if not seen:
        return None
    if kind == "rewind":
        recent = [entry.id for entry in log.ordered()[-400:]]
        return rng.choice([None, *seen[-400:], *recent])
    if kind == "ahead":
        entries = log.ordered()
        return entries[-1].id if entries else seen[-1]
    if kind == "stranger" and rng.random() < 0.5:
        return rng.choice(STRANGE_IDS)
    return seen[-1]


def choose_channels(rng: random.Random) -> frozenset[str]:
    return frozenset(rng.sample(CHANNELS, rng.choice([1, 1, 2])))


def channels_for(name: int, kind: str, rng: random.Random) -> frozenset[str]:
    """The channels client *name* follows. Slow clients also follow the channel of big
    events; the first follows only that one, which no revocation names, so that one stream
    is sure to be dropped as slow rather than revoked while its reader pauses."""
    chosen = choose_channels(rng)
    if kind != "slow":
        return chosen
    return frozenset({BULK}) if name == 0 else chosen | {BULK}


def query(channels: frozenset[str]) -> str:
    return "&".join(f"channel={c}" for c in sorted(channels))


def check_outcome(outcome: Outcome, history: int) -> None:
    """Every connection saw its events exactly once, in order; every client caught up."""
    assert not outcome.errors, outcome.errors[:10]
    log = outcome.log.ordered()
    problems: list[str] = []
    connections = 0
    for client in outcome.clients:
        for conn in client.connections:
            connections += 1
            for problem in check_connection(conn, log, history):
                problems.append(
                    f"client {client.name} ({client.kind}) {conn.last_event_id}: {problem}"
                )
    problems += laggards(outcome.clients, outcome.log)
    assert not problems, f"{len(problems)} problems in {connections} connections:\n" + "\n".join(
        problems[:20]
    )


def summarize(bus: str, outcome: Outcome, totals: dict[str, int]) -> None:
    """Print what the run did (shown with ``-s``, or when a later check fails)."""
    connections = [c for client in outcome.clients for c in client.connections]
    resets = sum(1 for c in connections if c.events and c.events[0].type == "sse-reset")
    ended = Counter(c.ended for c in connections)
    print(
        f"{bus}: {len(outcome.log)} events, {len(connections)} connections, {resets} resets, "
        f"ends {dict(ended)}, {outcome.revokes} revocations, {outcome.kills} receiver kills, "
        f"totals {totals}"
    )


# -- greenlets: a real gunicorn -k gevent ---------------------------------------------------


class SocketClient:
    """A subscriber on a raw socket (HTTP/1.0: the body ends when the server closes).

    Its *kind* decides where it resumes (see :func:`resume_point`); ``slow`` ones stop
    reading now and then (see :class:`SlowReaders`) and never leave by themselves.
    """

    def __init__(
        self, name: int, kind: str, port: int, log: PublishLog, rng: random.Random
    ) -> None:
        self.name = name
        self.kind = kind
        self.port = port
        self.log = log
        self.rng = rng
        self.channels = channels_for(name, kind, rng)
        self.connections: list[Connection] = []
        self.sock: socket.socket | None = None
        self.seen: list[str] = []
        self._buffer = b""
        self._in_body = False
        self._parser = SSEParser()
        self._leave_after = 0

    @property
    def current(self) -> Connection:
        return self.connections[-1]

    def connect(self, selector: selectors.BaseSelector) -> None:
        last = resume_point(self.kind, self.seen, self.log, self.rng)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.kind == "slow":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect((HOST, self.port))
        header = f"Last-Event-ID: {last}\r\n" if last else ""
        path = f"/stream?{query(self.channels)}"
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {HOST}\r\n{header}\r\n".encode())
        sock.setblocking(False)
        self.sock = sock
        self.connections.append(Connection(self.channels, last))
        self._buffer = b""
        self._in_body = False
        self._parser = SSEParser()
        self._leave_after = self.rng.randint(20, 300)
        selector.register(sock, selectors.EVENT_READ, self)

    def feed(self, data: bytes) -> None:
        if not self._in_body:
            self._buffer += data
            body = body_after_ok_head(self._buffer)
            if body is None:
                return
            data = body
            self._in_body = True
        for event in self._parser.feed(data):
            self.current.events.append(compacted(event))
            self.seen.append(event.last_event_id)  # a reset's id too: resume from its head

    def ended(self) -> None:
        comments = [c.strip() for c in self._parser.comments if c.strip()]
        self.current.ended = comments[-1] if comments else None

    def wants_to_leave(self) -> bool:
        return self.kind != "slow" and len(self.current.events) >= self._leave_after

    def close(self, selector: selectors.BaseSelector) -> None:
        if self.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(self.sock)
            self.sock.close()
            self.sock = None


class SlowReaders:
    """Makes the slow clients stop reading now and then, each until the server has dropped
    a stream as slow (its stats say so) or for ``MAX_PAUSE`` seconds."""

    MAX_PAUSE = 6.0

    def __init__(self, url: str, selector: selectors.BaseSelector, rng: random.Random) -> None:
        self.url = url
        self.selector = selector
        self.rng = rng
        self.paused: dict[SocketClient, tuple[float, int]] = {}
        self._dropped = 0
        self._polled = 0.0

    def dropped(self, now: float) -> int:
        """The server's count of streams dropped as slow (polled at most 4 times a second)."""
        if now - self._polled >= 0.25:
            self._polled = now
            stats = requests.get(self.url + "/stream/stats", timeout=5).json()
            self._dropped = int(stats["totals"]["dropped"])
        return self._dropped

    def step(self, clients: list[SocketClient], now: float, publishing: bool) -> None:
        for client, (since, dropped) in list(self.paused.items()):
            if client.sock is None:
                del self.paused[client]
            elif now - since >= self.MAX_PAUSE or self.dropped(now) > dropped:
                del self.paused[client]
                self.selector.register(client.sock, selectors.EVENT_READ, client)
        if not publishing:
            return
        for client in clients:
            if (
                client.kind == "slow"
                and client not in self.paused
                and client.sock is not None
                and len(client.current.events) > 5
                # Until the first drop every slow client pauses at once, so that one is
                # dropped while events still flow however slowly this machine runs (a
                # revocation may end a paused stream first); later pauses come at random.
                and (self._dropped == 0 or self.rng.random() < 0.01)
            ):
                self.paused[client] = (now, self.dropped(now))
                self.selector.unregister(client.sock)


def drive_sockets(
    port: int, url: str, plan: Plan, publishing: Callable[[], bool], outcome: Outcome
) -> None:
    """Run the clients until publishing is over and every client caught up (bounded)."""
    rng = random.Random(plan.seed)
    kinds = client_kinds(plan, rng)
    raise_nofile_limit(len(kinds) * 4 + 256)
    selector = selectors.DefaultSelector()
    clients = [
        SocketClient(i, kind, port, outcome.log, random.Random(rng.random()))
        for i, kind in enumerate(kinds)
    ]
    outcome.clients = clients
    slow = SlowReaders(url, selector, rng)
    for client in clients:
        client.connect(selector)
    deadline = time.monotonic() + plan.seconds * 4 + 60
    settle: float | None = None
    try:
        for _ in range(10_000_000):
            now = time.monotonic()
            if now > deadline:
                late = laggards(clients, outcome.log)
                outcome.errors.append(f"the clients did not catch up in time: {late}")
                return
            active = publishing()
            if not active:
                settle = settle or now
                if now - settle > 1.0 and not laggards(clients, outcome.log):
                    return
            slow.step(clients, now, active)
            for key, _ in selector.select(0.05):
                read_once(key.data, selector, active)
    finally:
        for client in clients:
            client.close(selector)
        selector.close()


def read_once(client: SocketClient, selector: selectors.BaseSelector, publishing: bool) -> None:
    """Read what *client*'s socket has; reconnect it when it ends, or when it wants to."""
    assert client.sock is not None
    try:
        data = client.sock.recv(65536)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if data:
        client.feed(data)
        if client.wants_to_leave() and publishing:
            client.close(selector)
            client.connect(selector)
    else:
        client.ended()
        client.close(selector)
        client.connect(selector)


def laggards(clients: list[Any], log: PublishLog) -> list[str]:
    """The clients that have not seen the last event of their channels (or a reset past
    it) yet."""
    newest: dict[str, Published] = {}
    for entry in log.ordered():
        newest[entry.channel] = entry
    late = []
    for client in clients:
        mine = [newest[c] for c in client.channels if c in newest]
        if not mine:
            continue
        wanted = max(mine, key=lambda entry: entry.key)
        last = id_key(client.seen[-1]) if client.seen else None
        if last is None or last < wanted.key:
            conn = client.connections[-1]
            late.append(
                f"client {client.name} ({client.kind}, {sorted(client.channels)}) saw "
                f"{client.seen[-1] if client.seen else None!r} of {wanted.id!r}; "
                f"{len(client.connections)} connections, the last from "
                f"{conn.last_event_id!r} got {len(conn.events)} events"
            )
    return late


def run_publishers(plan: Plan, publish: Callable[[int, str, int], None], outcome: Outcome) -> None:
    """Publish ``plan.events`` events from ``plan.publishers`` threads, and
    ``plan.bulk_events`` big ones from one more, over about ``plan.seconds``."""
    per_thread = plan.events // plan.publishers

    def work(worker: int, count: int, channels: list[str], pad: int) -> None:
        rng = random.Random(plan.seed * 100 + worker)
        pause = plan.seconds / count
        try:
            for i in range(count):
                publish(worker * per_thread + i, rng.choice(channels), pad)
                time.sleep(rng.uniform(0, 2 * pause))
        except Exception as exc:  # reported by the test, not as a thread warning
            outcome.errors.append(f"publisher {worker}: {exc!r}")

    threads = [
        threading.Thread(target=work, args=(w, per_thread, CHANNELS, PAD))
        for w in range(plan.publishers)
    ]
    threads.append(
        threading.Thread(target=work, args=(plan.publishers, plan.bulk_events, [BULK], BULK_PAD))
    )
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=plan.seconds * 6 + 60)


def run_disruptions(
    plan: Plan,
    stop: threading.Event,
    revoke: Callable[[str], None],
    kill: Callable[[], int] | None,
    outcome: Outcome,
) -> None:
    """Revoke channels (and kill the receivers' connections) while *stop* is not set."""
    rng = random.Random(plan.seed + 1)
    steps = plan.revokes + (plan.kills if kill else 0)
    try:
        for _ in range(steps):
            if stop.wait(plan.seconds / (steps + 1)):
                return
            if kill is not None and rng.random() < plan.kills / steps:
                outcome.kills += kill()
            else:
                revoke(rng.choice(CHANNELS))
                outcome.revokes += 1
    except Exception as exc:
        outcome.errors.append(f"disruptions: {exc!r}")


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def served(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, Any, redis.Redis | None]]:
    """A gunicorn -k gevent serving the streaming app on one bus."""
    redis_server: RedisServer | None = None
    env: dict[str, str] = {}
    if request.param == "redis":
        redis_server = RedisServer(tmp_path, executable=require_redis_server()).start()
        env["SSE_BUS_URL"] = redis_server.url
    try:
        server = serve_module(
            tmp_path, env=env, SSE_KEEPALIVE=0.2, SSE_QUEUE_SIZE=QUEUE, SSE_HISTORY_SIZE=HISTORY
        )
        try:
            yield request.param, server, (redis_server.client() if redis_server else None)
        finally:
            server.stop(timeout=10)
    finally:
        if redis_server is not None:
            redis_server.stop()


@pytest.mark.e2e
@pytest.mark.slow
def test_greenlets_under_gunicorn(
    served: tuple[str, Any, redis.Redis | None],
) -> None:
    bus, server, redis_client = served
    plan = Plan()
    outcome = Outcome(PublishLog(), [])
    local = threading.local()
    sessions: list[requests.Session] = []

    def publish(i: int, channel: str, pad: int) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            sessions.append(local.session)
        publish_logged(server.url, outcome.log, f"{i}:" + "x" * pad, channel, local.session)

    def revoke(channel: str) -> None:
        response = requests.post(server.url + f"/revoke?channel={channel}", timeout=10)
        assert response.status_code == 200, response.text

    kill = (lambda: kill_receivers(redis_client)) if redis_client is not None else None
    done = threading.Event()
    stop = threading.Event()

    def produce() -> None:
        try:
            run_publishers(plan, publish, outcome)
        finally:
            done.set()

    producer = threading.Thread(target=produce)
    disruptor = threading.Thread(target=run_disruptions, args=(plan, stop, revoke, kill, outcome))
    producer.start()
    disruptor.start()
    try:
        drive_sockets(server.port, server.url, plan, lambda: not done.is_set(), outcome)
    finally:
        stop.set()
        producer.join(timeout=plan.seconds * 6 + 60)
        disruptor.join(timeout=30)
        for session in sessions:
            session.close()
    left = wait_streams_closed(server.url, 15)
    totals = requests.get(server.url + "/stream/stats", timeout=5).json()["totals"]
    summarize(bus, outcome, totals)
    check_outcome(outcome, HISTORY - outcome.revokes - 1)
    assert left == 0, f"{left} subscriptions left over"
    assert totals["dropped"] >= 1, f"no slow reader was dropped: {totals}"
    if redis_client is not None:
        assert outcome.kills >= 1, "no receiver connection was killed"
    text, _ = log_since(server, 0)
    assert "Traceback" not in text, text[-5000:]


# -- threads: the app in this process ---------------------------------------------------------


class ThreadClient:
    """A subscriber in its own thread, reading a streamed response of Flask's test client.

    Kinds as for :class:`SocketClient`; a ``slow`` client stops iterating now and then until
    the bus has dropped a stream as slow.
    """

    MAX_PAUSE = 3.0

    def __init__(self, name: int, kind: str, app: Flask, rng: random.Random) -> None:
        self.name = name
        self.kind = kind
        self.app = app
        self.rng = rng
        self.channels = channels_for(name, kind, rng)
        self.connections: list[Connection] = []
        self.seen: list[str] = []

    def run(self, done: Callable[[], bool], log: PublishLog, deadline: float) -> None:
        """Connect, read and reconnect until publishing is over and this client caught up."""
        client = self.app.test_client()
        for _ in range(10_000):
            if time.monotonic() > deadline or (done() and not laggards([self], log)):
                return
            last = resume_point(self.kind, self.seen, log, self.rng)
            headers = {"Last-Event-ID": last} if last is not None else {}
            response = client.get(
                f"/stream?{query(self.channels)}", headers=headers, buffered=False
            )
            assert response.status_code == 200, response.get_data()
            conn = Connection(self.channels, last)
            self.connections.append(conn)
            try:
                chunks = cast("Iterator[bytes]", iter(response.response))
                self.read(chunks, conn, done, log, deadline)
            finally:
                response.close()

    def read(
        self,
        chunks: Iterator[bytes],
        conn: Connection,
        done: Callable[[], bool],
        log: PublishLog,
        deadline: float,
    ) -> None:
        parser = SSEParser()
        leave_after = self.rng.randint(20, 300)
        for chunk in chunks:  # a keep-alive comes at least every SSE_KEEPALIVE seconds
            for event in parser.feed(chunk):
                conn.events.append(compacted(event))
                self.seen.append(event.last_event_id)
            if time.monotonic() > deadline:
                return
            if done():
                if not laggards([self], log):
                    return
            elif self.kind == "slow":
                first = get_state(self.app).totals["dropped"] == 0
                if len(conn.events) > 5 and (first or self.rng.random() < 0.02):
                    self.pause()
            elif len(conn.events) >= leave_after:
                return
        comments = [c.strip() for c in parser.comments if c.strip()]
        conn.ended = comments[-1] if comments else None

    def pause(self) -> None:
        """Stop reading until the bus drops a stream as slow, or MAX_PAUSE seconds."""
        totals = get_state(self.app).totals
        dropped = totals["dropped"]
        wait_for(lambda: totals["dropped"] > dropped, self.MAX_PAUSE, interval=0.02)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def in_process(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, Flask, redis.Redis | None]]:
    """The app in this process on one bus (its own redis-server for Redis)."""
    redis_server: RedisServer | None = None
    app = Flask("stress_threads")
    app.config.update(
        SSE_KEEPALIVE=0.2,
        SSE_QUEUE_SIZE=QUEUE,
        SSE_HISTORY_SIZE=HISTORY,
        SSE_PUBLISH_TIMEOUT=5,
        SSE_STATS=True,
    )
    if request.param == "redis":
        redis_server = RedisServer(tmp_path, executable=require_redis_server()).start()
        app.config["SSE_BUS_URL"] = redis_server.url
    app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
    try:
        yield request.param, app, (redis_server.client() if redis_server else None)
    finally:
        get_state(app).bus.close()
        if redis_server is not None:
            redis_server.stop()


@pytest.mark.slow
def test_threads_in_process(
    in_process: tuple[str, Flask, redis.Redis | None],
) -> None:
    bus, app, redis_client = in_process
    plan = Plan()
    outcome = Outcome(PublishLog(), [])

    def publish(i: int, channel: str, pad: int) -> None:
        data = f"{i}:" + "x" * pad
        with app.app_context():
            event_id = send_event(data, channel=channel)
        key = id_key(event_id)
        assert key is not None, event_id
        outcome.log.add(Published(event_id, channel, compact(data), key))

    def revoke(channel: str) -> None:
        with app.app_context():
            end_streams(channel=channel)

    kill = (lambda: kill_receivers(redis_client)) if redis_client is not None else None
    rng = random.Random(plan.seed)
    kinds = client_kinds(plan, rng)
    clients = [ThreadClient(i, k, app, random.Random(rng.random())) for i, k in enumerate(kinds)]
    outcome.clients = clients
    done = threading.Event()
    stop = threading.Event()
    deadline = time.monotonic() + plan.seconds * 4 + 60

    def subscribe(client: ThreadClient) -> None:
        try:
            client.run(done.is_set, outcome.log, deadline)
        except Exception as exc:  # reported by the test, not as a thread warning
            outcome.errors.append(f"client {client.name}: {exc!r}")

    # The bus's per-process state is made before the threads start: its creation races
    # (FIRST_USE_RACE), which test_first_use_of_a_bus_from_many_threads covers by itself.
    get_state(app).bus.stream_count()
    readers = [threading.Thread(target=subscribe, args=(c,)) for c in clients]
    disruptor = threading.Thread(target=run_disruptions, args=(plan, stop, revoke, kill, outcome))
    for thread in [*readers, disruptor]:
        thread.start()
    try:
        run_publishers(plan, publish, outcome)
    finally:
        done.set()
        stop.set()
        for thread in [*readers, disruptor]:
            thread.join(timeout=max(deadline - time.monotonic(), 0) + 10)
    state = get_state(app)
    wait_for(lambda: state.bus.stream_count() == 0, 10)
    summarize(bus, outcome, dict(state.totals))
    assert not any(t.is_alive() for t in readers), "a reader did not finish"
    check_outcome(outcome, HISTORY - outcome.revokes - 1)
    assert state.bus.stream_count() == 0, "subscriptions left over"
    assert state.totals["dropped"] >= 1, f"no slow reader was dropped: {state.totals}"
    if redis_client is not None:
        assert outcome.kills >= 1, "no receiver connection was killed"


# -- focused reproducers of what the stress runs found ----------------------------------------


@pytest.mark.e2e
def test_no_event_is_lost_right_after_a_reset(
    served: tuple[str, Any, redis.Redis | None],
) -> None:
    """A resume from an id the bus never gave out gets a reset naming the newest id; every
    event after that id must then arrive, even while events are being published."""
    _, server, _ = served
    log = PublishLog()
    stop = threading.Event()
    errors: list[str] = []

    def publish() -> None:
        with requests.Session() as session:
            try:
                for i in range(5000):
                    if stop.is_set():
                        return
                    publish_logged(server.url, log, f"{i}", "c0", session)
            except Exception as exc:  # reported by the test, not as a thread warning
                errors.append(repr(exc))

    publisher = threading.Thread(target=publish)
    publisher.start()
    connections = []
    try:
        wait_for(lambda: len(log) > 0, 10)
        for _ in range(30):
            connections.append(read_after_reset(server.port, "stale-id"))
    finally:
        stop.set()
        publisher.join(timeout=30)
    assert not errors, errors
    entries = log.ordered()
    problems = [p for conn in connections for p in check_connection(conn, entries, HISTORY)]
    assert not problems, f"{len(problems)} of {len(connections)} connections:\n" + "\n".join(
        problems
    )


def read_after_reset(port: int, last_event_id: str) -> Connection:
    """Open a stream of ``c0`` resuming from *last_event_id* and read a few events."""
    wire = (
        f"GET /stream?channel=c0 HTTP/1.1\r\nHost: {HOST}\r\nLast-Event-ID: {last_event_id}\r\n\r\n"
    ).encode()
    sock, response = send_raw(port, wire, 10)
    collector = Collector()
    try:
        response.read_body_until(collector.at_least(6), 5)
    except TimeoutError:
        pass
    finally:
        sock.close()
    return Connection(frozenset({"c0"}), last_event_id, collector.events)


@pytest.mark.parametrize("bus", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_first_use_of_a_bus_from_many_threads(bus: str, request: pytest.FixtureRequest) -> None:
    """The first requests of a fresh app arrive together in threads (Flask's threaded
    server after a start): every one is served."""
    url = "memory://"
    if bus == "redis":
        url = request.getfixturevalue("redis_server")().url
    failures: Counter[str] = Counter()
    for attempt in range(40):
        app = Flask(f"first_use_{attempt}")
        app.config.update(SSE_BUS_URL=url, SSE_KEEPALIVE=0.2)
        app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
        try:
            first_uses(app, failures)
        finally:
            get_state(app).bus.close()
    assert not failures, dict(failures)


def first_uses(app: Flask, failures: Counter[str], count: int = 8) -> None:
    """*count* threads at once: half open a stream, half publish."""
    barrier = threading.Barrier(count, timeout=10)

    def work(i: int) -> None:
        try:
            barrier.wait()
            if i % 2:
                response = app.test_client().get("/stream?channel=a", buffered=False)
                if response.status_code != 200:
                    failures[f"stream answered {response.status_code}"] += 1
                response.close()
            else:
                with app.app_context():
                    send_event("x", channel="a")
        except Exception as exc:  # counted by the test, not reported as a thread warning
            failures[f"{type(exc).__name__}: {exc}"] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)

"""The bus contract: the mailbox, the fan-out and the registry as units, then one behaviour
suite that runs on every registered backend (driven through the :class:`Bus` methods, not
HTTP), and a third-party backend plugged in by declaring its class."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from support.buses import resume

from flask_sse_push import (
    ConfigurationError,
    EndReason,
    ResetReason,
    SSEBlueprint,
    get_state,
    send_event,
)
from flask_sse_push.bus import Bus, Fanout, MemoryBus, Message, Subscription, create_bus
from flask_sse_push.bus.base import registered_schemes
from flask_sse_push.config import DEFAULTS, Settings
from flask_sse_push.mailbox import TAKE_BYTES, Mailbox
from flask_sse_push.testing import read_events

# -- the mailbox ------------------------------------------------------------------------------


def test_push_take_and_overflow_ends_the_mailbox_as_slow() -> None:
    box = Mailbox(2)
    assert box.push(b"a") and box.push(b"b")
    assert box.take(0) == b"ab"
    assert box.push(b"c") and box.push(b"d")
    assert not box.push(b"e")
    assert box.reason is EndReason.SLOW
    assert box.take(0) is None
    assert box.push(b"f")  # an ended mailbox swallows what still arrives


def test_offer_refuses_when_full_and_never_ends() -> None:
    box = Mailbox(1)
    assert box.offer(b"a")
    assert not box.offer(b"b")
    assert box.reason is None
    assert box.take(0) == b"a"
    assert box.offer(b"b")


def test_finish_ends_after_what_was_queued() -> None:
    box = Mailbox(8)
    box.push(b"a")
    box.finish(EndReason.DONE)
    assert box.take(0) == b"a"
    assert box.take(0) is None
    assert box.reason is EndReason.DONE


def test_end_drops_what_was_queued() -> None:
    box = Mailbox(8)
    box.push(b"a")
    box.end(EndReason.REVOKED)
    box.end(EndReason.SHUTDOWN)  # the first reason stays
    assert box.take(0) is None
    assert box.reason is EndReason.REVOKED


def test_take_times_out_empty_and_ping_wakes_with_nothing() -> None:
    box = Mailbox(8)
    started = time.monotonic()
    assert box.take(0.05) == b""
    assert time.monotonic() - started >= 0.04
    timer = threading.Timer(0.05, box.ping)
    timer.start()
    try:
        assert box.take(5) == b""
    finally:
        timer.cancel()


def test_a_push_from_another_thread_wakes_the_reader() -> None:
    box = Mailbox(8)
    timer = threading.Timer(0.05, box.push, args=(b"x",))
    timer.start()
    try:
        started = time.monotonic()
        assert box.take(5) == b"x"
        assert time.monotonic() - started < 4
    finally:
        timer.cancel()


def test_a_backlog_is_taken_in_pieces_of_bounded_size() -> None:
    box = Mailbox(64)
    piece = b"x" * 10_000
    for _ in range(40):
        box.push(piece)
    sizes = []
    for _ in range(40):
        data = box.take(0)
        if not data:
            break
        sizes.append(len(data))
    assert sum(sizes) == 40 * len(piece)
    assert max(sizes) < TAKE_BYTES + len(piece)
    assert len(sizes) > 1


# -- the fan-out ------------------------------------------------------------------------------


def make_fanout(on_slow: Callable[[Subscription], None] = lambda sub: None) -> Fanout:
    return Fanout(threading.RLock(), on_slow)


def test_fanout_delivers_by_channel_once_per_subscription() -> None:
    fanout = make_fanout()
    ab = Subscription(["a", "b"], 8)
    b = Subscription(["b"], 8)
    for sub in (ab, b):
        fanout.add(sub)
    fanout.deliver(Message("a", "1", b"A"))
    fanout.deliver(Message("b", "2", b"B"))
    fanout.deliver(Message("c", "3", b"C"))
    assert ab.take(0) == b"AB"
    assert b.take(0) == b"B"
    assert len(fanout) == 2
    assert fanout.counts() == {"a": 1, "b": 2}


def test_fanout_holds_back_until_activated_and_remove_is_idempotent() -> None:
    fanout = make_fanout()
    sub = Subscription(["a"], 8)
    fanout.add(sub, deliver=False)
    fanout.deliver(Message("a", "1", b"early"))
    assert sub.take(0) == b""
    assert len(fanout) == 1 and sub in fanout
    fanout.activate(sub)
    fanout.deliver(Message("a", "2", b"live"))
    assert sub.take(0) == b"live"
    fanout.remove(sub)
    fanout.remove(sub)
    fanout.activate(sub)  # removed: activating again does nothing
    fanout.deliver(Message("a", "3", b"gone"))
    assert sub.take(0) == b""
    assert len(fanout) == 0 and fanout.counts() == {}


def test_fanout_drops_slow_subscriptions_even_when_the_callback_fails() -> None:
    dropped: list[Subscription] = []

    def on_slow(sub: Subscription) -> None:
        dropped.append(sub)
        raise RuntimeError("a receiver's bug")

    fanout = make_fanout(on_slow)
    slow = Subscription(["a"], 1)
    fast = Subscription(["a"], 8)
    fanout.add(slow)
    fanout.add(fast)
    fanout.deliver(Message("a", "1", b"1"))
    fanout.deliver(Message("a", "2", b"2"))
    assert dropped == [slow]
    assert slow.reason is EndReason.SLOW and slow not in fanout
    assert fast.take(0) == b"12"


def test_fanout_end_selects_by_predicate() -> None:
    fanout = make_fanout()
    alice = Subscription(["a"], 8, user="alice")
    bob = Subscription(["a"], 8, user="bob")
    fanout.add(alice)
    fanout.add(bob)
    assert fanout.end(EndReason.REVOKED, lambda sub: sub.user == "alice") == 1
    assert alice.reason is EndReason.REVOKED and bob.reason is None
    assert len(fanout) == 1


# -- the registry -----------------------------------------------------------------------------


def settings(**overrides: Any) -> Settings:
    return Settings.from_mapping({**DEFAULTS, **overrides})


def test_built_in_schemes_are_registered_by_their_classes() -> None:
    assert {"memory", "redis", "rediss", "unix"} <= set(registered_schemes())
    assert isinstance(create_bus("memory://", settings(), "x"), MemoryBus)


def test_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown scheme 'nope'.*'memory://'"):
        create_bus("nope://x", settings(), "x")


def test_a_missing_dependency_names_the_extra() -> None:
    class NeedsIt(MemoryBus):
        schemes = ("needs-it",)
        dependencies = {"surely_not_installed_module": "extra-name"}  # noqa: RUF012

    with pytest.raises(ConfigurationError, match=r"pip install 'flask-sse-push\[extra-name\]'"):
        create_bus("needs-it://", settings(), "x")


# -- one behaviour suite on every backend ----------------------------------------------------


@pytest.fixture(params=["one stream", pytest.param("sharded", marks=pytest.mark.redis)])
def bus(bus_url: str, request: pytest.FixtureRequest) -> Iterator[Bus]:
    """Each backend; the Redis bus also with its channels spread over three streams."""
    shards = 3 if request.param == "sharded" else 1
    if shards > 1 and not bus_url.startswith("redis"):
        pytest.skip("SSE_REDIS_SHARDS is a setting of the Redis bus")
    config = settings(SSE_KEEPALIVE=0, SSE_HISTORY_SIZE=1000, SSE_REDIS_SHARDS=shards)
    made = create_bus(bus_url, config, "contract")
    yield made
    made.close()


def comparable(bus: Bus, payloads: list[bytes]) -> list[bytes]:
    """*payloads* as the suite compares them: on a sharded Redis bus a client sees as ids
    its receiver's positions in the shards, not the ids ``publish`` answered (those place
    an event in every shard), so the ``id:`` lines are left out; and order holds within a
    shard only, so they are sorted (``tests/test_redis_shards.py`` checks the order within
    each channel)."""
    if getattr(getattr(bus, "shards", None), "count", 1) == 1:
        return payloads
    return sorted(payload.split(b"\n", 1)[1] for payload in payloads)


def test_every_registered_backend_runs_the_suite() -> None:
    """The ``bus_url`` fixture covers each backend class the package registers."""
    from conftest import BACKEND_URLS

    package = {cls for cls in _registered_classes() if cls.__module__.startswith("flask_sse_push.")}
    assert set(BACKEND_URLS) == {cls.__name__ for cls in package}


def _registered_classes() -> set[type[Bus]]:
    # The Redis bus registers its schemes before its module is imported (so a worker on the
    # in-process bus never loads it); import it to see its class.
    import flask_sse_push.bus.redis  # noqa: F401

    found: set[type[Bus]] = set()
    pending: list[type[Bus]] = [Bus]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            pending.append(sub)
            if sub.__dict__.get("schemes"):
                found.add(sub)
    return found


def take_until(sub: Subscription, count: int, timeout: float = 10) -> list[bytes]:
    """Events delivered live to *sub*, one payload each, until *count* arrived."""
    got = b""
    deadline = time.monotonic() + timeout
    while got.count(b"\n\n") < count and time.monotonic() < deadline:
        data = sub.take(0.1)
        assert data is not None, f"ended: {sub.reason}"
        got += data
    return [part + b"\n\n" for part in got.split(b"\n\n") if part]


def test_live_delivery_and_replay_after_an_id(bus: Bus) -> None:
    live = Subscription(["a"], 64)
    resume(bus, live, None)
    ids = [bus.publish("ab"[i % 2], f"data: {i}\n\n".encode()) for i in range(6)]
    expected = [f"id: {ids[i]}\ndata: {i}\n\n".encode() for i in (0, 2, 4)]
    assert comparable(bus, take_until(live, 3)) == comparable(bus, expected)
    late = Subscription(["a", "b"], 64)
    replayed = resume(bus, late, ids[1])
    assert replayed.reset is None
    expected = [f"id: {ids[i]}\ndata: {i}\n\n".encode() for i in range(2, 6)]
    # What a Redis receiver had not read yet when the resume was placed comes live, in order.
    rest = take_until(late, len(expected) - len(replayed.replay))
    assert comparable(bus, replayed.replay + rest) == comparable(bus, expected)
    bus.publish("b", b"data: after\n\n")
    assert take_until(late, 1)[0].endswith(b"data: after\n\n")
    for sub in (live, late):
        bus.unsubscribe(sub)
    assert bus.stream_count() == 0


@pytest.mark.parametrize(
    ("last_event_id", "reason"),
    [
        ("", ResetReason.MALFORMED),
        ("x" * 300, ResetReason.MALFORMED),
        ("nope", ResetReason.UNKNOWN),
    ],
)
def test_ids_that_cannot_be_resumed_get_a_reset(
    bus: Bus, last_event_id: str, reason: ResetReason
) -> None:
    head = bus.publish("a", b"data: 1\n\n")
    sub = Subscription(["a"], 8)
    result = resume(bus, sub, last_event_id)
    assert result.reset is not None
    assert result.reset.reason is reason
    assert result.reset.head_id == head
    bus.unsubscribe(sub)


def test_caller_ids_resume_too(bus: Bus) -> None:
    bus.publish("a", b"data: 1\n\n", "order-1")
    bus.publish("a", b"data: 2\n\n")
    sub = Subscription(["a"], 8)
    result = resume(bus, sub, "order-1")
    assert result.reset is None
    assert [p.split(b"\n", 1)[1] for p in result.replay] == [b"data: 2\n\n"]
    bus.unsubscribe(sub)


def test_end_streams_by_channel_and_user_and_counts(bus: Bus) -> None:
    subs = [
        Subscription(["a"], 8, user="alice"),
        Subscription(["a", "b"], 8, user="bob"),
        Subscription(["b"], 8, user="alice"),
    ]
    for sub in subs:
        resume(bus, sub, None)
    assert bus.stream_count() == 3
    assert bus.channel_counts() == {"a": 2, "b": 2}
    assert bus.end_streams(EndReason.REVOKED, channel="a", user="alice") == 1
    assert [s.reason for s in subs] == [EndReason.REVOKED, None, None]
    assert bus.end_streams(EndReason.REVOKED, user="alice") == 1
    assert bus.end_streams(EndReason.SHUTDOWN) == 1
    assert bus.stream_count() == 0


# -- a third-party backend ------------------------------------------------------------------


class RecordingBus(MemoryBus):
    """An in-process bus that also records what is published, as a user might write."""

    schemes = ("recording",)
    published: list[str] = []  # noqa: RUF012 - shared on purpose: the test reads it

    def publish(self, channel: str, body: bytes, event_id: str | None = None) -> str:
        self.published.append(channel)
        return super().publish(channel, body, event_id)


def test_a_third_party_backend_serves_a_stream() -> None:
    app = Flask(__name__)
    app.config.update(SSE_BUS_URL="recording://", SSE_KEEPALIVE=0)
    app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
    assert isinstance(get_state(app).bus, RecordingBus)
    response = app.test_client().get("/stream?channel=news", buffered=False)

    def publish_soon() -> None:
        time.sleep(0.1)
        with app.app_context():
            send_event("hello", channel="news")

    thread = threading.Thread(target=publish_soon)
    thread.start()
    try:
        events = read_events(response, count=1, timeout=5)
    finally:
        thread.join(5)
    assert [e.data for e in events] == ["hello"]
    assert RecordingBus.published == ["news"]

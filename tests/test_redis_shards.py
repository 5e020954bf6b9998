"""The Redis bus spread over several streams (``SSE_REDIS_SHARDS``), against a real
``redis-server``: delivery from every shard, vector ids that resume losslessly and without
repeats on another receiver, a receiver that reads only the shards it needs, hostile ids."""

from __future__ import annotations

import os
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from flask import Flask
from support.app import publish as publish_http
from support.app import serve
from support.buses import resume
from support.clients import Crowd
from support.gunicorn import GunicornFactory
from support.procs import wait_for
from support.redis_server import RedisFactory, RedisServer

from flask_sse_push import (
    BusError,
    ConfigurationError,
    EndReason,
    PublishError,
    ResetReason,
    get_state,
)
from flask_sse_push.bus import Subscription, create_bus
from flask_sse_push.bus.redis import RedisBus
from flask_sse_push.config import DEFAULTS, Settings

pytestmark = pytest.mark.redis

SHARDS = 3


def channel_in(shard: int, prefix: str = "ch") -> str:
    """A channel name of *shard* (of :data:`SHARDS`)."""
    return next(
        name
        for name in (f"{prefix}{i}" for i in range(1000))
        if zlib.crc32(name.encode()) % SHARDS == shard
    )


#: One channel in each shard.
C0, C1, C2 = (channel_in(shard) for shard in range(SHARDS))


@pytest.fixture
def make_bus(shared_redis: RedisServer) -> Iterator[Callable[..., RedisBus]]:
    """Makes sharded buses on a flushed Redis, each with a receiver of its own (like the
    workers of one app, or several app instances: they share the keys)."""
    shared_redis.client().flushdb()
    made: list[RedisBus] = []

    def make(**overrides: Any) -> RedisBus:
        config = {**DEFAULTS, "SSE_KEEPALIVE": 0, "SSE_REDIS_SHARDS": SHARDS, **overrides}
        bus = create_bus(shared_redis.url, Settings.from_mapping(config), "shards")
        assert isinstance(bus, RedisBus)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        bus.close()


def events(data: bytes) -> list[tuple[str, str]]:
    """``(id, data)`` of each event in *data*."""
    found = []
    for block in data.split(b"\n\n"):
        if block:
            fields = dict(line.split(b": ", 1) for line in block.split(b"\n"))
            found.append((fields[b"id"].decode(), fields[b"data"].decode()))
    return found


def take(sub: Subscription, count: int, timeout: float = 10) -> list[tuple[str, str]]:
    """*count* events delivered live to *sub*."""
    got = b""
    deadline = time.monotonic() + timeout
    while got.count(b"\n\n") < count and time.monotonic() < deadline:
        data = sub.take(0.05)
        assert data is not None, f"ended: {sub.reason}"
        got += data
    return events(got)


def publish(bus: RedisBus, channel: str, data: str, event_id: str | None = None) -> str:
    return bus.publish(channel, f"data: {data}\n\n".encode(), event_id)


def by_channel(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The data of *pairs* (``<channel>/<n>``) per channel, in the order received."""
    found: dict[str, list[str]] = {}
    for _id, data in pairs:
        found.setdefault(data.split("/")[0], []).append(data)
    return found


def test_channels_map_to_shards_with_keys_of_their_own(make_bus: Callable[..., RedisBus]) -> None:
    bus = make_bus()
    assert [bus.shards.shard_of(c) for c in (C0, C1, C2)] == [0, 1, 2]
    assert bus.shards.keys == [f"flask-sse-push:shards:{i}" for i in range(SHARDS)]
    assert bus.key == "flask-sse-push:shards:control"
    first = publish(bus, C1, "x")
    # send_event's id places the event in every shard: a resume point for any channels.
    vector = bus.shards.parse(first)
    assert vector is not None and vector[0] == vector[2] == (0, 0) and vector[1] > (0, 0)
    assert bus.client.xlen(bus.shards.keys[1]) == 1
    assert not bus.client.exists(bus.shards.keys[0], bus.shards.keys[2])
    second = bus.shards.parse(publish(bus, C2, "y"))
    assert second is not None and second == {**vector, 2: second[2]} and second[2] > (0, 0)


def test_one_shard_is_the_one_stream_as_before(make_bus: Callable[..., RedisBus]) -> None:
    bus = make_bus(SSE_REDIS_SHARDS=1)
    assert bus.key == "flask-sse-push:shards"
    event_id = publish(bus, C1, "x")
    assert event_id.count("-") == 1 and event_id.replace("-", "").isdigit()
    assert publish(bus, C1, "y", "0:1-0") == "0:1-0"  # no vector ids here: a caller's id
    assert bus.client.keys("*") and all(
        key.decode().startswith("flask-sse-push:shards") and ":0" not in key.decode()
        for key in bus.client.keys("*")
    )


def test_events_of_every_shard_are_delivered_with_vector_ids(
    make_bus: Callable[..., RedisBus],
) -> None:
    bus = make_bus()
    sub = Subscription([C0, C1, C2], 64)
    resume(bus, sub, None)
    for i, channel in enumerate([C0, C1, C2, C2, C0]):
        publish(bus, channel, f"{channel}/{i}")
    got = take(sub, 5)
    assert by_channel(got) == {
        C0: [f"{C0}/0", f"{C0}/4"],
        C1: [f"{C1}/1"],
        C2: [f"{C2}/2", f"{C2}/3"],
    }
    for event_id, _data in got:
        vector = bus.shards.parse(event_id)
        assert vector is not None and set(vector) == {0, 1, 2}, event_id
    bus.unsubscribe(sub)


def test_a_receiver_reads_only_the_shards_it_needs(make_bus: Callable[..., RedisBus]) -> None:
    bus = make_bus()
    receiver = bus.receiver
    keys = bus.shards.keys
    assert set(receiver.lasts) == {bus.key}  # the control stream only
    sub = Subscription([C1], 8)
    resume(bus, sub, None)
    assert set(receiver.lasts) == {bus.key, keys[1]}
    deadline = time.monotonic() + 2
    while receiver.reading != {bus.key, keys[1]} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert receiver.reading == {bus.key, keys[1]}
    # Redis sends it nothing of the other shards: their entries stay unread by it.
    publish(bus, C0, "other")
    publish(bus, C1, "mine")
    assert [data for _id, data in take(sub, 1)] == ["mine"]
    other = Subscription([C2], 8)
    resume(bus, other, None)
    assert set(receiver.lasts) == {bus.key, keys[1], keys[2]}
    bus.unsubscribe(sub)
    assert set(receiver.lasts) == {bus.key, keys[2]}
    bus.unsubscribe(other)
    assert set(receiver.lasts) == {bus.key}


def test_a_subscription_to_an_unread_shard_gets_what_is_published_right_after(
    make_bus: Callable[..., RedisBus],
) -> None:
    """The receiver is blocked reading other shards when the subscription arrives: it is
    interrupted, and reads the new shard from where it stood at subscribe time."""
    bus = make_bus()
    first = Subscription([C0], 8)
    resume(bus, first, None)
    time.sleep(0.2)  # the receiver is now blocked in XREAD on the control stream and shard 0
    for round_ in range(3):
        channel = [C1, C2, C1][round_]
        sub = Subscription([channel], 8)
        resume(bus, sub, None)
        started = time.monotonic()
        publish(bus, channel, f"right after {round_}")
        assert [d for _i, d in take(sub, 1, timeout=5)] == [f"right after {round_}"]
        assert time.monotonic() - started < 0.7  # under the 1 s of a blocked read
        bus.unsubscribe(sub)
        time.sleep(0.1)


@pytest.mark.parametrize("where", ["another receiver", "another app instance"])
def test_a_client_of_three_shards_resumes_elsewhere_without_loss_or_repeat(
    make_bus: Callable[..., RedisBus], shared_redis: RedisServer, where: str
) -> None:
    """A client following a channel in each shard reads some events on one receiver, then
    resumes from its last id on another while events keep coming: per channel it gets
    every event once, in order."""
    first = make_bus()
    if where == "another receiver":
        second = make_bus()
    else:
        app = Flask("other_instance")
        app.config.update(
            SSE_BUS_URL=shared_redis.url,
            SSE_REDIS_SHARDS=SHARDS,
            SSE_REDIS_KEY="flask-sse-push:shards",
            SSE_KEEPALIVE=0,
        )
        from flask_sse_push import SSEBlueprint

        app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
        second = get_state(app).bus  # type: ignore[assignment]
    channels = [C0, C1, C2]
    sub = Subscription(channels, 4096)
    resume(first, sub, None)
    # The other receiver reads only one of the shards before the client arrives there.
    warm = Subscription([C2], 4096)
    resume(second, warm, None)
    published: list[str] = []
    stop = threading.Event()

    def keep_publishing() -> None:
        i = 0
        while not stop.is_set():
            channel = channels[i % 3] if i % 7 else C1
            data = f"{channel}/{i}"
            publish(first, channel, data)
            published.append(data)
            i += 1
            time.sleep(0.001)

    publisher = threading.Thread(target=keep_publishing)
    publisher.start()
    try:
        got = take(sub, 60)
        first.unsubscribe(sub)
        last_id = got[-1][0]
        again = Subscription(channels, 4096)
        replayed = resume(second, again, last_id)
        assert replayed.reset is None
        time.sleep(0.3)
    finally:
        stop.set()
        publisher.join(5)
    time.sleep(0.3)
    rest = events(b"".join(replayed.replay)) + take(again, 0, timeout=0.5)
    while (more := again.take(0.3)) and more:
        rest += events(more)
    seen = by_channel(got[:60] + rest)
    assert seen == by_channel([("", d) for d in published])
    # Resuming from an id received on the second receiver works on the first, too.
    assert rest, "nothing arrived after the resume"
    third = Subscription(channels, 4096)
    assert resume(first, third, rest[len(rest) // 2][0]).reset is None


@pytest.mark.parametrize(
    "hostile",
    [
        "0:1-0.1:1-0.2:1-0.0:1-0",  # more parts than shards
        "0:1-0.0:2-0",  # a shard twice
        "7:1-0",  # a shard the bus does not have
        "1:99999999999999999999-0",  # a number Redis refuses
        "1:1-0,2:1-0",  # another separator
        "1:1-0;2:1-0",
        "1:1-0..2:1-0",  # an empty part
        "1:1-0." * 1700,  # 10 KB
        "1-0-0",
    ],
)
def test_hostile_vector_ids_get_a_clean_reset(
    make_bus: Callable[..., RedisBus], hostile: str
) -> None:
    bus = make_bus()
    head = publish(bus, C1, "1")
    sub = Subscription([C1], 8)
    result = resume(bus, sub, hostile)
    assert result.reset is not None
    assert result.reset.reason in (ResetReason.MALFORMED, ResetReason.UNKNOWN)
    assert result.reset.head_id == head
    publish(bus, C1, "after")
    assert [d for _i, d in take(sub, 1)] == ["after"]


def test_a_plain_stream_id_from_before_sharding_gets_a_reset(
    make_bus: Callable[..., RedisBus],
) -> None:
    bus = make_bus()
    publish(bus, C0, "1")
    result = resume(bus, Subscription([C0], 8), "1700000000000-0")
    assert result.reset is not None and result.reset.reason is ResetReason.UNKNOWN


def test_a_trimmed_shard_and_a_deleted_one_reset(make_bus: Callable[..., RedisBus]) -> None:
    bus = make_bus(SSE_HISTORY_SIZE=0)  # streams keep about 1,000 entries
    first = publish(bus, C0, "first")
    keep = publish(bus, C1, "kept")
    with bus.client.pipeline(transaction=False) as pipe:
        for i in range(3000):
            pipe.xadd(bus.shards.keys[0], {"c": C0, "b": f"data: {i}\n\n"}, maxlen=1000)
        pipe.execute()
    result = resume(bus, Subscription([C0, C1], 8), first)
    assert result.reset is not None and result.reset.reason is ResetReason.TOO_OLD
    # Shard 1 alone is intact.
    assert resume(bus, Subscription([C1], 8), keep).reset is None
    bus.client.delete(bus.shards.keys[1])
    publish(bus, C1, "new stream")
    vector = bus.shards.parse(keep)
    assert vector is not None
    vector[1] = (vector[1][0] + 10**6, 0)  # past the new stream's head
    result = resume(bus, Subscription([C1], 8), bus.shards.encode(vector))
    assert result.reset is not None and result.reset.reason is ResetReason.UNKNOWN


def test_a_refused_replay_ends_the_stream(make_bus: Callable[..., RedisBus]) -> None:
    bus = make_bus()
    first = publish(bus, C0, "1")
    bus.client.delete(bus.shards.keys[0])
    bus.client.set(bus.shards.keys[0], "not a stream")
    sub = Subscription([C0], 8)
    pending = bus.subscribe(sub, first).pending
    assert pending is not None
    with pytest.raises(BusError, match="refused"):
        pending()
    assert sub.reason is EndReason.ERROR
    bus.unsubscribe(sub)


def test_caller_ids_resume_in_their_shard(make_bus: Callable[..., RedisBus]) -> None:
    bus = make_bus()
    publish(bus, C2, "1", "order-1")
    publish(bus, C2, "2")
    result = resume(bus, Subscription([C2], 8), "order-1")
    assert result.reset is None
    assert [d for _i, d in events(b"".join(result.replay))] == ["2"]
    with pytest.raises(ValueError, match="form of the Redis bus's own ids"):
        publish(bus, C2, "x", "0:1-0")


def test_revocations_reach_receivers_that_read_other_shards(
    make_bus: Callable[..., RedisBus],
) -> None:
    here, there = make_bus(), make_bus()
    mine = Subscription([C0], 8)
    theirs = Subscription([C2], 8)
    resume(here, mine, None)
    resume(there, theirs, None)
    assert there.shards.keys[0] not in there.receiver.lasts
    here.end_streams(EndReason.REVOKED, channel=C2)
    deadline = time.monotonic() + 5
    while theirs.reason is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert theirs.reason is EndReason.REVOKED and mine.reason is None


def test_stats_and_health_with_shards(make_bus: Callable[..., RedisBus]) -> None:
    bus = make_bus()
    resume(bus, Subscription([C0, C2], 8), None)
    deadline = time.monotonic() + 5
    while not bus.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert bus.health() is None
    while bus.cluster_stats()["streams"] != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert bus.cluster_stats()["channels"] == {C0: 1, C2: 1}


@pytest.mark.parametrize("value", [0, -1, "3", True, 1.5, 65])
def test_the_setting_is_validated(value: object) -> None:
    with pytest.raises(ConfigurationError, match="SSE_REDIS_SHARDS must be a whole number"):
        Settings.from_mapping({**DEFAULTS, "SSE_REDIS_SHARDS": value})


@pytest.mark.e2e
def test_gunicorn_workers_resume_three_shard_clients_across_a_worker_restart(
    gunicorn: GunicornFactory, redis_server: RedisFactory
) -> None:
    """Clients following a channel in each of three shards, served by two gevent workers:
    one worker is restarted, its clients resume on any worker with their vector ids, and
    every client ends with every event once, in order within each channel."""
    redis = redis_server()
    server = serve(gunicorn, workers=2, SSE_BUS_URL=redis.url, SSE_REDIS_SHARDS=SHARDS)
    path = f"/stream?channel={C0}&channel={C1}&channel={C2}"
    crowd = Crowd(server.port, [path] * 40)
    published: list[str] = []

    def send(count: int, tag: str) -> None:
        for i in range(count):
            channel = (C0, C1, C2)[i % 3]
            publish_http(server.url, f"{channel}/{tag}{i}", channel=channel)
            published.append(f"{channel}/{tag}{i}")

    def streams() -> int:
        cluster = requests.get(server.url + "/stream/stats", timeout=5).json()["cluster"]
        return int(cluster["channels"].get(C1, 0))

    try:
        assert wait_for(lambda: streams() == 40, 15)
        send(30, "before")
        assert crowd.pump(lambda c: all(len(x.events) == 30 for x in c.clients), 20)
        processes = requests.get(server.url + "/stream/stats", timeout=5).json()["cluster"]
        busiest = max(
            processes["processes"].items(), key=lambda item: item[1]["channels"].get(C1, 0)
        )
        os.kill(int(busiest[0].rsplit(":", 2)[1]), signal.SIGTERM)
        send(15, "during")
        assert crowd.pump(lambda c: any(x.connects > 1 for x in c.clients), 15)
        send(15, "after")
        assert crowd.pump(lambda c: all(len(x.events) >= 60 for x in c.clients), 30)
        crowd.pump(lambda c: False, 0.5)  # anything repeated would arrive meanwhile
    finally:
        crowd.close()
    expected = by_channel([("", data) for data in published])
    for client in crowd.clients:
        assert all(e.type == "message" for e in client.events)
        assert by_channel([(e.last_event_id, e.data) for e in client.events]) == expected
    assert sum(client.connects > 1 for client in crowd.clients) >= 1


def test_wait_for_a_replica_with_shards(redis_server: RedisFactory) -> None:
    """SSE_REDIS_WAIT_REPLICAS holds per shard: an event confirmed by the replica answers
    its vector id; without a replica, publishing says the event may not survive."""
    primary, replica = redis_server(), redis_server()
    replica.client().replicaof("127.0.0.1", primary.port)

    def replicas() -> int:
        return int(primary.client().info("replication")["connected_slaves"])

    def synced() -> bool:
        return replica.client().info("replication").get("master_link_status") == "up"

    assert wait_for(synced, 10)
    config = {
        **DEFAULTS,
        "SSE_REDIS_SHARDS": SHARDS,
        "SSE_REDIS_WAIT_REPLICAS": 1,
        "SSE_REDIS_WAIT_TIMEOUT": 0.5,
    }
    bus = create_bus(primary.url, Settings.from_mapping(config), "wait")
    assert isinstance(bus, RedisBus)
    try:
        vector = bus.shards.parse(publish(bus, C1, "confirmed"))
        assert vector is not None and set(vector) == {0, 1, 2}
        replica.stop()
        assert wait_for(lambda: replicas() == 0, 10)
        with pytest.raises(PublishError, match="may or may not survive"):
            publish(bus, C2, "unconfirmed")
    finally:
        bus.close()


def test_a_new_shard_learnt_late_loses_nothing_published_after_subscribing(
    redis_server: RedisFactory,
) -> None:
    """Redis is down when a subscription needs a shard the receiver does not read yet: the
    shard's position is learnt once Redis is back, yet an event published after the
    subscription, before the receiver learnt the position, is delivered."""
    redis = redis_server()
    config = {**DEFAULTS, "SSE_KEEPALIVE": 0, "SSE_REDIS_SHARDS": SHARDS}
    bus = create_bus(redis.url, Settings.from_mapping(config), "late")
    assert isinstance(bus, RedisBus)
    try:
        first = Subscription([C0], 8)
        resume(bus, first, None)
        publish(bus, C1, "before")
        redis.stop()
        time.sleep(1.5)  # the receiver now retries every second or so
        sub = Subscription([C1], 8)
        resume(bus, sub, None)  # the shard's position could not be read
        redis.start()
        publish(bus, C1, "after")  # within milliseconds, before the receiver is back
        assert bus.receiver.lasts[bus.shards.keys[1]] is None, "the test came too late"
        publish(bus, C1, "later")
        assert [d for _i, d in take(sub, 2, timeout=5)] == ["after", "later"]
        bus.unsubscribe(first)
        bus.unsubscribe(sub)
    finally:
        bus.close()


def test_ids_answered_after_one_shard_was_deleted_resume_without_a_reset(
    make_bus: Callable[..., RedisBus],
) -> None:
    """One shard's stream alone is deleted: the ids send_event answers afterwards place
    the event before that shard's next stream, so resuming from them needs no reset."""
    bus = make_bus()
    publish(bus, C1, "old stream")
    bus.client.delete(bus.shards.keys[1])
    event_id = publish(bus, C0, "after the delete")
    vector = bus.shards.parse(event_id)
    assert vector is not None and vector[1] == (0, 0), event_id
    sub = Subscription([C0, C1], 8)
    result = resume(bus, sub, event_id)
    assert result.reset is None and result.replay == []
    publish(bus, C1, "new stream")
    assert [d for _i, d in take(sub, 1)] == ["new stream"]
    bus.unsubscribe(sub)


def test_an_idle_receiver_of_64_shards_costs_redis_little(shared_redis: RedisServer) -> None:
    """A receiver reading 64 idle shards and the control stream: each idle read (one a
    second) checks the position of a few of its streams in turn, not of every one."""
    shared_redis.client().flushdb()
    config = {**DEFAULTS, "SSE_KEEPALIVE": 0, "SSE_REDIS_SHARDS": 64}
    bus = create_bus(shared_redis.url, Settings.from_mapping(config), "idle")
    assert isinstance(bus, RedisBus)
    admin = shared_redis.client()

    def scripts() -> tuple[int, int]:
        stats = admin.info("commandstats").get("cmdstat_evalsha", {"calls": 0, "usec": 0})
        return int(stats["calls"]), int(stats["usec"])

    try:
        names = {bus.shards.shard_of(f"c{i}"): f"c{i}" for i in range(2000)}
        assert len(names) == 64
        sub = Subscription(list(names.values()), 8)
        resume(bus, sub, None)
        assert wait_for(lambda: len(bus.receiver.reading) == 65, 5)
        time.sleep(1.5)
        calls, usec = scripts()
        time.sleep(4)
        calls, usec = (now - before for now, before in zip(scripts(), (calls, usec), strict=True))
        print(f"\nidle, 64 shards: {calls / 4:.1f} scripts/s, {usec / 4:.0f} µs/s of Redis")
        assert calls / 4 <= 6
        bus.unsubscribe(sub)
    finally:
        bus.close()


def test_the_first_stream_of_one_stream_bus_while_redis_is_down_loses_nothing(
    redis_server: RedisFactory,
) -> None:
    """With one stream (SSE_REDIS_SHARDS = 1) the same holds for the first subscription of
    a process, which starts the receiver: Redis is down, so the stream's position is learnt
    later, yet what is published after the subscription is delivered."""
    redis = redis_server()
    config = {**DEFAULTS, "SSE_KEEPALIVE": 0}
    bus = create_bus(redis.url, Settings.from_mapping(config), "late")
    assert isinstance(bus, RedisBus)
    try:
        publish(bus, C1, "before")
        redis.stop()
        sub = Subscription([C1], 8)
        bus.subscribe(sub, None)  # the receiver starts; the position could not be read
        time.sleep(1.5)  # the receiver now retries every second or so
        redis.start()
        publish(bus, C1, "after")  # within milliseconds, before the receiver is back
        assert bus.receiver.last is None, "the test came too late"
        publish(bus, C1, "later")
        assert [d for _i, d in take(sub, 2, timeout=5)] == ["after", "later"]
        bus.unsubscribe(sub)
    finally:
        bus.close()

"""The Redis bus on a Redis Cluster (``redis+cluster://``), against a real cluster of three
primaries and three replicas made at test time: the URL and the hash tag, delivery and
resume on every worker, and the primary that serves the app's stream killed while events are
published and streams are open, without and with ``WAIT``."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from support.app import Apps
from support.failover import Failover, block_replication, bus_of, open_stream, resume
from support.procs import wait_for
from support.redis_cluster import ClusterSet
from support.redis_ha import Deployments, ask
from support.redis_server import require_redis_server
from test_redis_shards import by_channel, events, take
from test_redis_shards import resume as shard_resume

from flask_sse_push import ConfigurationError, EndReason, SSEBlueprint, end_streams, send_event
from flask_sse_push.bus import Subscription
from flask_sse_push.bus.redis_connect import Target

pytestmark = pytest.mark.redis


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], ClusterSet]]:
    """Make a cluster of six nodes; every node is stopped at the end."""
    redis_exe = require_redis_server()
    started = Deployments()
    yield lambda: started(ClusterSet(tmp_path_factory.mktemp("cluster"), redis_exe))
    started.stop()


def test_cluster_urls_and_hash_tags() -> None:
    target = Target.parse("redis+cluster://u:p@n1:7000,n2,[::1]:7002/")
    assert target.kind == "cluster"
    assert target.nodes == (("n1", 7000), ("n2", 6379), ("::1", 7002))
    assert target.auth == {"username": "u", "password": "p"}
    assert target.stream_key("flask-sse-push:app") == "{flask-sse-push:app}"
    assert target.stream_key("myapp:{events}") == "myapp:{events}"
    assert target.stream_key("odd{}key") == "{odd{}key}"
    assert Target.parse("redis://h/0").stream_key("a") == "a"
    for url in ("redis+cluster://n1/1", "redis+cluster://n1/?db=0", "redis+cluster:///"):
        app = Flask(__name__)
        app.config["SSE_BUS_URL"] = url
        with pytest.raises(ConfigurationError, match="SSE_BUS_URL"):
            app.register_blueprint(SSEBlueprint())


def test_every_key_in_one_slot_delivery_and_resume_on_every_worker(
    cluster: Callable[[], ClusterSet], apps: Apps
) -> None:
    deployment = cluster()
    workers = [apps(deployment.url, SSE_STATS=True) for _ in range(3)]
    readers = [open_stream(app) for app in workers]
    try:
        buses = [bus_of(app) for app in workers]
        ids = []
        for i, app in enumerate(workers):
            with app.app_context():
                ids.append(send_event(i, channel="a", id=f"order-{i}" if i == 1 else None))
        for reader in readers:
            assert [e.id for e in reader.events(count=3, timeout=15)] == ids
        # A revocation reaches the other workers through the stream, too.
        with workers[0].app_context():
            assert end_streams(channel="a") == 1
        for reader in readers[1:]:
            reader.events(timeout=5)
            assert reader.ended and reader.parser.comments[-1] == " revoked"
        assert all(b.connected for b in buses)
    finally:
        for reader in readers:
            reader.close()
    for app in workers:
        assert resume(app, ids[0], ids[2]) == ids[1:]
        assert resume(app, "order-1", ids[2]) == ids[2:]
    key = buses[0].key
    owner = deployment.owner(key)
    assert owner is not None
    keys = [k.decode() for k in ask(owner.port, "KEYS", "*")]
    assert sorted(keys) == sorted(key + suffix for suffix in ("", ":ids", ":epoch", ":stats"))
    slots = {ask(owner.port, "CLUSTER", "KEYSLOT", k) for k in keys}
    assert len(slots) == 1


def _failover(deployment: ClusterSet, apps: list[Flask], *, restart: bool) -> Failover:
    scenario = Failover(apps)
    scenario.open()
    key = bus_of(apps[0]).key
    old = deployment.owner(key)
    assert old is not None
    try:
        scenario.run(
            kill=old.kill,
            switched=lambda: deployment.switched(key, old),
            block=block_replication(old.port),
            # The only replica was promoted: the failed node comes back as its replica.
            then=old.start if restart else None,
        )
    finally:
        scenario.close()
    return scenario


def test_cluster_failover_without_wait(cluster: Callable[[], ClusterSet], apps: Apps) -> None:
    """The primary serving the stream dies: streams stay open, publishing fails only during
    the switch, every receiver follows the new primary; events acknowledged while the
    replica lagged are lost (the documented window), all others reach every stream and
    every resume."""
    deployment = cluster()
    workers = [apps(deployment.url) for _ in range(3)]
    scenario = _failover(deployment, workers, restart=False)
    print(f"\ncluster, no WAIT: {scenario.figures()}")
    assert scenario.lost()
    assert scenario.errors_after_switch(grace=1.0) == []
    scenario.check_streams()
    acked = [event_id for _, event_id in scenario.publisher.acked]
    scenario.check_resumes(acked[5])
    scenario.check_resumes(scenario.lost()[-1])


def test_cluster_failover_with_wait(cluster: Callable[[], ClusterSet], apps: Apps) -> None:
    """With SSE_REDIS_WAIT_REPLICAS = 1 no acknowledged event is lost; with one replica per
    shard, publishing goes on once the failed node is back as the new primary's replica."""
    deployment = cluster()
    config = {"SSE_REDIS_WAIT_REPLICAS": 1, "SSE_REDIS_WAIT_TIMEOUT": 0.2}
    workers = [apps(deployment.url, **config) for _ in range(3)]
    scenario = _failover(deployment, workers, restart=True)
    print(f"\ncluster, WAIT 1: {scenario.figures()}")
    assert scenario.lost() == []
    unconfirmed = [m for t, m in scenario.publisher.failed if t < scenario.killed_at]
    assert unconfirmed and all("may or may not survive" in m for m in unconfirmed)
    scenario.check_streams()
    acked = [event_id for _, event_id in scenario.publisher.acked]
    scenario.check_resumes(acked[5])


def test_shards_spread_over_the_primaries_and_resume_across_workers(
    cluster: Callable[[], ClusterSet], apps: Apps
) -> None:
    """With SSE_REDIS_SHARDS each shard's keys get a hash tag of their own: the shards live
    on several primaries, the keys of one shard in one slot. Each worker's receiver reads
    its streams with one connection each (a cluster refuses one XREAD across slots), and a
    client of four shards resumes on another worker without loss or repeat."""
    shards = 4
    deployment = cluster()
    config = {"SSE_REDIS_SHARDS": shards, "SSE_REDIS_KEY": "sse:cl", "SSE_KEEPALIVE": 0}
    workers = [apps(deployment.url, **config) for _ in range(2)]
    buses = [bus_of(app) for app in workers]
    keys = buses[0].shards.keys
    assert keys == [f"{{sse:cl:{shard}}}" for shard in range(shards)]
    channels = [
        next(f"c{i}" for i in range(1000) if zlib.crc32(f"c{i}".encode()) % shards == shard)
        for shard in range(shards)
    ]
    sub = Subscription(channels, 256)
    shard_resume(buses[0], sub, None)
    published = []
    for i in range(12):
        channel = channels[i % shards]
        buses[1].publish(channel, f"data: {channel}/{i}\n\n".encode(), "own-1" if i == 1 else None)
        published.append(f"{channel}/{i}")
    got = take(sub, 12)
    assert by_channel(got) == by_channel([("", data) for data in published])
    owners = {deployment.owner(key).port for key in keys}  # type: ignore[union-attr]
    assert len(owners) >= 2, "every shard landed on one primary"
    for key in keys:
        owner = deployment.owner(key)
        assert owner is not None
        own = [k.decode() for k in ask(owner.port, "KEYS", key + "*")]
        assert key in own and key + ":epoch" in own
        assert len({ask(owner.port, "CLUSTER", "KEYSLOT", k) for k in own}) == 1
    receiver = buses[0].receiver
    assert set(receiver._lanes) == {buses[0].key, *keys}
    # Resume on the other worker from the sixth event, while more come.
    again = Subscription(channels, 256)
    replayed = shard_resume(buses[1], again, got[5][0])
    assert replayed.reset is None
    for i in range(12, 16):
        channel = channels[i % shards]
        buses[0].publish(channel, f"data: {channel}/{i}\n\n".encode())
        published.append(f"{channel}/{i}")
    rest = events(b"".join(replayed.replay))
    rest += take(again, 16 - 6 - len(rest))
    assert by_channel(got[:6] + rest) == by_channel([("", data) for data in published])
    # A revocation reaches the other worker through the control stream.
    buses[1].end_streams(channel=channels[2])
    assert wait_for(lambda: sub.reason is EndReason.REVOKED, 5)
    buses[0].unsubscribe(sub)
    assert set(receiver._lanes) == {buses[0].key}


def test_cluster_failover_of_one_shard_with_wait(
    cluster: Callable[[], ClusterSet], apps: Apps
) -> None:
    """SSE_REDIS_SHARDS = 3 over the cluster's primaries, SSE_REDIS_WAIT_REPLICAS = 1: the
    primary of one shard's slot dies while events go to a channel in each shard. Streams
    stay open, publishing fails only during the switch (and only to that shard), every
    receiver's lane goes on from its last entry, and clients resuming from their vector
    ids, on any worker, lose nothing that was acknowledged."""
    deployment = cluster()
    config = {
        "SSE_REDIS_SHARDS": 3,
        "SSE_REDIS_KEY": "sse:fo",
        "SSE_REDIS_WAIT_REPLICAS": 1,
        "SSE_REDIS_WAIT_TIMEOUT": 0.2,
    }
    workers = [apps(deployment.url, **config) for _ in range(3)]
    channels = [
        next(f"c{i}" for i in range(100) if zlib.crc32(f"c{i}".encode()) % 3 == shard)
        for shard in range(3)
    ]
    scenario = Failover(workers, channels=channels)
    scenario.open()
    key = bus_of(workers[0]).shards.keys[1]
    old = deployment.owner(key)
    assert old is not None
    try:
        scenario.run(
            kill=old.kill,
            switched=lambda: deployment.switched(key, old),
            block=block_replication(old.port),
            then=old.start,  # back as the new primary's replica, so WAIT 1 can succeed
        )
    finally:
        scenario.close()
    publisher = scenario.publisher
    failed = [(t - scenario.killed_at, n) for t, n in publisher.failed_numbers]
    after = [(t, n) for t, n in failed if t >= 0]
    back = min(
        t - scenario.killed_at
        for t, event_id in publisher.acked
        if publisher.numbers[event_id] % 3 == 1 and t > scenario.killed_at + after[-1][0]
    )
    others = [t for t, n in after if n % 3 != 1]
    print(
        f"\ncluster, 3 shards, WAIT 1: {scenario.figures()}; publish errors after the kill: "
        f"{len(after)}, from {after[0][0]:.2f} s to {after[-1][0]:.2f} s; in the other "
        f"shards {len(others)}"
        + (f", from {others[0]:.2f} s to {others[-1]:.2f} s" if others else "")
        + f"; shard 1 acknowledged again at {back:.2f} s"
    )
    assert scenario.lost() == []
    # The failed node must come back as a replica before WAIT 1 succeeds again.
    assert scenario.errors_after_switch(grace=2.0) == []
    scenario.check_shards(keepalives=False)

"""The Redis bus on a Redis Cluster (``redis+cluster://``), against a real cluster of three
primaries and three replicas made at test time: the URL and the hash tag, delivery and
resume on every worker, and the primary that serves the app's stream killed while events are
published and streams are open, without and with ``WAIT``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from support.app import Apps
from support.failover import Failover, block_replication, bus_of, open_stream, resume
from support.redis_cluster import ClusterSet
from support.redis_ha import Deployments, ask
from support.redis_server import require_redis_server

from flask_sse_push import ConfigurationError, SSEBlueprint, end_streams, send_event
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

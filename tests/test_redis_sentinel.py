"""The Redis bus on a primary that Redis Sentinel manages (``redis+sentinel://``), against real
``redis-server`` and ``redis-sentinel`` processes: the URL, delivery, and the primary killed
while events are published and streams are open, without and with ``WAIT``."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask import Flask
from support.app import Apps
from support.failover import Failover, block_replication, bus_of
from support.redis_ha import (
    SENTINEL_MISSING_MESSAGE,
    Deployments,
    SentinelSet,
    ask,
    redis_sentinel_executable,
)
from support.redis_server import require_redis_server

from flask_sse_push import ConfigurationError, PublishError, SSEBlueprint, send_event
from flask_sse_push.bus.redis_connect import Target
from flask_sse_push.testing import EventReader

pytestmark = pytest.mark.redis

#: A channel in each of three shards.
SHARD_CHANNELS = [
    next(f"c{i}" for i in range(100) if zlib.crc32(f"c{i}".encode()) % 3 == shard)
    for shard in range(3)
]


@pytest.fixture
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[int], SentinelSet]]:
    """Start a primary with *n* replicas and three sentinels; all stopped at the end."""
    redis_exe = require_redis_server()
    sentinel_exe = redis_sentinel_executable()
    if sentinel_exe is None:
        if "CI" in os.environ:
            pytest.fail(SENTINEL_MISSING_MESSAGE, pytrace=False)
        pytest.skip(SENTINEL_MISSING_MESSAGE)
    started = Deployments()

    def start(replicas: int) -> SentinelSet:
        work_dir = tmp_path_factory.mktemp("sentinel")
        return started(SentinelSet(work_dir, redis_exe, sentinel_exe, replicas))

    yield start
    started.stop()


# -- the URL ---------------------------------------------------------------------------------


def test_sentinel_urls() -> None:
    target = Target.parse("redis+sentinel://:secret@h1,h2:26380,[::1]:26381/mymaster/3")
    assert target.kind == "sentinel"
    assert target.nodes == (("h1", 26379), ("h2", 26380), ("::1", 26381))
    assert (target.service, target.db, target.auth) == ("mymaster", 3, {"password": "secret"})
    assert "secret" not in target.describe()
    with_auth = Target.parse("redis+sentinel://u:p@h/s?sentinel_password=sp")
    assert with_auth.auth == {"username": "u", "password": "p"}
    assert with_auth.sentinel_auth == {"password": "sp"}
    assert Target.parse("redis://h:1/0").kind == "server"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://h:26379", "name the service"),
        ("redis+sentinel://h/s/x", "name the service"),
        ("redis+sentinel://h:port/s", "not a host"),
        ("redis+sentinel:///s", "no host"),
        ("redis+sentinel://h/s?socket_timeout=1", "unknown option"),
    ],
)
def test_bad_sentinel_urls_are_refused(url: str, problem: str) -> None:
    app = Flask(__name__)
    app.config["SSE_BUS_URL"] = url
    with pytest.raises(ConfigurationError, match=problem):
        app.register_blueprint(SSEBlueprint())


def test_a_bracketed_host_must_be_an_ipv6_address() -> None:
    with pytest.raises(ConfigurationError, match="IPv6"):
        Target.parse("redis+sentinel://[nothost]:1,h/s")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("SSE_REDIS_WAIT_REPLICAS", -1),
        ("SSE_REDIS_WAIT_REPLICAS", "1"),
        ("SSE_REDIS_WAIT_REPLICAS", True),
        ("SSE_REDIS_WAIT_TIMEOUT", 0),
    ],
)
def test_bad_wait_settings_are_refused(key: str, value: object) -> None:
    app = Flask(__name__)
    app.config.update({"SSE_BUS_URL": "redis://127.0.0.1:9/0", key: value})
    with pytest.raises(ConfigurationError, match=key):
        app.register_blueprint(SSEBlueprint())


# -- the failover ----------------------------------------------------------------------------


def test_publish_and_stream_through_sentinel(
    sentinels: Callable[[int], SentinelSet], apps: Apps
) -> None:
    """Delivery through the primary the sentinels name; 40 publishers at once share the
    process's bounded pool (they wait for a connection, none fails)."""
    deployment = sentinels(1)
    app = apps(deployment.url)
    with EventReader(app.test_client().get("/stream?channel=a", buffered=False)) as reader:
        with app.app_context():
            event_id = send_event("hello", channel="a")
        assert [(e.data, e.id) for e in reader.events(count=1, timeout=10)] == [("hello", event_id)]

    def publish(n: int) -> str:
        with app.app_context():
            return send_event(n, channel="b")

    with ThreadPoolExecutor(40) as pool:
        ids = list(pool.map(publish, range(200)))
    assert len(set(ids)) == 200
    assert ask(deployment.primary.port, "XLEN", bus_of(app).key) == 201
    clients = ask(deployment.primary.port, "CLIENT", "LIST").decode()
    publishing = clients.count(f"name=flask-sse-push:publish:{os.getpid()}")
    assert 1 <= publishing <= 10


def _failover(deployment: SentinelSet, apps: list[Flask], block: bool) -> Failover:
    scenario = Failover(apps)
    scenario.open()
    old = deployment.primary
    try:
        scenario.run(
            kill=old.kill,
            switched=lambda: deployment.primary_port() not in (None, old.port),
            block=block_replication(old.port) if block else None,
        )
        deployment.wait_failover(old.port)
    finally:
        scenario.close()
    return scenario


def _report(name: str, scenario: Failover) -> None:
    print(f"\n{name}: {scenario.figures()}")


def test_failover_without_wait_loses_what_was_not_replicated(
    sentinels: Callable[[int], SentinelSet], apps: Apps
) -> None:
    """Streams stay open and go on from the new primary; publishing fails only during the
    switch; events acknowledged while the replica lagged are lost (the documented window),
    and everything Redis still holds reaches every stream and every resume."""
    deployment = sentinels(1)
    workers = [apps(deployment.url) for _ in range(3)]
    scenario = _failover(deployment, workers, block=True)
    _report("sentinel, no WAIT", scenario)
    figures = scenario.figures()
    assert scenario.lost(), "blocked replication: the acknowledged events after it are lost"
    assert figures["last error"] is None or figures["last error"] < 20
    assert scenario.errors_after_switch(grace=1.0) == []
    scenario.check_streams()
    acked = [event_id for _, event_id in scenario.publisher.acked]
    scenario.check_resumes(acked[5])
    scenario.check_resumes(scenario.lost()[-1])  # a lost id resumes after its place


def test_failover_with_wait_loses_no_acknowledged_event(
    sentinels: Callable[[int], SentinelSet], apps: Apps
) -> None:
    """With SSE_REDIS_WAIT_REPLICAS = 1 an event is acknowledged only once a replica has it:
    publishes while replication is cut raise, saying the event may or may not survive; no
    acknowledged event is lost across the failover."""
    deployment = sentinels(2)
    config = {"SSE_REDIS_WAIT_REPLICAS": 1, "SSE_REDIS_WAIT_TIMEOUT": 0.2}
    workers = [apps(deployment.url, **config) for _ in range(3)]
    scenario = _failover(deployment, workers, block=True)
    _report("sentinel, WAIT 1", scenario)
    assert scenario.lost() == []
    assert scenario.blocked_at is not None
    unconfirmed = [m for t, m in scenario.publisher.failed if t < scenario.killed_at]
    assert unconfirmed, "publishes while replication was cut must raise"
    assert all("may or may not survive" in m for m in unconfirmed), unconfirmed[:1]
    assert scenario.errors_after_switch(grace=1.0) == []
    scenario.check_streams()
    acked = [event_id for _, event_id in scenario.publisher.acked]
    scenario.check_resumes(acked[5])


def test_publish_error_names_the_sentinel_service(apps: Apps) -> None:
    app = apps("redis+sentinel://127.0.0.1:9/nowhere/0")
    with app.app_context(), pytest.raises(PublishError, match="Sentinel calls 'nowhere'"):
        send_event("x", channel="a")


def test_failover_with_shards_and_wait_loses_nothing(
    sentinels: Callable[[int], SentinelSet], apps: Apps
) -> None:
    """SSE_REDIS_SHARDS = 3 and SSE_REDIS_WAIT_REPLICAS = 1, events published to a channel
    in each shard: the primary dies, streams stay open, publishing fails only during the
    switch, every receiver goes on in every shard from its last entry, and clients
    resuming from their vector ids, on any worker, lose nothing that was acknowledged."""
    deployment = sentinels(2)
    config = {"SSE_REDIS_SHARDS": 3, "SSE_REDIS_WAIT_REPLICAS": 1, "SSE_REDIS_WAIT_TIMEOUT": 0.2}
    workers = [apps(deployment.url, **config) for _ in range(3)]
    scenario = Failover(workers, channels=SHARD_CHANNELS)
    scenario.open()
    old = deployment.primary
    try:
        scenario.run(
            kill=old.kill,
            switched=lambda: deployment.primary_port() not in (None, old.port),
            block=block_replication(old.port),
        )
        deployment.wait_failover(old.port)
    finally:
        scenario.close()
    _report("sentinel, 3 shards, WAIT 1", scenario)
    assert scenario.lost() == []
    unconfirmed = [m for t, m in scenario.publisher.failed if t < scenario.killed_at]
    assert unconfirmed and all("may or may not survive" in m for m in unconfirmed)
    assert scenario.errors_after_switch(grace=1.0) == []
    scenario.check_shards()

"""The Redis bus over TLS on Sentinel and Cluster (``rediss+sentinel://``,
``rediss+cluster://``), against real ``redis-server`` and ``redis-sentinel`` processes that
speak TLS only (``--port 0``), with replication, the sentinels and the cluster bus over TLS
too and a client certificate required: the URL's TLS parameters, delivery, a primary killed,
resume on another worker, and what a wrong CA says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from flask import Flask
from support.app import Apps
from support.failover import Failover, open_stream, resume
from support.redis_cluster import ClusterSet
from support.redis_ha import (
    SENTINEL_MISSING_MESSAGE,
    Deployments,
    SentinelSet,
    redis_sentinel_executable,
)
from support.redis_server import require_redis_server
from support.tls import RedisTls

from flask_sse_push import ConfigurationError, PublishError, SSEBlueprint, send_event
from flask_sse_push.bus.redis_connect import Target

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> RedisTls:
    return RedisTls.make(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> RedisTls:
    """A certificate that signed none of the servers'."""
    return RedisTls.make(tmp_path_factory.mktemp("other-ca"))


@pytest.fixture
def deployments() -> Iterator[Deployments]:
    started = Deployments()
    yield started
    started.stop()


# -- the URL ---------------------------------------------------------------------------------


def test_tls_urls(certificate: RedisTls) -> None:
    ca = quote(str(certificate.cert))
    target = Target.parse(
        f"rediss+sentinel://:pw@h1,h2:26380/mymaster/1?ssl_ca_certs={ca}"
        "&ssl_check_hostname=no&sentinel_password=sp"
    )
    assert (target.kind, target.service, target.db, target.sentinel_tls) == (
        "sentinel",
        "mymaster",
        1,
        True,
    )
    assert target.tls == {
        "ssl": True,
        "ssl_ca_certs": str(certificate.cert),
        "ssl_check_hostname": False,
    }
    assert target.sentinel_auth == {"password": "sp"}
    assert "over TLS" in target.describe()
    mixed = Target.parse("rediss+sentinel://h/s?sentinel_ssl=false&ssl_cert_reqs=none")
    assert mixed.sentinel_tls is False
    assert mixed.tls == {"ssl": True, "ssl_cert_reqs": "none", "ssl_check_hostname": False}
    cluster = Target.parse(f"rediss+cluster://n1:7000,n2/?{certificate.query()}")
    assert (cluster.kind, cluster.nodes) == ("cluster", (("n1", 7000), ("n2", 6379)))
    assert cluster.tls["ssl_keyfile"] == str(certificate.key)
    assert Target.parse("redis+cluster://n1/").tls == {}


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("rediss+sentinel://h/s?ssl_cert_reqs=maybe", "none of required, optional, none"),
        ("rediss+sentinel://h/s?ssl_check_hostname=perhaps", "neither true nor false"),
        ("rediss+sentinel://h/s?sentinel_ssl=2", "sentinel_ssl='2' is neither"),
        ("rediss+sentinel://h/s?ssl_ca_certs=/no/such/ca.pem", "not a readable file"),
        ("rediss+cluster://h/?ssl_keyfile=CERT", "ssl_keyfile needs ssl_certfile"),
        ("rediss+cluster://h/?ssl_cert_reqs=none&ssl_check_hostname=1", "needs certificates"),
        ("rediss+cluster://h/?sentinel_ssl=no", "for rediss\\+sentinel:// only"),
        ("rediss+cluster://h/?ssl_ciphers=x", "takes no other options"),
        ("rediss+sentinel://h/s?ssl_ciphers=x", "unknown option 'ssl_ciphers'"),
        ("redis+sentinel://h/s?ssl_ca_certs=CERT", "the scheme is rediss\\+sentinel://"),
        ("redis+cluster://h/?ssl_cert_reqs=none", "the scheme is rediss\\+cluster://"),
    ],
)
def test_bad_tls_urls_are_refused(url: str, problem: str, certificate: RedisTls) -> None:
    app = Flask(__name__)
    app.config["SSE_BUS_URL"] = url.replace("CERT", str(certificate.cert))
    with pytest.raises(ConfigurationError, match=problem):
        app.register_blueprint(SSEBlueprint())


# -- real deployments ------------------------------------------------------------------------


def _wrong_ca(url: str, good: RedisTls, other: RedisTls) -> str:
    return url.replace(f"ssl_ca_certs={good.cert}", f"ssl_ca_certs={other.cert}")


def _check_wrong_ca(apps: Apps, url: str) -> None:
    """A bus whose CA did not sign the servers' certificates: health 503 and a publish error,
    each saying to check ssl_ca_certs."""
    app = apps(url, SSE_HEALTH=True)
    response = app.test_client().get("/stream/health")
    assert response.status_code == 503
    problems = " ".join(response.get_json()["problems"])
    assert "ssl_ca_certs" in problems, problems
    with app.app_context(), pytest.raises(PublishError, match="check that ssl_ca_certs names"):
        send_event("x", channel="a")


def test_sentinel_over_tls_survives_a_primary_kill(
    deployments: Deployments,
    tmp_path: Path,
    certificate: RedisTls,
    other_ca: RedisTls,
    apps: Apps,
) -> None:
    """Three workers publish and stream through TLS sentinels and a TLS primary; the primary
    is killed: the sentinels promote the replica (over TLS), streams stay open and go on,
    resumes on every worker get what Redis holds."""
    sentinel_exe = redis_sentinel_executable()
    if sentinel_exe is None:
        pytest.skip(SENTINEL_MISSING_MESSAGE)
    deployment = deployments(
        SentinelSet(tmp_path, require_redis_server(), sentinel_exe, 1, tls=certificate)
    )
    assert deployment.url.startswith("rediss+sentinel://")
    workers = [apps(deployment.url) for _ in range(3)]
    scenario = Failover(workers)
    scenario.open()
    old = deployment.primary
    try:
        scenario.run(
            kill=old.kill, switched=lambda: deployment.primary_port() not in (None, old.port)
        )
        deployment.wait_failover(old.port)
    finally:
        scenario.close()
    print(f"\nsentinel over TLS: {scenario.figures()}")
    assert scenario.errors_after_switch(grace=1.0) == []
    scenario.check_streams()
    acked = [event_id for _, event_id in scenario.publisher.acked]
    scenario.check_resumes(acked[5])
    _check_wrong_ca(apps, _wrong_ca(deployment.url, certificate, other_ca))


def test_plaintext_sentinels_in_front_of_tls_servers(
    deployments: Deployments, tmp_path: Path, certificate: RedisTls, apps: Apps
) -> None:
    """``sentinel_ssl=false``: the bus asks the sentinels in plaintext and speaks TLS to the
    primary they name (which listens to nothing else)."""
    sentinel_exe = redis_sentinel_executable()
    if sentinel_exe is None:
        pytest.skip(SENTINEL_MISSING_MESSAGE)
    made = SentinelSet(
        tmp_path, require_redis_server(), sentinel_exe, 1, certificate, plaintext_sentinels=True
    )
    deployment = deployments(made)
    assert "sentinel_ssl=false" in deployment.url
    app = apps(deployment.url)
    with open_stream(app) as reader:
        with app.app_context():
            event_id = send_event("mixed", channel="a")
        assert [(e.data, e.id) for e in reader.events(count=1, timeout=10)] == [("mixed", event_id)]
    tls_url = deployment.url.replace("&sentinel_ssl=false", "")
    with apps(tls_url).app_context(), pytest.raises(PublishError, match="did not answer in TLS"):
        send_event("x", channel="a")


def test_cluster_over_tls_delivers_and_resumes_on_another_worker(
    deployments: Deployments,
    tmp_path: Path,
    certificate: RedisTls,
    other_ca: RedisTls,
    apps: Apps,
) -> None:
    deployment = deployments(ClusterSet(tmp_path, require_redis_server(), tls=certificate))
    assert deployment.url.startswith("rediss+cluster://")
    workers: list[Flask] = [apps(deployment.url) for _ in range(2)]
    ids = []
    with open_stream(workers[0]) as reader:
        for n in range(3):
            with workers[n % 2].app_context():
                ids.append(send_event(n, channel="a"))
        assert [e.id for e in reader.events(count=3, timeout=15)] == ids
    assert resume(workers[1], ids[0], ids[2]) == ids[1:]
    _check_wrong_ca(apps, _wrong_ca(deployment.url, certificate, other_ca))


def test_an_unreachable_tls_node_gets_no_tls_hint(apps: Apps, certificate: RedisTls) -> None:
    """Nothing listening: the message is the general one, and says nothing of certificates."""
    app = apps(f"rediss+sentinel://127.0.0.1:9/nowhere/0?{certificate.query()}")
    with app.app_context(), pytest.raises(PublishError) as raised:
        send_event("x", channel="a")
    assert "TLS:" not in str(raised.value)
    assert "127.0.0.1:9" in str(raised.value)

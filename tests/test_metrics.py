"""Prometheus metrics in one process, through Flask's test client, on both buses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.app import publish as publish_to
from support.app import serve
from support.clients import Crowd
from support.flask_apps import AppFactory
from support.gunicorn import GunicornFactory
from support.procs import wait_for
from support.redis_server import RedisFactory

from flask_sse_push import ConfigurationError, PublishError, SSEBlueprint, get_state, send_event
from flask_sse_push.bus import Message, Subscription
from flask_sse_push.metrics import SAMPLE_EVERY, SAMPLE_STREAMS, Metrics
from flask_sse_push.testing import EventReader

Maker = Callable[..., tuple[Flask, SSEBlueprint]]


@pytest.fixture
def make(bus_url: str) -> Iterator[Maker]:
    """Apps with metrics at ``/metrics`` on the backend under test."""
    factory = AppFactory(
        SSE_BUS_URL=bus_url, SSE_KEEPALIVE=0.2, SSE_METRICS_PATH="/metrics", SSE_PUBLISH_TIMEOUT=1
    )
    yield factory
    factory.close()


def parse(text: str) -> dict[str, float]:
    """Every sample of a scrape, parsed by ``prometheus_client``'s own parser:
    ``name{label="value",...}`` -> value."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def scrape(app: Flask) -> dict[str, float]:
    """The app's metrics, through the test client."""
    response = app.test_client().get("/metrics")
    assert response.status_code == 200, response.get_data(as_text=True)
    return parse(response.get_data(as_text=True))


def publish(app: Flask, data: Any, channel: str = "a") -> str:
    with app.app_context():
        return send_event(data, channel=channel)


def open_stream(app: Flask, channel: str = "a", last_event_id: str | None = None) -> Any:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    return app.test_client().get(f"/stream?channel={channel}", headers=headers, buffered=False)


def test_streams_events_deliveries_and_the_lag_of_the_first_event(make: Maker) -> None:
    app, _ = make()
    with EventReader(open_stream(app)) as one, EventReader(open_stream(app)) as two:
        EventReader(open_stream(app, "b")).close()
        assert scrape(app)["sse_open_streams"] == 2
        ids = [publish(app, n) for n in range(3)]
        for reader in (one, two):
            assert [e.id for e in reader.events(count=3, timeout=10)] == ids
        # The first event of the process is sampled: each stream observes it once written.
        assert wait_for(lambda: scrape(app)["sse_delivery_lag_seconds_count"] == 2, 5)
        metrics = scrape(app)
    assert metrics["sse_worker_open_streams"] == 2
    assert metrics["sse_events_published_total"] == 3
    assert metrics["sse_deliveries_total"] == 6
    assert 0 < metrics["sse_delivery_lag_seconds_sum"] < 5
    assert metrics['sse_delivery_lag_seconds_bucket{le="+Inf"}'] == 2
    assert metrics["sse_publish_errors_total"] == 0
    assert wait_for(lambda: scrape(app)["sse_open_streams"] == 0, 5)


def test_one_event_in_sample_every_is_sampled(make: Maker) -> None:
    app, _ = make()
    with EventReader(open_stream(app)) as reader:
        # Each event is read before the next: a sample still queued would keep its place.
        for n in range(SAMPLE_EVERY + 1):
            publish(app, n)
            assert len(reader.events(count=1, timeout=10)) == 1
        assert wait_for(lambda: scrape(app)["sse_delivery_lag_seconds_count"] == 2, 5)
    assert scrape(app)["sse_deliveries_total"] == SAMPLE_EVERY + 1


@pytest.mark.parametrize(("streams", "step"), [(0, 1), (5, 1), (64, 1), (100, 2), (1000, 16)])
def test_a_sampled_event_stamps_a_bounded_spread_of_streams(streams: int, step: int) -> None:
    metrics = Metrics(CollectorRegistry(), multiprocess=False)
    subs = [Subscription(["a"], 10) for _ in range(streams)]

    def stamped(at: float) -> list[int]:
        return [i for i, sub in enumerate(subs) if sub.sent == at]

    metrics.delivered(Message("a", "1", b"", time=1000.0), subs)  # the first is sampled
    assert stamped(1000.0) == list(range(0, streams, step))
    assert len(stamped(1000.0)) <= SAMPLE_STREAMS
    for n in range(2, SAMPLE_EVERY + 1):  # not sampled
        metrics.delivered(Message("a", str(n), b"", time=2000.0 + n), subs)
    assert len(stamped(0.0)) + len(stamped(1000.0)) == streams
    if subs:
        subs[0].sent = 0.0  # its stream wrote the sampled event; the others did not yet
    metrics.delivered(Message("a", "17", b"", time=3000.0), subs)  # sampled
    assert stamped(3000.0) == ([0] if subs else [])  # the others keep the older sample
    samples = parse(generate_latest(metrics.registry).decode())
    assert samples["sse_deliveries_total"] == streams * (SAMPLE_EVERY + 1)


def test_replayed_events_and_resets_by_reason(make: Maker) -> None:
    app, _ = make()
    first, *_ = [publish(app, n) for n in range(3)]
    with EventReader(open_stream(app, last_event_id=first)) as resumed:
        assert [e.data for e in resumed.events(count=2, timeout=10)] == ["1", "2"]
    for bad in ("unknown-7", "x" * 300):
        with EventReader(open_stream(app, last_event_id=bad)) as reset:
            assert [e.type for e in reset.events(count=1, timeout=10)] == ["sse-reset"]
    metrics = scrape(app)
    assert metrics["sse_replayed_events_total"] == 2
    assert metrics['sse_resets_total{reason="unknown"}'] == 1
    assert metrics['sse_resets_total{reason="malformed"}'] == 1
    assert metrics['sse_resets_total{reason="too-old"}'] == 0


def test_slow_clients_dropped(make: Maker) -> None:
    app, _ = make(SSE_QUEUE_SIZE=2)
    with EventReader(open_stream(app)) as fast:
        stalled = open_stream(app)
        next(iter(stalled.response))
        for n in range(4):  # the third overflows the stalled reader's queue
            event_id = publish(app, n)
            assert [e.id for e in fast.events(count=1, timeout=10)] == [event_id]
        stalled.close()
    metrics = scrape(app)
    assert metrics["sse_slow_clients_dropped_total"] == 1
    assert metrics["sse_deliveries_total"] == 4 + 2


def test_authorize_metrics_guards_the_path(make: Maker) -> None:
    app, blueprint = make()
    allowed: list[bool] = [False]

    @blueprint.authorize_metrics
    def monitoring_only() -> bool:
        return allowed[0]

    response = app.test_client().get("/metrics")
    assert response.status_code == 403
    allowed[0] = True
    response = app.test_client().get("/metrics", headers={"Accept": "text/plain"})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize(
    ("value", "match"),
    [("metrics", "starting with '/'"), (7, "SSE_METRICS_PATH must be None")],
)
def test_a_bad_metrics_path_is_refused(value: object, match: str) -> None:
    app = Flask(__name__)
    app.config["SSE_METRICS_PATH"] = value
    with pytest.raises(ConfigurationError, match=match):
        app.register_blueprint(SSEBlueprint())


def test_without_the_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    app = Flask(__name__)
    app.config["SSE_METRICS_PATH"] = "/metrics"
    with pytest.raises(ConfigurationError, match=r"pip install 'flask-sse-push\[metrics\]'"):
        app.register_blueprint(SSEBlueprint())


def test_metrics_are_off_by_default_and_import_nothing() -> None:
    """Without ``SSE_METRICS_PATH``: no route, no metrics object, and streams and publishes
    never import ``prometheus_client`` (checked in a fresh interpreter)."""
    script = textwrap.dedent(
        """
        import sys
        from flask import Flask
        from flask_sse_push import SSEBlueprint, get_state, send_event
        from flask_sse_push.testing import EventReader

        app = Flask(__name__)
        app.config["SSE_KEEPALIVE"] = 0.2
        app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
        client = app.test_client()
        with EventReader(client.get("/stream", buffered=False)) as reader:
            with app.app_context():
                send_event("x")
            assert len(reader.events(count=1, timeout=10)) == 1
        print(
            get_state(app).metrics,
            client.get("/metrics").status_code,
            "prometheus_client" in sys.modules,
        )
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "404", "False"]


def test_multiprocess_files_still_empty_are_skipped(tmp_path: Path) -> None:
    """A worker creates its file before sizing it: a file of 0 bytes (a worker starting, or
    killed at that moment) neither fails the app's set-up nor the scrape."""
    for name in ("counter_4242.db", "gauge_livesum_4242.db", "histogram_4243.db"):
        (tmp_path / name).touch()
    script = textwrap.dedent(
        """
        from flask import Flask
        from flask_sse_push import SSEBlueprint, send_event

        app = Flask(__name__)
        app.config["SSE_METRICS_PATH"] = "/metrics"
        app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
        with app.app_context():
            send_event("x")
        response = app.test_client().get("/metrics")
        print(response.status_code)
        print(response.get_data(as_text=True))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    status, text = done.stdout.split("\n", 1)
    assert status == "200"
    metrics = parse(text)
    assert metrics["sse_events_published_total"] == 1
    assert metrics["sse_open_streams"] == 0
    assert len(per_worker(metrics)) == 1  # the script's process


@pytest.mark.redis
def test_publish_errors_are_counted(redis_server: RedisFactory) -> None:
    server = redis_server()
    app = Flask(__name__)
    app.config.update(SSE_BUS_URL=server.url, SSE_METRICS_PATH="/metrics", SSE_PUBLISH_TIMEOUT=1)
    app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
    try:
        publish(app, "sent")
        server.stop()
        with pytest.raises(PublishError):
            publish(app, "lost")
        metrics = scrape(app)
    finally:
        get_state(app).bus.close()
    assert (metrics["sse_events_published_total"], metrics["sse_publish_errors_total"]) == (1, 1)


# -- four gunicorn workers on the Redis bus ----------------------------------------------------

WORKERS = 4
#: Streams per worker: with SSE_MAX_CONNECTIONS at this, a full worker turns clients away
#: and they reconnect until every worker holds as many (the kernel alone often hands one
#: worker nearly every connection).
PER_WORKER = 6
CLIENTS = WORKERS * PER_WORKER
EVENTS = 5


def per_worker(samples: dict[str, float]) -> dict[str, float]:
    """``sse_worker_open_streams`` by worker pid."""
    prefix = 'sse_worker_open_streams{pid="'
    return {k[len(prefix) : -2]: v for k, v in samples.items() if k.startswith(prefix)}


@pytest.mark.e2e
@pytest.mark.redis
def test_four_workers_answer_the_sums(
    gunicorn: GunicornFactory, redis_server: RedisFactory, tmp_path: Path
) -> None:
    """Any worker answers a scrape with the sums over all four: every worker delivers each
    event to its own clients, and the counts add up to events x clients."""
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    server = serve(
        gunicorn,
        workers=WORKERS,
        env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)},
        SSE_BUS_URL=redis_server().url,
        SSE_METRICS_PATH="/metrics",
        SSE_MAX_CONNECTIONS=PER_WORKER,
        SSE_RETRY=50,  # turned-away clients come back soon
        SSE_KEEPALIVE=0.2,  # closed clients are noticed at the second keep-alive
    )

    def metrics() -> dict[str, float]:
        try:
            response = requests.get(server.url + "/metrics", timeout=10)
        except requests.RequestException as exc:
            raise AssertionError(f"{exc}; gunicorn's log:\n{server.log_text()}") from exc
        assert response.status_code == 200, f"{response.text}\ngunicorn's log:\n{server.log_text()}"
        return parse(response.text)

    crowd = Crowd(server.port, ["/stream?channel=m"] * CLIENTS)
    try:
        assert crowd.pump(lambda c: metrics()["sse_open_streams"] == CLIENTS, 30)
        holding = per_worker(metrics())
        assert sorted(holding.values()) == [PER_WORKER] * WORKERS
        assert set(holding) == {str(pid) for pid in server.worker_pids()}
        for n in range(EVENTS):
            publish_to(server.url, f"event-{n}", channel="m")
        assert crowd.pump(lambda c: all(len(x.events) == EVENTS for x in c.clients), 20)
        # The first event of each worker is sampled; each of its streams observes it.
        assert wait_for(lambda: metrics()["sse_delivery_lag_seconds_count"] == CLIENTS, 10)
        final = metrics()
    finally:
        crowd.close()
    assert final["sse_events_published_total"] == EVENTS
    assert final["sse_deliveries_total"] == EVENTS * CLIENTS
    assert 0 < final["sse_delivery_lag_seconds_sum"] < CLIENTS * 5
    assert wait_for(lambda: metrics()["sse_open_streams"] == 0, 10)

    # A worker that exits leaves the gauges (gunicorn's child_exit hook of the config module).
    gone = server.worker_pids()[0]
    os.kill(gone, signal.SIGTERM)
    assert wait_for(lambda: str(gone) not in per_worker(metrics()), 15)
    assert wait_for(lambda: len(per_worker(metrics())) == WORKERS, 15)
    assert metrics()["sse_deliveries_total"] == EVENTS * CLIENTS  # counters stay


@pytest.mark.redis
def test_deliveries_lag_and_replays_with_shards(bus_url: str) -> None:
    """SSE_REDIS_SHARDS = 3: each stream counts the events of its shards once, the first
    event's lag is observed by each stream it reached, and a resume from a vector id counts
    what it replayed."""
    if not bus_url.startswith("redis"):
        pytest.skip("shards are a Redis bus setting")
    factory = AppFactory(
        SSE_BUS_URL=bus_url, SSE_KEEPALIVE=0.2, SSE_METRICS_PATH="/metrics", SSE_REDIS_SHARDS=3
    )
    app, _ = factory()
    channels = [
        next(f"c{i}" for i in range(100) if zlib.crc32(f"c{i}".encode()) % 3 == shard)
        for shard in range(3)
    ]
    every = "&channel=".join(channels)
    try:
        with (
            EventReader(open_stream(app, every)) as all_three,
            EventReader(open_stream(app, channels[1])) as one,
        ):
            assert wait_for(lambda: scrape(app)["sse_open_streams"] == 2, 5)
            publish(app, "first", channels[1])  # sampled: both streams observe it
            # Read before the others are published: across shards, a read may deliver
            # them first.
            got = all_three.events(count=1, timeout=10)
            assert len(one.events(count=1, timeout=10)) == 1
            for n, channel in enumerate(channels * 2):
                publish(app, n, channel)
            got += all_three.events(count=6, timeout=10)
            assert len(got) == 7
            assert len(one.events(count=2, timeout=10)) == 2

            def observed() -> bool:
                # A stream observes the lag once the server asks it for more: read on.
                for reader in (all_three, one):
                    assert reader.events(timeout=0.05) == []
                return scrape(app)["sse_delivery_lag_seconds_count"] == 2

            assert wait_for(observed, 5)
            metrics = scrape(app)
        # Across shards the order may differ from the publishing order: what came after.
        after = sorted(e.data for e in got[3:])
        with EventReader(open_stream(app, every, last_event_id=got[2].id)) as resumed:
            assert sorted(e.data for e in resumed.events(count=4, timeout=10)) == after
        replayed = scrape(app)
    finally:
        factory.close()
    assert metrics["sse_events_published_total"] == 7
    assert metrics["sse_deliveries_total"] == 7 + 3
    assert 0 < metrics["sse_delivery_lag_seconds_sum"] < 5
    assert metrics['sse_delivery_lag_seconds_bucket{le="+Inf"}'] == 2
    assert replayed["sse_replayed_events_total"] == 4
    assert replayed['sse_resets_total{reason="unknown"}'] == 0

"""End to end: a real ``gunicorn -k gevent`` read by real clients and raw sockets."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import requests
import sseclient
from httpx_sse import connect_sse
from sseparse import parse_all
from support.app import publish, serve, stats
from support.clients import ManyStreams, read_events, reconnecting_read
from support.gunicorn import GunicornFactory
from support.http import dechunk, raw_sse
from support.procs import wait_for

import flask_sse_push

pytestmark = pytest.mark.e2e


def test_exact_bytes_and_headers_on_the_wire(gunicorn: GunicornFactory) -> None:
    server = serve(gunicorn)
    with raw_sse(server.url, "/stream?channel=a") as response:
        assert response.status == 200
        assert response.header("Content-Type") == "text/event-stream; charset=utf-8"
        assert response.header("Cache-Control") == "no-cache"
        assert response.header("X-Accel-Buffering") == "no"
        assert response.chunked
        # gunicorn's own HTTP/1.1 Connection header is the only one: the app adds none.
        assert response.get_all("Connection") == ["keep-alive"]
        assert response.header("Content-Length") is None
        # Bytes are written at once: headers and a retry hint arrive before any event.
        head = response.read_body_until(lambda body: body.endswith(b"\n"), 5)
        assert head == b"retry: 3000\n"
        event_id = publish(server.url, "one\r\ntwo\rthree\n", event="multi", channel="a")
        body = response.read_body_until(lambda body: body.endswith(b"\n\n"), 5)
    expected = f"id: {event_id}\nevent: multi\ndata: one\ndata: two\ndata: three\ndata: \n\n"
    assert body == head + expected.encode()
    (event,) = parse_all(body)
    assert (event.type, event.data, event.last_event_id) == ("multi", "one\ntwo\nthree\n", event_id)


def test_keepalive_comments_reach_the_client(gunicorn: GunicornFactory) -> None:
    server = serve(gunicorn, SSE_KEEPALIVE=0.2)
    with raw_sse(server.url, "/stream") as response:
        body = response.read_body_until(lambda body: body.count(b":\n") >= 3, 5)
    assert body.startswith(b"retry: 3000\n:\n:\n")
    assert parse_all(body) == []


def test_httpx_sse_follows_several_channels(gunicorn: GunicornFactory) -> None:
    server = serve(gunicorn)
    url = server.url + "/stream?channel=orders&channel=alerts"
    with httpx.Client(timeout=10) as client, connect_sse(client, "GET", url) as source:
        assert source.response.headers["content-type"] == "text/event-stream; charset=utf-8"
        sent = [
            publish(server.url, {"n": 1}, channel="orders", event="order"),
            publish(server.url, "skip", channel="other"),
            publish(server.url, "", channel="alerts"),
            publish(server.url, {"n": 2}, channel="orders", event="order", id=0),
        ]
        received = []
        for event in source.iter_sse():
            received.append(event)
            if len(received) == 3:
                break
    assert [(e.event, e.data, e.id) for e in received] == [
        ("order", '{"n": 1}', sent[0]),
        ("message", "", sent[2]),
        ("order", '{"n": 2}', "0"),
    ]


def test_sseclient_over_requests(gunicorn: GunicornFactory) -> None:
    server = serve(gunicorn)
    response = requests.get(server.url + "/stream?channel=news", stream=True, timeout=10)
    try:
        client = sseclient.SSEClient(response)
        events = client.events()
        publish(server.url, "naïve ☃ 😀\u2028same line", channel="news", event="text")
        event = next(events)
        assert event.event == "text"
        assert event.data == "naïve ☃ 😀\u2028same line"
    finally:
        response.close()


def test_bad_publish_input_is_refused_and_streams_carry_on(gunicorn: GunicornFactory) -> None:
    server = serve(gunicorn)
    with raw_sse(server.url, "/stream") as response:
        response.read_body_until(lambda body: b"retry" in body, 5)
        for bad in ({"event": "a\ndata: x"}, {"id": "1\r2"}, {"retry": "5"}, {"retry": True}):
            answer = requests.post(server.url + "/publish", json={"data": "x", **bad}, timeout=5)
            assert answer.status_code == 400, bad
        for query in ("channel=a%20b", "&".join(["channel=x"] * 300), "channel=%ff"):
            assert requests.get(f"{server.url}/stream?{query}", timeout=5).status_code == 400
        event_id = publish(server.url, "still fine")
        body = response.read_body_until(lambda body: b"still fine" in body, 5)
    assert [e.last_event_id for e in parse_all(body)] == [event_id]


def test_last_event_id_resume_header_and_query(gunicorn: GunicornFactory) -> None:
    server = serve(gunicorn)
    first = publish(server.url, "1", channel="a")
    publish(server.url, "2", channel="b")
    publish(server.url, "3", channel="a")
    publish(server.url, "4", channel="c")
    events, response = read_events(
        server.url, "/stream?channel=a&channel=b", 2, **{"Last-Event-ID": first}
    )
    response.close()
    assert [e.data for e in events] == ["2", "3"]
    events, response = read_events(server.url, f"/stream?channel=a&lastEventId={first}", 1)
    response.close()
    assert [e.data for e in events] == ["3"]


@pytest.mark.parametrize("bad_id", ["nonsense", "x" * 5000, "deadbeef-1", "-", "\u00e9"])
def test_unknown_or_malformed_last_event_id_gets_a_reset(
    gunicorn: GunicornFactory, bad_id: str
) -> None:
    server = serve(gunicorn)
    head = publish(server.url, "before")
    headers = {"Last-Event-ID": bad_id} if bad_id.isascii() else {}
    path = "/stream" if headers else "/stream?lastEventId=%C3%A9"
    events, response = read_events(server.url, path, 1, **headers)
    assert events[0].type == "sse-reset"
    assert events[0].last_event_id == head
    later = publish(server.url, "after")
    body = response.read_body_until(lambda body: b"after" in body, 5)
    response.close()
    assert parse_all(body)[-1].last_event_id == later


def test_thousands_of_connect_disconnect_cycles_leave_nothing_behind(
    gunicorn: GunicornFactory,
) -> None:
    server = serve(gunicorn, SSE_KEEPALIVE=0.2, SSE_MAX_CONNECTIONS=5000)
    (worker,) = server.worker_pids()
    process = psutil.Process(worker)

    def cycle(_: int) -> None:
        with raw_sse(server.url, "/stream?channel=a&channel=b", timeout=10) as response:
            response.read_body_until(lambda body: b"retry" in body, 10)

    def run(count: int) -> None:
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(cycle, range(count)))
        assert wait_for(lambda: stats(server.url)["connections"] == 0, 10)

    run(2000)  # warm-up: allocator pools, imports, caches, the heap's high-water mark
    rss_after_warmup = process.memory_info().rss
    run(8000)
    rss_after = process.memory_info().rss
    assert stats(server.url) == {
        "pid": worker,
        "bus": "memory",
        "streams": 0,
        "connections": 0,
        "direct": 0,
        "channels": {},
        "totals": {"opened": 10000, "closed": 10000, "published": 0, "dropped": 0},
    }
    # Measured flat within about 1.5 MB over 24,000 cycles (allocator noise); a leak of
    # 1 KB a cycle would add 8 MB here.
    assert rss_after - rss_after_warmup < 5 * 1024 * 1024, (rss_after_warmup, rss_after)


def test_reload_moves_clients_to_a_new_worker_with_a_reset(gunicorn: GunicornFactory) -> None:
    server = serve(gunicorn)
    old_worker = server.worker_pids()
    last = publish(server.url, "before reload")
    with raw_sse(server.url, "/stream") as response:
        response.read_body_until(lambda body: b"retry" in body, 5)
        server.reload()
        body = response.read_body_until(lambda body: b": shutdown" in body, 10)
    assert b": shutdown" in body
    assert wait_for(lambda: server.worker_pids() and server.worker_pids() != old_worker, 15)
    events = reconnecting_read(server.url, "/stream", 1, last)
    # The in-process bus starts a new history in the new worker: the client is told to refetch.
    assert events[0].type == "sse-reset"
    assert '"reason": "unknown"' in events[0].data


def test_stalled_reader_does_not_hold_back_anyone_and_catches_up(
    gunicorn: GunicornFactory,
) -> None:
    server = serve(gunicorn, SSE_QUEUE_SIZE=64, SSE_HISTORY_SIZE=5000)
    # 24 MB: more than the kernel's socket buffers can hold for the reader that sleeps.
    total, size = 3000, 8000
    stalled = raw_sse(server.url, "/stream?channel=load")
    fast = ManyStreams(server.port, "/stream?channel=load", 1)
    try:
        stalled.read_body_until(lambda body: b"retry" in body, 5)
        # The publisher finishes while one reader sleeps: it never waits for a client.
        with ThreadPoolExecutor(max_workers=1) as pool:
            url = f"{server.url}/publish-many?n={total}&size={size}&channel=load"
            answer = pool.submit(requests.post, url, timeout=30)
            # The fast reader reads meanwhile and gets everything, in order.
            assert fast.pump(
                lambda s: answer.done() and s.all_have(answer.result().json()["last"].encode()),
                40,
            )
        assert answer.result().status_code == 200
        assert stalled.body == b"retry: 3000\n"
        (fast_raw,) = fast.received.values()
        # The stalled reader now reads: its stream was ended for being slow.
        body = stalled.read_to_end(30)
    finally:
        fast.close()
        stalled.close()
    assert b": slow" in body
    got = parse_all(body)
    resumed, response = read_events(
        server.url,
        "/stream?channel=load",
        total - len(got),
        timeout=30,
        **{"Last-Event-ID": got[-1].last_event_id},
    )
    response.close()
    numbers = [str(i) for i in range(total)]
    assert [e.data.split(":")[0] for e in got + resumed] == numbers
    assert [e.data.split(":")[0] for e in parse_all(dechunk(bytes(fast_raw)))] == numbers


def test_several_workers_on_the_memory_bus_warn(gunicorn: GunicornFactory) -> None:
    server = serve(gunicorn, workers=2)
    assert wait_for(lambda: server.log_text().count("is served by 2 gunicorn workers") == 2, 10)


def test_worker_connections_below_the_stream_limit_warn(gunicorn: GunicornFactory) -> None:
    server = serve(gunicorn, env={"SSE_WORKER_CONNECTIONS": "500"}, SSE_MAX_CONNECTIONS=1000)
    assert wait_for(lambda: "worker_connections (500) is not above" in server.log_text(), 10)


def test_reload_after_a_deploy_runs_the_new_code(gunicorn: GunicornFactory, tmp_path: Path) -> None:
    """The gunicorn configuration module does not leave the package's modules in the master,
    so workers started by a SIGHUP reload import the deployed code, not a mix."""
    site = tmp_path / "site"
    shutil.copytree(
        Path(flask_sse_push.__file__).parent,
        site / "flask_sse_push",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    # PYTHONSAFEPATH: `python -m gunicorn` would put the repository first on sys.path.
    server = serve(gunicorn, env={"PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"})
    (old_worker,) = server.worker_pids()
    assert requests.head(server.url + "/stream", timeout=5).headers.get("X-Deployed") is None
    module = site / "flask_sse_push" / "stream.py"
    code = module.read_text()
    marker = '    "X-Accel-Buffering": "no",\n'
    assert marker in code
    module.write_text(code.replace(marker, marker + '    "X-Deployed": "2",\n'))
    server.reload()
    assert wait_for(lambda: old_worker not in server.worker_pids() and server.worker_pids(), 15)

    def deployed() -> bool:
        answer = requests.head(server.url + "/stream", timeout=5)
        return answer.headers.get("X-Deployed") == "2"

    assert wait_for(deployed, 15)

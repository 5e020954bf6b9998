"""The same app under Flask's threaded development server (``flask run``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
from httpx_sse import connect_sse
from sseparse import parse_all
from support.app import publish, stats
from support.http import raw_sse
from support.procs import free_port, wait_for

TESTS = Path(__file__).parent


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(TESTS), SSE_KEEPALIVE="0.2")
    log = (tmp_path / "flask.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "apps.streaming", "run", "--port", str(port)],
        cwd=TESTS,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(url + "/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        assert wait_for(up, 20), (tmp_path / "flask.log").read_text()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_threaded_dev_server_streams_and_cleans_up(dev_server: str) -> None:
    url = dev_server + "/stream?channel=a&channel=b"
    with httpx.Client(timeout=10) as client, connect_sse(client, "GET", url) as source:
        assert source.response.headers["content-type"] == "text/event-stream; charset=utf-8"
        first = publish(dev_server, {"n": 1}, channel="a")
        publish(dev_server, "two", channel="b", event="word")
        events = []
        for event in source.iter_sse():
            events.append(event)
            if len(events) == 2:
                break
        assert stats(dev_server)["connections"] == 1
    assert [(e.event, e.data) for e in events] == [("message", '{"n": 1}'), ("word", "two")]
    assert events[0].id == first
    # The closed client is noticed at the next keep-alive write at the latest.
    assert wait_for(lambda: stats(dev_server)["connections"] == 0, 10)


def test_a_few_streams_start_no_gunicorn_shutdown_watcher(dev_server: str, tmp_path: Path) -> None:
    """The shutdown watcher belongs to gunicorn's gevent workers: on the development server a
    few streams at once are served as before, and nothing is started or logged for them."""
    responses = [raw_sse(dev_server, f"/stream?channel=c{i}", timeout=10) for i in range(3)]
    try:
        for response in responses:
            response.read_body_until(lambda body: b"retry: 3000" in body, 10)
        assert stats(dev_server)["connections"] == 3
        for i, response in enumerate(responses):
            event_id = publish(dev_server, i, channel=f"c{i}")
            body = response.read_body_until(lambda body: body.endswith(b"\n\n"), 10)
            assert parse_all(body)[-1].last_event_id == event_id
    finally:
        for response in responses:
            response.close()
    assert wait_for(lambda: stats(dev_server)["connections"] == 0, 10)
    assert "flask-sse-push" not in (tmp_path / "flask.log").read_text()

"""``flask sse send | listen | stats``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flask import Flask
from support.app import publish, serve
from support.gunicorn import GunicornFactory

from flask_sse_push import SSEBlueprint
from flask_sse_push.cli import sse_cli
from flask_sse_push.testing import captured_events

TESTS = Path(__file__).parent


@pytest.fixture
def app() -> Flask:
    app = Flask(__name__)
    app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
    return app


def test_send_text_json_and_stdin(app: Flask) -> None:
    runner = app.test_cli_runner()
    with captured_events(app) as sent:
        result = runner.invoke(sse_cli, ["send", "news", "hello", "--event", "note", "--id", "7"])
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == "7"
        assert "reaches only the clients of that process" in result.stderr
        result = runner.invoke(sse_cli, ["send", "news", '{"a": [1]}', "--json"])
        assert result.exit_code == 0, result.output
        result = runner.invoke(sse_cli, ["send", "alerts"], input="from stdin\n")
        assert result.exit_code == 0, result.output
    assert [(e.channel, e.data, e.event) for e in sent] == [
        ("news", "hello", "note"),
        ("news", {"a": [1]}, None),
        ("alerts", "from stdin\n", None),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["send", "news", "{nope", "--json"], "not valid JSON"),
        (["send", "bad channel", "x"], "invalid channel"),
        (["send", "news", "x", "--event", "a\nb"], "CR, LF or NUL"),
        (["send", "news", "x", "--retry", "-1"], "-1"),
    ],
)
def test_send_refuses_bad_input(app: Flask, args: list[str], message: str) -> None:
    with captured_events(app) as sent:
        result = app.test_cli_runner().invoke(sse_cli, args)
    assert result.exit_code == 2
    assert message in result.output
    assert sent == []


def flask_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "apps.streaming", "sse", *args],
        cwd=TESTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.e2e
def test_listen_and_stats_against_a_running_app(gunicorn: GunicornFactory) -> None:
    server = serve(gunicorn)
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    command = [sys.executable, "-m", "flask", "--app", "apps.streaming", "sse", "listen"]
    listener = subprocess.Popen(
        [*command, "a", "b", "--url", server.url, "--count", "2", "--timeout", "20"],
        cwd=TESTS,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(100):
            stats = flask_cli("stats", "--url", server.url)
            if "a: 1" in stats.stdout:
                break
            time.sleep(0.1)
        assert stats.returncode == 0, stats.stderr
        assert "1 streams" in stats.stdout
        assert "  b: 1" in stats.stdout
        assert "since start: 1 streams opened, 0 closed, 0 events published" in stats.stdout
        first = publish(server.url, "one", channel="a", event="x")
        publish(server.url, {"two": 2}, channel="b")
        out, err = listener.communicate(timeout=20)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(timeout=10)
    assert listener.returncode == 0, err
    assert out == f"id: {first}\nevent: x\ndata: one\n\n" + out.split("\n\n", 1)[1]
    assert 'data: {"two": 2}' in out


def test_stats_says_how_to_turn_it_on(gunicorn: GunicornFactory) -> None:
    server = serve(gunicorn, SSE_STATS=False)
    result = flask_cli("stats", "--url", server.url)
    assert result.returncode == 1
    assert "SSE_STATS = True" in result.stderr


def test_listen_reports_an_unreachable_app() -> None:
    result = flask_cli("listen", "a", "--url", "http://127.0.0.1:9", "--timeout", "5")
    assert result.returncode == 1
    assert "cannot read http://127.0.0.1:9/stream?channel=a" in result.stderr


def test_send_reports_an_unreachable_redis_without_a_traceback() -> None:
    app = Flask(__name__)
    app.config.update(SSE_BUS_URL="redis://127.0.0.1:9/0", SSE_PUBLISH_TIMEOUT=1)
    app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
    result = app.test_cli_runner().invoke(sse_cli, ["send", "news", "x"])
    assert result.exit_code == 1
    assert "could not publish to Redis at 127.0.0.1:9/0" in result.output
    assert "Traceback" not in result.output

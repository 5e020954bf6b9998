"""The example dashboard in a real browser: headless Chromium (Debian's ``chromium``) driven
by Playwright, against ``example_app`` under ``gunicorn -k gevent`` with the Redis bus.

The page's own ``EventSource`` has to ride out a server restart: events published while
the server is down come back, each exactly once and in order, through ``Last-Event-ID``
replay from Redis, without an ``sse-reset``.

Needs the Debian package ``chromium`` (``/usr/bin/chromium``, or the path in ``$CHROMIUM``)
and the Python package ``playwright``; never ``playwright install``. Without them the test
is skipped, or failed when ``CI`` is set.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from support.app import CONF
from support.browser import WAIT_MS, chromium
from support.gunicorn import GunicornFactory, GunicornServer, answering
from support.procs import HOST, run_python
from support.redis_server import RedisFactory

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.redis]

EXAMPLE_APP = "example_app.app:app"
#: Runs before the page's scripts: counts what the page's EventSource goes through.
RECORDER = """
window.__sse = {opens: 0, errors: 0, resets: 0, hellos: 0};
const NativeEventSource = window.EventSource;
window.EventSource = class extends NativeEventSource {
  constructor(url, init) {
    super(url, init);
    this.addEventListener("open", () => { window.__sse.opens += 1; });
    this.addEventListener("error", () => { window.__sse.errors += 1; });
    this.addEventListener("hello", () => { window.__sse.hellos += 1; });
    this.addEventListener("sse-reset", () => { window.__sse.resets += 1; });
  }
};
"""

#: Publishes from outside any server, as a cron job or a worker queue would.
OFFLINE_PUBLISHER = """
import json, sys
from example_app.app import app
from flask_sse_push import send_event
ids = []
with app.app_context():
    for channel, data in json.loads(sys.argv[1]):
        ids.append(send_event({"channel": channel, "data": data}, event="note", channel=channel))
print(json.dumps(ids))
"""


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Debian's Chromium (see :func:`chromium`)."""
    with chromium() as launched:
        yield launched


def serve_example(
    gunicorn: GunicornFactory, env: dict[str, str], port: int | None = None
) -> GunicornServer:
    """Serve the example app (on *port* if given); return once its page answers."""
    return answering(gunicorn(EXAMPLE_APP, env=env, config=CONF, port=port), "/")


def publish(url: str, channel: str, data: Any) -> str:
    """Publish a ``note`` through the dashboard's JSON endpoint; return the event id."""
    answer = requests.post(url + "/api/events", json={"channel": channel, "data": data}, timeout=10)
    assert answer.status_code == 201, answer.text
    assert answer.json()["channel"] == channel
    event_id: str = answer.json()["id"]
    return event_id


def publish_offline(env: dict[str, str], events: list[tuple[str, Any]]) -> list[str]:
    """Publish with ``send_event`` from a separate process, with no server running."""
    out = run_python(["-c", OFFLINE_PUBLISHER, json.dumps(events)], env)
    ids: list[str] = json.loads(out.strip().splitlines()[-1])
    assert len(ids) == len(events), out
    return ids


def shown(page: Page, channel: str) -> list[tuple[str, Any]]:
    """The ``(id, data)`` pairs of the channel's list, oldest first (the page prepends)."""
    texts: list[str] = page.locator(f'[id="log-{channel}"] li').all_text_contents()
    pairs = []
    for text in reversed(texts):
        event_id, _, data = text.partition(" ")
        pairs.append((event_id, json.loads(data)))
    return pairs


def wait_for_count(page: Page, channel: str, count: int) -> None:
    """Wait until the channel's list has at least *count* items; on timeout, fail with
    what the page shows."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    try:
        page.wait_for_function(
            "([id, n]) => document.getElementById(id).children.length >= n",
            arg=[f"log-{channel}", count],
            timeout=WAIT_MS,
        )
    except PlaywrightTimeoutError:
        lists = {name: shown(page, name) for name in ("alerts", "news", "metrics")}
        status = page.locator("#status").text_content()
        pytest.fail(
            f"{channel!r} did not show {count} events within {WAIT_MS} ms; page: {lists}, "
            f"status {status!r}, EventSource {recorded(page)}",
            pytrace=False,
        )


def recorded(page: Page) -> dict[str, int]:
    """What the page's EventSource went through (see :data:`RECORDER`)."""
    result: dict[str, int] = page.evaluate("() => ({...window.__sse})")
    return result


def test_dashboard_rides_out_a_server_restart(
    browser: Browser,
    gunicorn: GunicornFactory,
    redis_server: RedisFactory,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    redis = redis_server()
    env = {"SSE_BUS_URL": json.dumps(redis.url), "SSE_RETRY": "1000"}
    server = serve_example(gunicorn, env)
    port = server.port
    assert server.url == f"http://{HOST}:{port}"

    context = browser.new_context()
    try:
        context.set_default_timeout(WAIT_MS)
        page = context.new_page()
        page.add_init_script(RECORDER)
        page.goto(server.url + "/", timeout=WAIT_MS)
        status = page.locator("#status")
        expect(status).to_have_text("open", timeout=WAIT_MS)

        # 1. Live: three events through the JSON endpoint.
        live = [("alerts", {"n": 1}), ("news", {"n": 2}), ("alerts", {"n": 3})]
        live_ids = [publish(server.url, channel, data) for channel, data in live]
        wait_for_count(page, "alerts", 2)
        wait_for_count(page, "news", 1)
        for event_id in live_ids:
            expect(page.locator("li", has_text=event_id)).to_have_count(1, timeout=WAIT_MS)
        page.evaluate("() => { window.__samePage = true; }")

        # 2. The server goes away: SIGTERM ends the streams at once.
        stopped_in = server.stop(signal.SIGTERM, timeout=10)
        assert stopped_in < 8, f"SIGTERM took {stopped_in:.1f}s; log:\n{server.log_text()}"
        expect(status).to_have_text("reconnecting…", timeout=WAIT_MS)

        # 3. Meanwhile events are published from another process.
        offline = [("news", {"n": 4}), ("alerts", {"n": 5}), ("news", {"n": 6})]
        offline_ids = publish_offline(env, offline)

        # 4. The server comes back on the same port; the page reconnects by itself.
        restarted_at = time.monotonic()
        server = serve_example(gunicorn, env, port=port)
        wait_for_count(page, "alerts", 3)
        wait_for_count(page, "news", 3)
        reconnected_in = time.monotonic() - restarted_at
        # A live event after the replay: anything replayed twice would have come before it.
        barrier_id = publish(server.url, "metrics", {"barrier": True})
        expect(page.locator("#log-metrics li", has_text=barrier_id)).to_have_count(
            1, timeout=WAIT_MS
        )

        published = list(zip(live_ids + offline_ids, live + offline, strict=True))
        for channel in ("alerts", "news"):
            expected = [(i, data) for i, (c, data) in published if c == channel]
            assert shown(page, channel) == expected, (channel, reconnected_in)
        assert shown(page, "metrics") == [(barrier_id, {"barrier": True})]
        ids = [event_id for event_id, _ in published]
        assert len(set(ids)) == 6

        # 5. No history reset; the same page, reconnected, not reloaded.
        expect(status).to_have_text("open", timeout=WAIT_MS)
        assert "reset" not in (status.text_content() or "")
        assert page.evaluate("() => window.__samePage === true")
        counts = recorded(page)
        assert counts["resets"] == 0, counts
        assert counts["opens"] >= 2, counts
        assert counts["hellos"] >= 2, counts

        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 0
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        context.close()

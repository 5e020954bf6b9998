"""The example dashboard's live parts in headless Chromium, against ``example_app`` under
``gunicorn -k gevent`` on the in-process bus: the chart of the ``metrics`` samples, the open
streams per public channel, and logging in and out with Flask-Login.

Needs what :mod:`test_browser` needs (Debian's ``chromium`` and the ``playwright`` package).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from support.browser import WAIT_MS, chromium
from support.gunicorn import GunicornFactory, GunicornServer
from test_browser import serve_example

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

#: A sample every quarter second; stream ends noticed within half a second; quick retries.
ENV = {
    "EXAMPLE_METRICS_INTERVAL": "0.25",
    "SSE_KEEPALIVE": "0.5",
    "SSE_RETRY": "300",
    "SECRET_KEY": "browser-test",
}

#: Counts the pixels of a canvas drawn in its own colour (the line and the newest point).
LINE_PIXELS = """(id) => {
  const canvas = document.getElementById(id);
  const hex = canvas.dataset.color;
  const rgb = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let count = 0;
  for (let i = 0; i < data.length; i += 4) {
    const near = rgb.every((v, k) => Math.abs(data[i + k] - v) < 40);
    if (near && data[i + 3] > 200) count += 1;
  }
  return count;
}"""


@pytest.fixture
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def server(gunicorn: GunicornFactory) -> GunicornServer:
    return serve_example(gunicorn, ENV)


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    yield context
    context.close()


def open_dashboard(context: BrowserContext, url: str) -> Page:
    """Open the dashboard and wait until its stream is open."""
    from playwright.sync_api import expect

    page = context.new_page()
    page.goto(url + "/", timeout=WAIT_MS)
    expect(page.locator("#status")).to_have_text("open", timeout=WAIT_MS)
    return page


def points(page: Page, chart: str) -> int:
    """How many samples the chart has drawn since the page loaded."""
    return int(page.locator(f"#chart-{chart}").get_attribute("data-points") or 0)


def wait_for_points(page: Page, chart: str, count: int) -> None:
    page.wait_for_function(
        "([id, n]) => Number(document.getElementById(id).dataset.points) >= n",
        arg=[f"chart-{chart}", count],
        timeout=WAIT_MS,
    )


def test_the_chart_draws_the_metrics_samples(
    context: BrowserContext, server: GunicornServer, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page = open_dashboard(context, server.url)
    wait_for_points(page, "streams", 5)
    wait_for_points(page, "rate", 5)
    before = points(page, "streams")
    wait_for_points(page, "streams", before + 2)
    assert points(page, "streams") > before
    # The page's own stream is counted, and the line is drawn in the chart's colour.
    expect(page.locator("#streams")).to_have_text("1")
    assert page.evaluate(LINE_PIXELS, "chart-streams") > 40
    assert page.evaluate(LINE_PIXELS, "chart-rate") > 40

    # Publishing shows up as a rate above zero.
    for n in range(5):
        answer = requests.post(
            server.url + "/api/events", json={"channel": "news", "data": {"n": n}}, timeout=10
        )
        assert answer.status_code == 201, answer.text
    page.wait_for_function(
        "() => document.getElementById('rate').textContent !== '0.0'", timeout=WAIT_MS
    )
    expect(page.locator('[id="log-news"] li')).to_have_count(5)

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_counts_per_channel_follow_a_second_event_source(
    context: BrowserContext, server: GunicornServer
) -> None:
    from playwright.sync_api import expect

    page = open_dashboard(context, server.url)
    counts = {c: page.locator(f"#count-{c}") for c in ("news", "alerts", "metrics")}
    for count in counts.values():
        expect(count).to_have_text("1")

    page.evaluate("() => { window.__extra = new EventSource('/stream?channel=alerts'); }")
    expect(counts["alerts"]).to_have_text("2")
    expect(counts["news"]).to_have_text("1")
    expect(page.locator("#streams")).to_have_text("2")
    assert page.locator("#bar-alerts").evaluate("e => e.style.width") == "100%"

    page.evaluate("() => { window.__extra.close(); }")
    expect(counts["alerts"]).to_have_text("1")
    expect(page.locator("#streams")).to_have_text("1")


def test_login_reads_the_private_channel_and_logout_ends_its_streams(
    browser: Browser, context: BrowserContext, server: GunicornServer
) -> None:
    from playwright.sync_api import expect

    page = open_dashboard(context, server.url)
    page.fill("input[name=name]", "ann")
    page.click("text=Log in")
    expect(page.locator("#user")).to_have_text("ann")
    expect(page.locator("#status")).to_have_text("open")
    answer = requests.post(
        server.url + "/api/events", json={"user": "ann", "data": {"text": "psst"}}, timeout=10
    )
    assert answer.json()["channel"] == "user:ann"
    expect(page.locator('[id="log-user:ann"] li')).to_have_text(
        answer.json()["id"] + ' {"text":"psst"}'
    )
    other_tab = open_dashboard(context, server.url)
    expect(other_tab.locator("#user")).to_have_text("ann")

    # Another visitor may not read ann's channel, and the dashboard does not name it.
    visitor = browser.new_context()
    try:
        refused = visitor.request.get(server.url + "/stream?channel=user:ann")
        assert refused.status == 403
        stranger = open_dashboard(visitor, server.url)
        wait_for_points(stranger, "streams", 2)
        assert "user:ann" not in stranger.content()
        assert visitor.request.get(server.url + "/stream/stats").status == 403
    finally:
        visitor.close()

    # Logging out in one tab ends the streams of the other; its reconnection is refused.
    page.click("text=Log out")
    expect(page.locator("input[name=name]")).to_be_visible()
    expect(other_tab.locator("#status")).to_have_text("closed (reload the page)")
    stats = json.loads(
        other_tab.evaluate("() => JSON.stringify(window.dashboard.source.readyState)")
    )
    assert stats == 2

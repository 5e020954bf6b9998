"""flask-sse-push behind nginx, with the shipped site configuration, in headless Chromium.

nginx runs ``deploy/nginx/flask-sse-push.conf`` (rendered with ``envsubst`` as the deployment
docs show) with a self-signed certificate, in front of ``gunicorn -k gevent`` serving
``apps.proxied``. The tests show what the docs claim: HTTP/2 lifts the browser's limit of six
connections per origin, events are not buffered, keep-alives hold a quiet stream open past
``proxy_read_timeout``, and a gunicorn restart behind nginx loses nothing on the Redis bus.

Needs the Debian packages ``nginx``, ``openssl``, ``gettext-base`` (``envsubst``) and
``chromium``; without them the tests are skipped, or failed when ``CI`` is set.
"""

from __future__ import annotations

import json
import re
import signal
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import requests
from support.app import CONF
from support.browser import WAIT_MS, chromium
from support.gunicorn import GunicornFactory, GunicornServer, answering
from support.nginx import SITE_TEMPLATE, NginxFactory, NginxServer, placeholders, require_nginx
from support.procs import REPO_ROOT, free_port, run_python, wait_for
from support.redis_server import RedisServer
from support.tls import OPENSSL_REQ

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

APP = "apps.proxied:app"
#: The site's proxy_read_timeout in these tests, and the app's keep-alive period (seconds).
READ_TIMEOUT = 3
KEEPALIVE = 1
#: Seconds the HTTP/1.1 page waits to see that the streams beyond six stay stalled.
STALL = 3.0
#: Seconds a stream stays idle: several keep-alive periods and read timeouts.
IDLE = 8.0

#: Opens EventSources on the page and records what each goes through.
HARNESS = """
window.__sources = [];
window.__open = (path, count) => {
  for (let i = 0; i < count; i++) {
    const rec = {opens: 0, errors: [], events: [], source: new EventSource(path)};
    rec.source.onopen = () => { rec.opens += 1; };
    rec.source.onerror = () => { rec.errors.push(performance.timeOrigin + performance.now()); };
    rec.source.onmessage = (e) => {
      rec.events.push({id: e.lastEventId, data: e.data,
                       at: performance.timeOrigin + performance.now()});
    };
    window.__sources.push(rec);
  }
};
window.__state = () => window.__sources.map((r) => ({
  opens: r.opens, errors: r.errors, events: r.events, state: r.source.readyState}));
"""


@dataclass
class Sources:
    """The EventSources of one page (see :data:`HARNESS`)."""

    page: Page

    def open(self, path: str, count: int = 1) -> None:
        """Open *count* EventSources on *path*."""
        self.page.evaluate("([path, count]) => window.__open(path, count)", [path, count])

    def state(self) -> list[dict[str, Any]]:
        """Each source's ``opens``, ``errors`` (times), ``events`` and ``state``."""
        result: list[dict[str, Any]] = self.page.evaluate("() => window.__state()")
        return result

    def wait(self, condition: str, arg: Any = None, timeout_ms: int = WAIT_MS) -> None:
        """Wait until the JavaScript *condition* on ``s`` (:meth:`state`) and ``arg`` holds;
        on timeout, fail with the sources' state."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

        try:
            self.page.wait_for_function(
                f"(arg) => {{ const s = window.__state(); return {condition}; }}",
                arg=arg,
                timeout=timeout_ms,
            )
        except PlaywrightTimeoutError:
            pytest.fail(f"not within {timeout_ms} ms: {condition}; {self.summary()}")

    def close(self, index: int) -> None:
        """Close source *index*."""
        self.page.evaluate("(i) => window.__sources[i].source.close()", index)

    def summary(self) -> list[tuple[int, int, int, int]]:
        """``(opens, errors, events, readyState)`` of each source."""
        return [(s["opens"], len(s["errors"]), len(s["events"]), s["state"]) for s in self.state()]


def without(directive: str) -> Callable[[str], str]:
    """An edit of the rendered site that takes *directive* (a text found once) away."""

    def edit(site: str) -> str:
        assert site.count(directive) == 1, (directive, site)
        return site.replace(directive, "")

    return edit


#: The same site without HTTP/2: what a browser gets from a proxy speaking HTTP/1.1.
HTTP1_ONLY = without(" http2")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, accepting the self-signed certificate."""
    with chromium(["--ignore-certificate-errors"]) as browser:
        yield browser


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    """``apps.proxied`` under gunicorn with the in-process bus and one-second keep-alives."""
    factory = GunicornFactory(tmp_path_factory.mktemp("gunicorn"))
    try:
        env = {"SSE_KEEPALIVE": str(KEEPALIVE), "SSE_RETRY": "1000"}
        yield answering(factory(APP, env=env, config=CONF), "/health")
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxFactory]:
    """The nginx servers in front of :func:`backend`, kept for the module."""
    factory = NginxFactory(tmp_path_factory.mktemp("nginx"), require_nginx())
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def h2_proxy(proxies: NginxFactory, backend: GunicornServer) -> NginxServer:
    """The shipped site: HTTP/2 to the browser."""
    return proxies(backend.port, read_timeout=f"{READ_TIMEOUT}s")


@pytest.fixture(scope="module")
def h1_proxy(proxies: NginxFactory, backend: GunicornServer) -> NginxServer:
    """The shipped site with HTTP/2 taken away."""
    return proxies(backend.port, read_timeout=f"{READ_TIMEOUT}s", edit=HTTP1_ONLY)


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[[str], Sources]]:
    """Open the app's page at a URL in a fresh browser context (its own connections)."""
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)

    def open_at(url: str) -> Sources:
        page = context.new_page()
        page.goto(url, timeout=WAIT_MS)
        page.evaluate(HARNESS)
        return Sources(page)

    try:
        yield open_at
    finally:
        context.close()


def protocol(sources: Sources) -> str:
    """The protocol the page was loaded over (``h2`` or ``http/1.1``)."""
    result: str = sources.page.evaluate(
        "() => performance.getEntriesByType('navigation')[0].nextHopProtocol"
    )
    return result


def publish(server: GunicornServer, channel: str, n: int = 0) -> str:
    """Publish ``{"n": n, "sent_at": ms}`` to *channel* (straight to gunicorn); return the id."""
    answer = requests.post(f"{server.url}/publish?channel={channel}&n={n}", timeout=10)
    assert answer.status_code == 200, answer.text
    event_id: str = answer.json()["id"]
    return event_id


def streams_on(server: GunicornServer, channel: str) -> int:
    """The streams gunicorn holds on *channel*."""
    answer = requests.get(f"{server.url}/stream/stats", timeout=10).json()
    count: int = answer["channels"].get(channel, 0)
    return count


def test_http2_carries_twelve_streams_from_one_page(
    h2_proxy: NginxServer, backend: GunicornServer, open_page: Callable[[str], Sources]
) -> None:
    sources = open_page(h2_proxy.url + "/")
    assert protocol(sources) == "h2"
    sources.open("/stream?channel=h2-tabs", 12)
    sources.wait("s.filter((x) => x.opens === 1).length === 12")
    publish(backend, "h2-tabs")
    sources.wait("s.filter((x) => x.events.length === 1).length === 12")
    assert streams_on(backend, "h2-tabs") == 12


def test_http1_stalls_the_streams_beyond_six(
    h1_proxy: NginxServer, backend: GunicornServer, open_page: Callable[[str], Sources]
) -> None:
    sources = open_page(h1_proxy.url + "/")
    assert protocol(sources) == "http/1.1"
    sources.open("/stream?channel=h1-tabs", 12)
    sources.wait("s.filter((x) => x.opens === 1).length === 6")
    publish(backend, "h1-tabs", n=1)
    sources.wait("s.filter((x) => x.events.length === 1).length === 6")
    time.sleep(STALL)
    summary = sources.summary()
    connecting = [s for s in sources.state() if s["opens"] == 0]
    assert len(connecting) == 6, summary
    assert all(s["state"] == 0 and not s["events"] for s in connecting), summary
    assert sum(s["opens"] == 1 and len(s["events"]) == 1 for s in sources.state()) == 6, summary
    assert streams_on(backend, "h1-tabs") == 6

    # The seventh gets a connection as soon as one of the six closes.
    first_open = next(i for i, s in enumerate(sources.state()) if s["opens"])
    sources.close(first_open)
    sources.wait("s.filter((x) => x.opens === 1).length === 7")


def test_first_event_reaches_the_browser_at_once(
    h2_proxy: NginxServer, backend: GunicornServer, open_page: Callable[[str], Sources]
) -> None:
    """Each event is the first after a quiet spell: a buffering proxy would hold it."""
    sources = open_page(h2_proxy.url + "/")
    sources.open("/stream?channel=latency")
    sources.wait("s[0].opens === 1")
    rounds = 20
    for n in range(rounds):
        publish(backend, "latency", n)
        sources.wait("s[0].events.length === arg", n + 1, timeout_ms=5000)
        time.sleep(0.05)
    events = sources.state()[0]["events"]
    latencies = sorted(e["at"] - json.loads(e["data"])["sent_at"] for e in events)
    median = statistics.median(latencies)
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(f"send_event to browser through nginx: median {median:.1f} ms, p95 {p95:.1f} ms")
    assert median < 100, latencies
    assert [json.loads(e["data"])["n"] for e in events] == list(range(rounds))


def test_keepalives_hold_a_quiet_stream_past_the_read_timeout(
    h2_proxy: NginxServer, backend: GunicornServer, open_page: Callable[[str], Sources]
) -> None:
    sources = open_page(h2_proxy.url + "/")
    # 0: an idle stream with keep-alives; 1: a stream without, silent for longer than IDLE.
    sources.open("/stream?channel=idle")
    sources.open(f"/stream/silent?pause={IDLE + 5}")
    sources.wait("s[0].opens === 1 && s[1].events.length === 1")
    time.sleep(IDLE)
    idle, silent = sources.state()
    # nginx cut the silent stream at its read timeout, before the second event.
    assert silent["errors"], sources.summary()
    cut_after = (silent["errors"][0] - silent["events"][0]["at"]) / 1000
    assert READ_TIMEOUT - 0.5 < cut_after < READ_TIMEOUT + 3, cut_after
    assert all(e["data"] == "first" for e in silent["events"])
    assert "upstream timed out" in h2_proxy.error_log()
    # The idle one is still the same stream, and an event still arrives on it.
    assert (idle["opens"], idle["errors"], idle["state"]) == (1, [], 1), sources.summary()
    publish(backend, "idle")
    sources.wait("s[0].events.length === 1", timeout_ms=5000)
    idle = sources.state()[0]
    assert (idle["opens"], idle["errors"], idle["state"]) == (1, [], 1), sources.summary()


@pytest.mark.redis
def test_a_gunicorn_restart_behind_nginx_loses_nothing(
    gunicorn: GunicornFactory,
    nginx: NginxFactory,
    shared_redis: RedisServer,
    open_page: Callable[[str], Sources],
) -> None:
    key = f"proxied-restart-{uuid.uuid4().hex}"
    env = {
        "SSE_BUS_URL": json.dumps(shared_redis.url),
        "SSE_REDIS_KEY": json.dumps(key),
        "SSE_RETRY": "500",
        "SSE_KEEPALIVE": str(KEEPALIVE),
    }
    try:
        server = answering(gunicorn(APP, env=env, config=CONF), "/health")
        proxy = nginx(server.port)
        sources = open_page(proxy.url + "/")
        assert protocol(sources) == "h2"
        sources.open("/stream?channel=restart")
        sources.wait("s[0].opens === 1")
        live = [publish(server, "restart", n) for n in range(3)]
        sources.wait("s[0].events.length === 3")

        stopped_in = server.stop(signal.SIGTERM, timeout=10)
        assert stopped_in < 8, f"SIGTERM took {stopped_in:.1f}s; log:\n{server.log_text()}"
        offline = publish_offline(env, "restart", 3)
        # Meanwhile nginx answers the reconnecting browser with a retry hint, not a 502.
        assert wait_for(lambda: fallback_answers(proxy.access_log(), "restart") >= 1, 10)
        assert sources.state()[0]["state"] != 2, sources.summary()

        server = answering(gunicorn(APP, env=env, config=CONF, port=server.port), "/health")
        sources.wait("s[0].events.length === 6")
        barrier = publish(server, "restart", 99)
        sources.wait("s[0].events.length === 7")
        received = [e["id"] for e in sources.state()[0]["events"]]
        assert received == [*live, *offline, barrier]
        assert sources.state()[0]["state"] == 1
    finally:
        shared_redis.client().delete(key)


def test_without_the_fallback_a_502_stops_the_browser_for_good(
    nginx: NginxFactory, open_page: Callable[[str], Sources]
) -> None:
    """With gunicorn down, the shipped site keeps browsers reconnecting; the same site without
    its ``error_page`` for the stream passes on the 502, and the browser gives up."""
    nobody = free_port()
    bare = nginx(nobody, edit=without("error_page 502 503 504 = @stream_unavailable;"))
    sources = open_page(bare.url + "/")
    sources.open("/stream?channel=gone")
    sources.wait("s[0].state === 2")
    assert sources.summary() == [(0, 1, 0, 2)]

    shipped = nginx(nobody)
    sources = open_page(shipped.url + "/")
    sources.open("/stream?channel=gone")
    assert wait_for(lambda: fallback_answers(shipped.access_log(), "gone") >= 2, 15)
    state = sources.state()[0]
    assert state["state"] != 2 and state["opens"] >= 2, sources.summary()


def fallback_answers(access_log: list[str], channel: str) -> int:
    """Count nginx's own answers (``200`` with the 13-byte retry hint) to *channel*'s stream."""
    pattern = re.compile(rf"^GET /stream\?channel={channel} HTTP/2\.0 200 13$")
    return sum(bool(pattern.match(line)) for line in access_log)


def publish_offline(env: dict[str, str], channel: str, count: int) -> list[str]:
    """Publish *count* events with ``send_event`` from a separate process; return their ids."""
    out = run_python(["-m", "apps.publish_script", channel, str(count)], env)
    ids = out.split()
    assert len(ids) == count, out
    return ids


def test_the_docs_show_what_the_tests_run() -> None:
    """The deployment page includes the shipped site, fills in its placeholders with the
    ``envsubst`` command :func:`support.nginx.render_site` runs, and makes the self-signed
    certificate with the command :mod:`support.tls` runs."""
    page = (REPO_ROOT / "docs" / "deployment.rst").read_text()
    relative = SITE_TEMPLATE.relative_to(REPO_ROOT).as_posix()
    assert f".. literalinclude:: ../{relative}" in page
    commands = re.findall(r"envsubst '([^']*)'", page)
    assert commands, "no envsubst command on the deployment page"
    names = placeholders(SITE_TEMPLATE.read_text())
    for command in commands:
        assert sorted(command.replace("$", "").split()) == names
    assert OPENSSL_REQ in " ".join(page.replace("\\\n", " ").split())

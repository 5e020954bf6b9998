"""Shared pytest fixtures: gunicorn and redis-server processes.

The support code (``free_port``, ``raw_sse``, the server classes) lives in the
:mod:`support` package, which pytest's ``pythonpath`` setting makes importable;
this module only wires it into fixtures and registers the markers.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.app import Apps
from support.gunicorn import GunicornFactory
from support.nginx import NginxFactory, require_nginx
from support.redis_server import RedisFactory, RedisServer, require_redis_server

_MARKERS = {
    "redis": "needs a redis-server (started by a fixture)",
    "e2e": "starts a real gunicorn with gevent workers",
    "browser": "drives headless Chromium",
    "slow": "takes more than a few seconds",
    "multihost": "hosts made of network namespaces (root, haproxy); run with -m multihost",
}


def pytest_configure(config: pytest.Config) -> None:
    """Register the project's markers.

    :param config: The pytest config.
    """
    for name, description in _MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


@pytest.fixture
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornFactory]:
    """Provide a factory starting ``gunicorn -k gevent`` servers.

    ``start(app, *, workers=1, env=None, args=(), config=None, timeout=20,
    port=None)`` returns a running :class:`support.gunicorn.GunicornServer`; see
    :class:`support.gunicorn.GunicornFactory`.  Every server started is stopped at
    teardown (SIGTERM, then SIGKILL of its own processes after 10 s).

    :param tmp_path_factory: For the log directory.
    :returns: The factory.
    """
    factory = GunicornFactory(tmp_path_factory.mktemp("gunicorn"))
    yield factory
    factory.stop_all()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisFactory]:
    """Provide a factory starting throwaway ``redis-server`` processes.

    ``start()`` returns a running :class:`support.redis_server.RedisServer` on a free
    127.0.0.1 port (no persistence).  Every server started is stopped at
    teardown.  Without ``redis-server`` on ``PATH`` the test is skipped, or
    failed when ``CI`` is set.

    :param tmp_path_factory: For the working directory and log.
    :returns: The factory.
    """
    exe = require_redis_server()
    factory = RedisFactory(tmp_path_factory.mktemp("redis"), exe)
    yield factory
    factory.stop_all()


@pytest.fixture
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxFactory]:
    """Provide a factory starting nginx with the shipped site in front of a gunicorn.

    ``start(upstream_port, *, read_timeout="60s", edit=None)`` returns a running
    :class:`support.nginx.NginxServer` speaking TLS (a self-signed certificate) and HTTP/2
    on a free 127.0.0.1 port; see :class:`support.nginx.NginxFactory`.  Every server
    started is stopped at teardown.  Without ``nginx`` the test is skipped, or failed when
    ``CI`` is set.

    :param tmp_path_factory: For the servers' directories.
    :returns: The factory.
    """
    factory = NginxFactory(tmp_path_factory.mktemp("nginx"), require_nginx())
    yield factory
    factory.stop_all()


@pytest.fixture
def apps() -> Iterator[Apps]:
    """Make apps in the test process, each with a bus of its own (see
    :class:`support.app.Apps`); their buses are closed at the end."""
    made = Apps()
    yield made
    made.close()


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One ``redis-server`` for the whole session, for tests that only need a Redis bus
    (each test gets a flushed database through :func:`bus_url`)."""
    exe = require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("shared-redis"), executable=exe).start()
    yield server
    server.stop()


#: The backend classes of the package and the ``bus_url`` parameter that runs each; a test
#: checks that every registered backend class is here.
BACKEND_URLS = {"MemoryBus": "memory", "RedisBus": "redis"}


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def bus_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """``SSE_BUS_URL`` for each backend: the same test runs against the in-process bus and
    against the Redis bus."""
    if request.param == "memory":
        yield "memory://"
        return
    server: RedisServer = request.getfixturevalue("shared_redis")
    client = server.client()
    client.flushdb()
    yield server.url
    client.flushdb()

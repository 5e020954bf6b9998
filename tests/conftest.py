"""Shared pytest fixtures: gunicorn and redis-server processes.

Plain helpers (``free_port``, ``raw_sse``, the server classes) live in
:mod:`helpers`; this module only wires them into fixtures and registers the
markers.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # needed under --import-mode=importlib
    sys.path.insert(0, _TESTS_DIR)

from helpers import (  # noqa: E402
    GunicornFactory,
    GunicornServer,
    RedisFactory,
    RedisServer,
    require_redis_server,
    start_gunicorn,
)

_MARKERS = {
    "redis": "needs a redis-server (started by a fixture)",
    "e2e": "starts a real gunicorn with gevent workers",
    "browser": "drives headless Chromium",
    "slow": "takes more than a few seconds",
}


def pytest_configure(config: pytest.Config) -> None:
    """Register the project's markers.

    :param config: The pytest config.
    """
    for name, description in _MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def _stop_all(stoppers: Sequence[Callable[[], object]]) -> None:
    """Call every stopper, even if some raise; re-raise the first error.

    :param stoppers: Callables stopping one server each.
    """
    first: BaseException | None = None
    for stop in stoppers:
        try:
            stop()
        except Exception as exc:
            first = first or exc
    if first is not None:
        raise first


@pytest.fixture
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornFactory]:
    """Provide a factory starting ``gunicorn -k gevent`` servers.

    ``start(app, *, workers=1, env=None, args=(), config=None, timeout=20,
    port=None)`` returns a running :class:`helpers.GunicornServer`; see
    :func:`helpers.start_gunicorn`.  Every server started is stopped at
    teardown (SIGTERM, then SIGKILL of its own processes after 10 s).

    :param tmp_path_factory: For the log directory.
    :returns: The factory.
    """
    servers: list[GunicornServer] = []
    log_dir = tmp_path_factory.mktemp("gunicorn")

    def start(app: str, **options: Any) -> GunicornServer:
        server = start_gunicorn(app, log_dir=log_dir, **options)
        servers.append(server)
        return server

    yield start
    _stop_all([functools.partial(s.stop, signal.SIGTERM, timeout=10) for s in servers])


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisFactory]:
    """Provide a factory starting throwaway ``redis-server`` processes.

    ``start()`` returns a running :class:`helpers.RedisServer` on a free
    127.0.0.1 port (no persistence).  Every server started is stopped at
    teardown.  Without ``redis-server`` on ``PATH`` the test is skipped, or
    failed when ``CI`` is set.

    :param tmp_path_factory: For the working directory and log.
    :returns: The factory.
    """
    exe = require_redis_server()
    servers: list[RedisServer] = []
    work_dir = tmp_path_factory.mktemp("redis")

    def start() -> RedisServer:
        server = RedisServer(work_dir, executable=exe)
        servers.append(server)
        return server.start()

    yield start
    _stop_all([server.stop for server in servers])


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

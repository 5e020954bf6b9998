"""The Redis bus behind a slow, lossy link: ``gunicorn -k gevent`` (two workers) reaches a real
``redis-server`` only through :mod:`support.lossy_link`, which adds 50 ms ± 20 ms each way
and TCP-like loss (200 ms stalls), and once resets every connection. Stream clients (which
reconnect and resume as browsers do, every few seconds since streams have a maximum
lifetime) get every event once and in order; publishing fails only around the reset; the
added delivery delay is measured against the same set-up without latency.

Also the link itself: delay, order and stalls, on an echo server.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.agents import Agent, acked, checked, python_module
from support.app import serve
from support.gunicorn import GunicornFactory
from support.procs import HOST
from support.redis_server import RedisFactory

pytestmark = pytest.mark.redis

CLIENTS = 40
INTERVAL = 0.05
LOSSY = {"delay": 0.05, "jitter": 0.02, "stall_probability": 0.03, "stall": 0.2}


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """Start agent processes (``python -m module args``); every one is stopped at the end."""
    started: list[Agent] = []

    def start(module: str, *args: str) -> Agent:
        agent = Agent.local(python_module(module, *args), tmp_path / f"agent{len(started)}.log")
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    listener = socket.create_server((HOST, 0))

    def serve_one() -> None:
        conn, _ = listener.accept()
        with conn, contextlib.suppress(ConnectionResetError):  # the link resets it
            for _ in range(10_000):
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    return listener, thread


def test_the_link_delays_keeps_order_stalls_and_resets(agents: Callable[..., Agent]) -> None:
    listener, thread = _echo_server()
    try:
        link = agents("support.lossy_link", HOST, "0", HOST, str(listener.getsockname()[1]), "7")
        link.ask({"cmd": "set", "delay": 0.05, "jitter": 0.02})
        round_trips, received = [], b""
        with socket.create_connection((HOST, link.started["started"]), timeout=5) as sock:
            for n in range(20):
                sent = time.monotonic()
                sock.sendall(b"%04d" % n)
                received += sock.recv(4)
                round_trips.append(time.monotonic() - sent)
            assert 0.06 <= statistics.median(round_trips) <= 0.2, round_trips
            link.ask({"cmd": "set", "delay": 0.0, "jitter": 0.0, "stall_probability": 1.0})
            sent = time.monotonic()
            sock.sendall(b"late")
            received += sock.recv(4)
            assert time.monotonic() - sent >= 0.4  # a stall each way
            assert link.ask({"cmd": "set", "jitter": 1.0}).get("error")
            assert link.ask({"cmd": "cut"}) == {"cut": 1}
            with pytest.raises(ConnectionResetError):
                sock.recv(4)
        assert received == b"".join(b"%04d" % n for n in range(20)) + b"late"
        link.ask({"cmd": "set", "stall_probability": 0.0, "cut_probability": 1.0})
        with socket.create_connection((HOST, link.started["started"]), timeout=5) as sock:
            sock.sendall(b"cut")
            with pytest.raises(ConnectionResetError):
                sock.recv(4)
        assert link.ask({"cmd": "stats"})["stalls"] == 2
    finally:
        listener.close()
        thread.join(timeout=5)


def _phase(publishers: list[Agent], since: float) -> dict[str, float]:
    return {i: t for i, t in acked(publishers).items() if t >= since}


def _wait(condition: Callable[[], bool], timeout: float) -> float | None:
    start = time.monotonic()
    for _ in range(int(timeout / 0.5) + 1):
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.5)
    return None


def test_streams_over_a_slow_lossy_link(
    redis_server: RedisFactory, gunicorn: GunicornFactory, agents: Callable[..., Agent]
) -> None:
    redis = redis_server()
    link = agents("support.lossy_link", HOST, "0", HOST, str(redis.port), "12")
    bus_url = f"redis://{HOST}:{link.started['started']}/0"
    server = serve(
        gunicorn,
        workers=2,
        SSE_BUS_URL=bus_url,
        SSE_KEEPALIVE=1,
        SSE_PUBLISH_TIMEOUT=1,
        SSE_MAX_LIFETIME=3,
    )
    clients = [agents("support.netload", "clients", HOST, str(server.port), str(CLIENTS // 2))]
    clients.append(agents("support.netload", "clients", HOST, str(server.port), str(CLIENTS // 2)))
    opened = _wait(
        lambda: all(c.ask({"cmd": "status"})["open"] == CLIENTS // 2 for c in clients), 30
    )
    assert opened is not None
    publisher = agents("support.netload", "publish-http", str(INTERVAL), f"{HOST}:{server.port}")
    figures: dict[str, Any] = {}

    time.sleep(4)  # no added latency
    clean = acked([publisher])
    assert _wait(lambda: checked(clients, clean)["missing"] == 0, 20) is not None
    figures["clean"] = checked(clients, clean)

    lossy_at = time.time()
    link.ask({"cmd": "set", **LOSSY})
    time.sleep(4)
    assert link.ask({"cmd": "cut"})["cut"] >= 2  # the receivers' and the publishing pools'
    cut_at = time.time()
    time.sleep(5)
    lossy = _phase([publisher], lossy_at)
    link.ask({"cmd": "set", "delay": 0.0, "jitter": 0.0, "stall_probability": 0.0})
    caught_up = _wait(lambda: checked(clients, lossy)["missing"] == 0, 30)
    failed: list[Any] = []
    everything = acked([publisher], "stop", failed)
    figures["lossy"] = checked(clients, lossy)
    figures["link"] = link.ask({"cmd": "stats"})
    figures["publishes"] = len(everything) + len(failed)
    figures["publishes failed (s after the cut)"] = [round(f[0] - cut_at, 2) for f in failed]
    figures["added delivery delay p50, s"] = round(
        figures["lossy"]["lag_p50_s"] - figures["clean"]["lag_p50_s"], 3
    )
    print(f"\nslow lossy link: {figures}")

    assert caught_up is not None, figures["lossy"]
    _wait(lambda: checked(clients, everything)["missing"] == 0, 20)
    final = checked(clients, everything)
    assert (final["missing"], final["duplicates"], final["out_of_order"]) == (0, 0, 0), final
    assert final["resets"] == 0
    assert final["connects"] > 2 * CLIENTS, "the streams' lifetime makes every client resume"
    assert figures["link"]["stalls"] > 0
    assert len(failed) <= 10, failed[:3]
    assert all(-1 <= f[0] - cut_at <= 3 for f in failed), failed[:3]
    assert 0.05 <= figures["added delivery delay p50, s"] <= 1.0

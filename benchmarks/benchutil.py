"""Small helpers shared by the benchmark's orchestrator, servers and client.

Nothing here imports gevent at module level: the orchestrator and the client never load it,
and the servers import it themselves (gunicorn's worker after its monkey-patching).
"""

from __future__ import annotations

import json
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

HOST = "127.0.0.1"
#: The channel every benchmark client follows and every event is published to.
CHANNEL = "bench"
#: Path of the event stream on both servers.
STREAM_PATH = f"/stream?channel={CHANNEL}"


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; return the new pair."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, hard
    return target, hard


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def event_data(n: int) -> dict[str, Any]:
    """The payload of event number *n*: its publish time and its number."""
    return {"t": time.time(), "n": n}


def encode_data(data: dict[str, Any]) -> bytes:
    """JSON exactly as Flask's default provider writes it (sorted keys, default separators)."""
    return json.dumps(data, sort_keys=True).encode()


def run_schedule(
    rate: float, duration: float, publish: Callable[[int], None]
) -> dict[str, float | int]:
    """Call ``publish(n)`` for n = 0, 1, ... at *rate* per second for *duration* seconds.

    Runs in a greenlet of a gevent server. Event *n* is due at ``start + n / rate`` on an
    absolute schedule, so a late publisher catches up instead of drifting; it always yields
    (``gevent.sleep(0)`` when late) so the connections' greenlets get to run. Returns how many
    events were published, the elapsed time and how late the publisher fell behind schedule.
    """
    import gevent

    count = max(1, round(rate * duration))
    interval = 1.0 / rate
    start = time.monotonic()
    max_lag = 0.0
    total_lag = 0.0
    for n in range(count):
        delay = start + n * interval - time.monotonic()
        if delay < 0:
            max_lag = max(max_lag, -delay)
            total_lag -= delay
        gevent.sleep(max(delay, 0.0))
        publish(n)
    elapsed = time.monotonic() - start
    return {
        "published": count,
        "elapsed_s": elapsed,
        "max_lag_ms": max_lag * 1000.0,
        "mean_lag_ms": total_lag / count * 1000.0,
    }

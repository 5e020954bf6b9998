"""Small helpers shared by the benchmark's orchestrator, servers and client, and the pieces
they share with the tests.

The tests' support package (``tests/support``) provides the free ports, the file limit, the
chunked-transfer decoder and the redis-server launcher; this module puts ``tests/`` on
``sys.path`` and re-exports what the benchmarks use. The scripts run as
``python benchmarks/<script>.py``, which puts only ``benchmarks/`` on the path: this is the
one place that adds ``tests/``, so the benchmark modules import those pieces from here
(``targets.py`` loads the redis-server launcher itself, and only in redis mode).

Nothing here imports gevent at module level: the orchestrator and the client never load it,
and the servers import it themselves (gunicorn's worker after its monkey-patching).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_TESTS_DIR = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS_DIR not in sys.path:
    sys.path.append(_TESTS_DIR)

from support.http import ChunkedDecoder, encode_chunk, is_chunked, parse_head  # noqa: E402
from support.procs import free_port, raise_nofile_limit, read_log  # noqa: E402

__all__ = [
    "CHANNEL",
    "HOST",
    "STREAM_PATH",
    "ChunkedDecoder",
    "encode_chunk",
    "encode_data",
    "event_data",
    "free_port",
    "is_chunked",
    "parse_head",
    "raise_nofile_limit",
    "read_log",
    "run_schedule",
]

HOST = "127.0.0.1"
#: The channel every benchmark client follows and every event is published to.
CHANNEL = "bench"
#: Path of the event stream on both servers.
STREAM_PATH = f"/stream?channel={CHANNEL}"


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

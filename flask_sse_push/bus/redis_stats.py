"""The stream counts every process of a Redis bus reports (``<prefix>/stats`` across the
app): each receiver writes its own every couple of seconds, :func:`read_stats` sums them."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, cast

from .redis_history import text

if TYPE_CHECKING:
    import redis

    from .redis import RedisBus

#: Seconds between two reports of this process's stream counts.
STATS_EVERY = 2.0
#: How long a process's reported stream counts stay valid, in seconds.
STATS_TTL = 10.0


def write_stats(bus: RedisBus, client: redis.Redis) -> None:
    """Report this process's stream counts on *bus*, with *client*, for :func:`read_stats`."""
    record = {
        "streams": bus.stream_count(),
        "channels": bus.channel_counts(),
        "time": time.time(),
    }
    stats_key = bus.options.stats_key
    client.hset(stats_key, bus.origin, json.dumps(record))
    client.expire(stats_key, int(STATS_TTL * 6))


def read_stats(client: redis.Redis, stats_key: str) -> dict[str, Any]:
    """Open streams of every live process of the app, as each receiver last reported them
    (every couple of seconds): ``processes`` (``host:pid:instance`` -> ``streams`` and
    ``channels``), and the totals ``streams`` and ``channels`` (``connections`` repeats
    ``streams`` for older clients)."""
    now = time.time()
    processes: dict[str, dict[str, Any]] = {}
    for origin, value in cast("dict[bytes, bytes]", client.hgetall(stats_key)).items():
        record = json.loads(value)
        if now - record["time"] <= STATS_TTL:
            processes[text(origin)] = {
                "streams": record["streams"],
                "channels": record["channels"],
            }
    totals: dict[str, int] = {}
    for process in processes.values():
        for channel, count in process["channels"].items():
            totals[channel] = totals.get(channel, 0) + count
    streams = sum(p["streams"] for p in processes.values())
    return {"processes": processes, "streams": streams, "connections": streams, "channels": totals}

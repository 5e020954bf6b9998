"""The Redis bus's receiver: ONE per bus and process, on ONE connection, reading the app's
stream with ``XREAD BLOCK`` and delivering each entry to the process's fan-out.

It goes on from the last entry it delivered after an outage, so every event Redis accepted is
delivered, in order; it holds the bus only weakly, so an app that is gone takes its receiver
with it. When the stream was trimmed past its position it ends its streams as lagged, so
that their clients resync; when the stream was deleted (``FLUSHDB``, a restart of Redis
without persistence) it reads the new one from its start. When a failover lost the newest
entries it had delivered (Redis replicates asynchronously), it goes on from the new primary's
newest entry: the stream keeps its epoch, which a stream made again does not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
import weakref
from typing import TYPE_CHECKING, Any, cast

from .. import concurrency
from ..reasons import EndReason, ResetReason
from .fanout import Fanout
from .redis_connect import refused
from .redis_history import Entries, Position, entry_id, stream_position, text

if TYPE_CHECKING:
    import redis

    from .redis import RedisBus

log = logging.getLogger("flask_sse_push")

#: Entries read at most at once; a full batch means the receiver is behind.
BATCH = 500
#: Longest wait of one ``XREAD BLOCK``, in milliseconds.
BLOCK_MS = 1000
#: Seconds between two reports of this process's stream counts.
STATS_EVERY = 2.0
#: How long a process's reported stream counts stay valid, in seconds.
STATS_TTL = 10.0
_BACKOFF_CAP = 2.0


class Receiver:
    """Reads the stream of *bus* and feeds *fanout*.

    :attr:`last` is the id of the last entry delivered; it changes together with the
    delivery, under the fan-out's lock, so that a resume reading it never misses an entry.

    :param bus: the bus (held weakly).
    :param fanout: this process's fan-out of the bus.
    """

    def __init__(self, bus: RedisBus, fanout: Fanout) -> None:
        self._bus = weakref.ref(bus)
        self._fanout = weakref.ref(fanout)
        self._errors = bus.errors
        self.lock = fanout.lock
        self.key = bus.key
        self.name = bus.name
        #: Id of the last entry delivered, ``None`` until the stream's position is known.
        self.last: str | None = None
        #: The epoch of the stream it reads (see :class:`~.redis_history.StreamInfo`).
        self.epoch: str | None = None
        #: Subscriptions waiting for the receiver to pass their resume point.
        self.waiting: dict[Any, tuple[int, int]] = {}
        #: Whether the connection to Redis is up (read by tests and health checks).
        self.connected = False
        self.stopped = False
        self._pid = os.getpid()
        self._reader: redis.Redis | None = None
        self._next_stats = 0.0
        #: The last error Redis answered with, logged once until things work again.
        self._refused: str | None = None

    def start(self) -> None:
        """Learn the stream's position now if Redis answers (so an event published right
        after the first subscription is delivered live), then run in the background."""
        bus = self._bus()
        if bus is not None:
            with contextlib.suppress(*self._errors):  # else learnt once connected
                self.learn_position(bus.client)
        concurrency.spawn(self.run, name=f"sse-redis-{self.name}")

    def stop(self) -> None:
        """Stop within a second; closing the connection interrupts a blocked read."""
        self.stopped = True
        if self._reader is not None:
            self._reader.close()

    @property
    def position(self) -> Position:
        """:attr:`last` as a position (``0-0`` while unknown). Callers hold the lock."""
        return stream_position(self.last or "0-0") or (0, 0)

    def learn_position(self, client: redis.Redis) -> None:
        """Start after the stream's newest entry, unless a position is known already."""
        if self.last is not None:
            return
        bus = self._bus()
        if bus is None:
            return
        info = bus.history.info(client)
        with self.lock:
            if self.last is None:
                self.last = entry_id(info.last_generated)
                self.epoch = info.epoch

    # -- the loop ------------------------------------------------------------------------

    def _running(self) -> bool:
        return not self.stopped and self._pid == os.getpid() and self._bus() is not None

    def run(self) -> None:
        """Read until stopped, reconnecting with backoff while Redis is unreachable."""
        backoff = 0.1
        while self._running():
            try:
                self._once()
                backoff = 0.1
                self._refused = None
            except self._errors as exc:
                if not self._running():
                    break
                if refused(exc):
                    self._log_refused(exc)
                elif self.connected:
                    log.warning(
                        "flask-sse-push: lost Redis (%s); open streams stay open, retrying", exc
                    )
                self._disconnect()
                time.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, _BACKOFF_CAP)
            except Exception:  # a bug must not end delivery for the whole process
                if not self._running():
                    break  # stop() closed the connection under a blocked read
                log.exception("flask-sse-push: Redis receiver error")
                time.sleep(1.0)
        self._disconnect()

    def _log_refused(self, exc: Exception) -> None:
        if str(exc) != self._refused:
            self._refused = str(exc)
            log.error(
                "flask-sse-push: Redis refused to let this worker read %r (%s); open streams "
                "stay open, retrying",
                self.key,
                exc,
            )

    def _disconnect(self) -> None:
        self.connected = False
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _connect(self, bus: RedisBus) -> redis.Redis:
        if self._reader is None:
            self._reader = bus.connect(
                socket_timeout=BLOCK_MS / 1000 + 10, single_connection_client=True, role="receive"
            )
        return self._reader

    def _once(self) -> None:
        """Read one batch from the stream and deliver it; report the stream counts when due."""
        bus = self._bus()
        if bus is None:
            return
        reader = self._connect(bus)
        if not self.connected:
            # (Re)connecting: learn where to start, or notice entries lost unread.
            if self.last is None:
                self.learn_position(reader)
            else:
                self._check_position(bus, reader)
            self.connected = True
        del bus  # not held across the blocking read
        streams = cast(
            "list[tuple[bytes, Entries]] | None",
            reader.xread({self.key: self.last or "$"}, count=BATCH, block=BLOCK_MS),
        )
        bus = self._bus()
        if bus is None:
            return
        if not streams:
            # Nothing new for a while: was the stream deleted, or made again with ids below
            # this receiver's position (which it would wait for forever)?
            self._check_position(bus, reader)
        for _key, entries in streams or ():
            if len(entries) >= BATCH:
                # A full batch: this receiver is behind, maybe by more than the stream
                # keeps. Entries trimmed before it read them cannot be delivered.
                self._check_position(bus, reader)
            self._deliver(bus, entries)
        if streams and not self.epoch:
            self._learn_epoch(bus, reader)
        if time.monotonic() >= self._next_stats:
            self._next_stats = time.monotonic() + STATS_EVERY
            try:
                self._write_stats(bus, reader)
            except self._errors as exc:  # out of memory: delivery goes on
                if not refused(exc):
                    raise
                self._log_refused(exc)

    def _learn_epoch(self, bus: RedisBus, reader: redis.Redis) -> None:
        """Learn the epoch of a stream that did not exist when this receiver started (it
        tells a failover from a stream made again, see :meth:`_check_position`). The
        epoch is the stream's first id: one after this receiver's position belongs to a
        stream made since, not to the one it read."""
        epoch = text(reader.get(bus.history.epoch_key) or b"")
        start = stream_position(epoch)
        with self.lock:
            if start is not None and start <= self.position:
                self.epoch = epoch

    def _write_stats(self, bus: RedisBus, client: redis.Redis) -> None:
        """Report this process's stream counts for :func:`read_stats`."""
        record = {
            "streams": bus.stream_count(),
            "channels": bus.channel_counts(),
            "time": time.time(),
        }
        stats_key = bus.options.stats_key
        client.hset(stats_key, bus.origin, json.dumps(record))
        client.expire(stats_key, int(STATS_TTL * 6))

    def _check_position(self, bus: RedisBus, reader: redis.Redis) -> None:
        """Notice a stream that cannot go on from :attr:`last`. Trimmed past it: end every
        stream, as lagged, so that their clients resync. Deleted or made again: read the new
        stream from its start, ending only the streams waiting for a resume point in the old
        one (which the new one's ids may never pass)."""
        info = bus.history.info(reader)
        fanout = self._fanout()
        if fanout is None:
            return
        with self.lock:
            reason = info.gap(self.position)
            known, self.epoch = self.epoch, info.epoch
            if reason is None:
                return
            if info.lost_tail(self.position, known):
                why = (
                    f"Redis lost the newest entries this worker delivered, up to {self.last} "
                    "(a failover: replication is asynchronous); open streams go on from the "
                    f"new primary's newest entry, {entry_id(info.last_generated)}"
                )
                self.last = entry_id(info.last_generated)
                ended = None
            elif reason is ResetReason.UNKNOWN:
                why = "the Redis stream was deleted or made again; reading the new one"
                self.last = "0-0"
                waiting, self.waiting = self.waiting, {}
                ended = fanout.end(EndReason.LAGGED, waiting.__contains__)
            else:
                why = "events were trimmed from Redis before this worker read them"
                ended = fanout.end(EndReason.LAGGED, lambda sub: True)
        if ended is None:
            log.warning("flask-sse-push: %s", why)
        else:
            log.warning("flask-sse-push: %s; ended %d streams so their clients resync", why, ended)

    def _deliver(self, bus: RedisBus, entries: Entries) -> None:
        fanout = self._fanout()
        if fanout is None:
            return
        for entry, fields in entries:
            try:
                if bus.is_control(fields):
                    bus.control(fields)
                    with self.lock:
                        self._advance(fanout, entry)
                else:
                    message = bus.message(entry, fields)
                    if fanout.metrics is not None:  # the entry id starts with its time in ms
                        message = message._replace(time=int(entry.partition(b"-")[0]) / 1000)
                    with self.lock:
                        self._advance(fanout, entry)
                        fanout.deliver(message)
            except Exception:  # one bad entry must not stop delivery, nor come back
                log.exception("flask-sse-push: skipped stream entry %r", entry)
                with self.lock:
                    self.last = entry.decode()
            concurrency.cooperate()

    def _advance(self, fanout: Fanout, entry: bytes) -> None:
        """Record *entry* as delivered and start the subscriptions waiting for a resume
        point before it. Callers hold :attr:`lock`."""
        self.last = entry.decode()
        if self.waiting:
            position = stream_position(self.last) or (0, 0)
            ready = [sub for sub, after in self.waiting.items() if after < position]
            for sub in ready:
                del self.waiting[sub]
                fanout.activate(sub)


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

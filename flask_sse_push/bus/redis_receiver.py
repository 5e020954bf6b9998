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
from .redis_stats import STATS_EVERY, STATS_TTL

if TYPE_CHECKING:
    import redis

    from .base import Message
    from .redis import RedisBus

log = logging.getLogger("flask_sse_push")

#: Entries read at most at once; a full batch means the receiver is behind.
BATCH = 500
#: Longest wait of one ``XREAD BLOCK``, in milliseconds.
BLOCK_MS = 1000
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
        self._shards = bus.shards
        #: Per stream key read: the id of the last entry delivered, ``None`` until known.
        self.lasts: dict[str, str | None] = {self.key: None}
        #: Per stream key read: its epoch (see :class:`~.redis_history.StreamInfo`).
        self.epochs: dict[str, str | None] = {self.key: None}
        #: The keys of the read in progress (a sharded bus waits until it has a new shard).
        self.reading: frozenset[str] = frozenset()
        self._reader_id: int | None = None
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
    def last(self) -> str | None:
        """Id of the last entry delivered from the (first) stream, ``None`` until known."""
        return self.lasts.get(self.key)

    @property
    def position(self) -> Position:
        """:attr:`last` as a position (``0-0`` while unknown). Callers hold the lock."""
        return self.position_in(self.key)

    def position_in(self, key: str) -> Position:
        """The position in stream *key* (``0-0`` while unknown). Callers hold the lock."""
        return stream_position(self.lasts.get(key) or "0-0") or (0, 0)

    def shard_positions(self, shards: frozenset[int]) -> dict[int, Position] | None:
        """The positions in *shards*, ``None`` while one is unknown. Callers hold the lock."""
        keys = self._shards.keys
        if any(self.lasts.get(keys[shard]) is None for shard in shards) or not self.connected:
            return None
        return {shard: self.position_in(keys[shard]) for shard in shards}

    def vector(self) -> str:
        """The vector id of the shards read now (see :mod:`.redis_shards`). Callers hold the
        lock."""
        shard_of_key = self._shards.shard_of_key
        positions = {}
        for key in self.lasts:
            shard = shard_of_key(key)
            if shard is not None:
                positions[shard] = self.position_in(key)
        return self._shards.encode(positions)

    def learn_position(self, client: redis.Redis, key: str | None = None) -> None:
        """Start after the newest entry of stream *key* (default: the first), unless a
        position is known already."""
        key = key or self.key
        if self.lasts.get(key) is not None:
            return
        bus = self._bus()
        if bus is None:
            return
        info = bus.history_of(key).info(client)
        with self.lock:
            if key in self.lasts and self.lasts[key] is None:
                self.lasts[key] = entry_id(info.last_generated)
                self.epochs[key] = info.epoch

    def read(self, key: str, info: Any) -> bool:
        """Start reading stream *key* after the newest entry *info* (a
        :class:`~.redis_history.StreamInfo`, or ``None`` to learn it once connected) tells
        of; return whether it was not read yet. Callers hold the lock."""
        if key in self.lasts:
            return False
        self.lasts[key] = entry_id(info.last_generated) if info is not None else None
        self.epochs[key] = info.epoch if info is not None else None
        return True

    def unread(self, key: str) -> None:
        """Stop reading stream *key*. Callers hold the lock."""
        self.lasts.pop(key, None)
        self.epochs.pop(key, None)

    def wake(self, client: redis.Redis, key: str) -> None:
        """Interrupt a blocked read that lacks *key* (``CLIENT UNBLOCK``), so that the next
        read has it; give up after half a second (the read ends within a second anyway)."""
        deadline = time.monotonic() + 0.5
        while key not in self.reading and self.connected and time.monotonic() < deadline:
            if self._reader_id is not None:
                client.client_unblock(self._reader_id)
            time.sleep(0.005)

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
        self._reader_id = None
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
        """Read one batch from the streams and deliver it; report the stream counts when due."""
        bus = self._bus()
        if bus is None:
            return
        reader = self._connect(bus)
        if not self.connected:
            # (Re)connecting: notice entries lost unread.
            for key, last in list(self.lasts.items()):
                if last is not None:
                    self._check_position(bus, reader, key)
            if self._shards.count > 1:
                self._reader_id = int(reader.client_id())
        for key in [key for key, last in self.lasts.items() if last is None]:
            self.learn_position(reader, key)  # also a shard added while Redis did not answer
        self.connected = True
        del bus  # not held across the blocking read
        with self.lock:
            wanted = {key: last or "$" for key, last in self.lasts.items()}
            self.reading = frozenset(wanted)
        streams = cast(
            "list[tuple[bytes, Entries]] | None",
            reader.xread(wanted, count=BATCH, block=BLOCK_MS),  # type: ignore[arg-type]
        )
        bus = self._bus()
        if bus is None:
            return
        if not streams:
            # Nothing new for a while: was a stream deleted, or made again with ids below
            # this receiver's position (which it would wait for forever)?
            for key in list(self.lasts):
                self._check_position(bus, reader, key)
        for raw_key, entries in streams or ():
            key = text(raw_key)
            if key not in self.lasts:
                continue  # no longer read
            if len(entries) >= BATCH:
                # A full batch: this receiver is behind, maybe by more than the stream
                # keeps. Entries trimmed before it read them cannot be delivered.
                self._check_position(bus, reader, key)
            self._deliver(bus, key, entries)
            if not self.epochs.get(key):
                self._learn_epoch(bus, reader, key)
        if time.monotonic() >= self._next_stats:
            self._next_stats = time.monotonic() + STATS_EVERY
            try:
                self._write_stats(bus, reader)
            except self._errors as exc:  # out of memory: delivery goes on
                if not refused(exc):
                    raise
                self._log_refused(exc)

    def _learn_epoch(self, bus: RedisBus, reader: redis.Redis, key: str) -> None:
        """Learn the epoch of a stream that did not exist when this receiver started (it
        tells a failover from a stream made again, see :meth:`_check_position`). The
        epoch is the stream's first id: one after this receiver's position belongs to a
        stream made since, not to the one it read."""
        epoch = text(reader.get(bus.history_of(key).epoch_key) or b"")
        start = stream_position(epoch)
        with self.lock:
            if start is not None and key in self.lasts and start <= self.position_in(key):
                self.epochs[key] = epoch

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

    def _check_position(self, bus: RedisBus, reader: redis.Redis, key: str) -> None:
        """Notice a stream that cannot go on from its position. Trimmed past it: end every
        stream that follows it, as lagged, so that their clients resync. Deleted or made
        again: read the new stream from its start, ending only the streams waiting for a
        resume point in the old one (which the new one's ids may never pass)."""
        info = bus.history_of(key).info(reader)
        fanout = self._fanout()
        if fanout is None:
            return
        shard = self._shards.shard_of_key(key)

        def follows(sub: Any) -> bool:
            return shard is None or shard in self._shards.needed(sub.channels)

        with self.lock:
            if key not in self.lasts:
                return
            position = self.position_in(key)
            reason = info.gap(position)
            known, self.epochs[key] = self.epochs.get(key), info.epoch
            if reason is None:
                return
            if info.lost_tail(position, known):
                why = (
                    f"Redis lost the newest entries this worker delivered, up to "
                    f"{self.lasts[key]} (a failover: replication is asynchronous); open "
                    f"streams go on from the new primary's newest entry, "
                    f"{entry_id(info.last_generated)}"
                )
                self.lasts[key] = entry_id(info.last_generated)
                ended = None
            elif reason is ResetReason.UNKNOWN:
                why = f"the Redis stream {key!r} was deleted or made again; reading the new one"
                self.lasts[key] = "0-0"
                waiting, self.waiting = self.waiting, {}
                ended = fanout.end(EndReason.LAGGED, waiting.__contains__)
            elif self._shards.count > 1 and shard is None:
                why = "revocation orders were trimmed from Redis before this worker read them"
                ended = None
            else:
                why = "events were trimmed from Redis before this worker read them"
                ended = fanout.end(EndReason.LAGGED, follows)
        if ended is None:
            log.warning("flask-sse-push: %s", why)
        else:
            log.warning("flask-sse-push: %s; ended %d streams so their clients resync", why, ended)

    def _deliver(self, bus: RedisBus, key: str, entries: Entries) -> None:
        fanout = self._fanout()
        if fanout is None:
            return
        sharded = self._shards.shard_of_key(key) is not None
        for entry, fields in entries:
            try:
                if bus.is_control(fields):
                    bus.control(fields)
                    with self.lock:
                        self._advance(fanout, key, entry)
                elif sharded:
                    with self.lock:  # the id holds the positions as of this entry
                        self._advance(fanout, key, entry)
                        fanout.deliver(self._message(bus, fanout, entry, fields, self.vector()))
                else:
                    message = self._message(bus, fanout, entry, fields)
                    with self.lock:
                        self._advance(fanout, key, entry)
                        fanout.deliver(message)
            except Exception:  # one bad entry must not stop delivery, nor come back
                log.exception("flask-sse-push: skipped stream entry %r", entry)
                with self.lock:
                    if key in self.lasts:
                        self.lasts[key] = entry.decode()
            concurrency.cooperate()

    @staticmethod
    def _message(
        bus: RedisBus,
        fanout: Fanout,
        entry: bytes,
        fields: dict[bytes, bytes],
        vector: str | None = None,
    ) -> Message:
        message = bus.message(entry, fields, vector)
        if fanout.metrics is not None:  # the entry id starts with its time in ms
            message = message._replace(time=int(entry.partition(b"-")[0]) / 1000)
        return message

    def _advance(self, fanout: Fanout, key: str, entry: bytes) -> None:
        """Record *entry* of stream *key* as delivered and start the subscriptions waiting
        for a resume point before it. Callers hold :attr:`lock`."""
        if key not in self.lasts:
            return  # no longer read
        last = self.lasts[key] = entry.decode()
        if self.waiting and key == self.key:
            position = stream_position(last) or (0, 0)
            ready = [sub for sub, after in self.waiting.items() if after < position]
            for sub in ready:
                del self.waiting[sub]
                fanout.activate(sub)

"""The Redis bus's receiver: ONE per bus and process, on ONE connection, reading the app's
stream with ``XREAD BLOCK`` and delivering each entry to the process's fan-out. With shards
it reads the control stream and the shards its subscriptions need, in one ``XREAD``; on a
Redis Cluster, with one connection per stream (see :mod:`.redis_lanes`).

It goes on from the last entry it delivered after an outage, so every event Redis accepted is
delivered, in order; it holds the bus only weakly, so an app that is gone takes its receiver
with it. When the stream was trimmed past its position it ends its streams as lagged, so
that their clients resync; when the stream was deleted (``FLUSHDB``, a restart of Redis
without persistence) it reads the new one from its start. When a failover lost the newest
entries it had delivered (Redis replicates asynchronously), it goes on from the new primary's
newest entry: the stream keeps its epoch, which a stream made again does not.
"""

from __future__ import annotations

import logging
import os
import random
import time
import weakref
from typing import TYPE_CHECKING, Any, cast

from .. import concurrency
from .fanout import Fanout
from .redis_connect import refused
from .redis_gaps import check_position, learn_epoch
from .redis_history import Entries, Position, entry_id, stream_position, text
from .redis_lanes import Lane
from .redis_stats import STATS_EVERY, write_stats

if TYPE_CHECKING:
    import redis

    from .base import Message
    from .redis import RedisBus

log = logging.getLogger("flask_sse_push")

#: Entries read at most at once; a full batch means the receiver is behind.
BATCH = 500
#: Longest wait of one ``XREAD BLOCK``, in milliseconds.
BLOCK_MS = 1000
#: Streams whose position one idle read checks at most; with more, they take turns (64
#: idle shards each cost a script a second otherwise).
IDLE_CHECKS = 4
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
        self.fanout = weakref.ref(fanout)
        self._errors = bus.errors
        self.lock = fanout.lock
        self.key = bus.key
        self.name = bus.name
        self.shards = bus.shards
        #: Per stream key read: the id of the last entry delivered, ``None`` until known.
        self.lasts: dict[str, str | None] = {self.key: None}
        #: Per stream key read: its epoch (see :class:`~.redis_history.StreamInfo`).
        self.epochs: dict[str, str | None] = {self.key: None}
        #: Per stream key whose position is not known yet: the moment (``time.time()``)
        #: from which its entries must be delivered, when it was read before it could be
        #: learnt (Redis did not answer).
        self.since: dict[str, float] = {}
        #: Subscriptions waiting for the receiver to pass their resume point.
        self.waiting: dict[Any, tuple[int, int]] = {}
        self.stopped = False
        self._pid = os.getpid()
        self._next_stats = 0.0
        #: One lane per stream (a cluster with shards), else one lane for all (``None``).
        self._per_key = bus.target.kind == "cluster" and bus.shards.count > 1
        self._lanes: dict[str | None, Lane] = {}

    def start(self) -> None:
        """Learn the stream's position now if Redis answers (so an event published right
        after the first subscription is delivered live), then run in the background."""
        bus = self._bus()
        if bus is not None:
            moment = time.time()
            try:
                self.learn_position(bus.client)
            except self._errors:  # learnt once connected, from this moment on
                self.since.setdefault(self.key, moment)
        self._spawn(self.key if self._per_key else None)

    def _spawn(self, key: str | None) -> None:
        lane = self._lanes[key] = Lane(key)
        concurrency.spawn(self.run, lane, name=f"sse-redis-{self.name}")

    def stop(self) -> None:
        """Stop within a second; closing the connections interrupts a blocked read."""
        self.stopped = True
        for lane in list(self._lanes.values()):
            lane.stopped = True
            lane.disconnect()

    @property
    def connected(self) -> bool:
        """Whether the connections to Redis are up (read by tests and health checks)."""
        lanes = list(self._lanes.values())
        return bool(lanes) and all(lane.connected for lane in lanes)

    @property
    def reading(self) -> frozenset[str]:
        """The keys of the reads in progress (a new shard waits until it is among them)."""
        return frozenset().union(*(lane.reading for lane in list(self._lanes.values())))

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
        return self.shards.positions(self.lasts, shards) if self.connected else None

    def learn_position(self, client: redis.Redis, key: str | None = None) -> None:
        """Start after the newest entry of stream *key* (default: the first), unless a
        position is known already; when it was to be read since an earlier moment (see
        :attr:`since`), after the newest entry added before that moment."""
        key = key or self.key
        if self.lasts.get(key) is not None:
            return
        bus = self._bus()
        if bus is None:
            return
        history = bus.history_of(key)
        info = history.info(client)
        position = info.last_generated
        since = self.since.get(key)
        if since is not None:
            position = min(position, history.position_at(since, client))
        with self.lock:
            if key in self.lasts and self.lasts[key] is None:
                self.lasts[key] = entry_id(position)
                self.epochs[key] = info.epoch
                self.since.pop(key, None)

    def read(self, key: str, info: Any, since: float = 0.0) -> bool:
        """Start reading stream *key* after the newest entry *info* (a
        :class:`~.redis_history.StreamInfo`) tells of, or, when *info* is ``None`` (Redis
        did not answer), after the newest entry added before the moment *since* (learnt
        once connected); return whether it was not read yet. Callers hold the lock."""
        if key in self.lasts:
            return False
        self.lasts[key] = entry_id(info.last_generated) if info is not None else None
        self.epochs[key] = info.epoch if info is not None else None
        if info is None:
            self.since[key] = since or time.time()
        if self._per_key and not self.stopped:
            self._spawn(key)
        return True

    def unread(self, key: str) -> None:
        """Stop reading stream *key*. Callers hold the lock."""
        self.lasts.pop(key, None)
        self.epochs.pop(key, None)
        self.since.pop(key, None)
        lane = self._lanes.pop(key, None) if self._per_key else None
        if lane is not None:
            lane.stopped = True
            lane.disconnect()

    def wake(self, client: redis.Redis, key: str) -> None:
        """Interrupt a blocked read that lacks *key* (``CLIENT UNBLOCK``), so that the next
        read has it; give up after half a second (the read ends within a second anyway)."""
        lane = self._lanes.get(None)
        deadline = time.monotonic() + 0.5
        while lane is not None and lane.connected and key not in lane.reading:
            if lane.client_id is not None:
                client.client_unblock(lane.client_id)
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)

    # -- the loop ------------------------------------------------------------------------

    def _running(self, lane: Lane) -> bool:
        return (
            not self.stopped
            and not lane.stopped
            and self._pid == os.getpid()
            and self._bus() is not None
        )

    def run(self, lane: Lane) -> None:
        """Read *lane*'s streams until stopped, reconnecting with backoff while Redis is
        unreachable."""
        backoff = 0.1
        while self._running(lane):
            try:
                self._once(lane)
                backoff = 0.1
                lane.refused = None
            except self._errors as exc:
                if not self._running(lane):
                    break
                if refused(exc):
                    self._log_refused(lane, exc)
                elif lane.connected:
                    log.warning(
                        "flask-sse-push: lost Redis (%s); open streams stay open, retrying", exc
                    )
                lane.disconnect()
                time.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, _BACKOFF_CAP)
            except Exception:  # a bug must not end delivery for the whole process
                if not self._running(lane):
                    break  # stop() closed the connection under a blocked read
                log.exception("flask-sse-push: Redis receiver error")
                time.sleep(1.0)
        lane.disconnect()

    def _log_refused(self, lane: Lane, exc: Exception) -> None:
        if str(exc) != lane.refused:
            lane.refused = str(exc)
            log.error(
                "flask-sse-push: Redis refused to let this worker read %r (%s); open streams "
                "stay open, retrying",
                lane.key or self.key,
                exc,
            )

    def _connect(self, bus: RedisBus, lane: Lane) -> redis.Redis:
        if lane.client is None:
            lane.client = bus.connect(
                socket_timeout=BLOCK_MS / 1000 + 10, single_connection_client=True, role="receive"
            )
        return lane.client

    def _once(self, lane: Lane) -> None:
        """Read one batch of *lane*'s streams and deliver it; report the stream counts when
        due."""
        bus = self._bus()
        if bus is None:
            return
        reader = self._connect(bus, lane)
        if not lane.connected:
            # (Re)connecting: notice entries lost unread.
            for key, last in list(self.lasts.items()):
                if last is not None and lane.reads(key):
                    check_position(self, bus, reader, key)
            if self.shards.count > 1 and lane.key is None:
                lane.client_id = int(reader.client_id())
        for key in [k for k, last in self.lasts.items() if last is None and lane.reads(k)]:
            self.learn_position(reader, key)  # also a shard added while Redis did not answer
        lane.connected = True
        del bus  # not held across the blocking read
        with self.lock:
            wanted = lane.streams(self.lasts)
            lane.reading = frozenset(wanted)
        if not wanted:
            return  # no longer read: the loop ends
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
            for key in lane.take_turns(sorted(wanted), IDLE_CHECKS):
                check_position(self, bus, reader, key)
        for raw_key, entries in streams or ():
            key = text(raw_key)
            if key not in self.lasts:
                continue  # no longer read
            if len(entries) >= BATCH:
                # A full batch: this receiver is behind, maybe by more than the stream
                # keeps. Entries trimmed before it read them cannot be delivered.
                check_position(self, bus, reader, key)
            self._deliver(bus, key, entries)
            if not self.epochs.get(key):
                learn_epoch(self, bus, reader, key)
        if lane.reads(self.key) and time.monotonic() >= self._next_stats:
            self._next_stats = time.monotonic() + STATS_EVERY
            try:
                write_stats(bus, reader)
            except self._errors as exc:  # out of memory: delivery goes on
                if not refused(exc):
                    raise
                self._log_refused(lane, exc)

    def _deliver(self, bus: RedisBus, key: str, entries: Entries) -> None:
        fanout = self.fanout()
        if fanout is None:
            return
        sharded = self.shards.shard_of_key(key) is not None
        for entry, fields in entries:
            try:
                if bus.is_control(fields):
                    bus.control(fields)
                    with self.lock:
                        self._advance(fanout, key, entry)
                elif sharded:
                    with self.lock:  # the id holds the positions as of this entry
                        if (stream_position(entry.decode()) or (0, 0)) <= self.position_in(key):
                            continue  # read before the shard was dropped and taken up again
                        self._advance(fanout, key, entry)
                        vector = self.shards.vector(self.lasts)
                        fanout.deliver(self._message(bus, fanout, entry, fields, vector))
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

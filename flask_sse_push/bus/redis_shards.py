"""The Redis bus spread over several streams (``SSE_REDIS_SHARDS`` > 1).

Each channel belongs to one of N stream keys, chosen by the CRC-32 of its name modulo N
(stable across processes and Python runs, unlike the salted ``hash``); revocation orders go
to one more stream, the control stream, that every process reads. A process's receiver reads
the control stream and only the shards its subscriptions need, in one ``XREAD`` (on a Redis
Cluster, which refuses that across hash slots, one ``XREAD`` per stream, see
:mod:`.redis_lanes`).

An event's id is a *vector*: for each shard the receiver reads, the last entry it delivered
there, ``<shard>:<ms>-<seq>``, the parts joined by ``.`` in the order of the shards
(``0:1700000000000-0.3:1700000000002-1``). The receiver builds it once per event. A client
resuming from it is replayed, per shard it follows, the entries after that shard's position.
Order holds within a shard (so within a channel), not across shards.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, cast

from ..encoding import MAX_FIELD_LENGTH, with_id
from ..errors import BusError
from ..reasons import ResetReason
from .base import Reset, Resume, Subscription
from .redis_history import (
    Entries,
    Position,
    StreamInfo,
    entry_id,
    stream_position,
    stream_shaped,
)
from .redis_resume import history_error

if TYPE_CHECKING:
    from .redis import RedisBus
    from .redis_connect import Target


#: Between the parts of a vector id.
SEPARATOR = "."
_PART = re.compile(r"([0-9]{1,3}):([0-9]{1,20}-[0-9]{1,20})")
_VECTOR_SHAPE = re.compile(r"[0-9]+:[0-9]+-[0-9]+(\.[0-9]+:[0-9]+-[0-9]+)*")

Vector = dict[int, Position]


def vector_shaped(value: str) -> bool:
    """Whether *value* has the form of a vector id (the sharded bus's own ids)."""
    return _VECTOR_SHAPE.fullmatch(value) is not None


class Shards:
    """The stream keys of a sharded bus, and which channel goes where.

    :param base: the key the bus would have with one stream (no cluster hash tag yet).
    :param count: how many shards.
    :param target: where the bus connects; in a cluster every shard key gets a hash tag of
        its own, so that shards spread over the slots while the keys named after a shard
        (``<key>:ids``, ``<key>:epoch``) stay in its slot.
    """

    def __init__(self, base: str, count: int, target: Target) -> None:
        self.count = count
        #: The event streams' keys, by shard.
        self.keys = [target.stream_key(f"{base}:{shard}") for shard in range(count)]
        #: The stream of revocation orders, read by every process.
        self.control = target.stream_key(f"{base}:control")
        #: The hash of each shard's newest id (one server only: a cluster spreads the shards).
        self.heads = target.stream_key(f"{base}:heads")
        self._shard_of_key = {key: shard for shard, key in enumerate(self.keys)}

    def shard_of(self, channel: str) -> int:
        """The shard of *channel*."""
        return zlib.crc32(channel.encode()) % self.count

    def shard_of_key(self, key: str) -> int | None:
        """The shard whose stream is *key*, ``None`` for the control stream."""
        return self._shard_of_key.get(key)

    def needed(self, channels: Iterable[str]) -> frozenset[int]:
        """The shards of *channels*."""
        return frozenset(self.shard_of(channel) for channel in channels)

    def encode(self, vector: Mapping[int, Position]) -> str:
        """The vector id of *vector*."""
        return SEPARATOR.join(f"{shard}:{entry_id(vector[shard])}" for shard in sorted(vector))

    def positions(self, lasts: Mapping[str, str | None], shards: Iterable[int]) -> Vector | None:
        """The positions *lasts* (stream key -> last id) hold for *shards*, ``None`` while
        one is unknown."""
        keys = self.keys
        found = {shard: stream_position(lasts.get(keys[shard]) or "") for shard in shards}
        if any(position is None for position in found.values()):
            return None
        return cast(Vector, found)

    def vector(self, lasts: Mapping[str, str | None]) -> str:
        """The vector id of the shards *lasts* (stream key -> last id) holds."""
        return self.encode(
            {
                shard: stream_position(last or "0-0") or (0, 0)
                for key, last in lasts.items()
                if (shard := self._shard_of_key.get(key)) is not None
            }
        )

    def parse(self, value: str) -> Vector | None:
        """The positions a vector id holds, or ``None`` when it is malformed: too long, a
        part of another form, a shard this bus does not have or named twice, a number
        Redis would refuse."""
        if not value or len(value) > MAX_FIELD_LENGTH:
            return None
        parts = value.split(SEPARATOR)
        if len(parts) > self.count:
            return None
        vector: Vector = {}
        for part in parts:
            match = _PART.fullmatch(part)
            if match is None:
                return None
            shard, position = int(match[1]), stream_position(match[2])
            if position is None or shard >= self.count or shard in vector:
                return None
            vector[shard] = position
        return vector


class ShardedResumption:
    """Resuming one subscription on a sharded bus (the pending part of its
    :class:`~flask_sse_push.bus.Resume`).

    It places the subscription once this process's receiver has reached the client's
    position in every shard the subscription follows (until then it raises
    :exc:`~flask_sse_push.BusError`, and the stream asks again shortly), then reads the
    replay: per shard, the entries between the client's position and the receiver's.
    """

    def __init__(self, bus: RedisBus, sub: Subscription, last_event_id: str) -> None:
        self.bus = bus
        self.sub = sub
        self.last_event_id = last_event_id
        self.shards = bus.shards
        #: The replay's bounds per shard once live delivery has started, and the reset.
        self.span: tuple[Vector, Vector, Reset | None] | None = None

    def __call__(self) -> Resume:
        try:
            if self.span is None:
                self.span = self._place()
            after, upto, reset = self.span
            return self._replay(after, upto, reset)
        except self.bus.errors as exc:
            raise history_error(exc, self.sub, self.sub.channels, self.last_event_id) from exc

    def _infos(self, followed: frozenset[int], own_id: str = "") -> dict[int, StreamInfo]:
        return {shard: self.bus.shard_history(shard).info(own_id=own_id) for shard in followed}

    def _start(self, followed: frozenset[int]) -> tuple[Vector, Reset | None]:
        """Where the client's replay starts in each followed shard, and the reset when it
        cannot resume from its id (it then starts from every shard's head)."""
        value = self.last_event_id
        reason: ResetReason | None = None
        vector: Vector | None = {}
        if not value or len(value) > MAX_FIELD_LENGTH or vector_shaped(value):
            vector = self.shards.parse(value)
            infos = self._infos(followed)
        elif stream_shaped(value):  # an id of the one stream before sharding
            infos = self._infos(followed)
            reason = ResetReason.UNKNOWN
        else:  # a caller-given id: exact in its own shard only
            infos = self._infos(followed, value)
            vector = {shard: info.found for shard, info in infos.items() if info.found}
            reason = None if vector else ResetReason.UNKNOWN
        if vector is None:
            reason, vector = ResetReason.MALFORMED, {}
        for shard, position in vector.items():
            if reason is None and shard in infos:
                reason = infos[shard].gap(position)
        if reason is not None:
            # The reset's id is every shard's head, as send_event answers ids.
            infos.update(self._infos(frozenset(range(self.shards.count)) - followed))
            heads = {shard: info.last_generated for shard, info in infos.items()}
            start = {shard: heads[shard] for shard in followed}
            return start, Reset(reason, self.shards.encode(heads))
        return {shard: pos for shard, pos in vector.items() if shard in followed}, None

    def _place(self) -> tuple[Vector, Vector, Reset | None]:
        bus = self.bus
        followed = self.shards.needed(self.sub.channels)
        start, reset = self._start(followed)
        receiver = bus.receiver
        with receiver.lock:
            cut = receiver.shard_positions(followed)
            if cut is None or any(cut[shard] < start[shard] for shard in start):
                # Not connected yet, or behind the process the client came from: it
                # catches up within milliseconds (the entries are in Redis).
                raise BusError("the Redis receiver has not reached the resume point yet")
            bus.fanout.activate(self.sub)
        return {shard: start.get(shard, cut[shard]) for shard in followed}, cut, reset

    def _replay(self, after: Vector, upto: Vector, reset: Reset | None) -> Resume:
        bus = self.bus
        channels = self.sub.channels
        entries: list[tuple[Position, int, bytes, dict[bytes, bytes]]] = []
        for shard in sorted(after):
            if after[shard] >= upto[shard]:
                continue
            history = bus.shard_history(shard)
            got: Entries = history.read(channels, after[shard], upto[shard])
            entries += [
                (stream_position(entry.decode()) or (0, 0), shard, entry, fields)
                for entry, fields in got
            ]
            # As with one stream: nothing trimmed after the position now, nothing then.
            gap = history.info().gap(after[shard])
            if gap is not None:
                return Resume([], Reset(gap, self.shards.encode(upto)))
        entries.sort()
        running = dict(after)
        replay: list[bytes] = []
        for position, shard, _entry, fields in entries:
            running[shard] = position
            wire = fields.get(b"i") or self.shards.encode(running).encode()
            replay.append(with_id(wire, fields.get(b"b", b"")))
        return Resume(replay, reset)

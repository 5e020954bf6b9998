"""The Redis bus's history: the app's stream read for replay, and the index of caller-given
ids.

Resuming a client costs a bounded number of small commands, whatever the history holds: the
facts needed about the stream (its newest entry's id, its oldest, how many entries were ever
added) come from a script that answers with them only, never with the entries' bodies, and a
caller-given ``Last-Event-ID`` is looked up in an index written with each event, not searched
for in the stream.

Entry ids are two unsigned 64-bit numbers, ``<ms>-<seq>``; Redis refuses anything larger, so
an id of that form out of range is malformed, and never sent to Redis.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ..encoding import MAX_FIELD_LENGTH
from ..reasons import ResetReason
from .base import Reset

if TYPE_CHECKING:
    import redis

Entries = list[tuple[bytes, dict[bytes, bytes]]]
Position = tuple[int, int]

#: Channel field (``c``) of the entries that are not events: revocation orders.
CONTROL = b"\x00control"

#: The largest number a part of a stream entry id may be.
MAX_ID_PART = 2**64 - 1
_STREAM_ID = re.compile(r"([0-9]+)-([0-9]+)")

#: Facts about the stream, without entry bodies; with a caller-given id (``ARGV[1]``, or
#: ``""``), the entry id the index holds for it.
_INFO = """#!lua flags=no-writes
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
local found = false
if ARGV[1] ~= '' then
  found = redis.call('HGET', KEYS[2], ARGV[1]) or redis.call('HGET', KEYS[3], ARGV[1])
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local facts = {}
for i = 1, #info, 2 do
  facts[info[i]] = info[i + 1]
end
local first, newest, own = '', '', ''
if facts['first-entry'] then
  first = facts['first-entry'][1]
end
if facts['last-entry'] then
  newest = facts['last-entry'][1]
  local fields = facts['last-entry'][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'i' then
      own = fields[i + 1]
    end
  end
end
return {facts['length'], facts['entries-added'], facts['last-generated-id'], first, newest,
        own, found or '', redis.call('GET', KEYS[4]) or ''}
"""

#: Add an entry (fields from ``ARGV[3]`` on) trimming to about ``ARGV[1]`` entries; index a
#: caller-given id ``ARGV[2]`` in ``KEYS[2]``, which moves to ``KEYS[3]`` when it holds
#: ``ARGV[1]`` ids. A new stream's first id becomes its epoch (``KEYS[4]``): the stream
#: after a failover has the epoch it had before, a stream made again has another. With a
#: hash of the shards' newest ids (``KEYS[5]``) and the keys of every shard after it, it
#: records the new id there and answers the newest id of each shard, as one string (spaces
#: between): the event's place in them all. A shard whose stream is gone (deleted alone)
#: counts as ``0-0``, before its next stream, whatever the hash still holds for it.
_ADD = """
local fresh = redis.call('EXISTS', KEYS[1]) == 0
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
if fresh or redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('SET', KEYS[4], id)
end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[2], id)
  if redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[1]) then
    redis.call('RENAME', KEYS[2], KEYS[3])
  end
end
if #KEYS > 4 then
  redis.call('HSET', KEYS[5], KEYS[1], id)
  local heads = redis.call('HMGET', KEYS[5], unpack(KEYS, 6))
  local known = {}
  for i = 1, #heads do
    if heads[i] then
      known[#known + 1] = KEYS[5 + i]
    end
  end
  local stale = #known > 0 and redis.call('EXISTS', unpack(known)) < #known
  for i = 1, #heads do
    if not heads[i] or (stale and redis.call('EXISTS', KEYS[5 + i]) == 0) then
      heads[i] = '0-0'
    end
  end
  return table.concat(heads, ' ')
end
return id
"""


def stream_shaped(value: str) -> bool:
    """Whether *value* has the form of a stream entry id, ``<digits>-<digits>``."""
    return _STREAM_ID.fullmatch(value) is not None


def stream_position(value: str) -> Position | None:
    """The two numbers of a stream entry id ``<ms>-<seq>``, or ``None`` for another form or
    numbers Redis would refuse."""
    match = _STREAM_ID.fullmatch(value)
    if match is None:
        return None
    position = (int(match[1]), int(match[2]))
    return position if max(position) <= MAX_ID_PART else None


def text(value: Any) -> str:
    """*value* as ``str`` (Redis answers ``bytes``)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def entry_id(position: Position) -> str:
    """The stream entry id of *position*."""
    return f"{position[0]}-{position[1]}"


@dataclass(frozen=True)
class StreamInfo:
    """What the bus needs to know about the stream, read in one small reply.

    :param exists: whether the stream exists.
    :param length: entries it holds.
    :param entries_added: entries ever added to it (more than *length* once trimmed).
    :param last_generated: the position of the newest entry ever added.
    :param first: the position of the oldest entry left, ``None`` when empty.
    :param head_id: the id of the newest entry as clients know it (its caller-given id if it
        has one), ``"0-0"`` when there is none.
    :param found: the position the index holds for the caller-given id asked about.
    :param epoch: the id the stream started with (it tells a stream made again from the
        same stream after a failover), ``""`` when unknown.
    """

    exists: bool = False
    length: int = 0
    entries_added: int = 0
    last_generated: Position = (0, 0)
    first: Position | None = None
    head_id: str = "0-0"
    found: Position | None = None
    epoch: str = ""

    def gap(self, position: Position) -> ResetReason | None:
        """Why the events after *position* cannot all be read from this stream, or ``None``
        when they can.

        A position newer than the stream's newest entry, or older than its first entry while
        nothing was ever trimmed, comes from another stream (deleted since, or before a
        restart of Redis without persistence); ``0-0`` stands before every stream.
        """
        if position > self.last_generated:
            return ResetReason.UNKNOWN
        if self.entries_added > self.length:
            # Trimmed. When *position* was itself the last entry trimmed nothing is missing,
            # but that cannot be told apart.
            oldest = self.first or self.last_generated  # empty: all trimmed
            return ResetReason.TOO_OLD if position < oldest else None
        if self.first is not None and (0, 0) < position < self.first:
            return ResetReason.UNKNOWN
        return None

    def lost_tail(self, position: Position, epoch: str | None) -> bool:
        """Whether this stream is the one of *epoch* but lacks its entries up to *position*:
        the newest entries were lost in a failover (Redis replicates asynchronously)."""
        return bool(self.epoch) and self.epoch == epoch and position > self.last_generated


class Unconfirmed(Exception):
    """Fewer replicas than asked confirmed an added entry in time.

    :param entry: the entry's id.
    :param confirmed: how many replicas confirmed it.
    """

    def __init__(self, entry: str, confirmed: int) -> None:
        super().__init__(entry, confirmed)
        self.entry = entry
        self.confirmed = confirmed


class History:
    """The app's stream as a history with an index of caller-given ids, in this process.

    :param client: the client the bus publishes and resumes with.
    :param key: the stream's key; the index lives at ``<key>:ids`` and ``<key>:ids:old``.
    :param maxlen: entries the stream keeps at least; the index keeps at least as many of
        the newest caller-given ids, and at most twice as many.
    :param replicas: replicas that must confirm each entry added (``WAIT``), ``0`` for none.
    :param wait: seconds they have to confirm it.
    :param cluster: whether *client* is a Redis Cluster client.
    :param shards: when *key* is a shard, the key of the hash of the shards' newest ids
        followed by the keys of every shard: :meth:`add` then answers the newest id of each
        (the new entry's for *key*), separated by spaces.
    """

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        maxlen: int,
        *,
        replicas: int = 0,
        wait: float = 1.0,
        cluster: bool = False,
        shards: list[str] | None = None,
    ) -> None:
        self.client = client
        self.key = key
        self.maxlen = maxlen
        self.replicas = replicas
        self.wait = wait
        self.cluster = cluster
        #: The key holding the id the stream started with.
        self.epoch_key = key + ":epoch"
        #: The stream, the two generations of the index, the epoch: one hash slot.
        self._keys = [key, key + ":ids", key + ":ids:old", self.epoch_key, *(shards or ())]
        self._info = client.register_script(_INFO)
        self._add = client.register_script(_ADD)

    def add(self, fields: dict[str, str | bytes], own_id: str | None = None) -> str:
        """Add an entry of *fields* (indexing its caller-given *own_id*); return its id.

        The ``redis`` client's errors go through.

        :raises Unconfirmed: when fewer than *replicas* confirmed it within *wait*
            seconds.
        """
        args: list[Any] = [self.maxlen, own_id or ""]
        for name, value in fields.items():
            args += [name, value]
        if not self.replicas:
            return text(self._add(keys=self._keys, args=args))
        try:
            # WAIT counts the writes of its own connection: the add and the WAIT go together.
            pipe: Any = self._node().pipeline(transaction=False)
            self._add(keys=self._keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.replicas, max(1, round(self.wait * 1000)))
            entry, confirmed = pipe.execute()
        except Exception:
            if self.cluster:  # the slot may have moved: learn where it is now
                with contextlib.suppress(Exception):
                    cast(Any, self.client).nodes_manager.initialize()
            raise
        if int(confirmed) < self.replicas:
            raise Unconfirmed(text(entry), int(confirmed))
        return text(entry)

    def _node(self, client: redis.Redis | None = None) -> redis.Redis:
        """The client of the server holding the stream (in a cluster, its slot's primary),
        out of *client* (default: the bus's client)."""
        client = client or self.client
        if not self.cluster:
            return client
        nodes: Any = client
        return cast("redis.Redis", nodes.get_redis_connection(nodes.get_node_from_key(self.key)))

    def position_at(self, moment: float, client: redis.Redis | None = None) -> tuple[int, int]:
        """The position of the newest entry added before *moment* (a ``time.time()`` of
        this host), ``0-0`` when there is none: every entry added after *moment* comes
        after it. Read with *client* (default: the bus's client).

        Entry ids start with the server's clock in milliseconds, which may differ from
        this host's: the offset is read with ``TIME``, and its uncertainty (half the round
        trip) and a millisecond of rounding are taken off *moment*, so that an entry added
        a little before *moment* may come after the position, one added after it never
        before. The ``redis`` client's errors go through.
        """
        node = self._node(client)
        sent = time.time()
        seconds, micros = node.time()
        answered = time.time()
        offset = seconds + micros / 1e6 - (sent + answered) / 2
        cutoff = int((moment + offset - (answered - sent) / 2) * 1000) - 1
        newest = cast(
            Entries, node.xrevrange(self.key, max=f"{cutoff}-{MAX_ID_PART}", min="-", count=1)
        )
        return stream_position(text(newest[0][0])) or (0, 0) if newest else (0, 0)

    def info(self, client: redis.Redis | None = None, own_id: str = "") -> StreamInfo:
        """The stream's :class:`StreamInfo` (with *own_id* looked up in the index), read with
        *client* (default: the bus's client).

        The ``redis`` client's errors go through.
        """
        reply = self._info(keys=self._keys, args=[own_id], client=client or self.client)
        if not reply:
            return StreamInfo()
        length, added, generated, first, newest, own, found, epoch = cast("list[Any]", reply)
        return StreamInfo(
            exists=True,
            length=int(length),
            entries_added=int(added),
            last_generated=stream_position(text(generated)) or (0, 0),
            first=stream_position(text(first)) if first else None,
            head_id=text(own or newest or "0-0"),
            found=stream_position(text(found)) if found else None,
            epoch=text(epoch),
        )

    def locate(self, last_event_id: str) -> tuple[Position | Reset, Position]:
        """The stream position *last_event_id* stands for, or why it cannot be resumed; and
        the position of the newest entry.

        An id of the form of a stream entry id is taken as a position (out of range it is
        malformed); any other is a caller-given id, looked up in the index.
        """
        if not last_event_id or len(last_event_id) > MAX_FIELD_LENGTH:
            info = self.info()
            return Reset(ResetReason.MALFORMED, info.head_id), info.last_generated
        shaped = stream_shaped(last_event_id)
        info = self.info(own_id="" if shaped else last_event_id)
        head = info.last_generated
        position = stream_position(last_event_id) if shaped else info.found
        if position is None:
            reason = ResetReason.MALFORMED if shaped else ResetReason.UNKNOWN
            return Reset(reason, info.head_id), head
        gap = info.gap(position)
        if gap is not None:
            return Reset(gap, info.head_id), head
        return position, head

    def read(self, channels: frozenset[str], after: Position, upto: Position) -> Entries:
        """The entries of *channels* after *after*, up to *upto* included.

        The ``redis`` client's errors go through.
        """
        wanted = {channel.encode() for channel in channels}
        entries = cast(
            Entries,
            self.client.xrange(self.key, min="(" + entry_id(after), max=entry_id(upto)),
        )
        return [(entry, fields) for entry, fields in entries if fields.get(b"c") in wanted]

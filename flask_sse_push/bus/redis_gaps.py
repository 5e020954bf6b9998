"""What a Redis receiver does when a stream cannot go on from its position: trimmed past
it, deleted or made again, or a failover lost the newest entries it had delivered."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..reasons import EndReason, ResetReason
from .redis_history import entry_id, stream_position, text

if TYPE_CHECKING:
    import redis

    from .redis import RedisBus
    from .redis_receiver import Receiver

log = logging.getLogger("flask_sse_push")


def learn_epoch(receiver: Receiver, bus: RedisBus, reader: redis.Redis, key: str) -> None:
    """Learn the epoch of a stream that did not exist when this receiver started (it
    tells a failover from a stream made again, see :func:`check_position`). The
    epoch is the stream's first id: one after this receiver's position belongs to a
    stream made since, not to the one it read."""
    epoch = text(reader.get(bus.history_of(key).epoch_key) or b"")
    start = stream_position(epoch)
    with receiver.lock:
        if start is not None and key in receiver.lasts and start <= receiver.position_in(key):
            receiver.epochs[key] = epoch


def check_position(receiver: Receiver, bus: RedisBus, reader: redis.Redis, key: str) -> None:
    """Notice a stream that cannot go on from its position. Trimmed past it: end every
    stream that follows it, as lagged, so that their clients resync. Deleted or made
    again: read the new stream from its start, ending only the streams waiting for a
    resume point in the old one (which the new one's ids may never pass)."""
    info = bus.history_of(key).info(reader)
    fanout = receiver.fanout()
    if fanout is None:
        return
    shard = receiver.shards.shard_of_key(key)

    def follows(sub: Any) -> bool:
        return shard is None or shard in receiver.shards.needed(sub.channels)

    with receiver.lock:
        if key not in receiver.lasts:
            return
        position = receiver.position_in(key)
        reason = info.gap(position)
        known, receiver.epochs[key] = receiver.epochs.get(key), info.epoch
        if reason is None:
            return
        if info.lost_tail(position, known):
            why = (
                f"Redis lost the newest entries this worker delivered, up to "
                f"{receiver.lasts[key]} (a failover: replication is asynchronous); open "
                f"streams go on from the new primary's newest entry, "
                f"{entry_id(info.last_generated)}"
            )
            receiver.lasts[key] = entry_id(info.last_generated)
            ended = None
        elif reason is ResetReason.UNKNOWN:
            why = f"the Redis stream {key!r} was deleted or made again; reading the new one"
            receiver.lasts[key] = "0-0"
            waiting, receiver.waiting = receiver.waiting, {}
            ended = fanout.end(EndReason.LAGGED, waiting.__contains__)
        elif receiver.shards.count > 1 and shard is None:
            why = "revocation orders were trimmed from Redis before this worker read them"
            ended = None
        else:
            why = "events were trimmed from Redis before this worker read them"
            ended = fanout.end(EndReason.LAGGED, follows)
    if ended is None:
        log.warning("flask-sse-push: %s", why)
    else:
        log.warning("flask-sse-push: %s; ended %d streams so their clients resync", why, ended)

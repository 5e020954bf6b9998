"""The connections a Redis receiver reads with: its *lanes*.

A receiver reads all its streams in one ``XREAD BLOCK`` on one connection: one lane. A Redis
Cluster refuses one command over keys of several hash slots, so there a receiver of a
sharded bus (:confval:`SSE_REDIS_SHARDS`) gives each stream (each shard, the control
stream) a lane of its own: a connection and a greenlet blocked on it.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis


class Lane:
    """One connection of a receiver and what it reads.

    :param key: the one stream it reads, or ``None`` for every stream of the receiver.
    """

    def __init__(self, key: str | None = None) -> None:
        self.key = key
        #: Its connection, made at first use and again after an error.
        self.client: redis.Redis | None = None
        #: Whether the connection is up.
        self.connected = False
        #: The keys of the read in progress.
        self.reading: frozenset[str] = frozenset()
        #: The connection's ``CLIENT ID``, to interrupt its blocked read (one lane only).
        self.client_id: int | None = None
        #: Set to end its loop.
        self.stopped = False
        #: The last error Redis answered with, logged once until things work again.
        self.refused: str | None = None
        self._turn = 0

    def take_turns(self, keys: list[str], most: int) -> list[str]:
        """*most* of *keys* at a time, the next ones at the next call (all of them when
        there are no more)."""
        if len(keys) <= most:
            return keys
        start = self._turn % len(keys)
        self._turn = start + most
        return (keys + keys)[start : start + most]

    def streams(self, lasts: dict[str, str | None]) -> dict[str, str]:
        """What its next ``XREAD`` asks for, out of the receiver's positions *lasts*."""
        if self.key is None:
            return {key: last or "$" for key, last in lasts.items()}
        if self.key not in lasts:
            return {}
        return {self.key: lasts[self.key] or "$"}

    def reads(self, key: str) -> bool:
        """Whether it reads stream *key*."""
        return self.key is None or self.key == key

    def disconnect(self) -> None:
        """Close its connection (which interrupts a blocked read)."""
        self.connected = False
        self.client_id = None
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None

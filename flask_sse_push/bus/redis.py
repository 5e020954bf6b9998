"""The Redis bus (``redis://host:port/db``, ``rediss://`` for TLS, ``unix://``, and
``redis+sentinel://`` or ``redis+cluster://``, see
:mod:`~flask_sse_push.bus.redis_connect`): many workers and hosts, one stream of events.

Every app has ONE Redis stream (``XADD`` with a bounded ``MAXLEN``) that is both the transport
and the history. Each process runs ONE :class:`~flask_sse_push.bus.redis_receiver.Receiver`
on ONE connection; publishing uses a small shared connection pool. The ``redis`` package is
imported when the first bus is created, so it stays an optional extra.

Event ids are the stream's entry ids (``<milliseconds>-<sequence>``), ordered across all
channels and valid in every process, so a client resumes on any worker or host. Requires
Redis 7 or Valkey (``XINFO STREAM`` reports trimmed entries there).

With ``SSE_REDIS_SHARDS`` above 1 the channels are spread over several streams and ids
are vectors of positions in them (see :mod:`~flask_sse_push.bus.redis_shards`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..encoding import with_id
from ..errors import BusError, PublishError
from ..reasons import EndReason
from .base import Bus, Message, Resume, Subscription
from .redis_connect import TOPOLOGY_SCHEMES, Connector, Target, errors, refused
from .redis_history import (
    CONTROL,
    History,
    Unconfirmed,
    stream_position,
    stream_shaped,
)
from .redis_receiver import Receiver
from .redis_resume import Resumption
from .redis_shards import ShardedResumption, Shards, vector_shaped
from .redis_stats import read_stats

if TYPE_CHECKING:
    import redis

log = logging.getLogger("flask_sse_push")


@dataclass(frozen=True)
class RedisSettings:
    """What the Redis bus reads from the app's settings.

    :param key: the stream's key (``SSE_REDIS_KEY``, or ``flask-sse-push:<app name>``; in
        a cluster with a hash tag, ``{...}``, so that every key of the bus has one slot);
        with shards, the control stream's key (``<key>:control``).
    :param stats_key: the hash where each process reports its stream counts.
    :param maxlen: entries the stream keeps at least (history, and room for receivers that
        fall behind).
    :param timeout: seconds a command may take (``SSE_PUBLISH_TIMEOUT``).
    :param wait_replicas: replicas that must confirm each event (``SSE_REDIS_WAIT_REPLICAS``).
    :param wait_timeout: seconds they have to (``SSE_REDIS_WAIT_TIMEOUT``).
    """

    key: str
    stats_key: str
    maxlen: int
    timeout: float
    wait_replicas: int = 0
    wait_timeout: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings, name: str, target: Target) -> RedisSettings:
        """Derive them from the app's *settings* and *name*, for *target*."""
        base = settings.redis_key or f"flask-sse-push:{name}"
        key = target.stream_key(base)
        return cls(
            key=key if settings.redis_shards == 1 else target.stream_key(base + ":control"),
            stats_key=key + ":stats",
            maxlen=max(settings.history_size, 1000),
            timeout=settings.publish_timeout,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout=settings.redis_wait_timeout,
        )


class RedisBus(Bus):
    """A bus on a Redis stream shared by every process of the app."""

    schemes = ("redis", "rediss", "unix", *TOPOLOGY_SCHEMES)
    dependencies = {"redis": "redis"}  # noqa: RUF012 - read-only

    client: redis.Redis
    _receiver: Receiver | None

    def __init__(self, url: str, settings: Settings, *, name: str) -> None:
        super().__init__(url, settings, name=name)
        self.redis = importlib.import_module("redis")
        #: What redis-py raises when Redis cannot answer.
        self.errors = errors()
        #: Where the bus connects.
        self.target = Target.parse(url)
        #: What the bus reads from the settings.
        self.options = RedisSettings.from_settings(settings, name, self.target)
        #: The stream's key (with shards, the control stream's).
        self.key = self.options.key
        base = settings.redis_key or f"flask-sse-push:{name}"
        #: The shards' keys (with one shard, none is used: the stream is :attr:`key`).
        self.shards = Shards(base, settings.redis_shards, self.target)

    # -- per-process state ---------------------------------------------------------------

    def _start(self) -> None:
        options = self.options
        #: Makes this process's clients.
        self.connector = Connector(self.target, options.timeout)
        self.client = self.connector.publisher(
            f"flask-sse-push:publish:{os.getpid()}",
            extra_timeout=options.wait_timeout if options.wait_replicas else 0.0,
        )
        #: The stream as a history, with the index of caller-given ids.
        self.history = History(
            self.client,
            self.key,
            options.maxlen,
            replicas=options.wait_replicas,
            wait=options.wait_timeout,
            cluster=self.connector.cluster,
        )
        keys = self.shards.keys if self.shards.count > 1 else []
        self._histories = {
            key: History(
                self.client,
                key,
                options.maxlen,
                replicas=options.wait_replicas,
                wait=options.wait_timeout,
                cluster=self.connector.cluster,
                # A cluster refuses a script over the keys of several slots.
                shards=None if self.connector.cluster else [self.shards.heads, *keys],
            )
            for key in keys
        }
        self._histories[self.key] = self.history
        #: Shards needed by each subscription of this process (with shards only).
        self._needs: dict[Subscription, frozenset[int]] = {}
        #: This bus instance in this process, for revocation and stream counts.
        self.origin = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._receiver = None

    def history_of(self, key: str) -> History:
        """The history of stream *key* (the stream, a shard or the control stream)."""
        self.fanout  # noqa: B018 - creates the per-process state after a fork
        return self._histories[key]

    def shard_history(self, shard: int) -> History:
        """The history of *shard* (with shards)."""
        return self.history_of(self.shards.keys[shard])

    @property
    def _client(self) -> redis.Redis:
        self.fanout  # noqa: B018 - creates the per-process state after a fork
        return self.client

    def connect(self, *, role: str, **kwargs: Any) -> redis.Redis:
        """A new client of its own (the receiver's), named by *role*."""
        self.fanout  # noqa: B018 - creates the per-process state after a fork
        return self.connector.dedicated(f"flask-sse-push:{role}:{os.getpid()}", **kwargs)

    @property
    def receiver(self) -> Receiver:
        """This process's receiver, started at first use."""
        fanout = self.fanout
        if self._receiver is None:
            # Claimed before anything that can yield to another greenlet: one receiver only.
            self._receiver = Receiver(self, fanout)
            self._receiver.start()
        return self._receiver

    @property
    def connected(self) -> bool:
        """Whether this process's receiver is connected to Redis."""
        return self._receiver is not None and self._receiver.connected

    # -- publishing ----------------------------------------------------------------------

    def publish(self, channel: str, body: bytes, event_id: str | None = None) -> str:
        sharded = self.shards.count > 1
        if event_id is not None and (
            stream_shaped(event_id) or (sharded and vector_shaped(event_id))
        ):
            raise ValueError(
                f"id {event_id!r} has the form of the Redis bus's own ids "
                "(<digits>-<digits>, or <shard>:<digits>-<digits> parts joined by '.' with "
                "SSE_REDIS_SHARDS), so a client resuming from it would be placed by "
                "position; use another form (for example 'order-2024-1'), or id=None"
            )
        fields: dict[str, str | bytes] = {"c": channel, "b": body}
        if event_id is not None:
            fields["i"] = event_id
        shard = self.shards.shard_of(channel) if sharded else None
        try:
            entry = self._add(fields, event_id, shard)
        except Unconfirmed as exc:
            raise PublishError(self._unconfirmed(exc, self._answer(exc.entry, shard))) from exc
        except self.errors as exc:
            raise PublishError(self._failed(exc)) from exc
        return event_id if event_id is not None else self._answer(entry, shard)

    def _answer(self, entry: str, shard: int | None) -> str:
        """The id of an event the add script answered *entry* for (in *shard*)."""
        if shard is None:
            return entry
        heads = [stream_position(head) or (0, 0) for head in entry.split()]
        if len(heads) == 1:  # a cluster: the event's place in its own shard only
            return self.shards.encode({shard: heads[0]})
        return self.shards.encode(dict(enumerate(heads)))

    def _add(
        self, fields: dict[str, str | bytes], own_id: str | None = None, shard: int | None = None
    ) -> str:
        self.fanout  # noqa: B018 - creates the per-process state after a fork
        history = self.history if shard is None else self.shard_history(shard)
        return history.add(fields, own_id)

    def _unconfirmed(self, exc: Unconfirmed, entry: str) -> str:
        options = self.options
        return (
            f"{self.target.describe()} took the event as {entry}, but {exc.confirmed} of "
            f"the {options.wait_replicas} replicas asked for (SSE_REDIS_WAIT_REPLICAS) "
            f"confirmed it within {options.wait_timeout} s (SSE_REDIS_WAIT_TIMEOUT): the "
            "event may or may not survive a failover, and streams may have received it."
        )

    def _failed(self, exc: Exception) -> str:
        """Why a publish failed, and what to do."""
        where = self.target.describe()
        hint = self.connector.tls_hint(exc)
        if hint:
            return f"could not publish to {where}; the event was not sent.{hint}"
        if isinstance(exc, self.redis.TimeoutError):
            return (
                f"{where} did not answer within SSE_PUBLISH_TIMEOUT ({self.options.timeout} s); "
                "the event may not have been published. (Redis may still carry the command "
                "out: publishing it again could send it twice.)"
            )
        if refused(exc):
            return (
                f"{where} refused to publish to {self.key!r} ({exc}); the event was not sent. "
                "The key must hold a stream (SSE_REDIS_KEY) and Redis must take writes."
            )
        if self.target.kind != "server":
            return (
                f"could not publish to {where} ({exc}); the event was most likely not sent "
                "(if the connection broke after the command went out, it may have been). "
                "During a failover this lasts until the new primary takes writes."
            )
        return (
            f"could not publish to {where} ({exc}); the event was not sent. Check that "
            "Redis is running and SSE_BUS_URL points at it."
        )

    def _revoke_elsewhere(self, channel: str | None, user: object) -> None:
        """Write a control entry to the stream: every other process of the app ends the
        matching streams when its receiver reads it."""
        failures: tuple[type[Exception], ...] = (*self.errors, TypeError, Unconfirmed)
        try:
            order = json.dumps({"channel": channel, "user": user, "origin": self.origin})
            self._add({"c": CONTROL, "b": order})
        except failures as exc:
            raise BusError(f"could not tell the other workers to end streams: {exc}") from exc

    @staticmethod
    def is_control(fields: dict[bytes, bytes]) -> bool:
        """Whether a stream entry is a control entry rather than an event."""
        return fields.get(b"c") == CONTROL

    def control(self, fields: dict[bytes, bytes]) -> None:
        """Carry out a control entry another process wrote (revocation)."""
        try:
            order = json.loads(fields.get(b"b", b"{}"))
        except ValueError:
            return
        if not isinstance(order, dict) or order.get("origin") == self.origin:
            return
        self._end_here(EndReason.REVOKED, order.get("channel"), order.get("user"))

    @staticmethod
    def message(entry_id: bytes, fields: dict[bytes, bytes], vector: str | None = None) -> Message:
        """The event a stream entry holds; with shards its id is the receiver's *vector*."""
        wire_id = fields.get(b"i") or (vector.encode() if vector else entry_id)
        payload = with_id(wire_id, fields.get(b"b", b""))
        return Message(fields.get(b"c", b"").decode(), wire_id.decode(), payload)

    # -- subscribing and replay ----------------------------------------------------------

    def subscribe(self, sub: Subscription, last_event_id: str | None) -> Resume:
        receiver = self.receiver
        added = self._read_shards(sub) if self.shards.count > 1 else []
        with receiver.lock:
            # With a Last-Event-ID, live delivery starts only once the resume point is
            # known (see _place): this process's receiver may still be behind it.
            self.fanout.add(sub, deliver=last_event_id is None)
        for key in added:
            with contextlib.suppress(*self.errors):  # the read ends within a second anyway
                receiver.wake(self.client, key)
        if last_event_id is None:
            return Resume([], None)
        if self.shards.count > 1:
            return Resume([], None, pending=ShardedResumption(self, sub, last_event_id))
        return Resume([], None, pending=Resumption(self, sub, last_event_id))

    def _read_shards(self, sub: Subscription) -> list[str]:
        """Have the receiver read the shards *sub* needs, each from its newest entry now
        (so an event published once :meth:`subscribe` returned is delivered; when Redis
        does not answer, from the newest entry added before now, learnt once it does);
        return the keys it did not read yet."""
        receiver = self.receiver
        needs = self.shards.needed(sub.channels)
        keys = [self.shards.keys[shard] for shard in sorted(needs)]
        infos: dict[str, Any] = {}
        moment = time.time()
        for key in keys:
            if key not in receiver.lasts:
                with contextlib.suppress(*self.errors):  # else learnt once connected
                    infos[key] = self.history_of(key).info()
        with receiver.lock:
            self._needs[sub] = needs
            return [key for key in keys if receiver.read(key, infos.get(key), moment)]

    def unsubscribe(self, sub: Subscription) -> None:
        fanout = self.fanout
        with fanout.lock:
            if self._receiver is not None:
                self._receiver.waiting.pop(sub, None)
                needs = self._needs.pop(sub, frozenset())
                still = frozenset().union(*self._needs.values()) if needs else needs
                for shard in needs - still:
                    self._receiver.unread(self.shards.keys[shard])
            fanout.remove(sub)

    def cluster_stats(self) -> dict[str, Any]:
        """Open streams of every live process of the app, as each last reported them (see
        :func:`~flask_sse_push.bus.redis_stats.read_stats`).

        :raises BusError: when Redis cannot be read.
        """
        try:
            return read_stats(self._client, self.options.stats_key)
        except self.errors as exc:
            raise BusError(f"could not read stream counts from Redis: {exc}") from exc

    def health(self) -> str | None:
        """``None`` while Redis answers ``PING`` within :confval:`SSE_PUBLISH_TIMEOUT` and
        this process's receiver, once started, is connected; else why not."""
        client = self._client
        try:
            client.ping()
        except self.errors as exc:
            return (
                f"Redis did not answer PING within {self.options.timeout:g} s "
                f"({type(exc).__name__}){self.connector.tls_hint(exc)}"
            )
        if self._receiver is not None and not self._receiver.connected:
            return "the Redis receiver of this process is not connected"
        return None

    def close(self) -> None:
        """Stop the receiver (within a second) and close the connections of this process."""
        if self._pid != os.getpid():
            return
        if self._receiver is not None:
            self._receiver.stop()
        self.client.close()
        self.connector.close()

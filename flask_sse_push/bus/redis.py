"""The Redis bus (``redis://host:port/db``, ``rediss://`` for TLS, ``unix://``): many
workers and hosts, one stream of events.

Every app has ONE Redis stream (``XADD`` with a bounded ``MAXLEN``) that is both the transport
and the history. Each process runs ONE :class:`~flask_sse_push.bus.redis_receiver.Receiver`
on ONE connection; publishing uses a small shared connection pool. The ``redis`` package is
imported when the first bus is created, so it stays an optional extra.

Event ids are the stream's entry ids (``<milliseconds>-<sequence>``), ordered across all
channels and valid in every process, so a client resumes on any worker or host. Requires
Redis 7 or Valkey (``XINFO STREAM`` reports trimmed entries there).
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ..config import Settings
from ..encoding import MAX_FIELD_LENGTH, with_id
from ..errors import BusError, PublishError
from ..reasons import EndReason, ResetReason
from .base import Bus, Message, Reset, Resume, Subscription
from .redis_receiver import Receiver, read_stats, stream_position, text

if TYPE_CHECKING:
    import redis

Entries = list[tuple[bytes, dict[bytes, bytes]]]
Position = tuple[int, int]

#: Field values of control entries (not events) in the stream.
_CONTROL = b"\x00control"


@dataclass(frozen=True)
class RedisSettings:
    """What the Redis bus reads from the app's settings.

    :param key: the stream's key (``SSE_REDIS_KEY``, or ``flask-sse-push:<app name>``).
    :param stats_key: the hash where each process reports its stream counts.
    :param maxlen: entries the stream keeps at least (history, and room for receivers that
        fall behind).
    :param timeout: seconds a command may take (``SSE_PUBLISH_TIMEOUT``).
    """

    key: str
    stats_key: str
    maxlen: int
    timeout: float

    @classmethod
    def from_settings(cls, settings: Settings, name: str) -> RedisSettings:
        """Derive them from the app's *settings* and *name*."""
        key = settings.redis_key or f"flask-sse-push:{name}"
        return cls(
            key=key,
            stats_key=key + ":stats",
            maxlen=max(settings.history_size, 1000),
            timeout=settings.publish_timeout,
        )


class _Resumption:
    """Resuming one subscription after a ``Last-Event-ID``: the first call places it (live
    delivery starts, or it waits for the receiver), later calls only read the replay."""

    def __init__(self, bus: RedisBus, sub: Subscription, last_event_id: str) -> None:
        self.bus = bus
        self.sub = sub
        self.last_event_id = last_event_id
        #: The replay's bounds, once live delivery has started.
        self.span: tuple[Position, Position] | None = None

    def __call__(self) -> Resume:
        try:
            if self.span is None:
                placed = self.bus._place(self.sub, self.last_event_id)
                if isinstance(placed, Resume):
                    return placed
                self.span = placed
            return self.bus._replay(self.sub, *self.span)
        except self.bus.redis.RedisError as exc:
            raise BusError(f"could not read the history from Redis: {exc}") from exc


class RedisBus(Bus):
    """A bus on a Redis stream shared by every process of the app."""

    schemes = ("redis", "rediss", "unix")
    dependencies = {"redis": "redis"}  # noqa: RUF012 - read-only

    client: redis.Redis
    _receiver: Receiver | None

    def __init__(self, url: str, settings: Settings, *, name: str) -> None:
        super().__init__(url, settings, name=name)
        self.redis = importlib.import_module("redis")
        #: What the bus reads from the settings.
        self.options = RedisSettings.from_settings(settings, name)
        #: The stream's key.
        self.key = self.options.key

    # -- per-process state ---------------------------------------------------------------

    def _start(self) -> None:
        timeout = self.options.timeout
        pool = self.redis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=10,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # An XADD is not retried: a retry after a lost reply could publish twice.
            retry=self._no_retry(),
            client_name=f"flask-sse-push:publish:{os.getpid()}",
        )
        self.client = self.redis.Redis(connection_pool=pool)
        #: This bus instance in this process, for revocation and stream counts.
        self.origin = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._receiver = None

    @property
    def _client(self) -> redis.Redis:
        self.fanout  # noqa: B018 - creates the per-process state after a fork
        return self.client

    def _no_retry(self) -> Any:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return Retry(NoBackoff(), 0)

    def connect(self, *, role: str, **kwargs: Any) -> redis.Redis:
        """A new client of its own (the receiver's), named by *role*."""
        return cast(
            "redis.Redis",
            self.redis.Redis.from_url(
                self.url,
                socket_connect_timeout=5,
                retry=self._no_retry(),
                client_name=f"flask-sse-push:{role}:{os.getpid()}",
                **kwargs,
            ),
        )

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

    def stream_info(self, client: redis.Redis) -> dict[Any, Any] | None:
        """``XINFO STREAM`` of the app's stream, or ``None`` when it does not exist."""
        if not client.exists(self.key):
            return None
        return cast("dict[Any, Any]", client.xinfo_stream(self.key))

    @staticmethod
    def trimmed_after(info: dict[Any, Any] | None, position: Position) -> bool:
        """Whether entries after *position* may have been trimmed from the stream: something
        was trimmed and *position* is older than the oldest entry left. (When *position* was
        itself the last entry trimmed nothing is missing, but that cannot be told apart.)"""
        if not info or info.get("entries-added", 0) <= info.get("length", 0):
            return False
        first = info.get("first-entry")
        if not first:
            return True
        oldest = stream_position(text(first[0]))
        return oldest is not None and position < oldest

    # -- publishing ----------------------------------------------------------------------

    def publish(self, channel: str, body: bytes, event_id: str | None = None) -> str:
        if event_id is not None and stream_position(event_id) is not None:
            raise ValueError(
                f"id {event_id!r} has the form of the Redis bus's own ids "
                "(<digits>-<digits>), so a client resuming from it would be placed by "
                "position; use another form (for example 'order-2024-1'), or id=None"
            )
        fields: dict[Any, Any] = {"c": channel, "b": body}
        if event_id is not None:
            fields["i"] = event_id
        try:
            entry = self._add(fields)
        except self.redis.RedisError as exc:
            raise PublishError(
                f"could not publish to Redis at {self._where()} ({exc}); the event was not "
                "sent. Check that Redis is running and SSE_BUS_URL points at it."
            ) from exc
        return event_id if event_id is not None else text(entry)

    def _add(self, fields: dict[Any, Any]) -> Any:
        return self._client.xadd(self.key, fields, maxlen=self.options.maxlen, approximate=True)

    def _where(self) -> str:
        kwargs = self._client.connection_pool.connection_kwargs
        if "path" in kwargs:
            return str(kwargs["path"])
        return f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"

    def end_streams(
        self,
        reason: EndReason = EndReason.REVOKED,
        *,
        channel: str | None = None,
        user: object = None,
    ) -> int:
        """End matching streams in this process, and (for revocation) in every other process
        of the app through a control entry in the stream."""
        ended = super().end_streams(reason, channel=channel, user=user)
        if reason is EndReason.REVOKED:
            try:
                order = json.dumps({"channel": channel, "user": user, "origin": self.origin})
                self._add({"c": _CONTROL, "b": order})
            except (self.redis.RedisError, TypeError) as exc:
                raise BusError(f"could not tell the other workers to end streams: {exc}") from exc
        return ended

    @staticmethod
    def is_control(fields: dict[bytes, bytes]) -> bool:
        """Whether a stream entry is a control entry rather than an event."""
        return fields.get(b"c") == _CONTROL

    def control(self, fields: dict[bytes, bytes]) -> None:
        """Carry out a control entry another process wrote (revocation)."""
        try:
            order = json.loads(fields.get(b"b", b"{}"))
        except ValueError:
            return
        if not isinstance(order, dict) or order.get("origin") == self.origin:
            return
        super().end_streams(EndReason.REVOKED, channel=order.get("channel"), user=order.get("user"))

    @staticmethod
    def message(entry_id: bytes, fields: dict[bytes, bytes]) -> Message:
        """The event a stream entry holds."""
        wire_id = fields.get(b"i") or entry_id
        payload = with_id(wire_id, fields.get(b"b", b""))
        return Message(fields.get(b"c", b"").decode(), wire_id.decode(), payload)

    # -- subscribing and replay ----------------------------------------------------------

    def subscribe(self, sub: Subscription, last_event_id: str | None) -> Resume:
        receiver = self.receiver
        with receiver.lock:
            # With a Last-Event-ID, live delivery starts only once the resume point is
            # known (see _place): this process's receiver may still be behind it.
            self.fanout.add(sub, deliver=last_event_id is None)
        if last_event_id is None:
            return Resume([], None)
        return Resume([], None, pending=_Resumption(self, sub, last_event_id))

    def unsubscribe(self, sub: Subscription) -> None:
        fanout = self.fanout
        with fanout.lock:
            if self._receiver is not None:
                self._receiver.waiting.pop(sub, None)
            fanout.remove(sub)

    def _place(self, sub: Subscription, last_event_id: str) -> Resume | tuple[Position, Position]:
        """Start live delivery to *sub* after *last_event_id*: a :class:`Resume` when there
        is nothing to replay, else the span of the history to replay.

        The client got *last_event_id* from some process, maybe one whose receiver is ahead
        of this one's. So live delivery starts after whichever is later, the resume point or
        this receiver's position (the cut); the history covers the span between them.
        """
        receiver = self.receiver
        if receiver.last is None:
            raise BusError("the Redis receiver has not connected yet")
        found, head = self._locate(last_event_id)
        with receiver.lock:
            cut = stream_position(receiver.last) or (0, 0)
            if isinstance(found, Reset):
                # The client refetches its state as of the head: live delivery starts
                # after the head, even if this receiver is not there yet.
                self._start_after(sub, head, cut)
                return Resume([], found)
            if cut <= found:
                # The receiver has not read past the resume point yet: it starts this
                # subscription's delivery when it does.
                receiver.waiting[sub] = found
                return Resume([], None)
            self.fanout.activate(sub)
            return found, cut

    def _start_after(self, sub: Subscription, position: Position, cut: Position) -> None:
        """Deliver to *sub* what comes after *position*. Callers hold the lock."""
        if cut < position:
            self.receiver.waiting[sub] = position
        else:
            self.fanout.activate(sub)

    def _replay(self, sub: Subscription, after: Position, upto: Position) -> Resume:
        """The events of *sub*'s channels after *after*, up to *upto* included."""
        wanted = {channel.encode() for channel in sub.channels}
        entries = cast(
            Entries,
            self._client.xrange(
                self.key, min=f"({after[0]}-{after[1]}", max=f"{upto[0]}-{upto[1]}"
            ),
        )
        replay = [
            self.message(entry_id, fields).payload
            for entry_id, fields in entries
            if fields.get(b"c") in wanted
        ]
        # Trimming only removes the oldest entries: if nothing after the resume point is
        # gone now, nothing was gone while the range above was read either.
        if self.trimmed_after(self.stream_info(self._client), after):
            return Resume([], Reset(ResetReason.TOO_OLD, f"{upto[0]}-{upto[1]}"))
        return Resume(replay, None)

    def _locate(self, last_event_id: str) -> tuple[Position | Reset, Position]:
        """The stream position *last_event_id* stands for, or why it cannot be resumed; and
        the position of the newest entry."""
        info = self.stream_info(self._client)
        head_id = self._head_id(info)
        head = (stream_position(text(info["last-generated-id"])) if info else None) or (0, 0)
        if not last_event_id or len(last_event_id) > MAX_FIELD_LENGTH:
            return Reset(ResetReason.MALFORMED, head_id), head
        position = stream_position(last_event_id)
        if position is None:
            position = self._find_own_id(last_event_id)
            if position is None:
                return Reset(ResetReason.UNKNOWN, head_id), head
        if position > head:
            return Reset(ResetReason.UNKNOWN, head_id), head
        if self.trimmed_after(info, position):
            return Reset(ResetReason.TOO_OLD, head_id), head
        return position, head

    def _head_id(self, info: dict[Any, Any] | None) -> str:
        if not info or not info.get("last-entry"):
            return "0-0"
        entry_id, fields = info["last-entry"]
        own = fields.get(b"i")
        return own.decode() if own else text(entry_id)

    def _find_own_id(self, event_id: str) -> Position | None:
        """The stream position of the newest event published with the caller's *event_id*."""
        wanted = event_id.encode()
        entries = cast(Entries, self._client.xrevrange(self.key, count=self.options.maxlen))
        for entry_id, fields in entries:
            if fields.get(b"i") == wanted:
                return stream_position(text(entry_id))
        return None

    def cluster_stats(self) -> dict[str, Any]:
        """Open streams of every live process of the app, as each last reported them (see
        :func:`~flask_sse_push.bus.redis_receiver.read_stats`).

        :raises BusError: when Redis cannot be read.
        """
        try:
            return read_stats(self._client, self.options.stats_key)
        except self.redis.RedisError as exc:
            raise BusError(f"could not read stream counts from Redis: {exc}") from exc

    def close(self) -> None:
        """Stop the receiver (within a second) and close the connections of this process."""
        if self._pid != os.getpid():
            return
        if self._receiver is not None:
            self._receiver.stop()
        self.client.close()

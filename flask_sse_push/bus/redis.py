"""The Redis bus (``redis://host:port/db``, ``rediss://`` for TLS, ``unix://``): many
workers and hosts, one stream of events.

Every app has ONE Redis stream (``XADD`` with a bounded ``MAXLEN``) that is both the transport
and the history. Each process runs ONE receiver (a greenlet under gevent, a thread otherwise)
on ONE connection, reading the stream with ``XREAD BLOCK`` from the last entry it delivered:
after an outage it goes on from there, so every event Redis accepted is delivered, in order.
Publishing uses a small shared connection pool.

Event ids are the stream's entry ids (``<milliseconds>-<sequence>``), ordered across all
channels and valid in every process, so a client resumes on any worker or host. Requires
Redis 7 or Valkey (``XINFO STREAM`` reports trimmed entries there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import socket
import time
import weakref
from collections.abc import Iterable
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import _sync
from ..encoding import MAX_FIELD_LENGTH
from ..errors import BusError, PublishError
from .base import REVOKED, Bus, Fanout, Message, Reset, Resume, Subscription

log = logging.getLogger("flask_sse_push")

_Entries = list[tuple[bytes, dict[bytes, bytes]]]

_STREAM_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
#: A subscription's streams are ended with this reason when entries were trimmed before the
#: receiver could read them: their clients reconnect and get a reset.
LAGGED = "lagged"
#: Field values of control entries (not events) in the stream.
_CONTROL = b"\x00control"
#: Entries read at most at once; a full batch means the receiver is behind.
_BATCH = 500
#: Longest wait of one ``XREAD BLOCK``, in milliseconds.
_BLOCK_MS = 1000
#: How long a worker's published stream counts stay valid, in seconds.
_STATS_TTL = 10.0
_STATS_EVERY = 2.0
_BACKOFF_CAP = 5.0


def _sid(value: str) -> tuple[int, int] | None:
    match = _STREAM_ID.fullmatch(value)
    return (int(match[1]), int(match[2])) if match else None


class RedisBus(Bus):
    """A bus on a Redis stream shared by every process of the app."""

    schemes = ("redis", "rediss", "unix")

    _client: redis.Redis
    _receiver: Any
    _reader: redis.Redis | None
    _last: str | None
    _start_id: str | None

    def __init__(self, url: str, settings: Any, *, name: str) -> None:
        super().__init__(url, settings, name=name)
        self.key = settings.redis_key or f"flask-sse-push:{name}"
        self.stats_key = self.key + ":stats"
        #: The stream keeps at least this many entries (history, and room for receivers
        #: that fall behind).
        self.maxlen = max(settings.history_size, 1000)
        #: Whether the receiver is connected (read by tests and health checks).
        self.connected = False

    # -- per-process state ---------------------------------------------------------------

    def _start(self) -> None:
        timeout = self.settings.publish_timeout
        pool = redis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=10,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # An XADD is not retried: a retry after a lost reply could publish twice.
            retry=Retry(NoBackoff(), 0),
            client_name=f"flask-sse-push:publish:{os.getpid()}",
        )
        self._client = redis.Redis(connection_pool=pool)
        self._receiver = None
        self._reader = None
        self._stopped = False
        #: Subscriptions waiting for the receiver to pass their resume point.
        self._waiting: dict[Subscription, tuple[int, int]] = {}
        self._last = None
        self._start_id = None
        self.connected = False

    def _receiving(self) -> None:
        if self._receiver is not None:
            return
        # Claimed before anything that can yield to another greenlet: one receiver only.
        self._receiver = True
        # Learn the stream's position now, so that an event published right after this first
        # subscription is delivered live (the receiver starts from here).
        with contextlib.suppress(redis.RedisError):  # else the receiver learns it later
            self._learn_position(self._client)
        self._receiver = _sync.spawn(
            _receive_loop,
            weakref.ref(self),
            weakref.ref(self.fanout),
            name=f"sse-redis-{self.name}",
        )

    def _learn_position(self, client: redis.Redis) -> dict[Any, Any] | None:
        info = client.xinfo_stream(self.key) if client.exists(self.key) else None
        if self._last is None:
            start = _text(info["last-generated-id"]) if info else "0-0"
            with self._lock():
                if self._last is None:
                    self._last = start
                if self._start_id is None:
                    self._start_id = start
        return info

    # -- publishing ----------------------------------------------------------------------

    def publish(self, channel: str, body: bytes, event_id: str | None = None) -> str:
        if event_id is not None and _sid(event_id) is not None:
            raise ValueError(
                f"id {event_id!r} has the form of the Redis bus's own ids "
                "(<digits>-<digits>), so a client resuming from it would be placed by "
                "position; use another form (for example 'order-2024-1'), or id=None"
            )
        self.fanout  # noqa: B018 - creates the per-process state after a fork
        fields: dict[Any, Any] = {"c": channel, "b": body}
        if event_id is not None:
            fields["i"] = event_id
        try:
            entry = self._client.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)
        except redis.RedisError as exc:
            raise PublishError(
                f"could not publish to Redis at {self._where()} ({exc}); the event was not "
                "sent. Check that Redis is running and SSE_BUS_URL points at it."
            ) from exc
        return event_id if event_id is not None else _text(entry)

    def _where(self) -> str:
        kwargs = self._client.connection_pool.connection_kwargs
        if "path" in kwargs:
            return str(kwargs["path"])
        return f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"

    def end_streams(
        self, reason: str = REVOKED, *, channel: str | None = None, user: object = None
    ) -> int:
        """End matching streams in this process, and (for revocation) in every other process
        of the app through a control entry in the stream."""
        ended = super().end_streams(reason, channel=channel, user=user)
        if reason == REVOKED:
            control = {"channel": channel, "user": user, "origin": self._origin()}
            try:
                self._client.xadd(
                    self.key,
                    {"c": _CONTROL, "b": json.dumps(control)},
                    maxlen=self.maxlen,
                    approximate=True,
                )
            except (redis.RedisError, TypeError) as exc:
                raise BusError(f"could not tell the other workers to end streams: {exc}") from exc
        return ended

    def _origin(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    # -- subscribing and replay ----------------------------------------------------------

    def subscribe(self, sub: Subscription, last_event_id: str | None) -> Resume:
        fanout = self.fanout
        self._receiving()
        with fanout.lock:
            # With a Last-Event-ID, live delivery starts only once the resume point is
            # known (see _resume): this process's receiver may still be behind it.
            fanout.add(sub, deliver=last_event_id is None)
        if last_event_id is None:
            return Resume([], None)
        span: list[tuple[tuple[int, int], tuple[int, int]]] = []
        return Resume([], None, pending=lambda: self._resume(sub, last_event_id, span))

    def unsubscribe(self, sub: Subscription) -> None:
        fanout = self.fanout
        with fanout.lock:
            self._waiting.pop(sub, None)
            fanout.remove(sub)

    def _resume(
        self,
        sub: Subscription,
        last_event_id: str,
        span: list[tuple[tuple[int, int], tuple[int, int]]],
    ) -> Resume:
        """Start live delivery to *sub* after *last_event_id* and return what it missed;
        raises :class:`BusError` while Redis or the receiver is not ready (the stream calls
        again later; *span* keeps the replay's bounds once delivery has started).

        The client got *last_event_id* from some process, maybe one whose receiver is ahead
        of this one's. So live delivery starts after whichever is later, the resume point or
        this receiver's position (the cut); the history covers the span between them.
        """
        try:
            if not span:
                if self._last is None:
                    raise BusError("the Redis receiver has not connected yet")
                found, head = self._locate(last_event_id)
                fanout = self.fanout
                with fanout.lock:
                    cut = _sid(self._last) or (0, 0)
                    if isinstance(found, Reset):
                        # The client refetches its state as of the head: live delivery
                        # starts after the head, even if this receiver is not there yet.
                        if cut < head:
                            self._waiting[sub] = head
                        else:
                            fanout.activate(sub)
                        return Resume([], found)
                    if cut <= found:
                        # The receiver has not read past the resume point yet: it starts
                        # this subscription's delivery when it does.
                        self._waiting[sub] = found
                        return Resume([], None)
                    fanout.activate(sub)
                    span.append((found, cut))
            after, upto = span[0]
            replay = self._entries(sub.channels, after, upto)
            # Trimming only removes the oldest entries: if nothing after the resume point is
            # gone now, nothing was gone while the range above was read either.
            client = self._client
            info = client.xinfo_stream(self.key) if client.exists(self.key) else None
            if _trimmed_after(info, after):
                return Resume([], Reset("too-old", f"{upto[0]}-{upto[1]}"))
            return Resume(replay, None)
        except redis.RedisError as exc:
            raise BusError(f"could not read the history from Redis: {exc}") from exc

    def _locate(self, last_event_id: str) -> tuple[tuple[int, int] | Reset, tuple[int, int]]:
        """The stream position *last_event_id* stands for, or why it cannot be resumed; and
        the position of the newest entry."""
        client = self._client
        info = client.xinfo_stream(self.key) if client.exists(self.key) else None
        head_id = self._head_id(info)
        head = (_sid(_text(info["last-generated-id"])) if info else None) or (0, 0)
        if not last_event_id or len(last_event_id) > MAX_FIELD_LENGTH:
            return Reset("malformed", head_id), head
        position = _sid(last_event_id)
        if position is None:
            position = self._find_own_id(last_event_id)
            if position is None:
                return Reset("unknown", head_id), head
        if position > head:
            return Reset("unknown", head_id), head
        if _trimmed_after(info, position):
            return Reset("too-old", head_id), head
        return position, head

    def _entries(
        self, channels: Iterable[str], after: tuple[int, int], upto: tuple[int, int]
    ) -> list[bytes]:
        """The encoded events of *channels* after *after*, up to *upto* included."""
        wanted = {channel.encode() for channel in channels}
        entries = cast(
            _Entries,
            self._client.xrange(
                self.key, min=f"({after[0]}-{after[1]}", max=f"{upto[0]}-{upto[1]}"
            ),
        )
        return [
            self._message(entry_id, fields).payload
            for entry_id, fields in entries
            if fields.get(b"c") in wanted
        ]

    def _head_id(self, info: dict[Any, Any] | None) -> str:
        if not info or not info.get("last-entry"):
            return "0-0"
        entry_id, fields = info["last-entry"]
        own = fields.get(b"i")
        return own.decode() if own else _text(entry_id)

    def _find_own_id(self, event_id: str) -> tuple[int, int] | None:
        """The stream position of the newest event published with the caller's *event_id*."""
        wanted = event_id.encode()
        entries = cast(_Entries, self._client.xrevrange(self.key, count=self.maxlen))
        for entry_id, fields in entries:
            if fields.get(b"i") == wanted:
                return _sid(_text(entry_id))
        return None

    @staticmethod
    def _message(entry_id: bytes, fields: dict[bytes, bytes]) -> Message:
        own = fields.get(b"i")
        wire_id = own or entry_id
        payload = b"id: " + wire_id + b"\n" + fields.get(b"b", b"")
        return Message(fields.get(b"c", b"").decode(), wire_id.decode(), payload)

    # -- the receiver ----------------------------------------------------------------------

    def _lock(self) -> Any:
        fanout = self._fanout
        assert fanout is not None
        return fanout.lock

    def _running(self, fanout: Fanout) -> bool:
        return self._fanout is fanout and not self._stopped and self._pid == os.getpid()

    def _receive_once(self, reader: redis.Redis) -> None:
        """Read one batch from the stream and deliver it."""
        self._catch_up_position(reader)
        self.connected = True
        streams = cast(
            "list[tuple[bytes, _Entries]] | None",
            reader.xread({self.key: self._last or "$"}, count=_BATCH, block=_BLOCK_MS),
        )
        for _key, entries in streams or ():
            if len(entries) >= _BATCH:
                # A full batch: this receiver is behind, maybe by more than the stream
                # keeps. Entries trimmed before it read them cannot be delivered.
                self._check_lag(reader)
            self._deliver(entries)

    def _check_lag(self, reader: redis.Redis) -> None:
        last = _sid(self._last or "0-0")
        info = reader.xinfo_stream(self.key) if reader.exists(self.key) else None
        if last is None or not _trimmed_after(info, last):
            return
        fanout = self._fanout
        assert fanout is not None
        with fanout.lock:
            ended = fanout.end(LAGGED, lambda sub: True)
        log.warning(
            "flask-sse-push: events were trimmed from Redis before this worker read them; "
            "ended %d streams so their clients resync",
            ended,
        )

    def _catch_up_position(self, reader: redis.Redis) -> None:
        """On (re)connecting: learn where to start, and notice entries trimmed unread."""
        if self.connected:
            return
        if self._last is None:
            self._learn_position(reader)
        else:
            self._check_lag(reader)

    def _deliver(self, entries: _Entries) -> None:
        fanout = self._fanout
        assert fanout is not None
        for entry_id, fields in entries:
            if self._waiting:
                self._start_waiting(fanout, _sid(_text(entry_id)) or (0, 0))
            try:
                if fields.get(b"c") == _CONTROL:
                    self._control(fields)
                else:
                    message = self._message(entry_id, fields)
                    with fanout.lock:
                        fanout.deliver(message)
            except Exception:  # one bad entry must not stop delivery, nor come back
                log.exception("flask-sse-push: skipped stream entry %r", entry_id)
            finally:
                with fanout.lock:
                    self._last = entry_id.decode()
            _sync.cooperate()

    def _start_waiting(self, fanout: Fanout, position: tuple[int, int]) -> None:
        """Start delivery to the subscriptions whose resume point is before *position*."""
        with fanout.lock:
            ready = [sub for sub, after in self._waiting.items() if after < position]
            for sub in ready:
                del self._waiting[sub]
                fanout.activate(sub)

    def _control(self, fields: dict[bytes, bytes]) -> None:
        try:
            order = json.loads(fields.get(b"b", b"{}"))
        except ValueError:
            return
        if order.get("origin") == self._origin():
            return
        super().end_streams(REVOKED, channel=order.get("channel"), user=order.get("user"))

    # -- statistics ----------------------------------------------------------------------

    def _write_stats(self, reader: redis.Redis) -> None:
        record = {
            "connections": self.connection_count(),
            "channels": self.channel_counts(),
            "time": time.time(),
        }
        reader.hset(self.stats_key, self._origin(), json.dumps(record))
        reader.expire(self.stats_key, int(_STATS_TTL * 6))

    def cluster_stats(self) -> dict[str, Any]:
        """Open streams of every live process of the app, as last reported by each (every
        couple of seconds): ``processes`` (``host:pid`` -> ``connections`` and
        ``channels``), and the totals ``connections`` and ``channels``.

        :raises BusError: when Redis cannot be read.
        """
        try:
            raw = self._client.hgetall(self.stats_key)
        except redis.RedisError as exc:
            raise BusError(f"could not read stream counts from Redis: {exc}") from exc
        now = time.time()
        processes: dict[str, dict[str, Any]] = {}
        for origin, value in raw.items():
            record = json.loads(value)
            if now - record["time"] <= _STATS_TTL:
                processes[_text(origin)] = {
                    "connections": record["connections"],
                    "channels": record["channels"],
                }
        totals: dict[str, int] = {}
        for process in processes.values():
            for channel, count in process["channels"].items():
                totals[channel] = totals.get(channel, 0) + count
        return {
            "processes": processes,
            "connections": sum(p["connections"] for p in processes.values()),
            "channels": totals,
        }

    def close(self) -> None:
        """Stop the receiver (within a second) and close the connections of this process."""
        self._stopped = True
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.close()  # interrupts a blocked XREAD
        if getattr(self, "_client", None) is not None:
            self._client.close()


def _receive_loop(ref: weakref.ref[RedisBus], fanout_ref: weakref.ref[Fanout]) -> None:
    """The receiver: reads the stream until the bus is closed or garbage-collected (it holds
    the bus only weakly, so an app that is gone takes its receiver with it), reconnecting
    with backoff while Redis is unreachable."""
    pid = os.getpid()
    backoff = 0.1
    reader: redis.Redis | None = None
    next_stats = 0.0
    while True:
        bus = ref()
        fanout = fanout_ref()
        if bus is None or fanout is None or not bus._running(fanout):
            break
        try:
            if reader is None:
                reader = redis.Redis.from_url(
                    bus.url,
                    socket_timeout=_BLOCK_MS / 1000 + 10,
                    socket_connect_timeout=5,
                    retry=Retry(NoBackoff(), 0),
                    single_connection_client=True,
                    client_name=f"flask-sse-push:receive:{pid}",
                )
                bus._reader = reader
            bus._receive_once(reader)
            backoff = 0.1
            if time.monotonic() >= next_stats:
                bus._write_stats(reader)
                next_stats = time.monotonic() + _STATS_EVERY
        except redis.RedisError as exc:
            if not bus._running(fanout):
                break
            if bus.connected:
                log.warning(
                    "flask-sse-push: lost Redis (%s); open streams stay open, retrying", exc
                )
            bus.connected = False
            if reader is not None:
                reader.close()
                reader = None
            del bus, fanout
            time.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, _BACKOFF_CAP)
        except Exception:  # a bug must not end delivery for the whole process
            if not bus._running(fanout):
                break  # close() closed the connection under a blocked read
            log.exception("flask-sse-push: Redis receiver error")
            del bus, fanout
            time.sleep(1.0)
        else:
            del bus, fanout
    if reader is not None:
        reader.close()


def _trimmed_after(info: dict[Any, Any] | None, position: tuple[int, int]) -> bool:
    """Whether entries after *position* may have been trimmed from the stream: something was
    trimmed and *position* is older than the oldest entry left. (When *position* was itself
    the last entry trimmed nothing is missing, but that cannot be told apart.)"""
    if not info or info.get("entries-added", 0) <= info.get("length", 0):
        return False
    first = info.get("first-entry")
    if not first:
        return True
    oldest = _sid(_text(first[0]))
    return oldest is not None and position < oldest


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

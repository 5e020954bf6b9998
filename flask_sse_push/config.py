"""Configuration keys, their defaults, and the settings object read once per app.

Every key is documented in ``docs/configuration.rst``; this module is the one place that
names them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError

#: Seconds between keep-alive comment lines on a quiet stream; ``0`` turns them off.
SSE_KEEPALIVE = "SSE_KEEPALIVE"
#: Events held for one connection before it counts as too slow and its stream is ended.
SSE_QUEUE_SIZE = "SSE_QUEUE_SIZE"
#: Channel followed by a connection that names none, and used by ``send_event`` by default.
SSE_DEFAULT_CHANNEL = "SSE_DEFAULT_CHANNEL"
#: Reconnection delay in milliseconds sent to clients when they connect (``None``: not sent).
SSE_RETRY = "SSE_RETRY"
#: Which bus carries events: ``memory://`` (one process), ``redis://host:port/db``,
#: ``redis+sentinel://host:port,.../service/db`` or ``redis+cluster://host:port,...``
#: (``rediss+sentinel://``, ``rediss+cluster://`` over TLS).
SSE_BUS_URL = "SSE_BUS_URL"
#: Events the bus keeps for ``Last-Event-ID`` replay.
SSE_HISTORY_SIZE = "SSE_HISTORY_SIZE"
#: Open streams allowed per process; more are told to come back later.
SSE_MAX_CONNECTIONS = "SSE_MAX_CONNECTIONS"
#: Channels one connection may follow.
SSE_MAX_CHANNELS = "SSE_MAX_CHANNELS"
#: Seconds after which a stream is ended so the client reconnects (``0``: never).
SSE_MAX_LIFETIME = "SSE_MAX_LIFETIME"
#: Seconds ``send_event`` may wait for a remote bus before it raises.
SSE_PUBLISH_TIMEOUT = "SSE_PUBLISH_TIMEOUT"

#: Seconds a write to a client may stall before the connection is dropped (``0``: never).
SSE_SEND_TIMEOUT = "SSE_SEND_TIMEOUT"
#: Redis key of the app's event stream (default: ``flask-sse-push:<app import name>``).
SSE_REDIS_KEY = "SSE_REDIS_KEY"
#: Replicas that must confirm each event (Redis ``WAIT``) before ``send_event`` returns.
SSE_REDIS_WAIT_REPLICAS = "SSE_REDIS_WAIT_REPLICAS"
#: Seconds the replicas have to confirm an event before ``send_event`` raises.
SSE_REDIS_WAIT_TIMEOUT = "SSE_REDIS_WAIT_TIMEOUT"
#: Stream keys the Redis bus spreads the channels over (``1``: one stream, as before).
SSE_REDIS_SHARDS = "SSE_REDIS_SHARDS"
#: The most shards :data:`SSE_REDIS_SHARDS` may name (an event id holds a position per shard).
MAX_REDIS_SHARDS = 64
#: Serve ``GET <prefix>/stats`` (open streams per channel of the answering process, as JSON).
SSE_STATS = "SSE_STATS"
#: Serve ``GET <prefix>/health`` (200 while this process can serve streams, 503 otherwise).
SSE_HEALTH = "SSE_HEALTH"
#: Path of the app where Prometheus metrics are served (``None``: no metrics).
SSE_METRICS_PATH = "SSE_METRICS_PATH"

DEFAULTS: Mapping[str, Any] = {
    SSE_KEEPALIVE: 15.0,
    SSE_QUEUE_SIZE: 512,
    SSE_DEFAULT_CHANNEL: "sse",
    SSE_RETRY: 3000,
    SSE_BUS_URL: "memory://",
    SSE_HISTORY_SIZE: 1000,
    SSE_MAX_CONNECTIONS: 1000,
    SSE_MAX_CHANNELS: 32,
    SSE_MAX_LIFETIME: 0.0,
    SSE_PUBLISH_TIMEOUT: 5.0,
    SSE_STATS: False,
    SSE_REDIS_KEY: None,
    SSE_REDIS_WAIT_REPLICAS: 0,
    SSE_REDIS_WAIT_TIMEOUT: 1.0,
    SSE_REDIS_SHARDS: 1,
    SSE_SEND_TIMEOUT: 30.0,
    SSE_HEALTH: True,
    SSE_METRICS_PATH: None,
}

#: Channel names: 1 to 128 characters out of letters, digits and ``_-.:@/``.
CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:@/-]{1,128}")


def from_environ(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``SSE_*`` settings found in environment variables, for ``app.config.update()``.

    Values are read as JSON when they parse (``SSE_KEEPALIVE=5``, ``SSE_STATS=true``,
    ``SSE_RETRY=null``) and as plain strings otherwise (``SSE_BUS_URL=redis://redis:6379/0``).

    :param environ: the variables; ``os.environ`` by default.
    """
    found: dict[str, Any] = {}
    for key, value in (os.environ if environ is None else environ).items():
        if key.startswith("SSE_"):
            try:
                found[key] = json.loads(value)
            except ValueError:
                found[key] = value
    return found


def _number(config: Mapping[str, Any], key: str, *, minimum: float, integer: bool) -> Any:
    value = config[key]
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
        wanted = "a whole number" if integer else "a number"
        raise ConfigurationError(
            f"{key} must be {wanted} >= {minimum:g}, got {value!r}; "
            f"fix it in app.config (the default is {DEFAULTS[key]!r})."
        )
    return value


def _shards(config: Mapping[str, Any]) -> int:
    value = config[SSE_REDIS_SHARDS]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REDIS_SHARDS:
        raise ConfigurationError(
            f"{SSE_REDIS_SHARDS} must be a whole number from 1 to {MAX_REDIS_SHARDS}, got "
            f"{value!r}; use 1 (one stream, the default) unless one Redis stream is too busy, "
            "and then about as many shards as the Redis servers' cores that serve them. Every "
            "process of the app must use the same number."
        )
    return value


def _optional_text(config: Mapping[str, Any], key: str) -> str | None:
    value = config[key]
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigurationError(f"{key} must be a non-empty str or None, got {value!r}")
    return value


def _metrics_path(config: Mapping[str, Any]) -> str | None:
    value = config[SSE_METRICS_PATH]
    if value is not None and (not isinstance(value, str) or not value.startswith("/")):
        raise ConfigurationError(
            f"{SSE_METRICS_PATH} must be None (no metrics) or a path starting with '/', such "
            f"as '/metrics'; got {value!r}"
        )
    return value


@dataclass(frozen=True)
class Settings:
    """The extension's settings for one app, read once when the blueprint is registered.

    :param keepalive: seconds between keep-alive comments, ``0`` for none.
    :param queue_size: bound of each connection's queue.
    :param default_channel: channel used when none is named.
    :param retry: reconnection delay in ms announced on connect, or ``None``.
    :param bus_url: URL selecting the bus backend.
    :param history_size: events kept for replay.
    :param max_streams: open streams allowed per process (``SSE_MAX_CONNECTIONS``).
    :param max_channels: channels one connection may follow.
    :param max_lifetime: seconds before a stream is ended for reconnection, ``0`` for never.
    :param publish_timeout: seconds a publish may wait on a remote bus.
    :param stats: whether ``<prefix>/stats`` is served.
    :param redis_key: the Redis stream's key, or ``None`` for the default.
    :param redis_wait_replicas: replicas that must confirm each event, ``0`` for none.
    :param redis_wait_timeout: seconds they have to confirm it.
    :param redis_shards: stream keys the Redis bus spreads the channels over.
    :param send_timeout: seconds a write may stall before the client is dropped, ``0``
        for never.
    :param health: whether ``<prefix>/health`` is served.
    :param metrics_path: the app's path serving Prometheus metrics, or ``None`` for none.
    """

    keepalive: float
    queue_size: int
    default_channel: str
    retry: int | None
    bus_url: str
    history_size: int
    max_streams: int
    max_channels: int
    max_lifetime: float
    publish_timeout: float
    stats: bool
    redis_key: str | None
    send_timeout: float
    health: bool
    metrics_path: str | None
    redis_wait_replicas: int = 0
    redis_wait_timeout: float = 1.0
    redis_shards: int = 1

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> Settings:
        """Validate the ``SSE_*`` keys of *config* (defaults already filled in).

        :raises ConfigurationError: naming the key and what it should be.
        """
        channel = config[SSE_DEFAULT_CHANNEL]
        if not isinstance(channel, str) or not CHANNEL_RE.fullmatch(channel):
            raise ConfigurationError(
                f"{SSE_DEFAULT_CHANNEL} must be 1-128 characters of letters, digits and "
                f"'_-.:@/', got {channel!r}."
            )
        retry = config[SSE_RETRY]
        if retry is not None:
            retry = _number(config, SSE_RETRY, minimum=0, integer=True)
        bus_url = config[SSE_BUS_URL]
        if not isinstance(bus_url, str) or "://" not in bus_url:
            raise ConfigurationError(
                f"{SSE_BUS_URL} must be a URL such as 'memory://' or "
                f"'redis://localhost:6379/0', got {bus_url!r}."
            )
        return cls(
            keepalive=float(_number(config, SSE_KEEPALIVE, minimum=0, integer=False)),
            queue_size=_number(config, SSE_QUEUE_SIZE, minimum=1, integer=True),
            default_channel=channel,
            retry=retry,
            bus_url=bus_url,
            history_size=_number(config, SSE_HISTORY_SIZE, minimum=0, integer=True),
            max_streams=_number(config, SSE_MAX_CONNECTIONS, minimum=1, integer=True),
            max_channels=_number(config, SSE_MAX_CHANNELS, minimum=1, integer=True),
            max_lifetime=float(_number(config, SSE_MAX_LIFETIME, minimum=0, integer=False)),
            publish_timeout=float(
                _number(config, SSE_PUBLISH_TIMEOUT, minimum=0.001, integer=False)
            ),
            stats=bool(config[SSE_STATS]),
            redis_key=_optional_text(config, SSE_REDIS_KEY),
            send_timeout=float(_number(config, SSE_SEND_TIMEOUT, minimum=0, integer=False)),
            health=bool(config[SSE_HEALTH]),
            metrics_path=_metrics_path(config),
            redis_wait_replicas=_number(config, SSE_REDIS_WAIT_REPLICAS, minimum=0, integer=True),
            redis_wait_timeout=float(
                _number(config, SSE_REDIS_WAIT_TIMEOUT, minimum=0.001, integer=False)
            ),
            redis_shards=_shards(config),
        )

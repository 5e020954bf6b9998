"""Bus backends: the in-process bus and the Redis bus, chosen by ``SSE_BUS_URL``."""

from __future__ import annotations

from urllib.parse import urlsplit

from ..config import SSE_BUS_URL, Settings
from ..errors import ConfigurationError
from .base import (
    Bus,
    Message,
    Reset,
    Resume,
    Subscription,
    factory_for,
    register_bus,
    registered_schemes,
)
from .memory import MemoryBus

__all__ = [
    "Bus",
    "MemoryBus",
    "Message",
    "Reset",
    "Resume",
    "Subscription",
    "create_bus",
    "register_bus",
]


def create_bus(url: str, settings: Settings, name: str) -> Bus:
    """Create the bus that *url* selects.

    :raises ConfigurationError: when no backend serves the URL's scheme.
    """
    scheme = urlsplit(url).scheme
    factory = factory_for(scheme)
    if factory is None:
        known = ", ".join(f"'{s}://'" for s in registered_schemes())
        raise ConfigurationError(
            f"{SSE_BUS_URL} = {url!r} uses the unknown scheme {scheme!r}; use one of {known}, "
            "or add a backend with flask_sse_push.bus.register_bus()."
        )
    return factory(url, settings, name)


def _redis_bus(url: str, settings: Settings, name: str) -> Bus:
    try:
        from .redis import RedisBus
    except ModuleNotFoundError as exc:
        if exc.name != "redis":
            raise
        raise ConfigurationError(
            f"{SSE_BUS_URL} = {url!r} needs the Redis client: pip install 'flask-sse-push[redis]'"
        ) from exc
    return RedisBus(url, settings, name=name)


register_bus("memory", lambda url, settings, name: MemoryBus(url, settings, name=name))
for _scheme in ("redis", "rediss", "unix"):
    register_bus(_scheme, _redis_bus)

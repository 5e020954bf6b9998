"""Bus backends, chosen by the scheme of ``SSE_BUS_URL``: the in-process bus
(``memory://``) and the Redis bus (``redis://``, ``rediss://``, ``unix://``).

Each backend module declares its :class:`Bus` subclass, which registers its schemes. The
Redis bus's modules (and the Redis client library) are imported only when a Redis bus is
created: until then its schemes name a factory that imports them, so a worker on the
in-process bus never loads them.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ..config import SSE_BUS_URL, Settings
from ..errors import ConfigurationError
from . import memory  # noqa: F401 - imported for its registration
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
from .fanout import Fanout
from .memory import MemoryBus

__all__ = [
    "Bus",
    "Fanout",
    "MemoryBus",
    "Message",
    "Reset",
    "Resume",
    "Subscription",
    "create_bus",
    "register_bus",
]


#: The schemes of the Redis bus (:class:`flask_sse_push.bus.redis.RedisBus`), registered
#: before its module is imported.
REDIS_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)


def _redis_bus(url: str, settings: Settings, name: str) -> Bus:
    from .redis import RedisBus  # registers RedisBus.create for its schemes in passing

    return RedisBus.create(url, settings, name)


for _scheme in REDIS_SCHEMES:
    register_bus(_scheme, _redis_bus)


def create_bus(url: str, settings: Settings, name: str) -> Bus:
    """Create the bus that *url* selects.

    :raises ConfigurationError: when no backend serves the URL's scheme, or the backend's
        dependencies are not installed.
    """
    scheme = urlsplit(url).scheme
    factory = factory_for(scheme)
    if factory is None:
        known = ", ".join(f"'{s}://'" for s in registered_schemes())
        raise ConfigurationError(
            f"{SSE_BUS_URL} = {url!r} uses the unknown scheme {scheme!r}; use one of {known}, "
            "or add a backend: a flask_sse_push.bus.Bus subclass naming it in 'schemes'."
        )
    return factory(url, settings, name)

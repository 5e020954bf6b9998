"""Where the Redis bus connects, and how its clients are made: one server (``redis://``,
``rediss://``, ``unix://``), a primary that Redis Sentinel manages (``redis+sentinel://``),
or a Redis Cluster (``redis+cluster://``), each also over TLS (``rediss+sentinel://``,
``rediss+cluster://``).

The topology URLs have the shapes other Python tools give them::

    redis[s]+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]
    redis[s]+cluster://[[user]:password@]host[:port][,host[:port]...][/]

Sentinels default to port 26379, cluster nodes to 6379. The user and password are those of
the Redis servers; sentinels that want a password of their own get it from the query
parameters ``sentinel_username`` and ``sentinel_password``. The TLS forms take the TLS
query parameters of ``redis_tls``.

No client of the bus retries a command by itself: a retry after a lost reply could publish
an event twice. The bus reconnects where that is safe (the receiver, a new publish).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from ..config import SSE_BUS_URL
from ..errors import ConfigurationError
from .redis_tls import TLS_OPTIONS, TlsOptionError, handshake_error, tls_hint, tls_options

if TYPE_CHECKING:
    import redis

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
#: Scheme -> (kind, over TLS).
_SCHEMES = {
    SENTINEL_SCHEME: ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    CLUSTER_SCHEME: ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_DEFAULT_PORTS = {"sentinel": 26379, "cluster": 6379}
#: The topology schemes, each a key of :data:`_SCHEMES`.
TOPOLOGY_SCHEMES = tuple(_SCHEMES)
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
#: Connections the publishing pool of a process holds at most (one server, Sentinel).
POOL_SIZE = 10


def _refuse(url: str, problem: str) -> ConfigurationError:
    shapes = (
        "redis+sentinel://host:26379,host:26380/service/0 or redis+cluster://host:7000,host:7001/"
        " (rediss+sentinel:// and rediss+cluster:// over TLS, with ssl_* parameters)"
    )
    return ConfigurationError(f"{SSE_BUS_URL} = {url!r}: {problem}; the shapes are {shapes}.")


def _address(url: str, text: str, default_port: int) -> tuple[str, int]:
    host, port = text, str(default_port)
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else port
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _refuse(url, f"{text!r} is not a host[:port]")
    return host, int(port)


@dataclass(frozen=True)
class Target:
    """What a bus URL points at.

    :param kind: ``"server"``, ``"sentinel"`` or ``"cluster"``.
    :param url: the URL as configured.
    :param nodes: the sentinels' or the cluster nodes' addresses.
    :param service: the name Sentinel knows the primary by.
    :param db: the database (one server, Sentinel).
    :param auth: ``username`` and ``password`` for the Redis servers, when given.
    :param sentinel_auth: the same for the sentinels.
    :param tls: redis-py's TLS keyword arguments (``ssl=True`` ...), empty without TLS.
    :param sentinel_tls: whether the sentinels speak TLS too.
    """

    kind: str
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    auth: dict[str, str] = field(default_factory=dict)
    sentinel_auth: dict[str, str] = field(default_factory=dict)
    tls: dict[str, Any] = field(default_factory=dict)
    sentinel_tls: bool = False

    @classmethod
    def parse(cls, url: str) -> Target:
        """Read *url*; a ``redis://``, ``rediss://`` or ``unix://`` URL is left to redis-py.

        :raises ConfigurationError: saying what is wrong with a topology URL.
        """
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # a bracketed host that is no IPv6 address
            raise _refuse(url, str(exc)) from exc
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES:
            return cls("server", url)
        kind, over_tls = _SCHEMES[scheme]
        userinfo, _, hosts = parts.netloc.rpartition("@")
        nodes = tuple(
            _address(url, host, _DEFAULT_PORTS[kind]) for host in hosts.split(",") if host
        )
        if not nodes:
            raise _refuse(url, "no host is named")
        auth: dict[str, str] = {}
        if userinfo:
            user, has_password, password = userinfo.partition(":")
            if user:
                auth["username"] = unquote(user)
            if has_password:
                auth["password"] = unquote(password)
        options = dict(parse_qsl(parts.query))
        tls, sentinel_tls = _tls(url, options, over_tls, kind)
        path = [part for part in parts.path.split("/") if part]
        if kind == "cluster":
            if path not in ([], ["0"]) or options:
                raise _refuse(url, "a cluster has database 0 only and takes no other options")
            return cls("cluster", url, nodes, auth=auth, tls=tls)
        unknown = sorted(set(options) - set(_SENTINEL_OPTIONS))
        if unknown:
            known = ", ".join((*_SENTINEL_OPTIONS, *TLS_OPTIONS, "sentinel_ssl"))
            raise _refuse(url, f"unknown option {unknown[0]!r} (known: {known})")
        if not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
            raise _refuse(url, "name the service Sentinel monitors (and a database number)")
        sentinel_auth = {name[len("sentinel_") :]: value for name, value in options.items()}
        db = int(path[1]) if len(path) == 2 else 0
        service = unquote(path[0])
        return cls("sentinel", url, nodes, service, db, auth, sentinel_auth, tls, sentinel_tls)

    def describe(self) -> str:
        """Where this is, for messages (never with a password)."""
        nodes = ", ".join(f"{host}:{port}" for host, port in self.nodes)
        tls = " over TLS" if self.tls else ""
        if self.kind == "sentinel":
            return f"the primary Sentinel calls {self.service!r} ({nodes}{tls}) database {self.db}"
        if self.kind == "cluster":
            return f"the Redis Cluster at {nodes}{tls}"
        return "Redis at " + _server_where(self.url)

    def stream_key(self, key: str) -> str:
        """*key* as the bus uses it here: in a cluster, with a hash tag, so that the stream
        and the keys named after it (``<key>:ids`` ...) live in one hash slot."""
        if self.kind != "cluster":
            return key
        start = key.find("{")
        end = key.find("}", start + 1) if start >= 0 else -1
        return key if end > start + 1 else "{" + key + "}"


def _tls(
    url: str, options: dict[str, str], over_tls: bool, kind: str
) -> tuple[dict[str, Any], bool]:
    """Take the TLS parameters out of *options*; refuse them without TLS."""
    if not over_tls:
        given = sorted(set(options) & {*TLS_OPTIONS, "sentinel_ssl"})
        if given:
            raise _refuse(url, f"{given[0]} needs TLS: the scheme is rediss+{kind}://")
        return {}, False
    if kind == "cluster" and "sentinel_ssl" in options:
        raise _refuse(url, "sentinel_ssl is for rediss+sentinel:// only")
    try:
        return tls_options(options)
    except TlsOptionError as exc:
        raise _refuse(url, str(exc)) from exc


def _server_where(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    db = parts.path.strip("/") or dict(parse_qsl(parts.query)).get("db", "0")
    return f"{parts.hostname}:{parts.port or 6379}/{db}"


def errors() -> tuple[type[Exception], ...]:
    """What redis-py raises when Redis cannot answer: its ``RedisError``, and the cluster
    client's exceptions that are not one (no reachable node, a slot not covered)."""
    exceptions = importlib.import_module("redis.exceptions")
    return (exceptions.RedisError, exceptions.RedisClusterException)


def no_retry() -> Any:
    """A redis-py ``Retry`` that never retries."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


@functools.cache
def _blocking_sentinel_pool() -> type:
    """Sentinel's connection pool with a bound: callers wait for a free connection."""
    from redis import BlockingConnectionPool
    from redis.sentinel import SentinelConnectionPool

    return type("BlockingSentinelPool", (SentinelConnectionPool, BlockingConnectionPool), {})


class LazyCluster:
    """A ``RedisCluster`` client made at its first command: making one asks the cluster for
    its slots, which must neither happen nor fail before the bus is used. Every attribute
    is the client's."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._client: Any = None

    def _made(self) -> Any:
        """The client, made now if needed (raising redis-py's errors when no node answers).
        (Not ``get``: that name is the client's ``GET`` command.)"""
        if self._client is None:
            cluster = importlib.import_module("redis.cluster")
            self._client = cluster.RedisCluster(**self._kwargs)
        return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._made(), name)

    def get_encoder(self) -> Any:
        """The encoder scripts are registered with (the client's default one)."""
        connection = importlib.import_module("redis.connection")
        return connection.Encoder("utf-8", "strict", False)

    def register_script(self, script: str) -> Any:
        """The script, registered without making the client (redis-py's ``Script`` asks
        only for the encoder until it runs)."""
        core = importlib.import_module("redis.commands.core")
        return core.Script(self, script)

    def close(self) -> None:
        """Close the client's connections, if it was made."""
        if self._client is not None:
            self._client.close()


class Connector:
    """Makes the bus's clients for a :class:`Target`, in one process.

    :param target: where to connect.
    :param timeout: seconds a connection attempt or a publishing command may take.
    """

    def __init__(self, target: Target, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self._sentinel: Any = None

    @property
    def cluster(self) -> bool:
        """Whether the target is a Redis Cluster."""
        return self.target.kind == "cluster"

    def publisher(self, name: str, *, extra_timeout: float = 0.0) -> redis.Redis:
        """The client the bus publishes and reads history with: a bounded pool.

        :param name: the connections' client name.
        :param extra_timeout: seconds a reply may take beyond the timeout (a ``WAIT``).
        """
        timeouts = {
            "socket_timeout": self.timeout + extra_timeout,
            "socket_connect_timeout": self.timeout,
        }
        if self.target.kind == "server":
            module = importlib.import_module("redis")
            pool = module.BlockingConnectionPool.from_url(
                self.target.url,
                max_connections=POOL_SIZE,
                timeout=self.timeout,
                retry=no_retry(),
                client_name=name,
                **timeouts,
            )
            return cast("redis.Redis", module.Redis(connection_pool=pool))
        if self.target.kind == "sentinel":
            return self._primary(
                name,
                connection_pool_class=_blocking_sentinel_pool(),
                max_connections=POOL_SIZE,
                timeout=self.timeout,
                **timeouts,
            )
        return self._cluster(name, **timeouts)

    def dedicated(self, name: str, **kwargs: Any) -> redis.Redis:
        """A client of its own (the receiver's, an admin's); *kwargs* go to redis-py."""
        kwargs.setdefault("socket_connect_timeout", 5)
        if self.target.kind == "server":
            module = importlib.import_module("redis")
            client = module.Redis.from_url(
                self.target.url, retry=no_retry(), client_name=name, **kwargs
            )
            return cast("redis.Redis", client)
        kwargs.pop("single_connection_client", None)  # both keep one connection per node
        if self.target.kind == "sentinel":
            return self._primary(name, **kwargs)
        return self._cluster(name, **kwargs)

    def tls_hint(self, exc: BaseException) -> str:
        """What to check when *exc* comes from a failed TLS handshake (``""`` otherwise),
        trying one handshake when the error does not say (see ``redis_tls.tls_hint``)."""
        target = self.target
        exceptions = importlib.import_module("redis.exceptions")
        unreachable = (exceptions.ConnectionError, exceptions.RedisClusterException)
        if not target.tls or not isinstance(exc, unreachable):
            return tls_hint(exc)
        if target.kind == "sentinel" and not target.sentinel_tls:
            return tls_hint(exc)
        return tls_hint(exc, lambda: handshake_error(target.nodes, target.tls, self.timeout))

    def close(self) -> None:
        """Close the connections to the sentinels, if any were made."""
        if self._sentinel is not None:
            self._sentinel.close()

    def _primary(self, name: str, **kwargs: Any) -> redis.Redis:
        target = self.target
        if self._sentinel is None:
            sentinel = importlib.import_module("redis.sentinel")
            self._sentinel = sentinel.Sentinel(
                list(target.nodes),
                sentinel_kwargs={
                    "socket_timeout": self.timeout,
                    "socket_connect_timeout": self.timeout,
                    "retry": no_retry(),
                    **target.sentinel_auth,
                    **(target.tls if target.sentinel_tls else {}),
                },
            )
        client = self._sentinel.master_for(
            target.service,
            db=target.db,
            retry=no_retry(),
            client_name=name,
            **target.auth,
            **target.tls,
            **kwargs,
        )
        return cast("redis.Redis", client)

    def _cluster(self, name: str, **kwargs: Any) -> redis.Redis:
        cluster = importlib.import_module("redis.cluster")
        client = LazyCluster(
            startup_nodes=[cluster.ClusterNode(host, port) for host, port in self.target.nodes],
            retry=no_retry(),
            require_full_coverage=False,
            client_name=name,
            **self.target.auth,
            **self.target.tls,
            **kwargs,
        )
        return cast("redis.Redis", client)


def refused(exc: BaseException) -> bool:
    """Whether Redis refused a command (asking again gets the same answer), rather than
    being unreachable or in a failover (``CLUSTERDOWN``, ``MOVED``, ``TRYAGAIN``)."""
    exceptions = importlib.import_module("redis.exceptions")
    passing = (exceptions.ClusterError, exceptions.AskError, exceptions.TryAgainError)
    return isinstance(exc, exceptions.ResponseError) and not isinstance(exc, passing)

"""Throwaway highly available Redis deployments on 127.0.0.1: a primary with replicas under
three ``redis-sentinel`` processes, and a Redis Cluster of three primaries and three replicas.

Every process runs from Debian's ``redis-server`` and ``redis-sentinel`` on a free port, in a
directory of its own, and is stopped by :meth:`stop` (which the fixtures call, also when a
test fails). Waits are bounded.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from support.procs import HOST, free_port, read_log, stop_each, terminate, wait_for
from support.redis_server import RedisServer
from support.tls import RedisTls, record_tls, tls_of

__all__ = [
    "SENTINEL_MISSING_MESSAGE",
    "Deployments",
    "SentinelServer",
    "SentinelSet",
    "redis_sentinel_executable",
]

SENTINEL_MISSING_MESSAGE = (
    "redis-sentinel is not on PATH; install the Debian package redis-sentinel "
    "(apt-get install redis-sentinel) to run the Sentinel tests"
)
SERVICE = "mymaster"


class Deployment(Protocol):
    def start(self) -> Any: ...

    def stop(self) -> None: ...


D = TypeVar("D", bound=Deployment)


class Deployments:
    """Starts deployments and remembers them, so that a fixture stops them all at the end
    (also when a test fails)."""

    def __init__(self) -> None:
        self.started: list[Deployment] = []

    def __call__(self, deployment: D) -> D:
        """Start *deployment* (stopped later even if starting fails) and return it."""
        self.started.append(deployment)
        deployment.start()
        return deployment

    def stop(self) -> None:
        """Stop every deployment started."""
        stop_each(d.stop for d in self.started)


def redis_sentinel_executable() -> str | None:
    """Locate ``redis-sentinel`` on ``PATH``.

    :returns: Its path, or ``None``.
    """
    return shutil.which("redis-sentinel")


def admin(port: int, timeout: float = 2.0) -> redis.Redis:
    """A client of the server (or sentinel) on *port* that never retries.

    :param port: The port on 127.0.0.1.
    :param timeout: Socket timeouts in seconds.
    :returns: The client (the caller closes it); a TLS one for a server started with TLS.
    """
    tls = tls_of(port)
    return redis.Redis(
        host=HOST,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        **(tls.client_kwargs() if tls else {}),
    )


def ask(port: int, *command: Any) -> Any:
    """Send one *command* to the server on *port*; ``None`` when it cannot answer.

    :param port: The port on 127.0.0.1.
    :param command: The command and its arguments.
    :returns: The reply, or ``None``.
    """
    client = admin(port)
    try:
        return client.execute_command(*command)
    except redis.exceptions.RedisError:
        return None
    finally:
        client.close()


def role(port: int | None) -> dict[str, Any]:
    """The replication section of ``INFO`` of the server on *port* (empty: no answer)."""
    info = None if port is None else ask(port, "INFO", "replication")
    return info if isinstance(info, dict) else {}


class SentinelServer:
    """One ``redis-sentinel`` process watching a primary.

    :ivar port: Its port.
    """

    def __init__(
        self,
        work_dir: Path,
        executable: str,
        primary_port: int,
        quorum: int,
        tls: RedisTls | None = None,
        plaintext: bool = False,
    ) -> None:
        """Write its configuration (it rewrites the file as it learns); start nothing yet.

        :param work_dir: A directory of its own.
        :param executable: Path of ``redis-sentinel``.
        :param primary_port: Port of the primary to watch.
        :param quorum: Sentinels that must agree the primary is down.
        :param tls: Speak TLS only, to clients, servers and sentinels, with this certificate.
        :param plaintext: With *tls*: speak TLS to the servers only, plaintext to clients
            and to the other sentinels.
        """
        self.work_dir = work_dir
        self.executable = executable
        self.port = free_port()
        self.tls = None if plaintext else tls
        self.config = work_dir / "sentinel.conf"
        self.log_path = work_dir / "sentinel.log"
        listen = f"port {self.port}\n"
        if tls is not None:
            listen = f"port 0\ntls-port {self.port}\n" if self.tls else listen
            listen += "".join(f"{name} {value}\n" for name, value in tls.server_options().items())
        self.config.write_text(
            listen + f"bind {HOST}\n"
            "protected-mode no\n"
            f"dir {work_dir}\n"
            f"sentinel monitor {SERVICE} {HOST} {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10) -> SentinelServer:
        """Start it and wait until it answers ``PING``.

        :param timeout: Seconds to wait.
        :returns: ``self``.
        :raises RuntimeError: If it does not answer in time (with its log).
        """
        record_tls(self.port, self.tls)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [self.executable, str(self.config)],
                cwd=self.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self.proc
        if not wait_for(lambda: proc.poll() is not None or ask(self.port, "PING"), timeout):
            self.stop()
            raise RuntimeError(f"redis-sentinel did not start; log:\n{read_log(self.log_path)}")
        return self

    def master(self) -> dict[str, Any]:
        """What it knows of the primary (``SENTINEL MASTER``), empty when it cannot say."""
        reply = ask(self.port, "SENTINEL", "MASTER", SERVICE)
        return dict(reply) if isinstance(reply, dict) else {}

    def stop(self, timeout: float = 10) -> None:
        """Stop it with SIGTERM (SIGKILL after *timeout*); no-op when not running."""
        proc, self.proc = self.proc, None
        if proc is not None:
            terminate(proc, timeout)


class SentinelSet:
    """A primary, *replicas* replicas and three sentinels on 127.0.0.1.

    :ivar primary: The server that was primary at the start.
    :ivar replicas: The servers that were replicas at the start.
    :ivar sentinels: The sentinels.
    """

    def __init__(
        self,
        work_dir: Path,
        redis_exe: str,
        sentinel_exe: str,
        replicas: int,
        tls: RedisTls | None = None,
        plaintext_sentinels: bool = False,
    ) -> None:
        """Prepare the deployment in *work_dir*; :meth:`start` starts it.

        :param work_dir: An empty directory.
        :param redis_exe: Path of ``redis-server``.
        :param sentinel_exe: Path of ``redis-sentinel``.
        :param replicas: How many replicas.
        :param tls: Every process speaks TLS only, with this certificate.
        :param plaintext_sentinels: With *tls*: the sentinels speak plaintext to clients
            (and to each other), TLS to the servers.
        """
        self.work_dir = work_dir
        self.redis_exe = redis_exe
        self.sentinel_exe = sentinel_exe
        self.tls = tls
        self.plaintext_sentinels = plaintext_sentinels
        self.primary = RedisServer(
            self._dir("primary"),
            executable=redis_exe,
            args=["--repl-diskless-sync-delay", "0"],
            tls=tls,
        )
        primary_of = ["--replicaof", HOST, str(self.primary.port)]
        self.replicas = [
            RedisServer(self._dir(f"replica{i}"), executable=redis_exe, args=primary_of, tls=tls)
            for i in range(replicas)
        ]
        self.sentinels: list[SentinelServer] = []

    def _dir(self, name: str) -> Path:
        path = self.work_dir / name
        path.mkdir()
        return path

    @property
    def servers(self) -> list[RedisServer]:
        """Every Redis server, the first primary first."""
        return [self.primary, *self.replicas]

    @property
    def url(self) -> str:
        """The bus URL: ``redis+sentinel://<the sentinels>/mymaster/0`` (``rediss+sentinel``
        with the certificate's files as its query with TLS)."""
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        if self.tls is not None:
            mixed = "&sentinel_ssl=false" if self.plaintext_sentinels else ""
            return f"rediss+sentinel://{hosts}/{SERVICE}/0?{self.tls.query()}{mixed}"
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self, timeout: float = 30) -> SentinelSet:
        """Start every process and wait until replication is up and every sentinel knows
        every replica and the other sentinels (so that a failover can happen).

        :param timeout: Seconds to wait for all that.
        :returns: ``self``.
        :raises RuntimeError: If it is not ready in time.
        """
        for server in self.servers:
            server.start()
        self.sentinels = [
            SentinelServer(
                self._dir(f"sentinel{i}"),
                self.sentinel_exe,
                self.primary.port,
                2,
                self.tls,
                self.plaintext_sentinels,
            )
            for i in range(3)
        ]
        for sentinel in self.sentinels:
            sentinel.start()
        if not wait_for(self.ready, timeout, interval=0.2):
            raise RuntimeError(f"the Sentinel deployment is not ready: {self.describe()}")
        return self

    def _linked(self, server: RedisServer) -> bool:
        return role(server.port).get("master_link_status") == "up"

    def ready(self) -> bool:
        """Whether replication is up and every sentinel sees the whole deployment."""
        if not all(self._linked(replica) for replica in self.replicas if replica.running()):
            return False
        for sentinel in self.sentinels:
            master = sentinel.master()
            if int(master.get(b"num-slaves", -1)) < len(self.live_replicas()):
                return False
            if int(master.get(b"num-other-sentinels", -1)) != len(self.sentinels) - 1:
                return False
        return True

    def live_replicas(self) -> list[RedisServer]:
        """The running servers that are not the current primary."""
        port = self.primary_port()
        return [s for s in self.servers if s.running() and s.port != port]

    def primary_port(self) -> int | None:
        """The port of the primary as the sentinels agree on it (``None``: they do not)."""
        seen = set()
        for sentinel in self.sentinels:
            reply = ask(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            seen.add(int(reply[1]) if reply else None)
        return seen.pop() if len(seen) == 1 else None

    def server_on(self, port: int | None) -> RedisServer | None:
        """The server listening on *port*."""
        return next((s for s in self.servers if s.port == port), None)

    def wait_failover(self, old_port: int, timeout: float = 30) -> RedisServer:
        """Wait until the sentinels agree on a new primary that takes writes.

        :param old_port: The port of the primary that failed.
        :param timeout: Seconds to wait.
        :returns: The new primary.
        :raises RuntimeError: If none is in place in time.
        """

        def switched() -> bool:
            port = self.primary_port()
            return port not in (None, old_port) and role(port).get("role") == "master"

        if not wait_for(switched, timeout, interval=0.1):
            raise RuntimeError(f"no failover within {timeout} s: {self.describe()}")
        server = self.server_on(self.primary_port())
        assert server is not None
        return server

    def describe(self) -> str:
        """What each sentinel reports, and the logs' tails, for failure messages."""
        lines = []
        for sentinel in self.sentinels:
            master = sentinel.master()
            lines.append(
                f"sentinel {sentinel.port}: "
                + ", ".join(
                    f"{k.decode()}={master.get(k, b'?').decode()}"
                    for k in (b"port", b"flags", b"num-slaves", b"num-other-sentinels")
                )
            )
            lines.append(read_log(sentinel.log_path)[-1500:])
        return "\n".join(lines)

    def stop(self) -> None:
        """Stop every process (sentinels first, so that they start no failover)."""
        stop_each([*(s.stop for s in self.sentinels), *(s.stop for s in self.servers)])

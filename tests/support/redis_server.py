"""Throwaway ``redis-server`` processes on 127.0.0.1 (the tests' fixtures, the benchmark)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from support.procs import (
    HOST,
    free_port,
    missing,
    read_log,
    start_logged,
    stop_each,
    terminate,
    wait_for,
)
from support.tls import RedisTls, record_tls, tls_of

__all__ = [
    "REDIS_MISSING_MESSAGE",
    "RedisFactory",
    "RedisServer",
    "redis_server_executable",
    "require_redis_server",
]

REDIS_MISSING_MESSAGE = (
    "redis-server is not on PATH; install the Debian package redis-server "
    "(apt-get install redis-server) to run the Redis tests"
)


def redis_server_executable() -> str | None:
    """Locate ``redis-server`` on ``PATH``.

    :returns: Its path, or ``None``.
    """
    return shutil.which("redis-server")


def require_redis_server() -> str:
    """Return the ``redis-server`` path, or skip / fail the current test.

    Without ``redis-server`` on ``PATH`` the test fails when the ``CI``
    environment variable is set and is skipped otherwise; either way the
    message says to install the Debian package ``redis-server``.

    :returns: The executable's path.
    """
    exe = redis_server_executable()
    if exe is None:
        missing(REDIS_MISSING_MESSAGE)
    return exe


class RedisServer:
    """A throwaway ``redis-server`` on 127.0.0.1 with persistence disabled.

    :ivar port: Its port (kept across :meth:`stop` / :meth:`start`).
    :ivar url: ``redis://127.0.0.1:<port>/0`` (``rediss://...?ssl_ca_certs=...`` with TLS).
    :ivar proc: The current process, or ``None`` when stopped.
    """

    def __init__(
        self,
        work_dir: Path,
        port: int | None = None,
        executable: str | None = None,
        args: Sequence[str] = (),
        tls: RedisTls | None = None,
    ) -> None:
        """Prepare (but do not start) a server.

        :param work_dir: Existing directory used as cwd and for the log.
        :param port: Port to use; a free one by default.
        :param executable: Path of ``redis-server``; looked up on ``PATH``
            by default.
        :param args: More command-line options (``--replicaof ...``).
        :param tls: Speak TLS only (with replication and the cluster bus over TLS too),
            with this certificate.
        :raises FileNotFoundError: If ``redis-server`` cannot be found.
        """
        exe = executable or redis_server_executable()
        if exe is None:
            raise FileNotFoundError(REDIS_MISSING_MESSAGE)
        self.executable = exe
        self.work_dir = work_dir
        self.port = port if port is not None else free_port()
        self.tls = tls
        self.url = f"redis://{HOST}:{self.port}/0"
        if tls is not None:
            self.url = f"rediss://{HOST}:{self.port}/0?{tls.query()}"
        self.log_path = work_dir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.args = list(args)
        self._clients: list[redis.Redis] = []

    def log_text(self) -> str:
        """Return everything the server logged (all runs).

        :returns: The log file's contents.
        """
        return read_log(self.log_path)

    def _ping(self) -> bool:
        """Tell whether the server answers ``PING``.

        :returns: ``True`` if it answered.
        """
        tls = tls_of(self.port)
        client = redis.Redis(
            host=HOST,
            port=self.port,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),  # redis-py retries with backoff by default
            **(tls.client_kwargs() if tls else {}),
        )
        try:
            return bool(client.ping())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return False
        except redis.exceptions.BusyLoadingError:
            return False
        finally:
            client.close()

    def start(self, timeout: float = 10) -> RedisServer:
        """Start the server (again) on :attr:`port` and wait for ``PING``.

        :param timeout: Maximum seconds to wait.
        :returns: ``self``.
        :raises RuntimeError: If it is already running, exits, or does not
            answer in time (the message contains its log).
        """
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        record_tls(self.port, self.tls)
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cluster", "yes"]
            for name, value in self.tls.server_options().items():
                listen += [f"--{name}", value]
        cmd = [
            self.executable,
            *listen,
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            *self.args,
        ]
        proc = start_logged(cmd, self.work_dir, self.log_path)
        self.proc = proc
        ok = wait_for(lambda: proc.poll() is not None or self._ping(), timeout)
        if proc.poll() is not None or not ok:
            self.stop()
            raise RuntimeError(
                f"redis-server on port {self.port} did not start; log:\n{self.log_text()}"
            )
        return self

    def stop(self, timeout: float = 10) -> None:
        """Stop the server with SIGTERM and wait (SIGKILL after *timeout*).

        Clients made by :meth:`client` are disconnected first.  No-op if it
        is not running.

        :param timeout: Seconds to wait before SIGKILL.
        """
        self.close_clients()
        proc = self.proc
        if proc is None:
            return
        terminate(proc, timeout)
        self.proc = None

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would; no-op if it is not running."""
        self.close_clients()
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def running(self) -> bool:
        """Tell whether the server process is running.

        :returns: ``True`` if started and not exited.
        """
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kwargs: object) -> redis.Redis:
        """Return a new client for database 0 (closed at :meth:`stop`).

        :param kwargs: Extra arguments for :meth:`redis.Redis.from_url`.
        :returns: The client.
        """
        client = redis.Redis.from_url(self.url, **kwargs)
        self._clients.append(client)
        return client

    def close_clients(self) -> None:
        """Close every client handed out by :meth:`client`."""
        clients, self._clients = self._clients, []
        for client in clients:
            client.close()


class RedisFactory:
    """Starts throwaway servers in one directory, and stops them at the end.

    The ``redis_server`` fixture hands one to a test, which calls it to start a server.

    :ivar servers: Every server started, in order.
    """

    def __init__(self, work_dir: Path, executable: str) -> None:
        """Start nothing yet.

        :param work_dir: Existing directory for the servers' cwd and logs.
        :param executable: Path of ``redis-server``.
        """
        self.work_dir = work_dir
        self.executable = executable
        self.servers: list[RedisServer] = []

    def __call__(self) -> RedisServer:
        """Start a new redis-server on a free port.

        :returns: The running server.
        """
        server = RedisServer(self.work_dir, executable=self.executable)
        self.servers.append(server)
        return server.start()

    def stop_all(self) -> None:
        """Stop every server started.

        :raises Exception: The first error of a stop, after trying every one.
        """
        stop_each(server.stop for server in self.servers)

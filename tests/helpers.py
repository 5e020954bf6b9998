"""Plain helper functions and classes used by the test fixtures.

Everything here talks to ``127.0.0.1`` only, every wait is bounded both in
iterations and in wall-clock time, and every process started is stopped by
its own pid (never by name).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from signal import SIGHUP, SIGTERM
from types import TracebackType
from typing import Protocol
from urllib.parse import urlsplit

import psutil
import pytest
import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "HOST",
    "REDIS_MISSING_MESSAGE",
    "REPO_ROOT",
    "TESTS_DIR",
    "GunicornFactory",
    "GunicornServer",
    "RawResponse",
    "RedisFactory",
    "RedisServer",
    "StreamClosedError",
    "free_port",
    "raw_sse",
    "redis_server_executable",
    "require_redis_server",
    "start_gunicorn",
    "wait_for",
]

HOST = "127.0.0.1"
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
REDIS_MISSING_MESSAGE = (
    "redis-server is not on PATH; install the Debian package redis-server "
    "(apt-get install redis-server) to run the Redis tests"
)

_POLL_INTERVAL = 0.05


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    :returns: The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def _port_accepts(port: int, timeout: float = 0.5) -> bool:
    """Tell whether a TCP connect to ``127.0.0.1:port`` succeeds.

    :param port: The port.
    :param timeout: Connect timeout in seconds.
    :returns: ``True`` if the connection was accepted.
    """
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    interval: float = _POLL_INTERVAL,
) -> bool:
    """Poll *condition* until it is true or *timeout* seconds have passed.

    The loop is bounded both by time and by ``timeout / interval + 1``
    iterations.

    :param condition: Called repeatedly; must itself return promptly.
    :param timeout: Maximum seconds to wait.
    :param interval: Seconds to sleep between polls.
    :returns: ``True`` if the condition became true, ``False`` on timeout.
    """
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if condition():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(interval, remaining))
    return condition()


def _kill_pids(procs: Sequence[psutil.Process]) -> None:
    """SIGKILL the given processes if they are still the same running processes.

    :param procs: Processes captured earlier with :mod:`psutil`; psutil
        checks their creation time, so a recycled pid is never signalled.
    """
    for proc in procs:
        try:
            if proc.is_running():
                proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(procs), timeout=5)


def _children(pid: int) -> list[psutil.Process]:
    """Return all descendants of *pid* (empty if it is gone).

    :param pid: The parent process id.
    :returns: The descendant processes.
    """
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


# -- gunicorn ----------------------------------------------------------------


def _signal_handlers_installed(pid: int) -> bool:
    """Tell whether a gunicorn worker has installed its own signal handlers.

    A freshly forked worker still has the master's handlers; until the
    worker replaces them (``Worker.init_signals``), a signal sent to it is
    queued in a copy of the master's queue and lost.  The worker resets
    SIGHUP to the default action while the master catches it, so the SIGHUP
    bit of ``SigCgt`` in ``/proc/<pid>/status`` tells the two states apart.
    Where ``/proc`` is unavailable this cannot be observed and ``True`` is
    returned.

    :param pid: The worker's pid.
    :returns: ``False`` while the worker still carries the master's handlers.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return not Path("/proc/self/status").exists()
    except OSError:
        return True
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            caught = int(line.split()[1], 16)
            return not caught & (1 << (SIGHUP - 1))
    return True


class GunicornServer:
    """A gunicorn master process started by :func:`start_gunicorn`.

    :ivar port: The port it listens on (127.0.0.1).
    :ivar url: ``http://127.0.0.1:<port>``.
    :ivar proc: The master's :class:`subprocess.Popen`.
    :ivar log_path: File receiving the master's and workers' stdout/stderr.
    """

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        """Wrap an already started master.

        :param proc: The master process.
        :param port: Its port.
        :param log_path: Its log file.
        """
        self.proc = proc
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.log_path = log_path
        self._seen: dict[int, psutil.Process] = {}

    def log_text(self) -> str:
        """Return everything logged so far.

        :returns: The log file's contents (undecodable bytes replaced).
        """
        try:
            return self.log_path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def booted_workers(self) -> int:
        """Count the ``Booting worker with pid`` lines logged so far.

        :returns: The number of workers booted since start (reloads add more).
        """
        return self.log_text().count("Booting worker with pid")

    def worker_pids(self) -> list[int]:
        """Return the pids of the master's current child processes.

        :returns: Sorted pids (empty if the master has exited).
        """
        if self.proc.poll() is not None:
            return []
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []
        self._track(children)
        return sorted(child.pid for child in children)

    def _track(self, procs: Sequence[psutil.Process] | None = None) -> None:
        """Remember descendants of the master, to clean them up in :meth:`stop`.

        Only called while the master has not been reaped, so its pid cannot
        have been reused; psutil re-checks identity before signalling.

        :param procs: Processes to remember; by default all current
            descendants of the master.
        """
        if procs is None:
            procs = _children(self.proc.pid) if self.proc.poll() is None else []
        for proc in procs:
            self._seen.setdefault(proc.pid, proc)

    def workers_ready(self, count: int) -> bool:
        """Tell whether at least *count* workers have installed their own
        signal handlers (so signals the master forwards to them are not lost).

        :param count: Number of workers expected.
        :returns: ``True`` if that many are initialised.
        """
        ready = [pid for pid in self.worker_pids() if _signal_handlers_installed(pid)]
        return len(ready) >= count

    def running(self) -> bool:
        """Tell whether the master is still running.

        :returns: ``True`` if it has not exited.
        """
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send *sig* to the master (no-op if it has exited).

        :param sig: Signal number.
        """
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def reload(self) -> None:
        """Ask the master to reload (SIGHUP): new workers replace the old."""
        self.signal(SIGHUP)

    def stop(self, sig: int = SIGTERM, timeout: float = 15) -> float:
        """Stop the master with *sig* and wait for it to exit.

        If it has not exited after *timeout* seconds, the master and the
        workers it had are killed with SIGKILL.  Workers still running after
        the master exited are killed too (only processes seen as its
        descendants, by pid, with psutil's pid-reuse check).

        :param sig: The signal to send first (SIGTERM: graceful shutdown).
        :param timeout: Seconds to wait before SIGKILL.
        :returns: Seconds from sending *sig* until the master had exited
            (``0.0`` if it had already exited).
        """
        if self.proc.poll() is not None:
            _kill_pids(list(self._seen.values()))
            return 0.0
        self._track()
        start = time.monotonic()
        self.signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._track()
            self.proc.kill()
            _kill_pids(list(self._seen.values()))
            self.proc.wait(timeout=10)
        elapsed = time.monotonic() - start
        _kill_pids(list(self._seen.values()))
        return elapsed


class GunicornFactory(Protocol):
    """Signature of the ``gunicorn`` fixture's factory."""

    def __call__(
        self,
        app: str,
        *,
        workers: int = 1,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        config: str | None = None,
        timeout: float = 20,
        port: int | None = None,
    ) -> GunicornServer:
        """Start gunicorn serving *app*; see :func:`start_gunicorn`."""
        ...


def _pythonpath(extra: str | None) -> str:
    """Build ``PYTHONPATH`` with the repo root and the tests directory.

    :param extra: Entries to put first (a caller-supplied ``PYTHONPATH``).
    :returns: The combined value.
    """
    parts = [p for p in (extra or "").split(os.pathsep) if p]
    parts += [str(REPO_ROOT), str(TESTS_DIR)]
    parts += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


def start_gunicorn(
    app: str,
    *,
    log_dir: Path,
    workers: int = 1,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
    config: str | None = None,
    timeout: float = 20,
    port: int | None = None,
) -> GunicornServer:
    """Start ``gunicorn -k gevent`` on a free 127.0.0.1 port and wait for it.

    The command is ``python -m gunicorn -k gevent -w WORKERS -b 127.0.0.1:PORT
    [-c CONFIG] *ARGS APP``, run from the repository root in a new session.
    The environment is the current one plus ``PYTHONPATH`` (the repository
    root and the tests directory; a ``PYTHONPATH`` in *env* is put first),
    ``PYTHONUNBUFFERED=1`` and ``XDG_RUNTIME_DIR`` pointing at *log_dir* (so
    gunicorn's control socket, if the version has one, is private to this
    server), then *env*.

    Readiness: a TCP connect to the port succeeds, when ``workers > 1`` the
    log shows at least *workers* ``Booting worker with pid`` lines, and (on
    Linux) at least *workers* workers have replaced the master's signal
    handlers with their own (see :meth:`GunicornServer.workers_ready`), so a
    signal sent right after start is not lost.  (Workers install their
    handlers before importing the app, so an app that fails to import may
    still be reported as ready; the master exits shortly afterwards.)

    :param app: The WSGI app, e.g. ``"apps.plain:app"``.
    :param log_dir: Existing directory for the log file.
    :param workers: Number of worker processes.
    :param env: Extra environment variables.
    :param args: Extra gunicorn arguments, placed before *app*.
    :param config: A gunicorn config file (``-c``).
    :param timeout: Maximum seconds to wait for readiness.
    :param port: Port to listen on instead of a free one (e.g. the port of a
        server stopped before, to restart it where its clients reconnect).
    :returns: The running server.
    :raises RuntimeError: If the master exits or is not ready in time; the
        message contains the log.  The process is stopped first.
    """
    if port is None:
        port = free_port()
    log_path = log_dir / f"gunicorn-{port}.log"
    for run in range(2, 1000):  # a restart on the same port keeps the earlier log
        if not log_path.exists():
            break
        log_path = log_dir / f"gunicorn-{port}-{run}.log"
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        "-k",
        "gevent",
        "-w",
        str(workers),
        "-b",
        f"{HOST}:{port}",
        *(["-c", config] if config else []),
        *args,
        app,
    ]
    extra = dict(env or {})
    full_env = dict(os.environ)
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env["XDG_RUNTIME_DIR"] = str(log_dir)
    full_env.update(extra)
    full_env["PYTHONPATH"] = _pythonpath(extra.get("PYTHONPATH"))
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = GunicornServer(proc, port, log_path)

    def ready() -> bool:
        if proc.poll() is not None:
            return True
        if not _port_accepts(port):
            return False
        if workers > 1 and server.booted_workers() < workers:
            return False
        return server.workers_ready(workers)

    ok = wait_for(ready, timeout)
    if proc.poll() is not None or not ok:
        reason = (
            f"exited with code {proc.returncode}"
            if proc.poll() is not None
            else f"not ready after {timeout}s"
        )
        server.stop(timeout=5)
        raise RuntimeError(f"gunicorn {' '.join(cmd[3:])} {reason}; log:\n{server.log_text()}")
    return server


# -- redis ---------------------------------------------------------------------


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
        if "CI" in os.environ:
            pytest.fail(REDIS_MISSING_MESSAGE, pytrace=False)
        pytest.skip(REDIS_MISSING_MESSAGE)
    return exe


class RedisServer:
    """A throwaway ``redis-server`` on 127.0.0.1 with persistence disabled.

    :ivar port: Its port (kept across :meth:`stop` / :meth:`start`).
    :ivar url: ``redis://127.0.0.1:<port>/0``.
    :ivar proc: The current process, or ``None`` when stopped.
    """

    def __init__(
        self, work_dir: Path, port: int | None = None, executable: str | None = None
    ) -> None:
        """Prepare (but do not start) a server.

        :param work_dir: Existing directory used as cwd and for the log.
        :param port: Port to use; a free one by default.
        :param executable: Path of ``redis-server``; looked up on ``PATH``
            by default.
        :raises FileNotFoundError: If ``redis-server`` cannot be found.
        """
        exe = executable or redis_server_executable()
        if exe is None:
            raise FileNotFoundError(REDIS_MISSING_MESSAGE)
        self.executable = exe
        self.work_dir = work_dir
        self.port = port if port is not None else free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.log_path = work_dir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[redis.Redis] = []

    def log_text(self) -> str:
        """Return everything the server logged (all runs).

        :returns: The log file's contents.
        """
        try:
            return self.log_path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _ping(self) -> bool:
        """Tell whether the server answers ``PING``.

        :returns: ``True`` if it answered.
        """
        client = redis.Redis(
            host=HOST,
            port=self.port,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),  # redis-py retries with backoff by default
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
        cmd = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ]
        with open(self.log_path, "ab") as log_file:
            proc = subprocess.Popen(
                cmd,
                cwd=self.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
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
        if proc.poll() is None:
            try:
                proc.send_signal(SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            except ProcessLookupError:
                proc.wait(timeout=10)
        self.proc = None

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


class RedisFactory(Protocol):
    """Signature of the ``redis_server`` fixture's factory."""

    def __call__(self) -> RedisServer:
        """Start a new redis-server on a free port."""
        ...


# -- raw HTTP client -----------------------------------------------------------


class StreamClosedError(TimeoutError):
    """The body ended before the awaited condition became true.

    Subclasses :class:`TimeoutError` because, to a caller waiting for data,
    it means the same thing: the data did not arrive.

    :ivar body: The decoded body received before the end.
    """

    def __init__(self, message: str, body: bytes = b"") -> None:
        super().__init__(message)
        self.body = body


class _ChunkedDecoder:
    """Incremental decoder for ``Transfer-Encoding: chunked`` bodies."""

    def __init__(self) -> None:
        """Start before the first chunk-size line."""
        self._buf = bytearray()
        self._state = "size"
        self._remaining = 0
        self.done = False
        self.chunk_sizes: list[int] = []

    def feed(self, data: bytes) -> bytes:
        """Consume raw wire bytes.

        :param data: The next bytes of the message body.
        :returns: The payload bytes decoded from them.
        :raises ValueError: On malformed framing.
        """
        self._buf += data
        out = bytearray()
        # Each iteration consumes bytes or returns, so len(buf) + 2 bounds it.
        for _ in range(len(self._buf) + 2):
            if self._state == "size":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    break
                line = bytes(self._buf[:end])
                del self._buf[: end + 2]
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ValueError(f"bad chunk size line {line!r}") from None
                self.chunk_sizes.append(size)
                if size == 0:
                    self._state = "trailer"
                else:
                    self._remaining = size
                    self._state = "data"
            elif self._state == "data":
                if not self._buf:
                    break
                take = bytes(self._buf[: self._remaining])
                del self._buf[: len(take)]
                out += take
                self._remaining -= len(take)
                if self._remaining == 0:
                    self._state = "data-end"
            elif self._state == "data-end":
                if len(self._buf) < 2:
                    break
                if self._buf[:2] != b"\r\n":
                    raise ValueError(f"missing CRLF after chunk: {bytes(self._buf[:2])!r}")
                del self._buf[:2]
                self._state = "size"
            elif self._state == "trailer":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    break
                del self._buf[: end + 2]
                if end == 0:
                    self._state = "done"
                    self.done = True
            else:
                break
        return bytes(out)


class RawResponse:
    """An HTTP/1.1 response read straight off a socket by :func:`raw_sse`.

    :ivar status: The status code.
    :ivar reason: The reason phrase.
    :ivar http_version: E.g. ``"HTTP/1.1"``.
    :ivar headers: ``(name, value)`` pairs in wire order, names exactly as
        sent, values with surrounding whitespace removed.
    :ivar raw_bytes: Every byte received on the wire so far (status line and
        headers included, chunk framing not removed).
    :ivar body: The decoded body received so far.
    :ivar chunked: Whether the body uses chunked transfer encoding.
    :ivar complete: Whether the whole body has been received (last chunk,
        ``Content-Length`` reached, or connection closed).
    :ivar eof: Whether the peer closed the connection.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        """Read the status line and headers from *sock*.

        :param sock: A connected socket on which the request was sent.
        :param timeout: Maximum seconds to wait for the complete header.
        :raises TimeoutError: If the header does not arrive in time.
        :raises ValueError: If the status line is malformed.
        """
        self._sock = sock
        self.raw_bytes = b""
        self.body = b""
        self.eof = False
        self.complete = False
        self.headers: list[tuple[str, str]] = []
        head, rest = self._read_head(timeout)
        lines = head.decode("iso-8859-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise ValueError(f"bad status line {lines[0]!r}")
        self.http_version = parts[0]
        self.status = int(parts[1])
        self.reason = parts[2] if len(parts) > 2 else ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers.append((name, value.strip(" \t")))
        codings = [
            c.strip().lower() for v in self.get_all("Transfer-Encoding") for c in v.split(",")
        ]
        self.chunked = bool(codings) and codings[-1] == "chunked"
        self._decoder = _ChunkedDecoder() if self.chunked else None
        length = self.header("Content-Length")
        self._length: int | None = None if self.chunked or length is None else int(length)
        if self.status in (204, 304) or 100 <= self.status < 200:
            self._length = 0
        self._absorb(rest)

    def _read_head(self, timeout: float) -> tuple[bytes, bytes]:
        """Receive until the blank line ending the header block.

        :param timeout: Maximum seconds.
        :returns: The header block (without the final CRLFCRLF) and any body
            bytes received after it.
        :raises TimeoutError: If it does not arrive in time.
        :raises StreamClosedError: If the peer closes first.
        """
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            end = self.raw_bytes.find(b"\r\n\r\n")
            if end >= 0:
                return self.raw_bytes[:end], self.raw_bytes[end + 4 :]
            data = self._recv(deadline)
            if data is None:
                raise TimeoutError(
                    f"no complete response header within {timeout}s; got {self.raw_bytes!r}"
                )
            if not data:
                raise StreamClosedError(f"connection closed in header; got {self.raw_bytes!r}")
            self.raw_bytes += data
        raise TimeoutError("response header too large")

    def _recv(self, deadline: float) -> bytes | None:
        """Receive once, waiting until *deadline* at most.

        :param deadline: :func:`time.monotonic` value.
        :returns: The bytes, ``b""`` at EOF, ``None`` on timeout.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
        return data

    def _absorb(self, data: bytes) -> None:
        """Add wire body bytes to :attr:`body`.

        :param data: Raw body bytes.
        """
        if self._decoder is not None:
            self.body += self._decoder.feed(data)
            self.complete = self._decoder.done
        elif self._length is not None:
            self.body += data[: max(0, self._length - len(self.body))]
            self.complete = len(self.body) >= self._length
        else:
            self.body += data

    @property
    def chunk_sizes(self) -> list[int]:
        """Return the sizes of the chunks received so far (chunked only).

        :returns: Sizes in order; a final ``0`` marks the last chunk.
        """
        return list(self._decoder.chunk_sizes) if self._decoder else []

    def header(self, name: str) -> str | None:
        """Return the first value of header *name* (case-insensitive).

        :param name: Header name.
        :returns: The value or ``None``.
        """
        values = self.get_all(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        """Return every value of header *name* (case-insensitive), in order.

        :param name: Header name.
        :returns: The values.
        """
        lowered = name.lower()
        return [v for n, v in self.headers if n.lower() == lowered]

    def read_body_until(self, predicate: Callable[[bytes], bool], timeout: float) -> bytes:
        """Receive until ``predicate(body)`` is true.

        :param predicate: Called with the whole decoded body received so far.
        :param timeout: Maximum seconds to wait.
        :returns: The decoded body received so far.
        :raises TimeoutError: If the predicate is not true in time.
        :raises StreamClosedError: (a :class:`TimeoutError`) if the body ended
            or the connection closed before the predicate became true.
        """
        deadline = time.monotonic() + timeout
        for _ in range(1_000_000):
            if predicate(self.body):
                return self.body
            if self.complete or self.eof:
                raise StreamClosedError(
                    f"body ended before the condition was met; body={self.body!r}", self.body
                )
            data = self._recv(deadline)
            if data is None:
                raise TimeoutError(f"condition not met within {timeout}s; body={self.body!r}")
            if not data:
                if self._length is None and not self.chunked:
                    self.complete = True
                continue
            self.raw_bytes += data
            self._absorb(data)
        raise TimeoutError("too many reads")

    def read_to_end(self, timeout: float) -> bytes:
        """Receive until the body is complete or the connection closes.

        :param timeout: Maximum seconds to wait.
        :returns: The decoded body.
        :raises TimeoutError: If it does not end in time.
        """
        deadline = time.monotonic() + timeout
        for _ in range(1_000_000):
            if self.complete or self.eof:
                return self.body
            data = self._recv(deadline)
            if data is None:
                raise TimeoutError(f"body did not end within {timeout}s; body={self.body!r}")
            if data:
                self.raw_bytes += data
                self._absorb(data)
            elif self._length is None and not self.chunked:
                self.complete = True
        raise TimeoutError("too many reads")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._sock.close()

    def __enter__(self) -> RawResponse:
        """Return ``self``.

        :returns: This response.
        """
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the connection."""
        self.close()


def raw_sse(
    url: str,
    path: str,
    headers: dict[str, str] | None = None,
    timeout: float = 5,
) -> RawResponse:
    """Send ``GET path HTTP/1.1`` over a plain socket and read the header.

    Sends ``Host`` and ``Accept: text/event-stream`` unless *headers* has
    them (compared case-insensitively), then *headers* as given.

    :param url: ``http://host:port`` of the server.
    :param path: Request target, e.g. ``"/stream?channel=a"``.
    :param headers: Extra request headers.
    :param timeout: Seconds for connecting and for receiving the header.
    :returns: The response, with the connection still open for the body.
    :raises TimeoutError: If the header does not arrive in time.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"unsupported URL {url!r}")
    port = parts.port or 80
    host = parts.hostname
    given = dict(headers or {})
    names = {name.lower() for name in given}
    request_headers: list[tuple[str, str]] = []
    if "host" not in names:
        request_headers.append(("Host", f"{host}:{port}"))
    if "accept" not in names:
        request_headers.append(("Accept", "text/event-stream"))
    request_headers.extend(given.items())
    request = f"GET {path or '/'} HTTP/1.1\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in request_headers
    )
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(request.encode("latin-1") + b"\r\n")
        return RawResponse(sock, timeout)
    except BaseException:
        sock.close()
        raise

"""The servers under test, the client process, and how each is started, measured and stopped.

Every process is started with :class:`subprocess.Popen` and tracked in :data:`REGISTRY` as a
:class:`psutil.Process` (which checks the creation time, so a recycled pid is never
signalled); :func:`stop_all` ends them by pid. Every wait is bounded.

A *target* is a server the benchmark compares. A mode (see ``broadcast.py``) builds its
Flask target plus any helper *services*: ``--mode redis`` is a :class:`FlaskTarget` with
``workers=4``, ``SSE_BUS_URL`` in ``env`` and a :class:`RedisService` whose CPU is measured
apart from the workers'.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psutil
from benchutil import HOST, STREAM_PATH, read_log

if TYPE_CHECKING:
    import redis
    from support.redis_server import RedisServer

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

#: Every process this run started (servers, their workers, clients, services).
REGISTRY: list[psutil.Process] = []


def track(pid: int) -> psutil.Process | None:
    """Remember process *pid* for :func:`stop_all`."""
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return None
    if all(p.pid != proc.pid for p in REGISTRY):
        REGISTRY.append(proc)
    return proc


def stop_procs(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGTERM *procs*, wait up to *timeout* seconds, then SIGKILL what is left."""
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running():
                proc.send_signal(signal.SIGTERM)
                alive.append(proc)
    _, left = psutil.wait_procs(alive, timeout=timeout)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=5)


def stop_all() -> None:
    """Stop every process in :data:`REGISTRY` (children first), by pid."""
    procs = list(reversed(REGISTRY))
    stop_procs(procs, timeout=5)
    REGISTRY.clear()


def http_request(
    port: int, method: str, path: str, timeout: float
) -> tuple[int, dict[str, Any] | str]:
    """One HTTP request to 127.0.0.1:*port*; the JSON answer, or the text when not JSON."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Content-Length": "0"} if method == "POST" else {})
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
    finally:
        conn.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, body


def _sum_cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


class RedisService:
    """A throwaway ``redis-server`` on a free 127.0.0.1 port without persistence, started by
    the tests' launcher (:class:`support.redis_server.RedisServer`).

    Started once per benchmark invocation and tracked in :data:`REGISTRY`; :meth:`stop` ends
    it by pid (SIGTERM, SIGKILL after a bounded wait). :meth:`reset` empties it before each
    run, so every run starts from the same (empty) stream. Only the redis mode uses it, so
    redis-py (which the launcher needs) is imported when it starts.
    """

    name = "redis-server"

    def __init__(self, log_dir: Path, args: list[str] | None = None) -> None:
        self.log_dir = log_dir
        #: More ``redis-server`` options (``--maxclients 20000``).
        self.args = list(args or [])
        self.server: RedisServer | None = None
        self.ps: psutil.Process | None = None
        self._client: redis.Redis | None = None

    def start(self, timeout: float = 10.0) -> dict[str, str]:
        """Start redis-server, wait (at most *timeout* s) for ``PING``; return its settings."""
        from support.redis_server import RedisServer, redis_server_executable

        if redis_server_executable() is None:
            raise RuntimeError("redis-server is not on PATH (Debian package redis-server)")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.server = RedisServer(self.log_dir, args=self.args).start(timeout)
        assert self.server.proc is not None
        self.ps = track(self.server.proc.pid)
        self._client = self.server.client(socket_timeout=10)
        return {"SSE_BUS_URL": self.server.url}

    def client_names(self) -> dict[str, int]:
        """How many connections redis-server has under each client name (``CLIENT LIST``);
        the Redis bus names its connections ``flask-sse-push:receive:<pid>`` and
        ``flask-sse-push:publish:<pid>``. Empty when the server cannot be asked."""
        from redis.exceptions import RedisError

        if self._client is None:
            return {}
        try:
            clients = self._client.client_list()
        except RedisError:
            return {}
        return dict(Counter(c["name"] for c in clients if c.get("name")))

    def subscribers(self, channel: str) -> int:
        """How many pub/sub subscribers *channel* has (``PUBSUB NUMSUB``); 0 when unknown."""
        from redis.exceptions import RedisError

        if self._client is None:
            return 0
        try:
            return int(dict(self._client.pubsub_numsub(channel)).get(channel.encode(), 0))
        except RedisError:
            return 0

    def reset(self) -> None:
        """Empty the server (``FLUSHALL``) before a run."""
        assert self._client is not None and self.server is not None
        if not self._client.flushall():
            raise RuntimeError(f"redis-server FLUSHALL failed; see {self.server.log_path}")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of redis-server so far."""
        return _sum_cpu([self.ps]) if self.ps is not None else 0.0

    def stop(self) -> None:
        """Stop redis-server by pid (SIGTERM, SIGKILL after 5 s)."""
        if self.server is not None:
            self.server.stop(timeout=5)
        if self.ps is not None and self.ps in REGISTRY:
            REGISTRY.remove(self.ps)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of redis-server's log."""
        return tail(self.server.log_path if self.server is not None else None, lines)


def tail(path: Path | None, lines: int) -> str:
    """The last *lines* lines of the log at *path* (empty when there is none)."""
    return "\n".join(read_log(path).splitlines()[-lines:])


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(BENCH_DIR), str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Target(ABC):
    """A server under test."""

    #: Name shown in the table.
    name: str = ""

    def __init__(self) -> None:
        #: Helper processes serving this target (redis-server): their CPU is measured, and
        #: reported, apart from the workers'.
        self.services: list[RedisService] = []
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self._log: IO[bytes] | None = None
        #: The processes whose CPU and RSS are measured (gunicorn: the workers).
        self.measured: list[psutil.Process] = []

    stream_path = STREAM_PATH
    #: When the client counts a stream as open: at its first body bytes (``"body"``), or
    #: once its request is written (``"sent"``: the server sends nothing before the first
    #: event; :meth:`wait_ready` then tells when the server holds the streams).
    ready = "body"

    def wait_ready(self, streams: int, timeout: float) -> int:
        """Wait (at most *timeout* s) until the server holds *streams* streams of the
        channel ``bench``; return how many it holds (default: no way to tell, *streams*)."""
        return streams

    @abstractmethod
    def command(self, port: int, clients: int) -> tuple[list[str], dict[str, str]]:
        """The command line and extra environment to start the server."""

    @abstractmethod
    def expected_workers(self) -> int:
        """How many processes serve (and are measured)."""

    def start(self, port: int, clients: int, log_path: Path, timeout: float = 30.0) -> None:
        """Start the server and wait (at most *timeout* s) until every worker answers."""
        argv, extra = self.command(port, clients)
        self.port = port
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=_child_env(extra),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        track(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start; see {log_path}")
            self.measured = self.find_workers()
            if len(self.measured) == self.expected_workers() and self._answers():
                for proc in self.measured:
                    track(proc.pid)
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start within {timeout:.0f} s; see {log_path}")

    def settle(self, timeout: float = 10.0, window: float = 0.5) -> float:
        """Wait until every measured process has booted and is idle; return the seconds waited.

        :meth:`start` returns once ONE worker answers; the others may still be importing the
        app, and their memory would count as the connections'. So: a few requests (which the
        kernel spreads over the workers, so each handles its first request now), then wait
        (at most *timeout* s) until, over *window* seconds, no process used more than 20 ms
        of CPU and none grew by more than 64 KB.
        """
        started = time.monotonic()
        for _ in range(10 * len(self.measured)):
            with contextlib.suppress(OSError):
                http_request(self.port, "GET", "/bench/ping", timeout=2)
        deadline = started + timeout
        before = self._usage()
        while time.monotonic() < deadline:
            time.sleep(window)
            after = self._usage()
            if all(
                cpu1 - cpu0 <= 0.02 and rss1 - rss0 <= 65536
                for (cpu0, rss0), (cpu1, rss1) in zip(before, after, strict=True)
            ):
                break
            before = after
        return time.monotonic() - started

    def _usage(self) -> list[tuple[float, int]]:
        return [(_sum_cpu([p]), p.memory_info().rss) for p in self.measured]

    def find_workers(self) -> list[psutil.Process]:
        """The serving processes (default: the started process itself)."""
        assert self.proc is not None
        proc = track(self.proc.pid)
        return [proc] if proc is not None else []

    def _answers(self) -> bool:
        try:
            status, _ = http_request(self.port, "GET", "/bench/ping", timeout=2)
        except OSError:
            return False
        return status == 200

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the measured processes so far."""
        return _sum_cpu(self.measured)

    def service_cpu_seconds(self) -> float:
        """User + system CPU seconds of the helper services so far."""
        return sum(service.cpu_seconds() for service in self.services)

    def stream_peers(self) -> list[list[tuple[str, int]]]:
        """Per measured process, the remote (client) addresses of its established
        connections to the server's port: which worker the kernel handed each client to."""
        out: list[list[tuple[str, int]]] = []
        for proc in self.measured:
            try:
                conns = proc.net_connections(kind="tcp")
            except psutil.Error:
                conns = []
            out.append(
                [
                    (c.raddr.ip, c.raddr.port)
                    for c in conns
                    if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.port and c.raddr
                ]
            )
        return out

    def streams_by_worker(self) -> list[set[int]]:
        """Per measured process, the remote ports of :meth:`stream_peers` (one client
        address)."""
        return [{port for _, port in peers} for peers in self.stream_peers()]

    def rss_bytes(self) -> int:
        """Resident memory of the measured processes."""
        return sum(self.rss_by_worker())

    def rss_by_worker(self) -> list[int]:
        """Resident memory of each measured process."""
        return [proc.memory_info().rss for proc in self.measured]

    def stop(self) -> None:
        """Stop the server and its workers by pid (SIGTERM, then SIGKILL after 10 s)."""
        procs: list[psutil.Process] = []
        if self.proc is not None:
            master = track(self.proc.pid)
            if master is not None:
                procs.append(master)
        stop_procs(procs, timeout=10)
        stop_procs(self.measured, timeout=2)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
        for proc in [*procs, *self.measured]:
            if proc in REGISTRY:
                REGISTRY.remove(proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log."""
        return tail(self.log_path, lines)


class GunicornTarget(Target):
    """A WSGI app under ``gunicorn -k gevent -w W``, as the peers' documentation serves it:
    *app* is gunicorn's app argument (``peers:create_queue_app()``), *env* is added to the
    environment, and ``--worker-connections`` is raised above the client count (gunicorn's
    default of 1000 would cap the streams)."""

    def __init__(
        self,
        name: str,
        app: str,
        workers: int = 1,
        env: dict[str, str] | None = None,
        *,
        services: list[RedisService] | None = None,
        ready: str = "body",
    ) -> None:
        super().__init__()
        self.name = name
        self.app = app
        self.workers = workers
        self.env = dict(env or {})
        self.services = list(services or [])
        self.ready = ready

    def gunicorn_argv(self, port: int, *options: str) -> list[str]:
        """gunicorn's command line with the gevent worker, *options*, and the app."""
        return [
            sys.executable,
            "-m",
            "gunicorn",
            *options,
            "-k",
            "gevent",
            "-w",
            str(self.workers),
            "-b",
            f"{HOST}:{port}",
            "--no-control-socket",
            "--pythonpath",
            str(BENCH_DIR),
            self.app,
        ]

    def command(self, port: int, clients: int) -> tuple[list[str], dict[str, str]]:
        # A peer's streams never end by themselves: without a short graceful timeout every
        # stop would wait gunicorn's 30 s (this changes nothing while it serves).
        options = ["--worker-connections", str(clients + 200), "--graceful-timeout", "2"]
        return self.gunicorn_argv(port, *options), self.env

    def wait_ready(self, streams: int, timeout: float) -> int:
        """With a Redis helper, the pub/sub subscribers of ``bench`` (flask-sse subscribes
        each stream), else *streams*."""
        if self.ready != "sent" or not self.services:
            return streams
        deadline = time.monotonic() + timeout
        held = self.services[0].subscribers("bench")
        while held < streams and time.monotonic() < deadline:
            time.sleep(0.2)
            held = self.services[0].subscribers("bench")
        return held

    def expected_workers(self) -> int:
        return self.workers

    def find_workers(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []


class UvicornTarget(Target):
    """An ASGI app factory under ``uvicorn --factory`` (one process)."""

    def __init__(self, name: str, factory: str) -> None:
        super().__init__()
        self.name = name
        self.factory = factory

    def command(self, port: int, clients: int) -> tuple[list[str], dict[str, str]]:
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            self.factory,
            "--host",
            HOST,
            "--port",
            str(port),
            "--backlog",
            "2048",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        return argv, {}

    def expected_workers(self) -> int:
        return 1


class FlaskTarget(GunicornTarget):
    """``benchmarks/app.py`` under gunicorn with the gevent worker and the package's config
    module; *env* is added to the environment (e.g. ``SSE_BUS_URL``). With *metrics* the app
    serves Prometheus metrics at ``/metrics``, in multiprocess mode on a fresh
    ``PROMETHEUS_MULTIPROC_DIR`` per start (removed at stop), as in production."""

    def __init__(
        self,
        workers: int = 1,
        env: dict[str, str] | None = None,
        *,
        name: str | None = None,
        services: list[RedisService] | None = None,
        metrics: bool = False,
    ) -> None:
        super().__init__(name or "flask-sse-push", "app:app", workers, env, services=services)
        self.metrics = metrics
        self._metrics_dir: str | None = None

    def command(self, port: int, clients: int) -> tuple[list[str], dict[str, str]]:
        argv = self.gunicorn_argv(port, "-c", "python:flask_sse_push.gunicorn_conf")
        max_connections = max(5000, clients + 100)
        env = {
            "BENCH_MAX_CONNECTIONS": str(max_connections),
            # Above the extension's cap (the config module warns otherwise), and so above the
            # client count, with room for the control requests.
            "SSE_WORKER_CONNECTIONS": str(max_connections + 100),
            **self.env,
        }
        if self.metrics:
            self._metrics_dir = tempfile.mkdtemp(prefix="sse-bench-metrics-")
            env.update({"BENCH_METRICS": "1", "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir})
        return argv, env

    def scrape(self) -> dict[str, float]:
        """The app's metrics (summed over the workers), or ``{}`` without metrics."""
        if not self.metrics:
            return {}
        from prometheus_client.parser import text_string_to_metric_families

        status, text = http_request(self.port, "GET", "/metrics", timeout=10)
        if status != 200 or not isinstance(text, str):
            raise RuntimeError(f"{self.name}: /metrics answered {status}")
        wanted = {
            "sse_events_published_total",
            "sse_deliveries_total",
            "sse_delivery_lag_seconds_count",
            "sse_delivery_lag_seconds_sum",
            "sse_slow_clients_dropped_total",
        }
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name in wanted
        }

    def stop(self) -> None:
        super().stop()
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._metrics_dir = None


class BareTarget(Target):
    """``benchmarks/bare.py``: the bare gevent broadcaster."""

    name = "bare gevent"

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        if name is not None:
            self.name = name

    def command(self, port: int, clients: int) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, str(BENCH_DIR / "bare.py"), "--port", str(port)], {}

    def expected_workers(self) -> int:
        return 1


class ClientProcess:
    """``benchmarks/sse_client.py``, driven by JSON lines over its stdin and stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "sse_client.py")],
            cwd=REPO_ROOT,
            env=_child_env({}),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        track(self.proc.pid)
        self.ps = psutil.Process(self.proc.pid)
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def request(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send *command* and wait at most *timeout* seconds for the answer."""
        self.send(command)
        return self.answer(command, timeout)

    def send(self, command: dict[str, Any]) -> None:
        """Send *command* without waiting (several clients then work at once)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()

    def answer(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Wait at most *timeout* seconds for the answer to *command*."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            message = f"client gave no answer to {command['cmd']!r} in {timeout} s"
            raise TimeoutError(message) from None
        if line is None:
            raise RuntimeError(f"client exited (code {self.proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stop(self) -> None:
        """Ask the client to close its connections and exit; kill it after 5 s."""
        with contextlib.suppress(OSError, TimeoutError, RuntimeError, ValueError):
            if self.proc.poll() is None:
                self.request({"cmd": "close"}, timeout=5)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            stop_procs([self.ps], timeout=2)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self.ps in REGISTRY:
            REGISTRY.remove(self.ps)

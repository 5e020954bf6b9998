"""Starting and stopping ``gunicorn -k gevent`` on 127.0.0.1 (the ``gunicorn`` fixture)."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from signal import SIGHUP, SIGTERM

import psutil
import requests

from support.procs import (
    HOST,
    REPO_ROOT,
    TESTS_DIR,
    descendants,
    free_port,
    kill_all,
    port_accepts,
    read_log,
    stop_each,
    wait_for,
)

__all__ = ["GunicornFactory", "GunicornServer", "answering"]


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
    """A gunicorn master process started by :class:`GunicornFactory`.

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
        return read_log(self.log_path)

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
            procs = descendants(self.proc.pid) if self.proc.poll() is None else []
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
            kill_all(list(self._seen.values()))
            return 0.0
        self._track()
        start = time.monotonic()
        self.signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._track()
            self.proc.kill()
            kill_all(list(self._seen.values()))
            self.proc.wait(timeout=10)
        elapsed = time.monotonic() - start
        kill_all(list(self._seen.values()))
        return elapsed


class GunicornFactory:
    """Starts gunicorn servers, all logging into one directory, and stops them at the end.

    The ``gunicorn`` fixture hands one to a test, which calls it to start a server.

    :ivar log_dir: The directory of the servers' log files.
    :ivar servers: Every server started, in order.
    """

    def __init__(self, log_dir: Path) -> None:
        """Start nothing yet.

        :param log_dir: Existing directory for the log files.
        """
        self.log_dir = log_dir
        self.servers: list[GunicornServer] = []

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
        """Start ``gunicorn -k gevent`` on a free 127.0.0.1 port and wait for it.

        The command is ``python -m gunicorn -k gevent -w WORKERS -b 127.0.0.1:PORT
        [-c CONFIG] *ARGS APP``, run from the repository root in a new session.
        The environment is the current one plus ``PYTHONPATH`` (the repository
        root and the tests directory; a ``PYTHONPATH`` in *env* is put first),
        ``PYTHONUNBUFFERED=1`` and ``XDG_RUNTIME_DIR`` pointing at the log
        directory (so gunicorn's control socket, if the version has one, is
        private to this server), then *env*.

        Readiness: a TCP connect to the port succeeds, when ``workers > 1`` the
        log shows at least *workers* ``Booting worker with pid`` lines, and (on
        Linux) at least *workers* workers have replaced the master's signal
        handlers with their own (see :meth:`GunicornServer.workers_ready`), so a
        signal sent right after start is not lost.  (Workers install their
        handlers before importing the app, so an app that fails to import may
        still be reported as ready; the master exits shortly afterwards.)

        :param app: The WSGI app, e.g. ``"apps.plain:app"``.
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
        log_path = self._log_path(port)
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=self._environment(env or {}),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = GunicornServer(proc, port, log_path)
        self.servers.append(server)

        def ready() -> bool:
            if proc.poll() is not None:
                return True
            if not port_accepts(port):
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

    def _log_path(self, port: int) -> Path:
        """Choose the log file of a server on *port*.

        :param port: The server's port.
        :returns: ``gunicorn-PORT.log``, or ``gunicorn-PORT-N.log`` for a restart on the
            same port (which keeps the earlier log).
        """
        log_path = self.log_dir / f"gunicorn-{port}.log"
        for run in range(2, 1000):
            if not log_path.exists():
                break
            log_path = self.log_dir / f"gunicorn-{port}-{run}.log"
        return log_path

    def _environment(self, extra: dict[str, str]) -> dict[str, str]:
        """Build a server's environment (see :meth:`__call__`).

        :param extra: The caller's variables.
        :returns: The full environment.
        """
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["XDG_RUNTIME_DIR"] = str(self.log_dir)
        env.update(extra)
        parts = [p for p in extra.get("PYTHONPATH", "").split(os.pathsep) if p]
        parts += [str(REPO_ROOT), str(TESTS_DIR)]
        parts += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
        return env

    def stop_all(self) -> None:
        """Stop every server started (SIGTERM, then SIGKILL of its own processes after 10 s).

        :raises Exception: The first error of a stop, after trying every one.
        """
        stop_each(functools.partial(s.stop, SIGTERM, timeout=10) for s in self.servers)


def answering(server: GunicornServer, path: str, timeout: float = 20) -> GunicornServer:
    """Return *server* once its app answers ``GET path`` with 200 (gunicorn listens before
    the worker has loaded the app).

    :param server: The server.
    :param path: The path to ask.
    :param timeout: Maximum seconds to wait.
    :returns: *server*.
    :raises RuntimeError: If it does not answer in time; the message contains the log.
    """

    def healthy() -> bool:
        try:
            return requests.get(server.url + path, timeout=1).status_code == 200
        except requests.RequestException:
            return False

    if not wait_for(healthy, timeout):
        raise RuntimeError(f"the app did not answer {path}; log:\n{server.log_text()}")
    return server

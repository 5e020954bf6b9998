"""Process utilities: free ports, bounded waits, file limits, stopping processes by pid.

Everything here talks to ``127.0.0.1`` only, every wait is bounded both in iterations and in
wall-clock time, and every process is signalled by its own pid (never by name), through
:mod:`psutil`, which checks the creation time so that a recycled pid is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import psutil

__all__ = [
    "HOST",
    "REPO_ROOT",
    "TESTS_DIR",
    "descendants",
    "free_port",
    "kill_all",
    "port_accepts",
    "raise_nofile_limit",
    "read_log",
    "stop_each",
    "terminate",
    "wait_for",
]

HOST = "127.0.0.1"
TESTS_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = TESTS_DIR.parent

_POLL_INTERVAL = 0.05


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    :returns: The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def port_accepts(port: int, timeout: float = 0.5) -> bool:
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


def raise_nofile_limit(needed: int | None = None) -> tuple[int, int]:
    """Raise this process's open-file soft limit (``RLIMIT_NOFILE``).

    :param needed: The soft limit wanted; by default as high as the hard limit.  Never
        above the hard limit.
    :returns: The ``(soft, hard)`` limits in force afterwards (unchanged if the limit
        could not be raised).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    target = ceiling if needed is None else min(needed, ceiling)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, hard
    return target, hard


def kill_all(procs: Sequence[psutil.Process]) -> None:
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


def descendants(pid: int) -> list[psutil.Process]:
    """Return all descendants of *pid* (empty if it is gone).

    :param pid: The parent process id.
    :returns: The descendant processes.
    """
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Stop a child process with SIGTERM, and SIGKILL after *timeout* seconds.

    :param proc: The child (no-op if it has exited).
    :param timeout: Seconds to wait before SIGKILL.
    """
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def stop_each(stoppers: Iterable[Callable[[], object]]) -> None:
    """Call every stopper, even if some raise; re-raise the first error.

    :param stoppers: Callables stopping one server each.
    """
    first: BaseException | None = None
    for stop in stoppers:
        try:
            stop()
        except Exception as exc:
            first = first or exc
    if first is not None:
        raise first


def read_log(path: Path | None) -> str:
    """Return everything a process logged to *path* so far.

    :param path: The log file (``None``: not started yet).
    :returns: Its contents, undecodable bytes replaced; empty if there is no such file.
    """
    if path is None:
        return ""
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def missing(message: str) -> None:
    """Skip the current test, or fail it when ``CI`` is set (where everything must be
    installed).

    :param message: What is missing and how to install it.
    """
    import pytest  # here: the benchmarks use this package without pytest

    if "CI" in os.environ:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def start_logged(cmd: list[str], cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start *cmd* in *cwd* in a session of its own, its output appended to *log_path*.

    :returns: The process; the caller stops it.
    """
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def run_python(args: Sequence[str], env: dict[str, str] | None = None) -> str:
    """Run ``python ARGS`` from the repository root with the repository and the tests
    directory importable, bounded to 30 s; return its standard output.

    :raises AssertionError: When it fails, with its standard error.
    """
    done = subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]),
            **(env or {}),
        },
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout

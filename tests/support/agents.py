"""Driving the agent processes (:mod:`support.netload`, :mod:`support.lossy_link`): JSON lines
on their stdin, JSON lines back on their stdout, each answer awaited for a bounded time.

An agent runs on this host (:meth:`Agent.local`) or inside a host of a
:class:`~support.netns.Lab` (:meth:`Agent.__init__` with the process ``Host.popen`` made);
:meth:`Agent.stop` ends it, and the fixtures (or the lab) stop what a failing test left.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from support.procs import REPO_ROOT, TESTS_DIR, read_log, terminate

__all__ = ["AGENT_ENV", "Agent", "acked", "checked", "python_module"]

#: The environment an agent needs: the package and the tests' support importable.
AGENT_ENV = {"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{TESTS_DIR}", "PYTHONUNBUFFERED": "1"}


def python_module(module: str, *args: str) -> list[str]:
    """The command running ``python -m module args``."""
    return [sys.executable, "-m", module, *args]


class Agent:
    """An agent process, spoken to in JSON lines; its first line (``{"started": ...}``) is
    read at once and kept in :attr:`started`.

    :param proc: the process, with stdin and stdout pipes.
    :param log: where its stderr goes.
    """

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log
        self.started = self.read(60)

    @classmethod
    def local(cls, command: Sequence[str], log: Path) -> Agent:
        """Start *command* on this host, from the tests' directory."""
        with open(log, "ab") as log_file:
            proc = subprocess.Popen(
                list(command),
                cwd=TESTS_DIR,
                env={**os.environ, **AGENT_ENV},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                start_new_session=True,
            )
        try:
            return cls(proc, log)
        except BaseException:
            terminate(proc, 5)
            raise

    def read(self, timeout: float) -> dict[str, Any]:
        """The next answer, waited for at most *timeout* seconds."""
        assert self.proc.stdout is not None
        ready = select.select([self.proc.stdout], [], [], timeout)[0]
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            why = f"exit {self.proc.poll()}; stderr:\n{read_log(self.log)[-2000:]}"
            raise AssertionError(f"agent {self.proc.args!r} did not answer ({why})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def ask(self, command: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        """Send *command* and return the answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()
        return self.read(timeout)

    def stop(self, timeout: float = 10) -> None:
        """Close its stdin (which ends every agent), then wait; SIGTERM and SIGKILL after
        *timeout* seconds."""
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            terminate(self.proc, 5)


def acked(
    publishers: Sequence[Agent], command: str = "acked", failed: Any = None
) -> dict[str, float]:
    """The ids the publisher agents got back so far, with their publish times; the failures
    (time, source, why) go into *failed*."""
    ids: dict[str, float] = {}
    for publisher in publishers:
        reply = publisher.ask({"cmd": command})
        ids.update({event_id: t for event_id, t, _ in reply["acked"]})
        if failed is not None:
            failed += reply["failed"]
    return ids


def checked(agents: Sequence[Agent], expected: dict[str, float]) -> dict[str, Any]:
    """What the clients of every client agent received of *expected*, summed up."""
    results = [agent.ask({"cmd": "check", "expected": expected}, 120) for agent in agents]
    total = {k: sum(r[k] for r in results) for k in ("missing", "clients_missing", "duplicates")}
    total.update({k: sum(r[k] for r in results) for k in ("out_of_order", "resets", "connects")})
    total["missing_sample"] = next((r["missing_sample"] for r in results if r["missing"]), [])
    total["lag_p50_s"] = round(max(r["lag_p50"] or 0 for r in results), 3)
    total["lag_max_s"] = round(max(r["lag_max"] or 0 for r in results), 3)
    total["expected"] = len(expected)
    return total

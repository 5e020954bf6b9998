"""Hosts made of Linux network namespaces, for tests that need several machines.

A :class:`Lab` makes one namespace per host and one more holding the bridges (the
switches); each host joins a network through a veth pair whose other end is on the
network's bridge. Addresses are private (``10.x.y.z``) and exist only inside the lab's
namespaces: nothing is added to the namespace the tests run in, and the tests reach the
hosts only through processes started inside them (``ip netns exec``).

:meth:`Lab.close` stops every process started in the lab (and anything still running in its
namespaces, which only the lab can have started), then deletes every namespace, which
deletes the veth pairs and bridges in them; it also deletes a veth pair left in the tests'
namespace by a failure halfway through its set-up. Use the lab as a context manager, or
call :meth:`Lab.close` from a fixture's finalizer, so that this happens when a test fails.

Needs root and the ``ip`` tool. This kernel has no ``netem``: a link here is either up or
down (a partition); latency and loss come from :mod:`support.lossy_link`, run in a host as a
proxy in front of the service it should slow down.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from support.procs import kill_all

__all__ = ["Host", "Lab", "lab_missing"]


def lab_missing() -> str | None:
    """Why a lab cannot be made here (``None`` when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip tool (Debian package iproute2) is missing"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


@dataclass
class Host:
    """One host: a namespace, its addresses, and the processes started in it."""

    lab: Lab
    name: str
    namespace: str
    #: Network name -> (interface, address).
    links: dict[str, tuple[str, str]] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def address(self, network: str) -> str:
        """This host's address on *network*."""
        return self.links[network][1]

    def popen(
        self,
        cmd: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start *cmd* inside this host (``ip netns exec``); it is stopped by
        :meth:`Lab.close` (or :meth:`kill`). Its output goes to *log* (stdout only when
        *stdout* is given)."""
        with open(log or os.devnull, "ab") as log_file:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, *cmd],
                env={**os.environ, **(env or {})},
                cwd=cwd,
                stdin=stdin,
                stdout=log_file if stdout is None else stdout,
                stderr=log_file if stdout is not None else subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def run(
        self,
        cmd: Sequence[str],
        timeout: float = 20,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run *cmd* inside this host and wait for it."""
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace, *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )

    def set_link(self, network: str, up: bool) -> None:
        """Bring this host's link to *network* up or down (a cable pulled or plugged)."""
        _ip("-n", self.namespace, "link", "set", self.links[network][0], "up" if up else "down")

    def kill(self) -> None:
        """Kill every process started in this host at once (SIGKILL), as a power cut would."""
        victims: list[psutil.Process] = []
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(proc.pid)
                victims += [parent, *parent.children(recursive=True)]
        kill_all(victims)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()


class Lab:
    """Namespaces for one test: hosts on bridged networks.

    :param networks: network names, each with its ``/24`` prefix (``"10.77.1"``).
    """

    def __init__(self, networks: dict[str, str]) -> None:
        self.tag = secrets.token_hex(3)
        self.networks = networks
        self.hosts: dict[str, Host] = {}
        self.switch = f"sse-{self.tag}-sw"
        self._namespaces: list[str] = []
        self._veths: list[str] = []
        self._add_namespace(self.switch)
        for n, _network in enumerate(networks):
            _ip("-n", self.switch, "link", "add", f"br{n}", "type", "bridge")
            _ip("-n", self.switch, "link", "set", f"br{n}", "up")

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, name: str, addresses: dict[str, int]) -> Host:
        """Make host *name* with address ``<prefix>.<n>`` on each network of *addresses*."""
        host = Host(self, name, f"sse-{self.tag}-{name}")
        self._add_namespace(host.namespace)
        index = len(self.hosts)
        for network, number in addresses.items():
            n = list(self.networks).index(network)
            inside, outside = f"s{self.tag}{index}{n}", f"p{self.tag}{index}{n}"
            self._veths.append(inside)
            _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            _ip("link", "set", inside, "netns", host.namespace)
            _ip("link", "set", outside, "netns", self.switch)
            address = f"{self.networks[network]}.{number}"
            _ip("-n", host.namespace, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", host.namespace, "link", "set", inside, "up")
            _ip("-n", self.switch, "link", "set", outside, "master", f"br{n}")
            _ip("-n", self.switch, "link", "set", outside, "up")
            host.links[network] = (inside, address)
        self.hosts[name] = host
        return host

    def close(self) -> None:
        """Stop every process of the lab, delete its namespaces (and with them its veth
        pairs and bridges), and check that none is left."""
        for host in self.hosts.values():
            for proc in host.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for host in self.hosts.values():
            for proc in host.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            host.kill()
        for namespace in self._namespaces:
            # Anything still in a lab namespace was started by the lab (or its processes).
            pids = _ip("netns", "pids", namespace, check=False).stdout.split()
            kill_all([psutil.Process(int(pid)) for pid in pids if psutil.pid_exists(int(pid))])
        for namespace in reversed(self._namespaces):
            _ip("netns", "del", namespace, check=False)
        for veth in self._veths:  # left in this namespace if the set-up failed halfway
            if _ip("link", "show", veth, check=False).returncode == 0:
                _ip("link", "del", veth, check=False)
        left = set(_ip("netns", "list").stdout.split()) & set(self._namespaces)
        assert not left, f"namespaces left behind: {sorted(left)}"

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

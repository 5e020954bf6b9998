"""Several hosts, made of network namespaces: Redis on one, two app hosts each running
``gunicorn -k gevent -w 2``, haproxy in front, 2,000 stream clients on a fifth, and a
publishing script on a sixth. Events published from both app hosts and from the script
reach every client once, in order; then an app host is cut from Redis for 10 s (its streams
stay open, then catch up) and the other app host is killed whole (its clients reconnect
through haproxy and resume).

Not in the default run (marker ``multihost``; it needs root, ``ip`` and haproxy, and takes
about two minutes): ``.venv/bin/python -m pytest -m multihost -s tests/test_multihost.py``.
This kernel has no ``netem``, so the links have no added latency; a partition is a link
taken down.
"""

from __future__ import annotations

import json
import secrets
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.netns import Host, Lab, lab_missing
from support.procs import REPO_ROOT, TESTS_DIR, read_log
from support.redis_server import require_redis_server

pytestmark = pytest.mark.multihost

CLIENTS = 2000
AGENTS = 4
INTERVAL = 0.4  # each of the two publishers: 5 events/s in all
KEY = "multihost:events"
NO_PERSISTENCE = ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
GUNICORN = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "2"]
GUNICORN += ["-c", "python:flask_sse_push.gunicorn_conf"]


AGENT = [sys.executable, "-m", "support.netload"]
AGENT_ENV = {"PYTHONPATH": f"{REPO_ROOT}:{TESTS_DIR}", "PYTHONUNBUFFERED": "1"}


class Agent:
    """A :mod:`support.netload` process in a host, spoken to in JSON lines."""

    def __init__(self, host: Host, *args: str, log: Path) -> None:
        self.proc = host.popen(
            [*AGENT, *args],
            env=AGENT_ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=TESTS_DIR,
            log=log,
        )
        self.log = log
        self.read(60)  # {"started": ...}

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready = select.select([self.proc.stdout], [], [], timeout)[0]
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            why = f"exit {self.proc.poll()}; stderr:\n{read_log(self.log)[-2000:]}"
            raise AssertionError(f"agent {self.proc.args[4:]} did not answer ({why})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def ask(self, command: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()
        return self.read(timeout)


def _wait(condition: Any, timeout: float, interval: float = 0.5) -> float | None:
    """Seconds until ``condition()`` held, or ``None`` after *timeout*."""
    start = time.monotonic()
    for _ in range(int(timeout / interval) + 1):
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            break
        time.sleep(interval)
    return None


HAPROXY = """
global
    maxconn 9000
defaults
    mode http
    timeout connect 1s
    timeout client 1h
    timeout server 1h
    retries 3
    option redispatch
frontend streams
    bind {lb}:8080
    default_backend apps
frontend stats
    bind {lb}:8404
    stats enable
    stats uri /stats
backend apps
    balance roundrobin
    option httpchk GET /health
    timeout check 5s
    default-server inter 1s fall 3 rise 2 on-marked-down shutdown-sessions
    server app1 {app1}:8000 check
    server app2 {app2}:8000 check
"""


@pytest.fixture
def lab() -> Iterator[Lab]:
    missing = lab_missing() or (None if shutil.which("haproxy") else "haproxy is missing")
    if missing:
        pytest.skip(missing)
    prefix = f"10.{100 + secrets.randbelow(100)}"
    with Lab({"front": f"{prefix}.1", "back": f"{prefix}.2"}) as made:
        yield made


def _start_hosts(lab: Lab, work: Path) -> dict[str, Host]:
    hosts = {
        "redis": lab.add_host("redis", {"back": 10}),
        "app1": lab.add_host("app1", {"front": 11, "back": 11}),
        "app2": lab.add_host("app2", {"front": 12, "back": 12}),
        "lb": lab.add_host("lb", {"front": 2}),
        "client": lab.add_host("client", {"front": 100}),
        "ops": lab.add_host("ops", {"back": 20}),
    }
    redis_at = hosts["redis"].address("back")
    hosts["redis"].popen(
        [require_redis_server(), "--bind", redis_at, "--port", "6379", *NO_PERSISTENCE],
        log=work / "redis.log",
        cwd=work,
    )
    ping = ["redis-cli", "-h", redis_at, "ping"]
    assert _wait(lambda: hosts["ops"].run(ping).stdout.strip() == "PONG", 20), "no Redis"
    for name in ("app1", "app2"):
        host = hosts[name]
        (work / name).mkdir()
        env = {
            "PYTHONPATH": f"{REPO_ROOT}:{TESTS_DIR}",
            "XDG_RUNTIME_DIR": str(work / name),
            "SSE_BUS_URL": json.dumps(f"redis://{redis_at}:6379/0"),
            "SSE_REDIS_KEY": json.dumps(KEY),
            "SSE_KEEPALIVE": "2",
            "SSE_PUBLISH_TIMEOUT": "1",
            "SSE_MAX_CONNECTIONS": "5000",
            "SSE_WORKER_CONNECTIONS": "5000",
        }
        host.popen(
            [*GUNICORN, "-b", f"{host.address('front')}:8000", "apps.streaming:app"],
            env=env,
            log=work / f"{name}.log",
            cwd=REPO_ROOT,
        )
    config = work / "haproxy.cfg"
    front = {name: hosts[name].address("front") for name in ("lb", "app1", "app2")}
    config.write_text(HAPROXY.format(**front))
    hosts["lb"].popen(["haproxy", "-f", str(config), "-db"], log=work / "haproxy.log")
    urls = [[f"http://{front[n]}:8000/health"] for n in ("app1", "app2")]
    urls.append([f"http://{front['lb']}:8404/stats;csv", "app1", "app2"])
    for url in urls:
        waited = hosts["client"].run(
            [*AGENT, "wait-http", url[0], "30", *url[1:]], timeout=40, env=AGENT_ENV, cwd=TESTS_DIR
        )
        assert waited.returncode == 0, waited.stdout + waited.stderr
    return hosts


def _all_open(agents: list[Agent]) -> bool:
    return all(a.ask({"cmd": "status"})["open"] == CLIENTS // AGENTS for a in agents)


def _acked(publishers: list[Agent], command: str = "acked", failed: Any = None) -> dict[str, float]:
    """The ids the publishers got back so far, with their publish times; the failures
    (time, source, why) go into *failed*."""
    acked: dict[str, float] = {}
    for publisher in publishers:
        reply = publisher.ask({"cmd": command})
        acked.update({event_id: t for event_id, t, _ in reply["acked"]})
        if failed is not None:
            failed += reply["failed"]
    return acked


def _checked(agents: list[Agent], expected: dict[str, float]) -> dict[str, Any]:
    """What the clients of every agent received of *expected*, summed up."""
    results = [agent.ask({"cmd": "check", "expected": expected}, 120) for agent in agents]
    total = {k: sum(r[k] for r in results) for k in ("missing", "clients_missing", "duplicates")}
    total.update({k: sum(r[k] for r in results) for k in ("out_of_order", "resets", "connects")})
    total["missing_sample"] = next((r["missing_sample"] for r in results if r["missing"]), [])
    total["lag_p50_s"] = round(max(r["lag_p50"] or 0 for r in results), 3)
    total["lag_max_s"] = round(max(r["lag_max"] or 0 for r in results), 3)
    total["expected"] = len(expected)
    return total


def test_several_hosts(lab: Lab, tmp_path: Path) -> None:
    hosts = _start_hosts(lab, tmp_path)
    lb, client = hosts["lb"].address("front"), hosts["client"]
    agents = [
        Agent(client, "clients", lb, "8080", str(CLIENTS // AGENTS), log=tmp_path / f"c{i}.log")
        for i in range(AGENTS)
    ]
    opened = _wait(lambda: _all_open(agents), 60)
    assert opened is not None, [a.ask({"cmd": "status"}) for a in agents]
    apps = ",".join(f"{hosts[n].address('front')}:8000" for n in ("app1", "app2"))
    redis_url = f"redis://{hosts['redis'].address('back')}:6379/0"
    publishers = [
        Agent(client, "publish-http", str(INTERVAL), apps, log=tmp_path / "http.log"),
        Agent(
            hosts["ops"],
            "publish-redis",
            str(INTERVAL),
            redis_url,
            KEY,
            log=tmp_path / "script.log",
        ),
    ]
    figures: dict[str, Any] = {"clients connected in s": round(opened, 1)}

    # Steady: every event reaches every client.
    time.sleep(10)
    steady = _acked(publishers)
    figures["steady"] = _checked(agents, steady)

    # app2 cut from Redis for 10 s: its streams stay open, then catch up.
    before = sum(a.ask({"cmd": "status"})["connects"] for a in agents)
    hosts["app2"].set_link("back", up=False)
    time.sleep(10)
    hosts["app2"].set_link("back", up=True)
    back_at = time.time()
    during = {i: t for i, t in _acked(publishers).items() if t < back_at}

    def caught_up() -> bool:
        return _checked(agents, during)["missing"] == 0

    waited = _wait(caught_up, 60, 1.0)
    figures["caught up after the link came back, s"] = None if waited is None else round(waited, 1)
    figures["after the cut"] = _checked(agents, during)
    figures["reconnects during the cut"] = (
        sum(a.ask({"cmd": "status"})["connects"] for a in agents) - before
    )

    # app1 killed whole: links down, every process killed.
    killed_at = time.time()
    hosts["app1"].set_link("front", up=False)
    hosts["app1"].set_link("back", up=False)
    hosts["app1"].kill()

    # Its clients reconnect through haproxy to app2 and resume: every client gets the events
    # published after the kill (the script publishes all along).
    time.sleep(2)
    after = {i: t for i, t in _acked(publishers).items() if t > killed_at}

    def resumed() -> bool:
        return _all_open(agents) and _checked(agents, after)["missing"] == 0

    waited = _wait(resumed, 60, 1.0)
    figures["every client has the events after the kill, s after it"] = (
        None if waited is None else round(2 + waited, 1)
    )
    figures["reconnects after the kill"] = (
        sum(a.ask({"cmd": "status"})["connects"] for a in agents) - CLIENTS
    )
    time.sleep(8)
    failed: list[Any] = []
    final = _acked(publishers, "stop", failed)
    figures["publishes failed (source: count)"] = {
        source: sum(f[1] == source for f in failed) for source in {f[1] for f in failed}
    }
    after_kill = {i: t for i, t in final.items() if t > killed_at}
    _wait(lambda: _checked(agents, final)["missing"] == 0, 30, 1.0)
    results = _checked(agents, final)
    figures["final"] = results
    figures["events acknowledged"] = len(final)
    figures["acknowledged after the kill"] = len(after_kill)
    print(f"\nseveral hosts: {json.dumps(figures, indent=1)}")
    assert figures["caught up after the link came back, s"] is not None
    assert figures["reconnects during the cut"] == 0
    assert figures["every client has the events after the kill, s after it"] is not None
    assert CLIENTS / 4 < figures["reconnects after the kill"] < CLIENTS
    assert (results["missing"], results["duplicates"], results["out_of_order"]) == (0, 0, 0)
    assert results["resets"] == 0


def test_the_lab_cleans_up_after_a_failure() -> None:
    """A test failing halfway leaves no namespace, link or process behind."""
    missing = lab_missing()
    if missing:
        pytest.skip(missing)
    with pytest.raises(RuntimeError, match="halfway"), Lab({"net": "10.99.1"}) as lab:
        one = lab.add_host("one", {"net": 1})
        two = lab.add_host("two", {"net": 2})
        listen = "import socket, time; s = socket.socket(); s.bind(('10.99.1.2', 9)); "
        listener = two.popen([sys.executable, "-c", listen + "s.listen(); time.sleep(600)"])
        connect = "import socket; socket.create_connection(('10.99.1.2', 9), timeout=1)"
        reached = _wait(lambda: one.run([sys.executable, "-c", connect]).returncode == 0, 10)
        assert reached is not None
        two.set_link("net", up=False)
        assert one.run([sys.executable, "-c", connect]).returncode != 0
        namespaces = [lab.switch, one.namespace, two.namespace]
        raise RuntimeError("halfway")
    assert listener.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert not set(listed.stdout.split()) & set(namespaces)

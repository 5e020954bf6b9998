"""Scale benchmark: flask-sse-push, its peers and a bare gevent broadcaster, side by side.

    .venv/bin/python benchmarks/scale.py                   # every scenario, medians of 3 runs
    .venv/bin/python benchmarks/scale.py --quick           # a subset, about 2 minutes
    .venv/bin/python benchmarks/scale.py --only growth,rate --repeat 1 --json OUT
    .venv/bin/python benchmarks/scale.py --from-json OUT --docs --readme   # no measuring

Scenarios (``--only``): ``broadcast`` (1,000 clients x 50 events/s, every server),
``growth`` (1k..19k streams on one worker, and one broadcast to 19k), ``rate`` (p99 against
the publishing rate up to saturation), ``machine`` (38,000 streams on two workers),
``targeted`` (one private channel per client; ``send_event``'s own CPU cost), ``footprint``
(what a worker's fixed size is made of). Every server runs in the same invocation as the
bare broadcaster it is compared with. The markdown report goes to stdout, progress to
stderr; ``--json`` writes every raw figure, ``--docs`` the plots and
``docs/performance_results.rst``, ``--readme`` the README's performance table. See
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
from benchutil import STREAM_PATH, free_port, raise_nofile_limit
from broadcast import _busy_seconds, _log_problems, _process_seconds, package_state
from sse_client import histogram_quantile
from targets import (
    BENCH_DIR,
    REPO_ROOT,
    BareTarget,
    ClientProcess,
    FlaskTarget,
    GunicornTarget,
    RedisService,
    Target,
    UvicornTarget,
    _child_env,
    http_request,
    stop_all,
)

DEFAULT_JSON = BENCH_DIR / "results" / "scale.json"
LOG_DIR = BENCH_DIR / "results" / "logs"
PLOT_DIR = REPO_ROOT / "docs" / "_static" / "perf"
RESULTS_RST = REPO_ROOT / "docs" / "performance_results.rst"
README = REPO_ROOT / "README.md"
SCENARIOS = ["broadcast", "growth", "rate", "machine", "targeted", "footprint"]
QUICK_SCENARIOS = ["broadcast", "growth", "targeted", "footprint"]
BARE = "bare"
PEERS = ["sse-starlette", "flask-sse", "flask-queue"]

#: A step saturates when the publisher falls this far behind its schedule, ...
SATURATED_LAG_MS = 200.0
#: ... or the p99 latency goes above this, or an event is lost.
SATURATED_P99_MS = 1000.0


# -- servers ------------------------------------------------------------------------------


class Helpers:
    """The one throwaway redis-server of an invocation, started at first use and shared by
    the Redis bus and flask-sse (emptied before each run). ``--maxclients 20000``: flask-sse
    opens a pub/sub connection per stream (redis-server lowers it to what its file limit
    allows, and says so in its log)."""

    def __init__(self) -> None:
        self.redis: RedisService | None = None

    def redis_service(self) -> RedisService:
        if self.redis is None:
            self.redis = RedisService(LOG_DIR, args=["--maxclients", "20000"])
            self.redis.start()
        return self.redis

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


@dataclass
class Server:
    """A server the scenarios compare: its label in the report and how to build it."""

    key: str
    label: str
    build: Callable[[Helpers, int], Target]
    #: One line for the report: how it is served.
    how: str


def _memory(helpers: Helpers, workers: int) -> Target:
    return FlaskTarget(workers=workers, name="flask-sse-push memory")


def _redis(helpers: Helpers, workers: int) -> Target:
    redis = helpers.redis_service()
    env = {"SSE_BUS_URL": redis.server.url if redis.server else ""}
    return FlaskTarget(workers=workers, env=env, name="flask-sse-push redis", services=[redis])


def _flask_sse(helpers: Helpers, workers: int) -> Target:
    redis = helpers.redis_service()
    env = {"REDIS_URL": redis.server.url if redis.server else ""}
    return GunicornTarget(
        "flask-sse", "peers:create_flask_sse()", workers, env, services=[redis], ready="sent"
    )


SERVERS: dict[str, Server] = {
    server.key: server
    for server in [
        Server(BARE, "bare gevent", lambda h, w: BareTarget(), "bare.py: one sendall per client"),
        Server("memory", "flask-sse-push memory", _memory, "gunicorn -k gevent, memory:// bus"),
        Server("redis", "flask-sse-push redis", _redis, "gunicorn -k gevent, Redis Streams bus"),
        Server(
            "sse-starlette",
            "sse-starlette",
            lambda h, w: UvicornTarget("sse-starlette", "peers:create_starlette_app"),
            "uvicorn, EventSourceResponse, asyncio.Queue per client",
        ),
        Server("flask-sse", "flask-sse", _flask_sse, "gunicorn -k gevent, Redis pub/sub"),
        Server(
            "flask-queue",
            "Flask + queue.Queue",
            lambda h, w: GunicornTarget("flask-queue", "peers:create_queue_app()", w),
            "gunicorn -k gevent, a queue.Queue per client, list fan-out",
        ),
    ]
}


# -- a running server and its clients -------------------------------------------------------


@dataclass
class Session:
    """One or more server processes (*targets*, one port each) and the client processes
    that hold their streams. Client process *i* connects to target ``i mod len(targets)``,
    from local address ``sources[i]`` when given."""

    targets: list[Target]
    #: Streams each target must be able to hold (sizes gunicorn's worker connections).
    capacity: int
    clients: int = 1
    sources: list[str] = field(default_factory=list)
    procs: list[ClientProcess] = field(default_factory=list)
    opened: list[int] = field(default_factory=list)
    rss_before: int = 0

    def start(self, tag: str) -> None:
        """Start the servers (helpers emptied first), wait until idle, note their RSS."""
        for service in self.services():
            service.reset()
        for index, target in enumerate(self.targets):
            log = LOG_DIR / f"scale-{tag}-{target.name.replace(' ', '-')}-{index}.log"
            target.start(free_port(), self.capacity, log)
        for target in self.targets:
            target.settle()
        self.rss_before = self.rss()
        self.procs = [ClientProcess() for _ in range(self.clients)]
        self.opened = [0] * self.clients

    def services(self) -> list[RedisService]:
        return list({id(s): s for t in self.targets for s in t.services}.values())

    def measured(self) -> list[psutil.Process]:
        return [p for t in self.targets for p in t.measured]

    def rss(self) -> int:
        return sum(t.rss_bytes() for t in self.targets)

    def alive(self) -> bool:
        """Every server process still runs."""
        procs = [t.proc for t in self.targets]
        return all(p is not None and p.poll() is None for p in procs) and all(
            p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in self.measured()
        )

    def connect(self, n: int, path: str = STREAM_PATH, timeout: float = 60.0) -> dict[str, Any]:
        """Open *n* more streams spread over the client processes; return how many are held."""
        share = [
            n // self.clients + (1 if i < n % self.clients else 0) for i in range(self.clients)
        ]
        started = time.monotonic()
        for i, proc in enumerate(self.procs):
            target = self.targets[i % len(self.targets)]
            command: dict[str, Any] = {
                "cmd": "connect",
                "port": target.port,
                "path": path,
                "n": share[i],
                "first": sum(self.opened),
                "timeout": timeout,
                "ready": "sent" if target.ready == "sent" else "body",
            }
            if self.sources:
                command["source"] = self.sources[i]
            self.opened[i] += share[i]
            proc.send(command)
        answers = [p.answer({"cmd": "connect"}, timeout + 30) for p in self.procs]
        connected = sum(int(a["connected"]) for a in answers)
        for target in self.targets:
            if target.ready == "sent":
                connected = min(connected, target.wait_ready(sum(self.opened), timeout=30))
        errors: Counter[str] = Counter()
        for answer in answers:
            errors.update(answer["errors"])
        return {
            "connected": connected,
            "failed": sum(int(a["failed"]) for a in answers),
            "seconds": time.monotonic() - started,
            "errors": dict(errors),
        }

    def measure(
        self, rate: float, duration: float, *, targets: int = 0, drain_timeout: float = 30.0
    ) -> dict[str, Any]:
        """Publish *rate* events/s for *duration* s in every server, wait for the clients to
        receive them; the figures of the window."""
        for proc in self.procs:
            proc.request({"cmd": "mark"}, timeout=10)
        machine0 = _busy_seconds(psutil.cpu_times())
        client0 = sum(_process_seconds(p.ps) for p in self.procs)
        helper0 = sum(s.cpu_seconds() for s in self.services())
        cpu0 = sum(t.cpu_seconds() for t in self.targets)
        wall0 = time.monotonic()
        query = f"/bench/start?rate={rate:g}&duration={duration:g}&targets={targets}"
        with concurrent.futures.ThreadPoolExecutor(len(self.targets)) as pool:
            answers = list(
                pool.map(
                    lambda t: http_request(t.port, "POST", query, timeout=duration * 3 + 60),
                    self.targets,
                )
            )
        for status, body in answers:
            if status != 200 or not isinstance(body, dict):
                raise RuntimeError(f"/bench/start answered {status}: {body}")
        published = [a[1] for a in answers if isinstance(a[1], dict)]
        count = int(published[0]["published"])
        per_stream = count // targets if targets else count
        command = {
            "cmd": "drain",
            "expected": per_stream,
            "quiet": 2.0,
            "timeout": drain_timeout,
            "hist": len(self.procs) > 1,
        }
        for proc in self.procs:
            proc.send(command)
        drains = [p.answer(command, drain_timeout + 10) for p in self.procs]
        cpu = sum(t.cpu_seconds() for t in self.targets) - cpu0
        helper = sum(s.cpu_seconds() for s in self.services()) - helper0
        wall = time.monotonic() - wall0
        client = sum(_process_seconds(p.ps) for p in self.procs) - client0
        machine = _busy_seconds(psutil.cpu_times()) - machine0
        received = sum(int(d["received"]) for d in drains)
        streams = sum(int(d["connections"]) for d in drains)
        expected = count * len(self.targets) if targets else count * streams
        figures = {
            "rate": rate,
            "duration": duration,
            "published": count,
            "streams": streams,
            "expected": expected,
            "received": received,
            "lost": max(0, expected - received),
            "cpu_s": cpu,
            "cpu_us_per_delivery": cpu / received * 1e6 if received else None,
            "cpu_us_per_delivery_all": (cpu + helper) / received * 1e6 if received else None,
            "publisher_max_lag_ms": max(float(p["max_lag_ms"]) for p in published),
            "wall_publish_s": max(float(p["elapsed_s"]) for p in published),
            "call_cpu_us": statistics.mean(float(p.get("call_cpu_us", 0.0)) for p in published),
            "server_cpu_util": cpu / wall,
            "helper_cpu_util": helper / wall,
            "client_cpu_util": client / wall,
            "other_cpu_util": max(0.0, machine - cpu - helper - client) / wall,
        }
        latencies = _latencies(drains)
        figures.update(latencies)
        figures["saturated"] = (
            float(figures["publisher_max_lag_ms"] or 0.0) > SATURATED_LAG_MS
            or expected > received
            or latencies["latency_p99_ms"] > SATURATED_P99_MS
        )
        return figures

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
        for target in self.targets:
            target.stop()


def _latencies(drains: list[dict[str, Any]]) -> dict[str, float]:
    """p50/p99/max over the drains of one or several client processes."""
    if len(drains) == 1:
        only = drains[0]
        return {k: float(only[k]) for k in ("latency_p50_ms", "latency_p99_ms", "latency_max_ms")}
    merged: Counter[str] = Counter()
    for drain in drains:
        merged.update(drain["latency_hist"])
    return {
        "latency_p50_ms": histogram_quantile(merged, 0.5),
        "latency_p99_ms": histogram_quantile(merged, 0.99),
        "latency_max_ms": max(float(d["latency_max_ms"]) for d in drains),
    }


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _held(key: str, scenario: str, wanted: int, held: int, why: str, **more: Any) -> dict[str, Any]:
    """The record of a server that could not hold a scenario, with how far it got."""
    _progress(f"  {key}: {why} (held {held:,} of {wanted:,})")
    return {
        "scenario": scenario,
        "server": key,
        "wanted": wanted,
        "held": held,
        "failure": why,
        **more,
    }


def _open_session(
    key: str, helpers: Helpers, capacity: int, tag: str, *, workers: int = 1
) -> Session:
    session = Session([SERVERS[key].build(helpers, workers)], capacity)
    session.start(tag)
    return session


def _run_server(
    key: str,
    scenario: str,
    wanted: int,
    body: Callable[[Session], list[dict[str, Any]]],
    helpers: Helpers,
    *,
    capacity: int | None = None,
) -> list[dict[str, Any]]:
    """Start *key*'s server, run *body* on it, stop it; any failure becomes a record."""
    session: Session | None = None
    try:
        session = _open_session(key, helpers, capacity or wanted, scenario)
        records = body(session)
    except Exception as exc:  # a peer that breaks is shown, never left out
        held = int(sum(session.opened)) if session is not None else 0
        records = [_held(key, scenario, wanted, held, f"{type(exc).__name__}: {exc}"[:300])]
    finally:
        if session is not None:
            session.stop()
    if session is not None and records and records[-1].get("failure"):
        # What the server said about it (EMFILE, a Redis error ...).
        problems = _log_problems(session.targets[0].log_path or Path("/nonexistent"))
        records[-1]["log_problems"] = problems
    return records


def _connect_all(
    session: Session, key: str, scenario: str, wanted: int, path: str = STREAM_PATH, **more: Any
) -> dict[str, Any] | None:
    """Connect up to *wanted* streams in all; a failure record when fewer are held."""
    before = sum(session.opened)
    timeout = 30.0 + (wanted - before) / 400
    connect = session.connect(wanted - before, path, timeout=timeout)
    held = int(connect["connected"])
    alive = session.alive()
    if held < wanted or not alive:
        if not alive:
            why = "server died"
        elif connect["errors"]:
            why = f"connect errors {connect['errors']}"
        else:
            why = "the server did not take every stream the clients opened"
        return _held(key, scenario, wanted, held, why, **more)
    return None


# -- scenarios ------------------------------------------------------------------------------


def _steady(
    args: argparse.Namespace,
    helpers: Helpers,
    run: int,
    scenario: str,
    servers: list[str],
    rates: list[float],
    duration: float,
    targets: int = 0,
) -> list[dict[str, Any]]:
    """``--clients`` streams per server (with *targets*, each on its channel ``user-<i>``),
    then *rates* one after the other until one saturates."""
    out = []
    path = "/stream?channel=user-{i}" if targets else STREAM_PATH
    for key in servers:
        _progress(f"{scenario} run {run}: {key} ...")

        def body(session: Session, key: str = key) -> list[dict[str, Any]]:
            failed = _connect_all(session, key, scenario, args.clients, path)
            if failed:
                return [failed]
            time.sleep(0.5)
            rss = (session.rss() - session.rss_before) / args.clients / 1024
            records = []
            for rate in rates:
                figures = session.measure(rate, duration, targets=targets)
                record = {"scenario": scenario, "server": key, "run": run, "held": args.clients}
                records.append({**record, "rss_kb_per_stream": rss, **figures})
                _show(records[-1])
                if figures["saturated"]:
                    break
            return records

        out += _run_server(key, scenario, args.clients, body, helpers)
    return out


def scenario_broadcast(
    args: argparse.Namespace, helpers: Helpers, run: int
) -> list[dict[str, Any]]:
    """N clients on one channel, R events/s, every server (peers included)."""
    return _steady(args, helpers, run, "broadcast", args.servers, [args.rate], args.duration)


def scenario_rate(args: argparse.Namespace, helpers: Helpers, run: int) -> list[dict[str, Any]]:
    """1k streams, rates doubling until the server saturates."""
    return _steady(args, helpers, run, "rate", args.rate_servers, args.rates, args.rate_duration)


def scenario_targeted(args: argparse.Namespace, helpers: Helpers, run: int) -> list[dict[str, Any]]:
    """A private channel per client, each event to one client; send_event's own cost."""
    return _steady(
        args,
        helpers,
        run,
        "targeted",
        args.targeted_servers,
        args.targeted_rates,
        args.duration,
        targets=args.clients,
    )


def scenario_growth(args: argparse.Namespace, helpers: Helpers, run: int) -> list[dict[str, Any]]:
    """1k..19k streams on one worker at a fixed rate; then single broadcasts at the top."""
    out: list[dict[str, Any]] = []
    top = max(args.levels)
    # The peers run in the first run only: they are far from the targets, and take long.
    servers = [k for k in args.growth_servers if run == 1 or k not in PEERS]
    for key in servers:
        _progress(f"growth run {run}: {key} ...")

        def body(session: Session, key: str = key) -> list[dict[str, Any]]:
            records: list[dict[str, Any]] = []
            fixed = session.rss_before / 1024
            for level in args.levels:
                failed = _connect_all(session, key, "growth", level, level=level, run=run)
                if failed:
                    return [*records, failed]
                time.sleep(0.5)
                rss = (session.rss() - session.rss_before) / level / 1024
                figures = session.measure(args.growth_rate, args.duration)
                records.append(
                    {
                        "scenario": "growth",
                        "server": key,
                        "run": run,
                        "level": level,
                        "held": level,
                        "rss_kb_per_stream": rss,
                        "fixed_rss_kb": fixed,
                        **figures,
                    }
                )
                _show(records[-1])
            p99s = []
            for _ in range(args.broadcasts):
                time.sleep(0.5)
                p99s.append(session.measure(1, 1)["latency_p99_ms"])
            records.append(
                {
                    "scenario": "single",
                    "server": key,
                    "run": run,
                    "level": top,
                    "held": top,
                    "latency_p99_ms": statistics.median(p99s),
                    "p99s_ms": p99s,
                    "fixed_rss_kb": fixed,
                    "rss_kb_per_stream": records[-1]["rss_kb_per_stream"],
                }
            )
            _show(records[-1])
            return records

        out += _run_server(key, "growth", top, body, helpers)
    return out


def system_limits() -> dict[str, Any]:
    """The limits that bound how many loopback connections one machine holds."""

    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return "?"

    import resource

    low, high = (int(x) for x in read("/proc/sys/net/ipv4/ip_local_port_range").split())
    return {
        "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "ip_local_port_range": [low, high],
        "ephemeral_ports": high - low + 1,
        "somaxconn": read("/proc/sys/net/core/somaxconn"),
        "file_max": read("/proc/sys/fs/file-max"),
    }


def scenario_machine(args: argparse.Namespace, helpers: Helpers, run: int) -> list[dict[str, Any]]:
    """38,000 streams on two workers (Redis bus) against two bare processes."""
    limits = system_limits()
    per_client = args.machine_streams // args.machine_clients
    sources = [f"127.0.0.{2 + i}" for i in range(args.machine_clients)]
    if per_client >= limits["nofile_hard"] - 50:
        raise SystemExit(f"{per_client} streams per client process exceed the file limit")
    out = []
    for key in (BARE, "redis"):
        _progress(f"machine run {run}: {key}, {args.machine_streams:,} streams ...")
        servers: list[Target]
        if key == BARE:
            servers = [BareTarget(f"bare gevent {i + 1}") for i in range(2)]
        else:
            servers = [SERVERS["redis"].build(helpers, 2)]
        # The extension's cap per worker is capacity + 100 (19,850 with 20,000 files, its
        # pool 100 more): as close to the file limit as is safe, since the kernel does not
        # split the accepts evenly between the two workers (19,341/18,659 in a trial).
        capacity = min(limits["nofile_hard"] - 250, args.machine_streams // 2 + 1000)
        session = Session(servers, capacity, clients=args.machine_clients, sources=sources)
        record: dict[str, Any] = {
            "scenario": "machine",
            "server": key,
            "run": run,
            "wanted": args.machine_streams,
            "limits": limits,
            "sources": sources,
        }
        try:
            session.start("machine")
            failed = _connect_all(session, key, "machine", args.machine_streams)
            if failed:
                record.update(failed)
            else:
                record["held"] = args.machine_streams
                record["per_worker"] = [len(p) for t in servers for p in t.stream_peers()]
                record["rss_kb_per_stream"] = (
                    (session.rss() - session.rss_before) / 1024 / (args.machine_streams)
                )
                single = session.measure(1, 1, drain_timeout=60)
                steady = session.measure(args.machine_rate, args.machine_duration, drain_timeout=60)
                record["single"] = single
                record.update(steady)
                record["lost"] = single["lost"] + steady["lost"]
        except Exception as exc:
            record.update(
                _held(
                    key,
                    "machine",
                    args.machine_streams,
                    int(sum(session.opened)),
                    f"{type(exc).__name__}: {exc}"[:300],
                )
            )
        finally:
            session.stop()
        out.append(record)
        _show(record)
    return out


#: The import steps of the footprint scenario: label, statement.
IMPORT_STEPS = [
    ("python", "pass"),
    ("gevent + monkey.patch_all()", "from gevent import monkey; monkey.patch_all()"),
    ("gunicorn gevent worker", "import gunicorn.app.wsgiapp, gunicorn.workers.ggevent"),
    ("flask", "import flask"),
    ("flask_sse_push", "import flask_sse_push"),
    ("benchmark app (memory bus)", "import app"),
    ("redis", "import redis"),
    ("prometheus_client", "import prometheus_client"),
]
#: The import step after which a plain Flask app under gunicorn's gevent worker is loaded:
#: what the memory worker loads beyond it (and beyond bare) is the package's and the app's.
STACK_STEP = "flask"
#: The benchmark's own modules in a worker (not the package's doing).
BENCH_MODULES = {"app", "benchutil", "support", "__main__"}

_IMPORT_SCRIPT = """
import json, os, sys, time
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
for label, statement in json.loads(sys.argv[1]):
    exec(statement)
    step = {"step": label, "rss_kb": rss() / 1024, "modules": len(sys.modules)}
    if label == sys.argv[2]:
        step["names"] = sorted(sys.modules)
    print(json.dumps(step))
"""


def scenario_footprint(
    args: argparse.Namespace, helpers: Helpers, run: int
) -> list[dict[str, Any]]:
    """RSS step by step over the imports, idle workers, and the modules a worker loads."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_SCRIPT, json.dumps(IMPORT_STEPS), STACK_STEP],
        cwd=REPO_ROOT,
        env=_child_env({}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"import steps failed: {done.stderr[-2000:]}")
    steps = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    record: dict[str, Any] = {
        "scenario": "footprint",
        "server": "-",
        "run": run,
        "steps": steps,
        "idle": {},
    }
    for key in args.footprint_servers:
        _progress(f"footprint run {run}: idle {key} ...")
        try:
            session = _open_session(key, helpers, 1000, "footprint")
        except Exception as exc:
            record["idle"][key] = {"failure": str(exc)[:300]}
            continue
        try:
            target = session.targets[0]
            status, modules = http_request(target.port, "GET", "/bench/modules", timeout=10)
            record["idle"][key] = {
                "rss_kb": session.rss_before / 1024,
                "modules": modules if status == 200 and isinstance(modules, list) else [],
            }
        finally:
            session.stop()
    stack: list[str] = next((step.pop("names") for step in steps if "names" in step), [])
    record["unneeded"] = unneeded_modules(record["idle"], stack)
    return [record]


def _tops(modules: Iterable[str]) -> Counter[str]:
    return Counter(name.split(".")[0] for name in modules)


def unneeded_modules(idle: dict[str, Any], stack: list[str]) -> dict[str, Any]:
    """What an idle memory-bus worker loads beyond a plain Flask app under gunicorn's gevent
    worker (*stack*: the modules after those imports) and beyond the bare server: counted by
    top-level package, with the names; and the package's own modules that belong to another
    bus or an optional feature."""
    memory = idle.get("memory", {}).get("modules", [])
    known = set(stack) | set(idle.get(BARE, {}).get("modules", []))
    extra = sorted(m for m in memory if m not in known and m.split(".")[0] not in BENCH_MODULES)
    outside = [m for m in extra if not m.startswith("flask_sse_push")]
    own = sorted(m for m in memory if m.startswith("flask_sse_push."))
    suspicious = [m for m in own if re.search(r"redis|aio|metrics|cli|testing|sentinel", m)]
    return {
        "packages": dict(sorted(_tops(outside).items())),
        "modules": outside,
        "package_modules": own,
        "package_modules_to_review": suspicious,
    }


RUNNERS: dict[str, Callable[[argparse.Namespace, Helpers, int], list[dict[str, Any]]]] = {
    "broadcast": scenario_broadcast,
    "growth": scenario_growth,
    "rate": scenario_rate,
    "machine": scenario_machine,
    "targeted": scenario_targeted,
    "footprint": scenario_footprint,
}
#: Scenarios run once whatever --repeat says (big, and their figures are counts).
ONCE = {"machine", "footprint"}


def _show(record: dict[str, Any]) -> None:
    if record.get("failure"):
        return
    keys = ["level", "rate", *FIGURES[:8]]
    parts = [f"{k}={_fmt(record[k])}" for k in keys if record.get(k) is not None]
    _progress(f"  {record['server']} {record['scenario']}: " + " ".join(parts))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# -- summary, targets, report -----------------------------------------------------------------

FIGURES = [
    "cpu_us_per_delivery",
    "cpu_us_per_delivery_all",
    "latency_p50_ms",
    "latency_p99_ms",
    "rss_kb_per_stream",
    "lost",
    "call_cpu_us",
    "publisher_max_lag_ms",
    "fixed_rss_kb",
    "server_cpu_util",
    "client_cpu_util",
    "other_cpu_util",
]


def medians(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the figures over runs; a failure when any run failed (the least held)."""
    failed = [r for r in records if r.get("failure")]
    if failed:
        worst = min(failed, key=lambda r: r.get("held", 0))
        return {
            "failure": worst["failure"],
            "held": worst.get("held", 0),
            "wanted": worst.get("wanted", 0),
            "runs": len(records),
        }
    out: dict[str, Any] = {"runs": len(records)}
    for key in FIGURES:
        values = [r[key] for r in records if isinstance(r.get(key), int | float)]
        if values:
            out[key] = float(statistics.median(values))
    out["saturated"] = sum(bool(r.get("saturated")) for r in records) > len(records) / 2
    return out


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per scenario, server and step (level or rate)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r["scenario"] == "footprint":
            continue
        step = r.get("level", r.get("rate", "")) if r["scenario"] != "broadcast" else ""
        if r.get("failure") and r["scenario"] == "growth":
            step = r.get("level", "")
        groups.setdefault((r["scenario"], r["server"], str(step)), []).append(r)
    out: dict[str, Any] = {}
    for (scenario, server, step), group in groups.items():
        out.setdefault(scenario, {}).setdefault(server, {})[step] = medians(group)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _get(summary: dict[str, Any], scenario: str, server: str, step: str = "") -> dict[str, Any]:
    return dict(summary.get(scenario, {}).get(server, {}).get(step, {}))


def evaluate(summary: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets, each PASS, FAIL or not measured, with the figures behind it."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, detail: str) -> None:
        verdict = "n/a" if value is None else ("PASS" if value <= limit else "FAIL")
        shown = "-" if value is None else f"{value:.2f}x"
        out.append(
            {
                "target": name,
                "verdict": verdict,
                "value": value,
                "limit": limit,
                "detail": f"{shown} (limit {limit:g}x) {detail}".strip(),
            }
        )

    growth = summary.get("growth", {})
    levels = sorted({int(k) for s in growth.values() for k in s if k})
    for level in [levels[0], levels[-1]] if levels else []:
        bare = _get(summary, "growth", BARE, str(level)).get("cpu_us_per_delivery")
        for key, limit, fig in (
            ("memory", 1.5, "cpu_us_per_delivery"),
            ("redis", 1.7, "cpu_us_per_delivery_all"),
        ):
            mine = _get(summary, "growth", key, str(level))
            add(
                f"CPU/delivery {key} at {level:,} streams",
                _ratio(mine.get(fig), bare),
                limit,
                mine.get("failure", ""),
            )
    if not levels and "broadcast" in summary:
        bare = _get(summary, "broadcast", BARE).get("cpu_us_per_delivery")
        for key, limit, fig in (
            ("memory", 1.5, "cpu_us_per_delivery"),
            ("redis", 1.7, "cpu_us_per_delivery_all"),
        ):
            mine = _get(summary, "broadcast", key)
            add(
                f"CPU/delivery {key} at 1 channel broadcast",
                _ratio(mine.get(fig), bare),
                limit,
                mine.get("failure", ""),
            )
    single = summary.get("single", {})
    if single:
        top = max(int(k) for s in single.values() for k in s)
        bare_single = _get(summary, "single", BARE, str(top))
        for key in ("memory", "redis"):
            mine = _get(summary, "single", key, str(top))
            add(
                f"one broadcast to {top:,}: p99 {key}",
                _ratio(mine.get("latency_p99_ms"), bare_single.get("latency_p99_ms")),
                1.5,
                "",
            )
            add(
                f"RSS per stream {key} at {top:,}",
                _ratio(mine.get("rss_kb_per_stream"), bare_single.get("rss_kb_per_stream")),
                1.1,
                "",
            )
    machine = [r for r in records if r["scenario"] == "machine" and r["server"] == "redis"]
    if machine:
        r = machine[-1]
        ok = not r.get("failure") and r.get("lost") == 0
        out.append(
            {
                "target": f"{r['wanted']:,} streams on 2 workers, nothing lost",
                "verdict": "PASS" if ok else "FAIL",
                "value": None,
                "limit": None,
                "detail": r.get("failure") or f"held {r.get('held', 0):,}, lost {r.get('lost')}",
            }
        )
    targeted = summary.get("targeted", {})
    if targeted:
        first = min((float(k) for s in targeted.values() for k in s if k), default=None)
        if first is not None:
            bare = _step(targeted, BARE, first).get("call_cpu_us")
            for key in ("memory", "redis"):
                mine = _step(targeted, key, first)
                add(
                    f"targeted send_event cost {key}",
                    _ratio(mine.get("call_cpu_us"), bare),
                    2.0,
                    f"({_fmt(mine.get('call_cpu_us'))} vs {_fmt(bare)} µs at {first:g}/s)",
                )
    return out


def _step(scenario: dict[str, Any], server: str, rate: float) -> dict[str, Any]:
    """The step of *server* at *rate* (keys are the rates as JSON wrote them)."""
    for key, value in scenario.get(server, {}).items():
        if key and float(key) == rate:
            return dict(value)
    return {}


def _cell(fig: dict[str, Any], key: str, fmt: str = "{:.2f}") -> str:
    if fig.get("failure"):
        wanted = fig.get("wanted") or 0
        return f"held {fig.get('held', 0):,} of {wanted:,}" if wanted else "failed"
    value = fig.get(key)
    return fmt.format(value) if isinstance(value, int | float) else "-"


def _label(key: str) -> str:
    return SERVERS[key].label if key in SERVERS else key


def tables(data: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every table of the report: (title, header, rows), shared by markdown and reST."""
    summary = data["summary"]
    out: list[tuple[str, list[str], list[list[str]]]] = []
    cfg = data["config"]
    if "broadcast" in summary:
        servers = list(summary["broadcast"])
        bare = _get(summary, "broadcast", BARE)
        rows = []
        for label, key, fmt in [
            ("server CPU µs / delivery", "cpu_us_per_delivery", "{:.2f}"),
            ("... incl. redis-server", "cpu_us_per_delivery_all", "{:.2f}"),
            ("latency p50 (ms)", "latency_p50_ms", "{:.1f}"),
            ("latency p99 (ms)", "latency_p99_ms", "{:.1f}"),
            ("RSS KB / stream", "rss_kb_per_stream", "{:.1f}"),
            ("lost events", "lost", "{:.0f}"),
            ("publisher max lag (ms)", "publisher_max_lag_ms", "{:.0f}"),
        ]:
            rows.append([label, *[_cell(_get(summary, "broadcast", s), key, fmt) for s in servers]])
        ratios = []
        for s in servers:
            mine = _get(summary, "broadcast", s)
            r = _ratio(mine.get("cpu_us_per_delivery_all"), bare.get("cpu_us_per_delivery"))
            ratios.append(f"{r:.2f}x" if r is not None and not mine.get("failure") else "-")
        rows.append(["CPU ratio to bare (incl. helpers)", *ratios])
        title = (
            f"broadcast: {cfg['clients']:,} clients x {cfg['rate']:g} events/s for "
            f"{cfg['duration']:g} s, one worker each"
        )
        out.append((title, ["figure", *map(_label, servers)], rows))
    for scenario, title in (("growth", f"growth: {cfg['growth_rate']:g} events/s, one worker"),):
        if scenario not in summary:
            continue
        servers = list(summary[scenario])
        levels = sorted({int(k) for s in summary[scenario].values() for k in s if k})
        rows = []
        for label, key, fmt in [
            ("CPU µs / delivery (incl. helpers)", "cpu_us_per_delivery_all", "{:.2f}"),
            ("latency p99 (ms)", "latency_p99_ms", "{:.1f}"),
            ("RSS KB / stream", "rss_kb_per_stream", "{:.1f}"),
        ]:
            for level in levels:
                rows.append(
                    [
                        f"{label} at {level:,}",
                        *[_cell(_growth_cell(summary, s, level), key, fmt) for s in servers],
                    ]
                )
        out.append((title, ["figure", *map(_label, servers)], rows))
    if "single" in summary:
        servers = list(summary["single"])
        top = max(int(k) for s in summary["single"].values() for k in s)
        rows = [
            [
                f"one broadcast to {top:,}: p99 (ms, median of {cfg['broadcasts']})",
                *[
                    _cell(_get(summary, "single", s, str(top)), "latency_p99_ms", "{:.0f}")
                    for s in servers
                ],
            ],
            [
                "RSS KB a stream adds",
                *[
                    _cell(_get(summary, "single", s, str(top)), "rss_kb_per_stream", "{:.1f}")
                    for s in servers
                ],
            ],
            [
                "worker fixed RSS (MB)",
                *[_mb(_get(summary, "single", s, str(top))) for s in servers],
            ],
        ]
        out.append(
            (
                f"one broadcast to {top:,} streams on one worker",
                ["figure", *map(_label, servers)],
                rows,
            )
        )
    for scenario, title in (
        ("rate", f"rate: {cfg['clients']:,} streams, one worker"),
        ("targeted", f"targeted: {cfg['clients']:,} private channels"),
    ):
        if scenario not in summary:
            continue
        servers = list(summary[scenario])
        rates = sorted({float(k) for s in summary[scenario].values() for k in s if k})
        rows = []
        for rate in rates:
            for s in servers:
                fig = _step(summary[scenario], s, rate)
                if not fig and not summary[scenario][s].get(""):
                    continue
                fig = fig or summary[scenario][s].get("", {})
                row = [
                    f"{rate:g}",
                    _label(s),
                    _cell(fig, "cpu_us_per_delivery_all"),
                    _cell(fig, "latency_p99_ms", "{:.1f}"),
                    _cell(fig, "lost", "{:.0f}"),
                    _cell(fig, "publisher_max_lag_ms", "{:.0f}"),
                ]
                if scenario == "targeted":
                    row.append(_cell(fig, "call_cpu_us", "{:.1f}"))
                row.append("saturated" if fig.get("saturated") else "")
                rows.append(row)
        header = ["events/s", "server", "CPU µs / delivery", "p99 ms", "lost", "pub. lag ms"]
        if scenario == "targeted":
            header.append("publish call CPU µs")
        out.append((title, [*header, "note"], rows))
    machine = [r for r in data["records"] if r["scenario"] == "machine"]
    if machine:
        rows = []
        for r in machine:
            if r.get("failure"):
                rows.append(
                    [
                        _label(r["server"]),
                        f"held {r.get('held', 0):,} of {r['wanted']:,}",
                        "-",
                        "-",
                        "-",
                        "-",
                        r["failure"][:80],
                    ]
                )
                continue
            rows.append(
                [
                    _label(r["server"]),
                    f"{r['held']:,}",
                    "/".join(f"{n:,}" for n in r.get("per_worker", [])),
                    f"{r['single']['latency_p99_ms']:.0f}",
                    f"{r['latency_p99_ms']:.0f}",
                    f"{r['lost']:,}",
                    f"{r['cpu_us_per_delivery_all']:.2f}",
                ]
            )
        out.append(
            (
                f"machine: {machine[0]['wanted']:,} streams, 2 processes",
                [
                    "server",
                    "held",
                    "per process",
                    "one broadcast p99 ms",
                    f"{cfg['machine_rate']:g}/s p99 ms",
                    "lost",
                    "CPU µs / delivery",
                ],
                rows,
            )
        )
    foot = [r for r in data["records"] if r["scenario"] == "footprint"]
    if foot:
        steps = foot[-1]["steps"]
        rows = []
        prev = None
        for s in steps:
            rows.append(
                [
                    s["step"],
                    f"{s['rss_kb'] / 1024:.1f}",
                    "" if prev is None else f"+{(s['rss_kb'] - prev) / 1024:.1f}",
                    str(s["modules"]),
                ]
            )
            prev = s["rss_kb"]
        for key, idle in foot[-1]["idle"].items():
            if "rss_kb" in idle:
                rows.append(
                    [
                        f"idle worker: {_label(key)}",
                        f"{idle['rss_kb'] / 1024:.1f}",
                        "",
                        str(len(idle["modules"])),
                    ]
                )
        out.append(
            (
                "footprint: RSS of a fresh process, import by import (cumulative)",
                ["step", "RSS MB", "step adds MB", "modules"],
                rows,
            )
        )
    return out


def _mb(fig: dict[str, Any]) -> str:
    value = fig.get("fixed_rss_kb")
    return f"{value / 1024:.1f}" if isinstance(value, int | float) else "-"


def _growth_cell(summary: dict[str, Any], server: str, level: int) -> dict[str, Any]:
    fig = _get(summary, "growth", server, str(level))
    if fig:
        return fig
    # Past a failure: show the failure at the first level it did not hold.
    failed = [v for k, v in summary["growth"][server].items() if k and v.get("failure")]
    return failed[0] if failed and int(failed[0].get("wanted", 0)) <= level else {}


def render_markdown(data: dict[str, Any]) -> str:
    """The report on stdout."""
    env = data["environment"]
    lines = [
        f"# flask-sse-push scale benchmark ({env['date']})",
        "",
        f"{env['cpu_model']}, {env['cores']} cores, Linux {env['kernel']}, Python "
        f"{env['python']}, gevent {env['gevent']}, gunicorn {env['gunicorn']}, commit "
        f"{env['commit'][:10]}; medians of {data['config']['repeat']} runs (growth's peers, "
        "machine and footprint: one run)",
    ]
    for title, header, rows in tables(data):
        lines += [
            "",
            f"## {title}",
            "",
            "| " + " | ".join(header) + " |",
            "|---" * len(header) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    failures = [r for r in data["records"] if r.get("failure")]
    if failures:
        lines += ["", "## servers that did not hold a scenario", ""]
        for r in failures:
            first = (r.get("log_problems") or {}).get("first", [])
            said = f"; its log: {first[0]}" if first else ""
            lines.append(
                f"- {r['scenario']}, {_label(r['server'])}: held {r.get('held', 0):,} of "
                f"{r.get('wanted', 0):,}: {r['failure']}{said}"
            )
    lines += ["", "## targets", ""]
    lines += [f"- {t['verdict']}: {t['target']}: {t['detail']}" for t in data["targets"]]
    foot = [r for r in data["records"] if r["scenario"] == "footprint"]
    if foot:
        unneeded = foot[-1]["unneeded"]
        lines += [
            "",
            "## modules an idle memory-bus worker loads beyond a plain Flask app under "
            "gunicorn's gevent worker (and beyond bare gevent)",
            "",
            ", ".join(unneeded.get("modules", [])) or "none",
            "",
            "package modules to review: "
            + (", ".join(unneeded["package_modules_to_review"]) or "none"),
        ]
    return "\n".join(lines) + "\n"


def _rst_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    rule = "  ".join("=" * w for w in widths)

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    body = [line([c or ".." for c in row]) for row in rows]
    return [rule, line(header), rule, *body, rule]


PLOTS = [
    ("cpu_per_delivery.png", "growth", "cpu_us_per_delivery_all", "CPU µs per delivery"),
    ("p99_vs_streams.png", "growth", "latency_p99_ms", "latency p99 (ms)"),
    ("rss_per_stream.png", "growth", "rss_kb_per_stream", "RSS KB per stream"),
    ("p99_vs_rate.png", "rate", "latency_p99_ms", "latency p99 (ms)"),
]


def write_plots(data: dict[str, Any], out_dir: Path) -> list[str]:
    """The plots (matplotlib, Agg): one line per server, bare included; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, scenario, key, ylabel in PLOTS:
        series = data["summary"].get(scenario, {})
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        saturated_shown = False
        for server, steps in series.items():
            points = sorted(
                (float(k), v[key])
                for k, v in steps.items()
                if k and isinstance(v.get(key), int | float)
            )
            steps_by_x = {float(k): v for k, v in steps.items() if k}
            failed = [v for v in steps.values() if v.get("failure")]
            label = _label(server)
            if failed:
                # Where a peer stopped: the legend says how far it got.
                label += f" ({_cell(failed[0], key)})"
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
            late = [(x, y) for x, y in points if steps_by_x[x].get("saturated")]
            if late:
                saturated_label = "saturated" if not saturated_shown else None
                ax.plot(*zip(*late, strict=True), "kx", markersize=10, label=saturated_label)
                saturated_shown = True
        ax.set_xlabel("streams on one worker" if scenario == "growth" else "events/s")
        if scenario == "rate":
            ax.set_xscale("log", base=2)
            rates = sorted({float(k) for steps in series.values() for k in steps if k})
            ax.set_xticks(rates, [f"{r:g}" for r in rates])
            ax.minorticks_off()
        if key.startswith("latency"):
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def render_rst(data: dict[str, Any], plots: list[str]) -> str:
    """``docs/performance_results.rst``: the tables, targets, machine and plots."""
    env = data["environment"]
    lines = [
        ".. This file is written by ``benchmarks/scale.py --docs``; do not edit it by hand.",
        "",
        f"Measured on {env['date']}: {env['cpu_model']}, {env['cores']} cores, Linux "
        f"{env['kernel']}, Python {env['python']}, gevent {env['gevent']}, gunicorn "
        f"{env['gunicorn']}, commit ``{env['commit'][:10]}``. Medians of "
        f"{data['config']['repeat']} runs (the peers in growth, the machine scenario and the "
        "footprint: one run).",
        "",
    ]
    for title, header, rows in tables(data):
        lines += [f"**{title}**", "", *_rst_table(header, rows), ""]
    lines += ["**Targets**", ""]
    lines += [f"- **{t['verdict']}** {t['target']}: {t['detail']}" for t in data["targets"]]
    lines.append("")
    for name in plots:
        alt = name.removesuffix(".png").replace("_", " ")
        lines += [f".. image:: _static/perf/{name}", f"   :alt: {alt}", ""]
    return "\n".join(lines)


README_START = "## Performance"
README_END = "See `docs/performance.rst`"


def readme_table(data: dict[str, Any]) -> str:
    """The README's performance section, from the broadcast and growth figures."""
    summary = data["summary"]
    keys = [
        k
        for k in ("memory", "redis", "sse-starlette", "flask-sse", "flask-queue", BARE)
        if k in summary.get("broadcast", {})
    ]
    bare = _get(summary, "broadcast", BARE)

    def cpu(key: str) -> str:
        fig = _get(summary, "broadcast", key)
        if fig.get("failure"):
            return _cell(fig, "")
        value = fig.get("cpu_us_per_delivery_all")
        ratio = _ratio(value, bare.get("cpu_us_per_delivery"))
        return (
            f"{value:.1f} ({ratio:.2f}x)"
            if value and ratio and key != BARE
            else _cell(fig, "cpu_us_per_delivery_all", "{:.1f}")
        )

    def lat(key: str) -> str:
        fig = _get(summary, "broadcast", key)
        return (
            f"{_cell(fig, 'latency_p50_ms', '{:.1f}')} / {_cell(fig, 'latency_p99_ms', '{:.1f}')}"
        )

    header = ["", *map(_label, keys)]
    rows = [
        ["CPU µs per delivery (incl. redis-server)", *map(cpu, keys)],
        ["latency p50 / p99 (ms)", *map(lat, keys)],
        [
            "RSS per stream (KB)",
            *[_cell(_get(summary, "broadcast", k), "rss_kb_per_stream", "{:.1f}") for k in keys],
        ],
        ["lost events", *[_cell(_get(summary, "broadcast", k), "lost", "{:.0f}") for k in keys]],
    ]
    cfg, env = data["config"], data["environment"]
    lines = [
        README_START,
        "",
        f"`benchmarks/scale.py` compares flask-sse-push with its peers and a bare gevent "
        f"broadcaster (no WSGI, one `sendall` per client) in the same run: "
        f"{cfg['clients']:,} clients, {cfg['rate']:g} events/s, one process each; medians of "
        f"{cfg['repeat']} runs on {env['cores']} cores ({env['date']}):",
        "",
        "| " + " | ".join(header) + " |",
        "| --- |" + " ---: |" * len(keys),
        *["| " + " | ".join(row) + " |" for row in rows],
        "",
    ]
    for t in data["targets"]:
        lines.append(f"- {t['verdict']}: {t['target']}: {t['detail']}")
    return "\n".join(lines).rstrip() + "\n\n"


def rewrite_readme(data: dict[str, Any], path: Path = README) -> None:
    """Replace the README's performance section (up to its "See ..." line)."""
    text = path.read_text()
    start, end = text.index(README_START), text.index(README_END)
    path.write_text(text[:start] + readme_table(data) + text[end:])


def environment(started: float) -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu_model": model,
        "cores": psutil.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gevent": version("gevent"),
        "gunicorn": version("gunicorn"),
        "commit": package_state()["commit"],
        "seconds": time.monotonic() - started,
    }


def build_report(
    args: argparse.Namespace, records: list[dict[str, Any]], env: dict[str, Any]
) -> dict[str, Any]:
    summary = summarize(records)
    config = {k: v for k, v in vars(args).items() if k not in ("json", "from_json")}
    return {
        "config": config,
        "environment": env,
        "summary": summary,
        "records": records,
        "targets": evaluate(summary, records),
    }


def outputs(data: dict[str, Any], args: argparse.Namespace) -> None:
    """The report on stdout, and what --json, --docs and --readme ask for."""
    print(render_markdown(data))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1, default=str) + "\n")
        _progress(f"raw figures: {out}")
    if args.docs:
        plots = write_plots(data, Path(args.plot_dir))
        Path(args.results_rst).write_text(render_rst(data, plots))
        _progress(f"wrote {args.results_rst} and {len(plots)} plots in {args.plot_dir}")
    if args.readme:
        rewrite_readme(data, Path(args.readme_path))
        _progress(f"rewrote the performance table of {args.readme_path}")


# -- command line ---------------------------------------------------------------------------


def _numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a subset ({', '.join(QUICK_SCENARIOS)}; smaller), ~2 minutes",
    )
    parser.add_argument("--only", help=f"comma-separated scenarios of: {', '.join(SCENARIOS)}")
    parser.add_argument("--repeat", type=int, help="runs of each scenario (default 3, quick 1)")
    parser.add_argument(
        "--json",
        nargs="?",
        const=str(DEFAULT_JSON),
        metavar="OUT",
        help=f"write every raw figure (default {DEFAULT_JSON})",
    )
    parser.add_argument(
        "--from-json",
        metavar="IN",
        help="measure nothing: report (and --docs/--readme) from a saved JSON",
    )
    parser.add_argument(
        "--docs", action="store_true", help="write the plots and docs/performance_results.rst"
    )
    parser.add_argument(
        "--readme", action="store_true", help="rewrite the performance table of README.md"
    )
    parser.add_argument("--plot-dir", default=str(PLOT_DIR), help=argparse.SUPPRESS)
    parser.add_argument("--results-rst", default=str(RESULTS_RST), help=argparse.SUPPRESS)
    parser.add_argument("--readme-path", default=str(README), help=argparse.SUPPRESS)
    parser.add_argument(
        "--clients",
        type=int,
        default=1000,
        help="streams of broadcast, rate and targeted (default 1000)",
    )
    parser.add_argument("--rate", type=float, default=50.0, help="broadcast events/s (50)")
    parser.add_argument("--duration", type=float, help="seconds of publishing per step (6)")
    parser.add_argument("--levels", help="growth: streams on one worker (1000,5000,10000,19000)")
    parser.add_argument(
        "--growth-rate",
        type=float,
        default=3.0,
        help="growth: events/s at every level (3: 57,000 deliveries/s at 19k)",
    )
    parser.add_argument(
        "--broadcasts",
        type=int,
        default=5,
        help="growth: single broadcasts at the top level (median of p99s)",
    )
    parser.add_argument("--rates", help="rate: the ladder (25,50,...,1600)")
    parser.add_argument("--rate-duration", type=float, help="rate: seconds per step (3)")
    parser.add_argument("--targeted-rates", help="targeted: events/s in total (500,1000,2000)")
    parser.add_argument("--machine-streams", type=int, default=38000)
    parser.add_argument("--machine-clients", type=int, default=4, help="client processes")
    parser.add_argument("--machine-rate", type=float, default=1.0)
    parser.add_argument("--machine-duration", type=float, default=5.0)
    parser.add_argument("--no-peers", action="store_true", help="bare and flask-sse-push only")
    args = parser.parse_args(argv)
    quick = args.quick
    args.scenarios = (
        args.only.split(",") if args.only else (QUICK_SCENARIOS if quick else SCENARIOS)
    )
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from {SCENARIOS}")
    args.repeat = args.repeat or (1 if quick else 3)
    args.duration = args.duration or (3.0 if quick else 6.0)
    args.rate_duration = args.rate_duration or (2.0 if quick else 3.0)
    args.levels = [
        int(x) for x in _numbers(args.levels or ("1000,5000" if quick else "1000,5000,10000,19000"))
    ]
    args.rates = _numbers(args.rates or ("50,200,800" if quick else "25,50,100,200,400,800,1600"))
    args.targeted_rates = _numbers(args.targeted_rates or ("500" if quick else "500,1000,2000"))
    peers = [] if args.no_peers else PEERS
    flask = [BARE, "memory", "redis"]
    args.servers = [*flask, *peers]
    args.growth_servers = [*flask, *([] if quick else peers)]
    args.rate_servers = flask
    args.targeted_servers = flask
    args.footprint_servers = flask
    if min(args.repeat, args.clients, *args.levels) < 1:
        parser.error("--repeat, --clients and --levels must be positive")
    return args


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        saved["summary"] = summarize(saved["records"])
        saved["targets"] = evaluate(saved["summary"], saved["records"])
        outputs(saved, args)
        return 0
    raise_nofile_limit()
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, _on_signal)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    helpers = Helpers()
    records: list[dict[str, Any]] = []
    try:
        for scenario in args.scenarios:
            t0 = time.monotonic()
            for run in range(1, (1 if scenario in ONCE else args.repeat) + 1):
                records += RUNNERS[scenario](args, helpers, run)
            _progress(f"{scenario}: {time.monotonic() - t0:.0f} s")
    finally:
        helpers.stop()
        stop_all()
    data = build_report(args, records, environment(started))
    outputs(data, args)
    _progress(f"took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

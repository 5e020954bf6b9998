"""Broadcast benchmark: flask-sse-push under gunicorn + gevent against a bare gevent server.

    .venv/bin/python benchmarks/broadcast.py [--mode memory|redis|all] [--clients 1000]
                                             [--rate 50] [--duration 10] [--repeat 3]
                                             [--workers 4] [--json [OUT]]

For each run: start the server on a free 127.0.0.1 port, connect N clients from a separate
client process (one epoll loop), publish ``rate`` events/s for ``duration`` s from a greenlet
inside the server, and measure the server's CPU per delivered event, publish-to-receive
latency, RSS per connection and lost events. ``--mode memory`` serves the Flask app from one
gunicorn gevent worker with the in-process bus; ``--mode redis`` from ``--workers`` workers on
the Redis bus of a throwaway redis-server (whose CPU is measured too); ``--mode all`` runs
both. The servers alternate (Flask targets, then the bare baseline), ``--repeat`` runs each;
the table shows medians. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
from benchutil import free_port, raise_nofile_limit
from targets import (
    BENCH_DIR,
    REPO_ROOT,
    BareTarget,
    ClientProcess,
    FlaskTarget,
    RedisService,
    Target,
    http_request,
    stop_all,
)

DEFAULT_JSON = BENCH_DIR / "results" / "latest.json"
LOG_DIR = BENCH_DIR / "results" / "logs"

#: Targets: CPU per delivery of flask-sse-push at most this many times the bare server's.
CPU_RATIO_TARGET = 2.0
#: Target: CPU per delivery with metrics at most this many times the same server's without.
METRICS_RATIO_TARGET = 1.05
#: Settle time before reading RSS after the clients are connected.
RSS_SETTLE_S = 0.5
#: Lines of a server log that tell of a problem (gunicorn's levels, tracebacks, and the
#: package's own warnings, which reach the log through logging's last-resort handler).
LOG_PROBLEM = re.compile(
    r"\[(WARNING|ERROR|CRITICAL)\]|Traceback|Error|flask-sse-push: (?!worker \d+ ended)"
)


@dataclass
class Mode:
    """What one ``--mode`` runs: a Flask target (compared with the bare baseline).

    :param name: the mode's name on the command line.
    :param describe: one line for the report, from the arguments.
    :param build: starts the mode's helper services, if any (tracked in
        ``targets.REGISTRY`` and listed in the target's ``services``, which are stopped at
        the end), and returns its Flask target.
    """

    name: str
    describe: Callable[[argparse.Namespace], str]
    build: Callable[[argparse.Namespace], FlaskTarget]


def with_metrics(target: FlaskTarget) -> FlaskTarget:
    """The same server as *target* (sharing its services) with Prometheus metrics on."""
    return FlaskTarget(
        workers=target.workers,
        env=target.env,
        name=f"{target.name} +metrics",
        services=target.services,
        metrics=True,
    )


def _memory_target(args: argparse.Namespace) -> FlaskTarget:
    env = {"BENCH_KEEPALIVE": str(args.keepalive)}
    return FlaskTarget(workers=1, env=env, name="flask-sse-push memory")


def _redis_target(args: argparse.Namespace) -> FlaskTarget:
    redis = RedisService(LOG_DIR)
    settings = redis.start()
    env = {**settings, "BENCH_KEEPALIVE": str(args.keepalive)}
    return FlaskTarget(workers=args.workers, env=env, name="flask-sse-push redis", services=[redis])


#: The modes; ``--mode all`` runs every one of them, in this order.
MODES: dict[str, Mode] = {
    "memory": Mode(
        "memory",
        lambda args: "one gunicorn gevent worker, in-process bus (memory://)",
        _memory_target,
    ),
    "redis": Mode(
        "redis",
        lambda args: (
            f"{args.workers} gunicorn gevent workers, Redis bus on a throwaway redis-server; "
            "one publisher greenlet in one worker"
        ),
        _redis_target,
    ),
}


def run_once(target: Target, args: argparse.Namespace, index: int) -> dict[str, Any]:
    """Start *target*, run one measurement against it, stop it; return the raw figures."""
    port = free_port()
    log_path = LOG_DIR / f"{target.name.replace(' ', '-')}-{index}.log"
    run: dict[str, Any] = {"server": target.name, "run": index, "port": port}
    # Others commit on this machine: a run that starts on another package state than the
    # benchmark did (or whose workers import a half-changed tree) says so in its notes.
    run["package"] = package_state()
    run["helpers"] = [service.name for service in target.services]
    started = time.monotonic()
    for service in target.services:
        service.reset()
    target.start(port, args.clients, log_path)
    client: ClientProcess | None = None
    try:
        run["pids"] = [p.pid for p in target.measured]
        run["settle_s"] = target.settle()
        rss_before_by_worker = target.rss_by_worker()
        rss_before = sum(rss_before_by_worker)
        client = ClientProcess()
        connect = client.request(
            {
                "cmd": "connect",
                "port": port,
                "path": target.stream_path,
                "n": args.clients,
                "timeout": args.connect_timeout,
            },
            timeout=args.connect_timeout + 10,
        )
        run["connect"] = connect
        connected = int(connect["connected"])
        if connected == 0:
            raise RuntimeError(f"no client could connect to {target.name}: {connect}")
        time.sleep(RSS_SETTLE_S)
        rss_after_by_worker = target.rss_by_worker()
        rss_after = sum(rss_after_by_worker)
        worker_ports = target.streams_by_worker()
        for service in target.services:
            run.setdefault("redis_clients", {})["connected"] = service.client_names()

        client.request({"cmd": "mark"}, timeout=10)
        machine_start = _busy_seconds(psutil.cpu_times())
        client_start = _process_seconds(client.ps)
        helper_start = target.service_cpu_seconds()
        cpu_start = target.cpu_seconds()
        wall_start = time.monotonic()
        status, published = http_request(
            port,
            "POST",
            f"/bench/start?rate={args.rate}&duration={args.duration}",
            timeout=args.duration * 3 + 60,
        )
        if status != 200 or not isinstance(published, dict):
            raise RuntimeError(f"{target.name}: /bench/start answered {status}: {published}")
        cpu_published = target.cpu_seconds()
        wall_published = time.monotonic()
        count = int(published["published"])
        drain = client.request(
            {"cmd": "drain", "expected": count, "quiet": 2.0, "timeout": args.drain_timeout},
            timeout=args.drain_timeout + 10,
        )
        cpu_end = target.cpu_seconds()
        helper_end = target.service_cpu_seconds()
        wall_end = time.monotonic()
        client_cpu = _process_seconds(client.ps) - client_start
        machine_cpu = _busy_seconds(psutil.cpu_times()) - machine_start
        rss_end = target.rss_bytes()
        per_port = client.request({"cmd": "per_port"}, timeout=10)["received"]
        if isinstance(target, FlaskTarget) and target.metrics:
            run["metrics"] = target.scrape()
        for service in target.services:
            run.setdefault("redis_clients", {})["after_drain"] = service.client_names()
        run["drain"] = drain
        run["publisher"] = published
    finally:
        if client is not None:
            client.stop()
        target.stop()
    run["log_problems"] = _log_problems(log_path)
    run.update(_per_worker(target, worker_ports, per_port, count, published))
    for worker, before, after in zip(
        run["workers"], rss_before_by_worker, rss_after_by_worker, strict=True
    ):
        worker["rss_growth_kb"] = (after - before) / 1024
        if "redis_clients" in run:
            names = run["redis_clients"]["after_drain"]
            worker["redis_receive_conns"] = names.get(f"flask-sse-push:receive:{worker['pid']}", 0)
            worker["redis_publish_conns"] = names.get(f"flask-sse-push:publish:{worker['pid']}", 0)

    received = int(drain["received"])
    expected = count * connected
    cpu = cpu_end - cpu_start
    helper_cpu = helper_end - helper_start
    wall = wall_end - wall_start
    run.update(
        {
            "clients": args.clients,
            "connected": connected,
            "published": count,
            "expected": expected,
            "received": received,
            "lost": expected - received,
            "cpu_s": cpu,
            "cpu_publish_s": cpu_published - cpu_start,
            "wall_s": wall,
            "wall_publish_s": wall_published - wall_start,
            "publisher_max_lag_ms": published["max_lag_ms"],
            "helper_cpu_s": helper_cpu,
            "server_cpu_util": cpu / wall,
            "helper_cpu_util": helper_cpu / wall,
            # Everything else the machine did meanwhile (other jobs skew the figures).
            "other_cpu_util": max(0.0, machine_cpu - cpu - helper_cpu - client_cpu) / wall,
            "machine_cpu_util": machine_cpu / wall,
            "cpu_us_per_delivery": cpu / received * 1e6 if received else float("nan"),
            "cpu_us_per_delivery_all": (
                (cpu + helper_cpu) / received * 1e6 if received else float("nan")
            ),
            "latency_p50_ms": drain["latency_p50_ms"],
            "latency_p99_ms": drain["latency_p99_ms"],
            "latency_max_ms": drain["latency_max_ms"],
            "rss_before_kb": rss_before / 1024,
            "rss_connected_kb": rss_after / 1024,
            "rss_end_kb": rss_end / 1024,
            "rss_kb_per_connection": (rss_after - rss_before) / 1024 / connected,
            "connect_s": connect["seconds"],
            "client_cpu_util": drain["client_cpu_util"],
            "total_s": time.monotonic() - started,
        }
    )
    return run


def _per_worker(
    target: Target,
    worker_ports: list[set[int]],
    per_port: dict[str, int],
    count: int,
    published: dict[str, Any],
) -> dict[str, Any]:
    """Which worker held each client (from the workers' sockets), and what each delivered."""
    workers = []
    mapped: set[int] = set()
    for proc, ports in zip(target.measured, worker_ports, strict=True):
        got = [per_port[str(p)] for p in ports if str(p) in per_port]
        mapped |= ports
        workers.append(
            {
                "pid": proc.pid,
                "clients": len(ports),
                "received": sum(got),
                "lost": count * len(got) - sum(got),
                "min_per_client": min(got) if got else 0,
            }
        )
    pids = [w["pid"] for w in workers]
    pub_pid = published.get("pid")
    return {
        "workers": workers,
        "unmapped_clients": sum(1 for p in per_port if int(p) not in mapped),
        "publisher_worker": pids.index(pub_pid) + 1 if pub_pid in pids else None,
    }


def _log_problems(path: Path, keep: int = 5) -> dict[str, Any]:
    """How many lines of a server log tell of a problem, and the first few different ones."""
    try:
        lines = path.read_text("utf-8", "replace").splitlines()
    except OSError:
        return {"count": 0, "first": []}
    bad = [line for line in lines if LOG_PROBLEM.search(line)]
    first: list[str] = []
    for line in bad:
        # Without the timestamp and pid, so repeats of one message count once.
        text = re.sub(r"^\[[^]]*\] \[\d+\] ", "", line)[:200]
        if text not in first:
            first.append(text)
        if len(first) >= keep:
            break
    return {"count": len(bad), "first": first}


def _busy_seconds(times: Any) -> float:
    """Busy CPU seconds of the whole machine in a ``psutil.cpu_times()`` sample."""
    idle = times.idle + getattr(times, "iowait", 0.0)
    return float(
        sum(times) - idle - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    )


def _process_seconds(proc: psutil.Process) -> float:
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(float(r[key]) for r in runs))


def summarize(runs: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, float]]:
    """Medians per server of the figures in the table."""
    keys = [
        "cpu_us_per_delivery",
        "cpu_us_per_delivery_all",
        "latency_p50_ms",
        "latency_p99_ms",
        "rss_kb_per_connection",
        "lost",
        "connect_s",
        "server_cpu_util",
        "helper_cpu_util",
        "client_cpu_util",
        "other_cpu_util",
        "publisher_max_lag_ms",
        "wall_publish_s",
        "received",
    ]
    out: dict[str, dict[str, float]] = {}
    for name in names:
        mine = [r for r in runs if r["server"] == name]
        if mine:
            out[name] = {
                key: _median(mine, key)
                for key in keys
                if key != "helper_cpu_util" or mine[0]["helpers"]
            }
            out[name]["lost_total"] = float(sum(r["lost"] for r in mine))
    return out


def render(
    summary: dict[str, dict[str, float]],
    runs: list[dict[str, Any]],
    args: argparse.Namespace,
    names: list[str],
) -> str:
    """The markdown report: medians, ratios to bare, targets, and one line per run."""
    bare_name = BareTarget.name
    bare = summary.get(bare_name, {})
    flasks = [n for n in names if n != bare_name and n in summary]
    columns = [*flasks, bare_name] if bare else flasks
    rows = [
        ("CPU µs / delivery (server processes)", "cpu_us_per_delivery", "{:.2f}"),
        ("CPU µs / delivery incl. redis-server", "cpu_us_per_delivery_all", "{:.2f}"),
        ("latency p50 (ms)", "latency_p50_ms", "{:.2f}"),
        ("latency p99 (ms)", "latency_p99_ms", "{:.2f}"),
        ("RSS KB / connection (sum of workers)", "rss_kb_per_connection", "{:.1f}"),
        ("lost events", "lost", "{:.0f}"),
        (f"connect {args.clients} clients (s)", "connect_s", "{:.2f}"),
        (f"publishing took (s, nominal {args.duration:g})", "wall_publish_s", "{:.2f}"),
        ("publisher max lag (ms)", "publisher_max_lag_ms", "{:.0f}"),
        ("server CPU use (cores, all workers)", "server_cpu_util", "{:.2f}"),
        ("redis-server CPU use (cores)", "helper_cpu_util", "{:.2f}"),
        ("client CPU use (cores)", "client_cpu_util", "{:.2f}"),
        ("other load on the machine (cores)", "other_cpu_util", "{:.2f}"),
    ]
    modes = ", ".join(f"{MODES[m].name}: {MODES[m].describe(args)}" for m in _mode_names(args))
    lines = [
        f"{args.clients} clients, {args.rate:g} events/s for {args.duration:g} s "
        f"({args.clients * args.rate:,.0f} deliveries/s), SSE_KEEPALIVE {args.keepalive:g} s, "
        f"{psutil.cpu_count()} CPUs, medians of {args.repeat} runs each",
        f"mode {args.mode} ({modes})",
    ]
    ratio_heads = [f"{n.removeprefix('flask-sse-push ')} / bare" for n in flasks] if bare else []
    header = ["metric", *columns, *ratio_heads]
    lines += ["", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for label, key, fmt in rows:
        cells = []
        for name in columns:
            value = summary[name].get(key)
            cells.append(fmt.format(value) if value is not None else "-")
        ratios = []
        if bare:
            b = bare.get(key)
            for name in flasks:
                a = summary[name].get(key)
                ratios.append(f"{a / b:.2f}x" if a is not None and b else "-")
        lines.append(f"| {label} | " + " | ".join(cells + ratios) + " |")
    lines.append("")
    cpu_b = bare.get("cpu_us_per_delivery")
    for name in flasks:
        mine = summary[name]
        if cpu_b:
            ratio = mine["cpu_us_per_delivery"] / cpu_b
            ratio_all = mine["cpu_us_per_delivery_all"] / cpu_b
            verdict = "PASS" if ratio_all <= CPU_RATIO_TARGET else "FAIL"
            extra = f", {ratio_all:.2f}x with redis-server" if ratio_all != ratio else ""
            lines.append(
                f"- target CPU per delivery <= {CPU_RATIO_TARGET:g}x bare, {name}: {verdict} "
                f"({ratio:.2f}x{extra})"
            )
    for name in flasks:
        base = name.removesuffix(" +metrics")
        if base != name and base in summary:
            ratio = summary[name]["cpu_us_per_delivery"] / summary[base]["cpu_us_per_delivery"]
            ratio_all = (
                summary[name]["cpu_us_per_delivery_all"]
                / (summary[base]["cpu_us_per_delivery_all"])
            )
            verdict = "PASS" if ratio <= METRICS_RATIO_TARGET else "FAIL"
            lines.append(
                f"- target metrics cost <= {METRICS_RATIO_TARGET - 1:.0%} CPU per delivery, "
                f"{base}: {verdict} ({ratio:.3f}x, {ratio_all:.3f}x with redis-server)"
            )
    for name in flasks:
        lost = summary[name]["lost_total"]
        verdict = "PASS" if lost == 0 else "FAIL"
        lines.append(f"- target zero lost events, {name} (all runs): {verdict} ({lost:.0f})")
    if bare:
        lines.append(f"- {bare_name} lost events, all runs: {bare['lost_total']:.0f}")
    lines += [
        "",
        "| run | server | CPU µs/deliv | incl. redis | p50 ms | p99 ms | KB/conn | lost "
        "| connect s | clients per worker | notes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    order = {name: i for i, name in enumerate(columns)}
    for r in sorted(runs, key=lambda r: (order.get(r["server"], 99), r["run"])):
        per_worker = "/".join(str(w["clients"]) for w in r["workers"])
        lines.append(
            f"| {r['run']} | {r['server']} | {r['cpu_us_per_delivery']:.2f} | "
            f"{r['cpu_us_per_delivery_all']:.2f} | "
            f"{r['latency_p50_ms']:.2f} | {r['latency_p99_ms']:.2f} | "
            f"{r['rss_kb_per_connection']:.1f} | {r['lost']} | {r['connect_s']:.2f} | "
            f"{per_worker} | {_notes(r)} |"
        )
    return "\n".join(lines)


def _notes(run: dict[str, Any]) -> str:
    drain, pub = run["drain"], run["publisher"]
    notes = []
    if run["connected"] != run["clients"]:
        notes.append(f"connected {run['connected']}/{run['clients']}")
    if len(run["workers"]) > 1 and run.get("publisher_worker"):
        notes.append(f"publisher in worker {run['publisher_worker']}")
    if run["unmapped_clients"]:
        notes.append(f"{run['unmapped_clients']} clients on no known worker")
    silent = [i for i, w in enumerate(run["workers"], 1) if w["clients"] and not w["received"]]
    receivers = [
        i
        for i, w in enumerate(run["workers"], 1)
        if "redis_receive_conns" in w and w["redis_receive_conns"] != (1 if w["clients"] else 0)
    ]
    if receivers:
        counts = "/".join(str(w["redis_receive_conns"]) for w in run["workers"])
        notes.append(f"Redis receive connections per worker {counts}")
    if silent:
        notes.append("delivered nothing: worker " + ", ".join(map(str, silent)))
    if any(w["lost"] for w in run["workers"]) and len(run["workers"]) > 1:
        notes.append("lost per worker " + "/".join(str(w["lost"]) for w in run["workers"]))
    if drain["ended"]:
        notes.append(f"streams ended {drain['ended']}")
    if drain["comments"]:
        notes.append(f"comments {drain['comments']}")
    if drain["gaps"] or drain["duplicates"]:
        notes.append(f"gaps {drain['gaps']} dups {drain['duplicates']}")
    if pub["max_lag_ms"] > 50:
        notes.append(f"publisher late by up to {pub['max_lag_ms']:.0f} ms")
    cpus = psutil.cpu_count() or 1
    if run["server_cpu_util"] > 0.9 * min(len(run["pids"]), cpus):
        notes.append("server saturated")
    elif run["machine_cpu_util"] > 0.9 * cpus:
        notes.append(f"machine saturated ({run['machine_cpu_util']:.2f} of {cpus} cores)")
    if drain["client_cpu_util"] > 0.9:
        notes.append("client near 100% CPU")
    if run["other_cpu_util"] > 0.2:
        notes.append(f"other load {run['other_cpu_util']:.1f} cores")
    metrics = run.get("metrics")
    if metrics:
        counted = metrics.get("sse_deliveries_total", 0)
        if counted != run["received"]:
            notes.append(f"metrics count {counted:.0f} deliveries, {run['received']} received")
        samples = metrics.get("sse_delivery_lag_seconds_count", 0)
        if samples:
            mean = metrics["sse_delivery_lag_seconds_sum"] / samples * 1000
            notes.append(f"metrics lag mean {mean:.1f} ms ({samples:.0f} samples)")
    if run["log_problems"]["count"]:
        notes.append(f"server log: {run['log_problems']['count']} problem lines")
    if run.get("package_changed"):
        notes.append(f"PACKAGE CHANGED since the start: {run['package_changed']}")
    return "; ".join(notes)


def package_state() -> dict[str, Any]:
    """The commit and any uncommitted change of the package, to tell what was measured."""

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(
                ["git", *argv], cwd=REPO_ROOT, capture_output=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.decode("utf-8", "replace").strip()

    diff = git("diff", "HEAD", "--", "flask_sse_push")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty_files": git("diff", "HEAD", "--name-only", "--", "flask_sse_push").split(),
        "diff_sha1": hashlib.sha1(diff.encode()).hexdigest() if diff else None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Broadcast benchmark: flask-sse-push vs a bare gevent broadcaster."
    )
    parser.add_argument("--clients", type=int, default=1000, help="connections per server")
    parser.add_argument("--rate", type=float, default=50.0, help="events published per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of publishing")
    parser.add_argument("--repeat", type=int, default=3, help="runs per server, alternating")
    parser.add_argument(
        "--mode",
        choices=[*MODES, "all"],
        default="memory",
        help="memory (one worker, in-process bus), redis (--workers workers, Redis bus), or "
        "all (both, and one bare baseline, in the same invocation)",
    )
    parser.add_argument(
        "--workers", type=int, default=4, help="gunicorn workers in redis mode (default 4)"
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const=str(DEFAULT_JSON),
        default=None,
        metavar="OUT",
        help=f"write every raw figure as JSON (OUT defaults to {DEFAULT_JSON})",
    )
    parser.add_argument(
        "--keepalive",
        type=float,
        default=15.0,
        help="SSE_KEEPALIVE of the Flask app (seconds; 0 turns keep-alives off)",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="also run each flask-sse-push server with Prometheus metrics on (multiprocess "
        "mode), in the same alternation, and report the CPU ratio",
    )
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument("--drain-timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    if (
        args.clients < 1
        or args.rate <= 0
        or args.duration <= 0
        or args.repeat < 1
        or args.workers < 1
    ):
        parser.error("--clients, --rate, --duration, --repeat and --workers must be positive")
    return args


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _mode_names(args: argparse.Namespace) -> list[str]:
    return list(MODES) if args.mode == "all" else [args.mode]


def _stop_services(targets: list[Target]) -> None:
    services = {id(s): s for target in targets for s in target.services}  # shared by +metrics
    for service in services.values():
        service.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile_limit()
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, _on_signal)
    runs: list[dict[str, Any]] = []
    targets: list[Target] = []
    started = time.monotonic()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    package = package_state()
    try:
        for name in _mode_names(args):
            target = MODES[name].build(args)
            targets.append(target)
            if args.metrics:
                targets.append(with_metrics(target))
        targets.append(BareTarget())
        for index in range(1, args.repeat + 1):
            for target in targets:
                print(f"run {index}/{args.repeat}: {target.name} ...", file=sys.stderr, flush=True)
                try:
                    run = run_once(target, args, index)
                except Exception:
                    print(f"{target.name} failed; log tail:\n{target.log_tail()}", file=sys.stderr)
                    for service in target.services:
                        print(f"{service.name} log tail:\n{service.log_tail()}", file=sys.stderr)
                    raise
                if run["package"] != package:
                    state = run["package"]
                    run["package_changed"] = (
                        f"commit {state['commit'][:7]}, uncommitted {state['dirty_files']}"
                    )
                    print(f"  package changed: {run['package_changed']}", file=sys.stderr)
                runs.append(run)
                for line in run["log_problems"]["first"]:
                    print(f"  server log: {line}", file=sys.stderr, flush=True)
                per_worker = "/".join(str(w["clients"]) for w in run["workers"])
                print(
                    f"  {run['cpu_us_per_delivery']:.2f} µs/delivery "
                    f"({run['cpu_us_per_delivery_all']:.2f} with helpers), "
                    f"p50 {run['latency_p50_ms']:.1f} ms, p99 {run['latency_p99_ms']:.1f} ms, "
                    f"{run['rss_kb_per_connection']:.1f} KB/conn, lost {run['lost']}, "
                    f"connect {run['connect_s']:.2f} s, clients per worker {per_worker}, "
                    f"other load {run['other_cpu_util']:.2f} ({run['total_s']:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        _stop_services(targets)
        stop_all()
    names = [t.name for t in targets]
    summary = summarize(runs, names)
    print(render(summary, runs, args, names))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "modes": {m: MODES[m].describe(args) for m in _mode_names(args)},
            "environment": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": psutil.cpu_count(),
                "started": started_at,
                "seconds": time.monotonic() - started,
            },
            "package": package,
            "summary": summary,
            "runs": runs,
        }
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nraw figures: {out}", file=sys.stderr)
    print(f"took {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

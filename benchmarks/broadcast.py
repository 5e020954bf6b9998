"""Broadcast benchmark: flask-sse-push under gunicorn + gevent against a bare gevent server.

    .venv/bin/python benchmarks/broadcast.py [--clients 1000] [--rate 50] [--duration 10]
                                             [--repeat 3] [--json [OUT]]

For each run: start the server on a free 127.0.0.1 port, connect N clients from a separate
client process (one epoll loop), publish ``rate`` events/s for ``duration`` s from a greenlet
inside the server, and measure the server's CPU per delivered event, publish-to-receive
latency, RSS per connection and lost events. The servers alternate, ``--repeat`` runs each;
the table shows medians. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
    Target,
    http_request,
    stop_all,
)

DEFAULT_JSON = BENCH_DIR / "results" / "latest.json"
LOG_DIR = BENCH_DIR / "results" / "logs"

#: Targets: CPU per delivery of flask-sse-push at most this many times the bare server's.
CPU_RATIO_TARGET = 2.0
#: Settle time before reading RSS after the clients are connected.
RSS_SETTLE_S = 0.5


@dataclass
class Mode:
    """What one ``--mode`` runs: the servers to compare, built once services are up.

    :param name: the mode's name on the command line.
    :param describe: one line for the report.
    :param targets: builds the targets from the arguments and the services' settings
        (environment variables for the servers).
    :param services: starts helper processes (e.g. redis-server) and returns settings for
        :attr:`targets`; its processes must be tracked in ``targets.REGISTRY``.
    """

    name: str
    describe: str
    targets: Callable[[argparse.Namespace, dict[str, str]], list[Target]]
    services: Callable[[], dict[str, str]] = field(default=lambda: {})


def _memory_targets(args: argparse.Namespace, settings: dict[str, str]) -> list[Target]:
    env = {**settings, "BENCH_KEEPALIVE": str(args.keepalive)}
    return [FlaskTarget(workers=1, env=env), BareTarget()]


#: The modes. A later ``redis`` mode: a ``services`` that starts ``redis-server --port P``
#: on 127.0.0.1 (tracked for shutdown) and returns ``{"SSE_BUS_URL": "redis://..."}``, and
#: ``targets`` returning ``[FlaskTarget(workers=4, env=...), BareTarget()]``. CPU and RSS
#: are summed over a target's workers already; the redis-server's CPU would be added by
#: tracking it as a measured process of the Flask target.
MODES: dict[str, Mode] = {
    "memory": Mode(
        "memory",
        "one gunicorn gevent worker, in-process bus (memory://)",
        _memory_targets,
    ),
}


def run_once(target: Target, args: argparse.Namespace, index: int) -> dict[str, Any]:
    """Start *target*, run one measurement against it, stop it; return the raw figures."""
    port = free_port()
    log_path = LOG_DIR / f"{target.name.replace(' ', '-')}-{index}.log"
    run: dict[str, Any] = {"server": target.name, "run": index, "port": port}
    started = time.monotonic()
    target.start(port, args.clients, log_path)
    client: ClientProcess | None = None
    try:
        run["pids"] = [p.pid for p in target.measured]
        rss_before = target.rss_bytes()
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
        rss_after = target.rss_bytes()

        client.request({"cmd": "mark"}, timeout=10)
        machine_start = _busy_seconds(psutil.cpu_times())
        client_start = _process_seconds(client.ps)
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
        wall_end = time.monotonic()
        client_cpu = _process_seconds(client.ps) - client_start
        machine_cpu = _busy_seconds(psutil.cpu_times()) - machine_start
        rss_end = target.rss_bytes()
        run["drain"] = drain
        run["publisher"] = published
    finally:
        if client is not None:
            client.stop()
        target.stop()

    received = int(drain["received"])
    expected = count * connected
    cpu = cpu_end - cpu_start
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
            "server_cpu_util": cpu / wall,
            # Everything else the machine did meanwhile (other jobs skew the figures).
            "other_cpu_util": max(0.0, machine_cpu - cpu - client_cpu) / wall,
            "cpu_us_per_delivery": cpu / received * 1e6 if received else float("nan"),
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
        "latency_p50_ms",
        "latency_p99_ms",
        "rss_kb_per_connection",
        "lost",
        "connect_s",
        "server_cpu_util",
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
            out[name] = {key: _median(mine, key) for key in keys}
            out[name]["lost_total"] = float(sum(r["lost"] for r in mine))
    return out


def render(
    summary: dict[str, dict[str, float]], runs: list[dict[str, Any]], args: argparse.Namespace
) -> str:
    """The markdown report: medians, ratio, targets, and one line per run."""
    flask_name, bare_name = FlaskTarget.name, BareTarget.name
    flask, bare = summary.get(flask_name, {}), summary.get(bare_name, {})
    rows = [
        ("CPU µs / delivery", "cpu_us_per_delivery", "{:.2f}"),
        ("latency p50 (ms)", "latency_p50_ms", "{:.2f}"),
        ("latency p99 (ms)", "latency_p99_ms", "{:.2f}"),
        ("RSS KB / connection", "rss_kb_per_connection", "{:.1f}"),
        ("lost events", "lost", "{:.0f}"),
        (f"connect {args.clients} clients (s)", "connect_s", "{:.2f}"),
        (f"publishing took (s, nominal {args.duration:g})", "wall_publish_s", "{:.2f}"),
        ("publisher max lag (ms)", "publisher_max_lag_ms", "{:.0f}"),
        ("server CPU use (cores)", "server_cpu_util", "{:.2f}"),
        ("client CPU use (cores)", "client_cpu_util", "{:.2f}"),
        ("other load on the machine (cores)", "other_cpu_util", "{:.2f}"),
    ]
    lines = [
        f"{args.clients} clients, {args.rate:g} events/s for {args.duration:g} s "
        f"({args.clients * args.rate:,.0f} deliveries/s), mode {args.mode}, "
        f"SSE_KEEPALIVE {args.keepalive:g} s, medians of {args.repeat} runs each",
        "",
        f"| metric | {flask_name} | {bare_name} | ratio |",
        "|---|---:|---:|---:|",
    ]
    for label, key, fmt in rows:
        a, b = flask.get(key), bare.get(key)
        ratio = f"{a / b:.2f}x" if a is not None and b else "-"
        cell_a = fmt.format(a) if a is not None else "-"
        cell_b = fmt.format(b) if b is not None else "-"
        lines.append(f"| {label} | {cell_a} | {cell_b} | {ratio} |")
    lines.append("")
    cpu_a, cpu_b = flask.get("cpu_us_per_delivery"), bare.get("cpu_us_per_delivery")
    if cpu_a is not None and cpu_b:
        cpu_ratio = cpu_a / cpu_b
        verdict = "PASS" if cpu_ratio <= CPU_RATIO_TARGET else "FAIL"
        lines.append(
            f"- target CPU per delivery <= {CPU_RATIO_TARGET:g}x bare: {verdict} ({cpu_ratio:.2f}x)"
        )
    if flask:
        lost = flask["lost_total"]
        verdict = "PASS" if lost == 0 else "FAIL"
        lines.append(f"- target zero lost events ({flask_name}, all runs): {verdict} ({lost:.0f})")
    if bare:
        lines.append(f"- {bare_name} lost events, all runs: {bare['lost_total']:.0f}")
    lines += [
        "",
        "| run | server | CPU µs/deliv | p50 ms | p99 ms | KB/conn | lost | connect s | notes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        notes = _notes(r)
        lines.append(
            f"| {r['run']} | {r['server']} | {r['cpu_us_per_delivery']:.2f} | "
            f"{r['latency_p50_ms']:.2f} | {r['latency_p99_ms']:.2f} | "
            f"{r['rss_kb_per_connection']:.1f} | {r['lost']} | {r['connect_s']:.2f} | "
            f"{notes} |"
        )
    return "\n".join(lines)


def _notes(run: dict[str, Any]) -> str:
    drain, pub = run["drain"], run["publisher"]
    notes = []
    if run["connected"] != run["clients"]:
        notes.append(f"connected {run['connected']}/{run['clients']}")
    if drain["ended"]:
        notes.append(f"streams ended {drain['ended']}")
    if drain["comments"]:
        notes.append(f"comments {drain['comments']}")
    if drain["gaps"] or drain["duplicates"]:
        notes.append(f"gaps {drain['gaps']} dups {drain['duplicates']}")
    if pub["max_lag_ms"] > 50:
        notes.append(f"publisher late by up to {pub['max_lag_ms']:.0f} ms")
    if run["server_cpu_util"] > 0.9 * len(run["pids"]):
        notes.append("server saturated")
    if drain["client_cpu_util"] > 0.9:
        notes.append("client near 100% CPU")
    if run["other_cpu_util"] > 0.2:
        notes.append(f"other load {run['other_cpu_util']:.1f} cores")
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
    parser.add_argument("--mode", choices=sorted(MODES), default="memory")
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
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument("--drain-timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.rate <= 0 or args.duration <= 0 or args.repeat < 1:
        parser.error("--clients, --rate, --duration and --repeat must be positive")
    return args


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile_limit()
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, _on_signal)
    mode = MODES[args.mode]
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    package = package_state()
    try:
        settings = mode.services()
        targets = mode.targets(args, settings)
        for index in range(1, args.repeat + 1):
            for target in targets:
                print(f"run {index}/{args.repeat}: {target.name} ...", file=sys.stderr, flush=True)
                try:
                    run = run_once(target, args, index)
                except Exception:
                    print(f"{target.name} failed; log tail:\n{target.log_tail()}", file=sys.stderr)
                    raise
                runs.append(run)
                print(
                    f"  {run['cpu_us_per_delivery']:.2f} µs/delivery, "
                    f"p50 {run['latency_p50_ms']:.1f} ms, p99 {run['latency_p99_ms']:.1f} ms, "
                    f"{run['rss_kb_per_connection']:.1f} KB/conn, lost {run['lost']}, "
                    f"connect {run['connect_s']:.2f} s ({run['total_s']:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        stop_all()
    summary = summarize(runs, [t.name for t in targets])
    print(render(summary, runs, args))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "mode": mode.describe,
            "environment": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": psutil.cpu_count(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": time.monotonic() - started,
            },
            "package": package,
            "summary": summary,
            "runs": runs,
        }
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nraw figures: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

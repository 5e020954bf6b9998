"""What the memory one open stream adds is made of, by package.

    .venv/bin/python benchmarks/stream_memory.py [--streams 2000] [--bus memory|redis]

Serves ``app.py`` under ``gunicorn -k gevent -w 1`` with ``PYTHONTRACEMALLOC=1`` and
``BENCH_TRACEMALLOC=1`` (which adds ``/bench/snapshot`` to the app), opens ``--streams``
streams from raw sockets, and compares tracemalloc snapshots of the worker taken before and
after: the Python allocations the streams added, divided by their number and grouped by the
package of the line that made them (gunicorn, werkzeug, flask, gevent, greenlet, this
package, the standard library). Allocations tracemalloc does not see (libev's watchers, the
kernel's socket buffers) are not in it, and tracing itself makes the process bigger, so the
figures explain the RSS a stream adds (``scale.py``'s growth scenario), they do not replace
it.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections import Counter

from benchutil import HOST, free_port, raise_nofile_limit
from targets import BENCH_DIR, FlaskTarget, RedisService, http_request, stop_all

#: Package of a file, by a part of its path; the first that matches wins.
PACKAGES = (
    ("flask_sse_push", "flask-sse-push"),
    ("gunicorn", "gunicorn"),
    ("werkzeug", "werkzeug"),
    ("flask", "flask"),
    ("gevent", "gevent"),
    ("greenlet", "greenlet"),
    ("benchmarks", "benchmark app"),
)


def package_of(filename: str) -> str:
    """The package *filename* belongs to, or ``standard library / other``."""
    for part, name in PACKAGES:
        if f"/{part}/" in filename or filename.endswith(f"/{part}.py"):
            return name
    return "standard library / other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--bus", choices=("memory", "redis"), default="memory")
    args = parser.parse_args()
    raise_nofile_limit()
    env = {"PYTHONTRACEMALLOC": "1", "BENCH_TRACEMALLOC": "1"}
    services = []
    if args.bus == "redis":
        redis = RedisService(BENCH_DIR / "results" / "logs")
        env.update(redis.start())
        services.append(redis)
    target = FlaskTarget(workers=1, env=env, name=f"flask-sse-push {args.bus}", services=services)
    port = free_port()
    socks: list[socket.socket] = []
    try:
        target.start(port, args.streams, BENCH_DIR / "results" / "logs" / "stream_memory.log")
        http_request(port, "POST", "/bench/snapshot?name=before", timeout=60)
        for _ in range(args.streams):
            sock = socket.create_connection((HOST, port), timeout=10)
            sock.sendall(b"GET /stream?channel=bench HTTP/1.1\r\nHost: bench\r\n\r\n")
            socks.append(sock)
        for sock in socks:
            sock.recv(4096)  # the head: the stream is open and waiting
        time.sleep(1.0)
        status, body = http_request(port, "POST", "/bench/snapshot?name=after", timeout=120)
        if status != 200:
            print(f"snapshot failed: {status} {body!r}", file=sys.stderr)
            return 1
        assert isinstance(body, dict)
        by_file: dict[str, int] = body["growth"]
    finally:
        for sock in socks:
            sock.close()
        target.stop()
        for service in services:
            service.stop()
        stop_all()
    totals: Counter[str] = Counter()
    for filename, size in by_file.items():
        totals[package_of(filename)] += size
    print(f"Python allocations one stream adds ({args.streams} streams, {args.bus} bus)\n")
    print("| package | bytes per stream |")
    print("|---|---:|")
    for name, size in totals.most_common():
        print(f"| {name} | {size / args.streams:,.0f} |")
    print(f"| **total** | **{sum(totals.values()) / args.streams:,.0f}** |")
    print("\nThe files that allocated most (bytes per stream)\n")
    for filename, size in sorted(by_file.items(), key=lambda item: -item[1])[:12]:
        short = "/".join(filename.split("/")[-2:])
        print(f"- {short}: {size / args.streams:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

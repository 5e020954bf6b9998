"""How far one Redis goes: one redis-server, 2 to 64 receiving workers, rising event rates.

Each receiving worker of the Redis bus holds ONE connection that reads the app's stream with
``XREAD BLOCK``; this script simulates them (``--receivers`` connections in one process, on
raw sockets, doing exactly that loop) and publishes with the bus's own script (the ``XADD`` +
caller-id index Lua script of ``flask_sse_push.bus.redis_history``) at a rising rate. For each
number of receivers and each rate it reports:

- the rate achieved (the publisher pipelines its commands, 5 ms apart),
- the deliveries Redis made (receivers x events),
- Redis's CPU (user + system of the redis-server process, in % of one core: Redis executes
  commands on one thread),
- the delivery lag (receive time minus publish time of the oldest event of each batch a
  receiver got: p50, p99 and max),
- the simulated receivers' own CPU, to tell when the simulation, not Redis, is the limit.

With ``--shards N`` (a list: ``1,4``) the events go round robin to N stream keys on the same
server, as ``SSE_REDIS_SHARDS = N`` spreads channels, through the bus's script with the keys
of every shard (as the sharded bus publishes), and each receiver reads the (quiet) control
stream and ONE shard: the workers' clients follow channels of one shard each, the case
sharding is for. Redis then sends each event to receivers / N workers.

A rate *breaks* when the rate achieved falls below 95 % of the target, the lag's p99 goes
above 1 s, or Redis uses more than 90 % of its core; the ladder of that receiver count stops
there.

    .venv/bin/python benchmarks/redis_scale.py                  # 2..64 receivers (~4 min)
    .venv/bin/python benchmarks/redis_scale.py --receivers 8 --rates 1000,4000 --window 2
    .venv/bin/python benchmarks/redis_scale.py --json benchmarks/results/redis_scale.json
    .venv/bin/python benchmarks/redis_scale.py --receivers 64 --shards 1,4 --rates 16000,32000
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchutil  # noqa: F401 - puts tests/ on sys.path
from support.redis_server import RedisServer

from flask_sse_push.bus.redis_history import _ADD

KEY = "bench:scale"
CONTROL = KEY + ":control"


def keys_of(key: str) -> list[str]:
    """The keys the bus's script takes for the stream *key*."""
    return [key, key + ":ids", key + ":ids:old", key + ":epoch"]


def shard_keys(shards: int) -> list[str]:
    """The stream keys of *shards* shards (one: the stream itself)."""
    return [KEY] if shards == 1 else [f"{KEY}:{shard}" for shard in range(shards)]


#: What precedes the fields of each entry in an XREAD reply (the bus's ``c`` and ``b``).
MARK = b"\r\n*4\r\n$1\r\nc\r\n$5\r\nbench\r\n$1\r\nb\r\n"
TICK = 0.005


def command(*args: str | bytes) -> bytes:
    """One command in RESP."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process *pid*."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the receivers (a child process) ---------------------------------------------------------


class Receiver:
    """One simulated worker: XREAD BLOCK on one connection, from its last entry."""

    def __init__(self, port: int, key: str, sharded: bool) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.key = key
        self.sharded = sharded
        self.last = b"$"
        self.buffer = b""
        self.entries = 0

    def ask(self) -> None:
        read = ("XREAD", "COUNT", "1000", "BLOCK", "1000", "STREAMS")
        if self.sharded:  # the bus's receiver also reads the control stream
            self.sock.sendall(command(*read, CONTROL, self.key, "$", self.last))
        else:
            self.sock.sendall(command(*read, self.key, self.last))

    def feed(self, data: bytes, lags: list[float]) -> None:
        """Take bytes; at a complete reply, note its lag and ask again."""
        buffer = self.buffer = self.buffer + data
        if buffer.startswith(b"*-1\r\n"):
            self.buffer = b""
            self.ask()
            return
        # *1 *2 $<key> <key> *<n> then n entries, each ending with its body "...\n\n\r\n".
        head = buffer.find(b"\r\n*", buffer.find(b"\r\n%s\r\n" % self.key.encode()))
        if head < 0 or not buffer.endswith(b"\n\n\r\n"):
            return
        count = int(buffer[head + 3 : buffer.index(b"\r\n", head + 3)])
        if buffer.count(MARK) < count:
            return
        now = time.time()
        first = buffer.index(b"data: ") + 6
        lags.append(now - float(buffer[first : buffer.index(b"\n", first)]))
        mark = buffer.rfind(MARK)
        self.last = buffer[buffer.rfind(b"\r\n", 0, mark) + 2 : mark]
        self.entries += count
        self.buffer = b""
        self.ask()


def receive(port: int, count: int, seconds: float, shards: int) -> None:
    """Run *count* receivers for *seconds* after a ``go`` line, each reading one of *shards*
    shards; print their figures."""
    keys = shard_keys(shards)
    receivers = [Receiver(port, keys[i % shards], shards > 1) for i in range(count)]
    selector = selectors.DefaultSelector()
    for receiver in receivers:
        selector.register(receiver.sock, selectors.EVENT_READ, receiver)
        receiver.ask()
    print("ready", flush=True)
    sys.stdin.readline()
    lags: list[float] = []
    started, cpu = time.monotonic(), time.process_time()
    while time.monotonic() - started < seconds:
        for key, _ in selector.select(0.2):
            data = key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
            key.data.feed(data, lags)
    lags.sort()
    print(
        json.dumps(
            {
                "entries": sum(r.entries for r in receivers),
                "cpu": (time.process_time() - cpu) / seconds,
                "p50": lags[len(lags) // 2] if lags else None,
                "p99": lags[int(len(lags) * 0.99)] if lags else None,
                "max": lags[-1] if lags else None,
            }
        ),
        flush=True,
    )


# -- the publisher and the orchestration -----------------------------------------------------


def publish(port: int, rate: float, seconds: float, shards: int = 1) -> float:
    """Publish at *rate* per second for *seconds* with the bus's script, round robin over
    *shards*; the rate achieved."""
    keys = shard_keys(shards)
    siblings = [KEY + ":heads", *keys] if shards > 1 else []
    args = [[str(4 + len(siblings)), *keys_of(key), *siblings, "1000", ""] for key in keys]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(command("SCRIPT", "LOAD", _ADD))
    sha = sock.recv(1024).split(b"\r\n")[1]
    sent = 0
    started = time.monotonic()
    for _ in range(int(seconds / TICK) + 1):
        elapsed = time.monotonic() - started
        if elapsed >= seconds:
            break
        due = int(rate * elapsed) - sent + 1
        body = b"data: %.6f\n\n" % time.time()
        batches = [command("EVALSHA", sha, *arg, "c", "bench", "b", body) for arg in args]
        sock.sendall(b"".join(batches[(sent + i) % shards] for i in range(due)))
        ends, carried = 0, b""
        while ends < 2 * due:  # each reply: "$<len>\r\n<id>\r\n"
            data = carried + sock.recv(1 << 20)
            ends += data.count(b"\r\n")  # a reply may be split anywhere between reads
            carried = data[-1:] if data.endswith(b"\r") else b""
        sent += due
        time.sleep(max(0.0, TICK - (time.monotonic() - started - elapsed)))
    sock.close()
    return sent / (time.monotonic() - started)


def step(
    server: RedisServer, receivers: int, rate: float, window: float, shards: int = 1
) -> dict[str, Any]:
    """One measurement: *receivers* receiving while events are published at *rate* over
    *shards*."""
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--receive",
            str(server.port),
            str(receivers),
            str(window),
            str(shards),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        assert server.proc is not None
        cpu = cpu_seconds(server.proc.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        achieved = publish(server.port, rate, window, shards)
        redis_cpu = (cpu_seconds(server.proc.pid) - cpu) / window
        figures: dict[str, Any] = json.loads(child.stdout.readline())
    finally:
        child.kill()
        child.wait(timeout=10)
    figures.update(
        shards=shards,
        receivers=receivers,
        rate=rate,
        achieved=round(achieved),
        deliveries=round(figures.pop("entries") / window),
        redis_cpu=round(redis_cpu, 3),
    )
    figures["broken"] = achieved < 0.95 * rate or (figures["p99"] or 0) > 1.0 or redis_cpu > 0.9
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", default="2,4,8,16,32,64", help="counts, comma-separated")
    parser.add_argument("--rates", default="500,1000,2000,4000,8000,16000,32000,64000")
    parser.add_argument("--window", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--shards", default="1", help="shard counts, comma-separated")
    parser.add_argument("--json", metavar="OUT", help="also write every figure to OUT")
    parser.add_argument("--receive", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receive:
        port, count, seconds, shards = args.receive
        receive(int(port), int(count), float(seconds), int(shards))
        return
    work = Path(__file__).resolve().parent / "results" / "logs"
    work.mkdir(parents=True, exist_ok=True)
    server = RedisServer(work).start()
    rows: list[dict[str, Any]] = []
    try:
        ladders = [
            (int(shards), int(receivers))
            for shards in args.shards.split(",")
            for receivers in args.receivers.split(",")
        ]
        for shards, receivers in ladders:
            for rate in (float(r) for r in args.rates.split(",")):
                server.client().flushdb()
                row = step(server, receivers, rate, args.window, shards)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if row["broken"]:
                    break
    finally:
        server.stop()
    print(
        "| shards | receivers | target /s | achieved /s | deliveries /s | Redis CPU | lag p50 |"
        " lag p99 | receivers' CPU | |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        lag = [f"{row[k] * 1000:.1f} ms" if row[k] is not None else "-" for k in ("p50", "p99")]
        print(
            f"| {row['shards']} | {row['receivers']} | {row['rate']:.0f} | {row['achieved']} "
            f"| {row['deliveries']} "
            f"| {row['redis_cpu']:.0%} | {lag[0]} | {lag[1]} | {row['cpu']:.0%} "
            f"| {'breaks' if row['broken'] else ''} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

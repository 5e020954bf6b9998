"""Small helpers shared by the benchmark's orchestrator, servers and client, and the pieces
they share with the tests.

The tests' support package (``tests/support``) provides the free ports, the file limit, the
chunked-transfer decoder and the redis-server launcher; this module puts ``tests/`` on
``sys.path`` and re-exports what the benchmarks use. The scripts run as
``python benchmarks/<script>.py``, which puts only ``benchmarks/`` on the path: this is the
one place that adds ``tests/``, so the benchmark modules import those pieces from here
(``targets.py`` loads the redis-server launcher itself, and only in redis mode).

Nothing here imports gevent at module level: the orchestrator and the client never load it,
and the servers import it themselves (gunicorn's worker after its monkey-patching).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

_TESTS_DIR = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS_DIR not in sys.path:
    sys.path.append(_TESTS_DIR)

from support.http import ChunkedDecoder, encode_chunk, is_chunked, parse_head  # noqa: E402
from support.procs import free_port, raise_nofile_limit, read_log  # noqa: E402

__all__ = [
    "CHANNEL",
    "HOST",
    "STREAM_PATH",
    "ChunkedDecoder",
    "Schedule",
    "bench_args",
    "encode_chunk",
    "encode_data",
    "event_data",
    "free_port",
    "is_chunked",
    "parse_head",
    "raise_nofile_limit",
    "read_log",
    "run_schedule",
    "target_channel",
]

HOST = "127.0.0.1"
#: The channel every benchmark client follows and every event is published to.
CHANNEL = "bench"
#: Path of the event stream on both servers.
STREAM_PATH = f"/stream?channel={CHANNEL}"


def event_data(n: int) -> dict[str, Any]:
    """The payload of event number *n*: its publish time and its number."""
    return {"t": time.time(), "n": n}


def encode_data(data: dict[str, Any]) -> bytes:
    """JSON exactly as Flask's default provider writes it (sorted keys, default separators)."""
    return json.dumps(data, sort_keys=True).encode()


class Schedule:
    """The publishing schedule of ``rate`` events a second for ``duration`` seconds.

    Event *n* is due at ``start + n / rate`` on an absolute schedule, so a late publisher
    catches up instead of drifting. :meth:`delay` tells how long to sleep before event *n*
    (0 when late, and records how late); :meth:`result` gives the figures. The gevent
    servers use :func:`run_schedule`, the asyncio peer awaits :meth:`delay` itself.
    """

    def __init__(self, rate: float, duration: float) -> None:
        self.count = max(1, round(rate * duration))
        self.interval = 1.0 / rate
        self.start = time.monotonic()
        self.max_lag = 0.0
        self.total_lag = 0.0
        #: CPU seconds of this thread spent inside the publish calls (see :meth:`timed`).
        self.call_cpu = 0.0

    def delay(self, n: int) -> float:
        """Seconds to wait before event *n* (0 when it is already late)."""
        delay = self.start + n * self.interval - time.monotonic()
        if delay < 0:
            self.max_lag = max(self.max_lag, -delay)
            self.total_lag -= delay
        return max(delay, 0.0)

    def timed(self, publish: Callable[[int], None], n: int, own: bool = False) -> None:
        """``publish(n)``, adding the CPU time this thread spent in it to :attr:`call_cpu`.

        ``time.thread_time()`` counts only this thread's CPU, with no request handling in
        it. A call that yields to other greenlets (``send_event`` lets the streams write what
        it queued) also counts what they do meanwhile: the deliveries it lets run. With
        *own*, only the time the publishing greenlet itself runs is counted (see
        :func:`own_cpu`).
        """
        if own:
            self.call_cpu += own_cpu(lambda: publish(n))
            return
        before = time.thread_time()
        publish(n)
        self.call_cpu += time.thread_time() - before

    def result(self) -> dict[str, float | int]:
        """How many events were published, the elapsed time, the publisher's lag, and the
        mean CPU µs of one publish call."""
        return {
            "published": self.count,
            "elapsed_s": time.monotonic() - self.start,
            "max_lag_ms": self.max_lag * 1000.0,
            "mean_lag_ms": self.total_lag / self.count * 1000.0,
            "call_cpu_us": self.call_cpu / self.count * 1e6,
        }


def own_cpu(call: Callable[[], None]) -> float:
    """The CPU seconds this thread spends in *call* while the calling greenlet runs.

    A greenlet trace (installed for the call only) stops the clock when the greenlet
    switches away (to the hub, to the streams it woke) and restarts it when it comes back,
    so what the other greenlets do meanwhile is left out. The trace costs about a microsecond
    per switch, which the other greenlets' time absorbs; use it where a call makes few
    switches (one event to one client), not for a broadcast to thousands.
    """
    import greenlet

    me = greenlet.getcurrent()
    spent = 0.0
    start = time.thread_time()

    def trace(event: str, args: Any) -> None:
        nonlocal spent, start
        if event in ("switch", "throw"):
            origin, target = args
            now = time.thread_time()
            if origin is me:
                spent += now - start
            if target is me:
                start = now
        if previous is not None:
            previous(event, args)

    previous = greenlet.settrace(trace)
    try:
        call()
    finally:
        greenlet.settrace(previous)
    return spent + time.thread_time() - start


def run_schedule(
    rate: float, duration: float, publish: Callable[[int], None], own: bool = False
) -> dict[str, float | int]:
    """Call ``publish(n)`` for n = 0, 1, ... at *rate* per second for *duration* seconds.

    Runs in a greenlet of a gevent server, on a :class:`Schedule`; it always yields
    (``gevent.sleep(0)`` when late) so the connections' greenlets get to run. With *own*
    the publish calls' CPU counts only the publishing greenlet's own (:func:`own_cpu`).
    Returns :meth:`Schedule.result`.
    """
    import gevent

    schedule = Schedule(rate, duration)
    for n in range(schedule.count):
        gevent.sleep(schedule.delay(n))
        schedule.timed(publish, n, own)
    return schedule.result()


def target_channel(n: int, targets: int) -> str:
    """The channel of event *n*: ``bench``, or with *targets* private channels
    ``user-<n mod targets>`` (one client each)."""
    return f"user-{n % targets}" if targets else CHANNEL


def bench_args(query: dict[str, list[str]]) -> tuple[float, float, int]:
    """``rate``, ``duration`` and ``targets`` (default 0) of a ``/bench/start`` query.

    :raises ValueError: when one is missing, not a number, or not positive.
    """
    try:
        rate = float(query["rate"][0])
        duration = float(query["duration"][0])
        targets = int(query.get("targets", ["0"])[0])
    except (KeyError, IndexError, ValueError):
        raise ValueError("rate and duration are required numbers") from None
    if rate <= 0 or duration <= 0 or targets < 0:
        raise ValueError("rate and duration must be > 0, targets >= 0")
    return rate, duration, targets


def add_bench_routes(app: Flask, publish: Callable[[int, str], None]) -> None:
    """Add the benchmark's control routes to the Flask *app* (served by a gevent worker).

    ``GET /bench/ping`` answers ``{"pid": ...}``; ``GET /bench/modules`` the names in
    ``sys.modules``; ``POST /bench/start?rate=R&duration=D[&targets=K]`` spawns a greenlet
    that calls ``publish(n, channel)`` in the app context on :func:`run_schedule` (the
    channel from :func:`target_channel`; with ``targets`` the calls' own CPU), waits for
    it, and answers its figures and pid.
    """
    import os

    from flask import Response, jsonify, request

    @app.get("/bench/ping")
    def ping() -> Response:
        return jsonify(pid=os.getpid())

    @app.get("/bench/modules")
    def modules() -> Response:
        return jsonify(sorted(sys.modules))

    @app.post("/bench/start")
    def start() -> Response | tuple[str, int]:
        import gevent

        try:
            rate, duration, targets = bench_args(request.args.to_dict(flat=False))
        except ValueError as exc:
            return f"{exc}\n", 400

        def to_channel(n: int) -> None:
            publish(n, target_channel(n, targets))

        def run() -> dict[str, float | int]:
            with app.app_context():
                # Targeted: one delivery per call, few switches; count send_event's own CPU.
                return run_schedule(rate, duration, to_channel, own=targets > 0)

        result = gevent.spawn(run).get(timeout=duration * 3 + 60)
        return jsonify({**result, "pid": os.getpid()})


def add_snapshot_route(app: Flask) -> None:
    """Add ``POST /bench/snapshot?name=N`` to *app*, for a process started with
    ``PYTHONTRACEMALLOC=1``: it takes a tracemalloc snapshot (after a garbage collection)
    and answers ``{"growth": {file: bytes}}``, what each source file allocated since the
    snapshot named ``before``."""
    import gc
    import tracemalloc

    from flask import Response, jsonify, request

    snapshots: dict[str, tracemalloc.Snapshot] = {}

    @app.post("/bench/snapshot")
    def snapshot() -> Response:
        name = request.args.get("name", "before")
        gc.collect()
        snapshots[name] = tracemalloc.take_snapshot()
        growth: dict[str, int] = {}
        if name != "before" and "before" in snapshots:
            for stat in snapshots[name].compare_to(snapshots["before"], "filename"):
                growth[stat.traceback[0].filename] = stat.size_diff
        return jsonify(growth=growth)

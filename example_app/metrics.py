"""The dashboard's metrics: a background publisher that sends, every ``METRICS_INTERVAL``
seconds, one ``metrics`` event saying what the extension does in this process.

It runs in a thread, which under ``gunicorn -k gevent`` is a greenlet (the worker has
patched ``threading`` before it loads the app), and in a daemon thread under ``flask run``.
Each worker process starts its own on its first request; with several workers on the Redis
bus the page would see one series per worker (each event names its ``pid``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from flask import Flask

from flask_sse_push import SSEError, get_state, send_event

log = logging.getLogger(__name__)

#: The channel and the event type of the samples.
METRICS = "metrics"
#: Key of the running publisher in ``app.extensions``.
EXTENSION_KEY = "example_metrics"
#: Guards starting a publisher (threads under ``flask run``; gunicorn's gevent worker imports
#: the app after patching, so there it is gevent's lock).
_lock = threading.Lock()


class MetricsPublisher:
    """Publishes a sample of the extension's state every *interval* seconds until stopped.

    :param app: the app whose streams are counted and whose bus carries the samples.
    :param interval: seconds between samples.
    :param public: the channels whose open-stream counts every visitor may see; the counts
        of other channels (the private ``user:<name>`` ones, which name who is logged in)
        are left out.
    """

    def __init__(self, app: Flask, interval: float, public: Iterable[str]) -> None:
        self.app = app
        self.interval = interval
        self.public = tuple(public)
        #: The process that runs the publisher (a forked child must start its own).
        self.pid = os.getpid()
        #: The last sample sent, if any.
        self.last: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="example-metrics", daemon=True)
        self._published: int | None = None
        self._at = time.monotonic()

    def start(self) -> MetricsPublisher:
        """Start publishing; return the publisher."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 5) -> None:
        """Stop publishing, waiting up to *timeout* seconds for the thread to end."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def running(self) -> bool:
        """Whether the publisher was started in this process and not stopped."""
        return self.pid == os.getpid() and not self._stop.is_set()

    def sample(self) -> dict[str, Any]:
        """What the dashboard shows: the open streams of this process, per public channel,
        and the events published per second since the last sample (besides these)."""
        stats = get_state(self.app).stats()
        published: int = stats["totals"]["published"]
        now = time.monotonic()
        rate = 0.0
        if self._published is not None:
            rate = max(published - self._published, 0) / max(now - self._at, 1e-3)
        self._published, self._at = published, now
        counts: dict[str, int] = stats["channels"]
        return {
            "time": time.time(),
            "pid": stats["pid"],
            "streams": stats["streams"],
            "rate": round(rate, 2),
            "channels": {channel: counts.get(channel, 0) for channel in self.public},
        }

    def publish(self) -> str:
        """Send one sample now; return its event id."""
        sample = self.sample()
        event_id = send_event(sample, event=METRICS, channel=METRICS)
        # Not counted as published by others at the next sample.
        self._published = (self._published or 0) + 1
        self.last = sample
        return event_id

    def _run(self) -> None:
        with self.app.app_context():
            while not self._stop.wait(self.interval):
                try:
                    self.publish()
                except SSEError as exc:
                    # The Redis bus may be unreachable for a while: go on when it is back.
                    log.warning("metrics not published: %s", exc)
                except Exception:
                    log.exception("metrics not published")


def start_metrics_publisher(app: Flask) -> MetricsPublisher | None:
    """Start the app's metrics publisher in this process unless it runs already; return it,
    or ``None`` when ``METRICS_INTERVAL`` is 0 (off).

    Called on every request (cheap once it runs), so the publisher starts in the process
    that serves, after gunicorn has forked the worker and gevent has patched it.
    """
    interval = float(app.config["METRICS_INTERVAL"])
    if interval <= 0:
        return None
    with _lock:
        # Nothing in here switches greenlets; starting a thread may, so it comes after.
        running = app.extensions.get(EXTENSION_KEY)
        if isinstance(running, MetricsPublisher) and running.running():
            return running
        publisher = MetricsPublisher(app, interval, app.config["METRICS_CHANNELS"])
        app.extensions[EXTENSION_KEY] = publisher
    return publisher.start()


def stop_metrics_publisher(app: Flask) -> None:
    """Stop the app's metrics publisher, if one runs (tests, or an app shutting down)."""
    running = app.extensions.pop(EXTENSION_KEY, None)
    if isinstance(running, MetricsPublisher):
        running.stop()

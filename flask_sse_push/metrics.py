"""Prometheus metrics of one app (the optional extra ``flask-sse-push[metrics]``).

Made only when :confval:`SSE_METRICS_PATH` is set: without it nothing imports
``prometheus_client`` and every hook of the package is a ``None`` check. With it, each
place that counts calls a method of :class:`Metrics`:

- the stream view: streams opened and closed, resets and replayed events;
- :func:`~flask_sse_push.send_event`: events published, and publishes that failed;
- the fan-out (:class:`~flask_sse_push.bus.fanout.Fanout`): deliveries, counted once per
  event as the number of subscriptions it went to, never once per subscription;
- the stream bodies: the delivery lag of sampled events, observed after their write.

Under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` makes ``prometheus_client`` keep every
worker's values in files of that directory; a scrape reaching any worker then answers the
sums over all workers (as ``prometheus_client``'s ``MultiProcessCollector`` does). Set
the variable before the server starts, empty the directory at each start, and call
:func:`~flask_sse_push.gunicorn_conf.child_exit` from gunicorn's ``child_exit`` hook.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import itertools
import os
import time
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING

from .config import SSE_METRICS_PATH
from .errors import ConfigurationError
from .reasons import ResetReason

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

    from .bus.base import Message, Subscription

#: A process samples one event in this many for the delivery-lag histogram (the first one
#: included).
SAMPLE_EVERY = 16
#: At most this many of a sampled event's subscriptions observe its lag, once each after
#: writing it: all of them up to this many, else every k-th in the order they were queued
#: (and so written), so the spread of one broadcast shows at a bounded cost.
SAMPLE_STREAMS = 64
#: Buckets of the delivery-lag histogram, in seconds.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: The environment variable that puts ``prometheus_client`` in multiprocess mode.
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """The app's metrics and the registry that serves them.

    :param registry: where the metrics are collected from for a scrape.
    :param multiprocess: whether the values live in ``PROMETHEUS_MULTIPROC_DIR``, and a
        scrape answers the sums over every process writing there.
    """

    def __init__(self, registry: CollectorRegistry, *, multiprocess: bool) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # In multiprocess mode the values go to files, which the registry's collector reads;
        # otherwise the metrics register with the app's own registry.
        own = None if multiprocess else registry
        #: The registry a scrape reads (add collectors of your own to it).
        self.registry = registry
        self.multiprocess = multiprocess
        self._open = Gauge(
            "sse_open_streams",
            "Open event streams, summed over the live processes.",
            registry=own,
            multiprocess_mode="livesum",
        )
        self._open_here = Gauge(
            "sse_worker_open_streams",
            "Open event streams of each live process (label pid in multiprocess mode).",
            registry=own,
            multiprocess_mode="liveall",
        )
        self._published = Counter(
            "sse_events_published", "Events published with send_event.", registry=own
        )
        self._publish_errors = Counter(
            "sse_publish_errors",
            "Events send_event could not publish (PublishError: the bus is unreachable).",
            registry=own,
        )
        self._deliveries = Counter(
            "sse_deliveries",
            "Events queued for a stream: each event once per stream following its channel.",
            registry=own,
        )
        self._dropped = Counter(
            "sse_slow_clients_dropped",
            "Streams ended because their client read too slowly and their queue overflowed.",
            registry=own,
        )
        resets = Counter(
            "sse_resets",
            "Streams that asked to resume and got a reset instead of a replay, by reason.",
            ["reason"],
            registry=own,
        )
        self._resets = {reason: resets.labels(reason=reason.value) for reason in ResetReason}
        self._replayed = Counter(
            "sse_replayed_events",
            "Events replayed to streams resuming after a Last-Event-ID.",
            registry=own,
        )
        self._lag = Histogram(
            "sse_delivery_lag_seconds",
            f"Seconds from publishing an event to writing it to a stream (one event in "
            f"{SAMPLE_EVERY} per process, observed by up to {SAMPLE_STREAMS} of its streams).",
            buckets=LAG_BUCKETS,
            registry=own,
        )
        self._countdown = 1

    @classmethod
    def create(cls) -> Metrics:
        """The metrics of a new app: in multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR``
        is set.

        :raises ConfigurationError: when ``prometheus_client`` is not installed.
        """
        if importlib.util.find_spec("prometheus_client") is None:
            raise ConfigurationError(
                f"{SSE_METRICS_PATH} is set, which needs the 'prometheus_client' package: "
                "pip install 'flask-sse-push[metrics]'"
            )
        from prometheus_client import CollectorRegistry

        # Not auto_describe: registering a collector would then collect at once, reading the
        # other workers' files while the app is made.
        registry = CollectorRegistry()
        directory = os.environ.get(MULTIPROC_DIR)
        if directory:
            registry.register(_worker_files(directory))
        return cls(registry, multiprocess=bool(directory))

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape's body and content type, in the format *accept* (the request's
        ``Accept`` header) prefers."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    # -- the hooks -----------------------------------------------------------------------

    def opened(self) -> None:
        """A stream was opened."""
        self._open.inc()
        self._open_here.inc()

    def closed(self) -> None:
        """A stream ended."""
        self._open.dec()
        self._open_here.dec()

    def published(self) -> None:
        """An event was published."""
        self._published.inc()

    def publish_failed(self) -> None:
        """Publishing an event failed."""
        self._publish_errors.inc()

    def dropped(self) -> None:
        """A slow stream was ended."""
        self._dropped.inc()

    def resumed(self, replayed: int, reset: ResetReason | None) -> None:
        """A stream resuming got *replayed* events, or a reset for *reset*."""
        if reset is not None:
            self._resets[reset].inc()
        elif replayed:
            self._replayed.inc(replayed)

    def delivered(self, message: Message, subs: Collection[Subscription]) -> None:
        """*message* was queued for *subs* (called once per event by the fan-out, with its
        lock held). A sampled event stamps up to :data:`SAMPLE_STREAMS` of the subscriptions
        with its publish time; each of those streams observes the lag once it has written
        the event (see :meth:`lag`)."""
        count = len(subs)
        self._deliveries.inc(count)
        self._countdown -= 1
        if self._countdown:
            return
        self._countdown = SAMPLE_EVERY
        sent = message.time or time.time()
        step = -(-count // SAMPLE_STREAMS) or 1  # ceiling division; none left when all slow
        for sub in itertools.islice(subs, 0, None, step):
            if sub.reason is not None:  # ended, its direct write failed: never written
                continue
            if sub.direct and not (len(sub) or sub.rest):  # written directly, already
                self.lag(time.time() - sent)
            elif not sub.sent:  # an earlier sample not yet written keeps its place
                sub.sent = sent

    def lag(self, seconds: float) -> None:
        """Observe the delivery lag of a sampled event a stream has just written."""
        self._lag.observe(max(seconds, 0.0))


def _worker_files(directory: str) -> Collector:
    """What ``prometheus_client``'s ``MultiProcessCollector`` collects (the sums over the
    files of *directory*), minus the files that are still empty.

    A process creates its file before it sizes it, and the collector fails on a file of
    0 bytes (prometheus/client_python issue 1199): a scrape while a worker starts would
    answer 500, and a worker killed in between would leave such a file for good.
    """
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector

    class WorkerFiles(Collector):
        def collect(self) -> Iterable[Metric]:
            files = []
            for path in glob.glob(os.path.join(directory, "*.db")):
                with contextlib.suppress(OSError):  # removed meanwhile: a dead worker's
                    if os.path.getsize(path):
                        files.append(path)
            merge = MultiProcessCollector.merge
            merged: Iterable[Metric] = merge(files)  # type: ignore[no-untyped-call]
            return merged

        def describe(self) -> Iterable[Metric]:
            return ()

    return WorkerFiles()

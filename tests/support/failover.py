"""A Redis primary failing while events are published and streams are open: the scenario the
Sentinel and Cluster tests share, and what it measures.

Several apps (each with its own bus, so its own receiver) stand for several workers. A
publisher thread sends an event every few milliseconds through the apps in turn, recording
which publishes were acknowledged (with their ids) and which raised. Each app has a stream
open. The test blocks replication if it wants a window of unreplicated events, kills the
primary, and the scenario waits (bounded) for the switch and for delivery to go on; then
:class:`Failover` says what each stream received and what the stream in Redis still holds.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flask import Flask

from flask_sse_push import PublishError, get_state, send_event
from flask_sse_push.bus.redis import RedisBus
from flask_sse_push.testing import EventReader
from support.redis_ha import ask

__all__ = ["Failover", "Publisher", "Watcher", "block_replication", "position", "resume"]


def block_replication(port: int) -> Callable[[], None]:
    """What cuts the primary on *port* from its replicas, which then cannot sync again
    (``PSYNC`` is denied): what it acknowledges from then on exists nowhere else."""

    def block() -> None:
        assert ask(port, "ACL", "SETUSER", "default", "-psync", "-sync") == b"OK"
        assert ask(port, "CLIENT", "KILL", "TYPE", "replica")

    return block


def position(event_id: str) -> tuple[int, int]:
    """The two numbers of a stream entry id, to order ids."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def assert_in_order(
    ids: list[str], received: list[tuple[float, str]] | None = None, since: float = 0.0
) -> None:
    """*ids* are stream ids, each once, in order; else say where (and when) they were not."""
    for n, (before, after) in enumerate(itertools.pairwise(ids)):
        if position(before) >= position(after):  # one stream's ids only
            when = f" at {received[n + 1][0] - since:.2f} s" if received else ""
            raise AssertionError(f"{after} came after {before}{when}: {ids[max(0, n - 3) : n + 4]}")


def bus_of(app: Flask) -> RedisBus:
    bus = get_state(app).bus
    assert isinstance(bus, RedisBus)
    return bus


def open_stream(
    app: Flask, last_event_id: str | None = None, channels: Sequence[str] = ("a",)
) -> EventReader:
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    query = "&".join(f"channel={channel}" for channel in channels)
    response = app.test_client().get(f"/stream?{query}", headers=headers, buffered=False)
    return EventReader(response)


class Publisher:
    """Publishes ``0, 1, 2...`` to *channels* in turn (``a`` by default) through *apps* in
    turn, every *interval* seconds, in a thread, until :meth:`stop` (or 20,000 events)."""

    def __init__(
        self, apps: Sequence[Flask], interval: float, channels: Sequence[str] = ("a",)
    ) -> None:
        self.apps = apps
        self.interval = interval
        self.channels = channels
        #: ``(time, id)`` of each publish that returned.
        self.acked: list[tuple[float, str]] = []
        #: The number published, by id, of each publish that returned.
        self.numbers: dict[str, int] = {}
        #: ``(time, message)`` of each publish that raised.
        self.failed: list[tuple[float, str]] = []
        #: ``(time, number)`` of each publish that raised.
        self.failed_numbers: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        for n in range(20_000):
            if self._stop.is_set():
                return
            app = self.apps[n % len(self.apps)]
            try:
                with app.app_context():
                    event_id = send_event(n, channel=self.channels[n % len(self.channels)])
                self.numbers[event_id] = n
                self.acked.append((time.monotonic(), event_id))
            except PublishError as exc:
                self.failed.append((time.monotonic(), str(exc)))
                self.failed_numbers.append((time.monotonic(), n))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()

    def acked_after(self, moment: float) -> list[str]:
        return [event_id for t, event_id in self.acked if t > moment]


@dataclass
class Watcher:
    """One open stream, read as it goes: ``(time, id)`` of every event, and the number of
    comments (keep-alives) seen at each poll."""

    reader: EventReader
    received: list[tuple[float, str]] = field(default_factory=list)
    comments: list[tuple[float, int]] = field(default_factory=list)
    #: The data of every event, in the order received.
    data: list[str] = field(default_factory=list)

    def poll(self) -> None:
        now = time.monotonic()
        events = self.reader.events(timeout=0.01)
        self.received += [(now, e.id) for e in events]
        self.data += [e.data for e in events]
        self.comments.append((now, len(self.reader.parser.comments)))

    @property
    def ids(self) -> list[str]:
        return [event_id for _, event_id in self.received]

    def comments_between(self, start: float, end: float) -> int:
        before = max((n for t, n in self.comments if t <= start), default=0)
        after = max((n for t, n in self.comments if t <= end), default=0)
        return after - before

    def got_at(self, event_id: str) -> float | None:
        return next((t for t, got in self.received if got == event_id), None)

    def got_number_at(self, number: int) -> float | None:
        """When the event of data *number* arrived (ids differ from send_event's with
        shards)."""
        at = [
            t for (t, _), data in zip(self.received, self.data, strict=True) if data == str(number)
        ]
        return at[0] if at else None


def resume(app: Flask, last_event_id: str, until: str, timeout: float = 20) -> list[str]:
    """Open a stream resuming after *last_event_id* and read until *until* arrives (or it
    ends, or *timeout*); return the ids received (a reset's id included)."""
    ids: list[str] = []
    deadline = time.monotonic() + timeout
    with open_stream(app, last_event_id) as reader:
        for _ in range(10_000):
            ids += [e.id for e in reader.events(timeout=0.2)]
            if until in ids or reader.ended or time.monotonic() > deadline:
                break
    return ids


class Failover:
    """The scenario: :meth:`open`, then :meth:`run`, then read the results.

    :param apps: the apps, one stream open on each.
    :param interval: seconds between two publishes.
    :param channels: the channels published to in turn, all of which each stream follows
        (with ``SSE_REDIS_SHARDS``, see :meth:`check_shards`).
    """

    def __init__(
        self, apps: Sequence[Flask], interval: float = 0.02, channels: Sequence[str] = ("a",)
    ) -> None:
        self.apps = apps
        self.channels = channels
        self.publisher = Publisher(apps, interval, channels)
        self.watchers: list[Watcher] = []
        self.killed_at = 0.0
        self.switched_at = 0.0
        self.blocked_at: float | None = None

    def open(self) -> None:
        self.watchers = [Watcher(open_stream(app, None, self.channels)) for app in self.apps]
        buses = [bus_of(app) for app in self.apps]
        ready = self._until(lambda: all(b.connected and b.stream_count() == 1 for b in buses), 15)
        assert ready, "the receivers did not connect"

    def close(self) -> None:
        for watcher in self.watchers:
            watcher.reader.close()

    def _until(self, condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            for watcher in self.watchers:
                watcher.poll()
            if condition():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return False

    def run(
        self,
        kill: Callable[[], None],
        switched: Callable[[], bool],
        block: Callable[[], None] | None = None,
        then: Callable[[], None] | None = None,
    ) -> None:
        """Publish for a while, *block* replication (if given) for half a second, *kill* the
        primary, wait until *switched* says a new one is in place and call *then* (if
        given), then wait until publishing and delivery went on; stop publishing and let
        every stream catch up."""
        publisher = self.publisher
        publisher.start()
        try:
            assert self._until(lambda: len(publisher.acked) >= 25, 15), publisher.failed[-3:]
            if block is not None:
                self.blocked_at = time.monotonic()
                block()
                self._until(lambda: False, 0.5)
            self.killed_at = time.monotonic()
            kill()
            assert self._until(switched, 40), "no new primary within 40 s"
            self.switched_at = time.monotonic()
            if then is not None:
                then()
            after = publisher.acked_after
            went_on = self._until(lambda: len(after(self.switched_at)) >= 25, 30)
            assert went_on, f"publishing did not go on: {publisher.failed[-3:]}"
        finally:
            publisher.stop()
        # The newest event of each channel (with shards, each is read on its own, and a
        # stream's ids are not send_event's).
        count = len(self.channels)
        numbers = sorted(publisher.numbers.values())
        newest = {str(n) for n in numbers if n >= numbers[-1] - count + 1}
        caught_up = self._until(lambda: all(newest <= set(w.data) for w in self.watchers), 30)
        assert caught_up, "the streams did not receive the newest event"

    # -- what happened ---------------------------------------------------------------------

    def stored(self) -> set[str]:
        """The ids the stream in Redis holds now (with shards, the ids send_event answered
        for the numbers the shards hold)."""
        bus = bus_of(self.apps[0])
        if bus.shards.count == 1:
            return {entry.decode() for entry, _ in bus._client.xrange(bus.key)}
        held = set()
        for key in bus.shards.keys:
            held |= {int(fields[b"b"].split(b"data: ")[1]) for _, fields in bus._client.xrange(key)}
        return {event_id for event_id, n in self.publisher.numbers.items() if n in held}

    def lost(self) -> list[str]:
        """Acknowledged ids Redis no longer holds."""
        stored = self.stored()
        return [event_id for _, event_id in self.publisher.acked if event_id not in stored]

    def switch_errors(self) -> list[tuple[float, str]]:
        """Publishes that raised after the kill, with their time from the kill."""
        return [(t - self.killed_at, m) for t, m in self.publisher.failed if t >= self.killed_at]

    def back_at(self) -> float:
        """When publishing went on: the first acknowledgement after the first error that
        followed the kill (a publish under way at the kill may still be acknowledged)."""
        errors = self.switch_errors()
        since = self.killed_at + (errors[0][0] if errors else 0.0)
        return min(t for t, _ in self.publisher.acked if t > since)

    def errors_after_switch(self, grace: float) -> list[tuple[float, str]]:
        """Publishes that raised later than *grace* seconds after the new primary was in
        place (with their time from the kill)."""
        late = self.switched_at - self.killed_at + grace
        return [(t, m) for t, m in self.switch_errors() if t > late]

    def figures(self) -> dict[str, Any]:
        """The measured figures, in seconds from the kill."""
        errors = self.switch_errors()
        first_ack = self.back_at()
        first_after = self.publisher.acked_after(first_ack - 1e-9)[0]
        number = self.publisher.numbers[first_after]
        delivered = [w.got_number_at(number) for w in self.watchers]
        lost = set(self.lost())
        lost_at = [t - self.killed_at for t, i in self.publisher.acked if i in lost]
        return {
            "new primary agreed": round(self.switched_at - self.killed_at, 2),
            "publish errors": len(errors),
            "first error": round(errors[0][0], 2) if errors else None,
            "last error": round(errors[-1][0], 2) if errors else None,
            "first publish acknowledged": round(first_ack - self.killed_at, 2),
            "first event after the kill delivered to all streams": round(
                max(t or 0.0 for t in delivered) - self.killed_at, 2
            ),
            "published": len(self.publisher.acked) + len(self.publisher.failed),
            "acknowledged": len(self.publisher.acked),
            "acknowledged but lost": len(lost),
            "lost, acknowledged from/to": (round(lost_at[0], 2), round(lost_at[-1], 2))
            if lost_at
            else None,
            "keep-alives per stream during the outage": min(
                w.comments_between(self.killed_at, first_ack) for w in self.watchers
            ),
        }

    def check_streams(self) -> None:
        """Every stream is open, received its events once and in order, every acknowledged
        event that Redis still holds among them, and keep-alives during the outage."""
        stored = self.stored()
        kept = [event_id for _, event_id in self.publisher.acked if event_id in stored]
        for watcher in self.watchers:
            ids = watcher.ids
            assert not watcher.reader.ended
            assert_in_order(ids, watcher.received, self.killed_at)
            missing = sorted(set(kept) - set(ids), key=position)
            assert missing == [], f"a stream missed {len(missing)} events: {missing[:5]}"
        assert self.figures()["keep-alives per stream during the outage"] >= 1

    def check_resumes(self, since: str) -> None:
        """A client resuming after *since*, on any app, gets every acknowledged event after
        it that Redis still holds, once and in order."""
        stored = self.stored()
        acked = [event_id for _, event_id in self.publisher.acked]
        wanted = [i for i in acked[acked.index(since) + 1 :] if i in stored]
        for app in self.apps:
            ids = resume(app, since, wanted[-1])
            assert_in_order(ids)
            assert [i for i in ids if i in set(wanted)] == wanted

    def check_shards(self, *, keepalives: bool = True) -> None:
        """With shards (where a stream's ids are vectors, not send_event's): every stream is
        open and received every acknowledged event Redis still holds once, in order within
        each channel (and keep-alives during the outage, when *keepalives*: not when only
        one shard was down); a client resuming from the id of any of its events received
        before the kill, on any app, gets exactly what that stream received after it."""
        numbers = self.publisher.numbers
        kept = {numbers[event_id] for event_id in self.stored()}
        for watcher in self.watchers:
            assert not watcher.reader.ended
            got = [int(data) for data in watcher.data]
            assert len(got) == len(set(got)), "a stream received an event twice"
            for channel in range(len(self.channels)):
                mine = [n for n in got if n % len(self.channels) == channel]
                assert mine == sorted(mine), f"out of order in channel {channel}"
            missing = sorted(kept - set(got))
            # Each missed number, with when it was acknowledged (seconds from the kill).
            when = {
                n: round(t - self.killed_at, 2)
                for t, event_id in self.publisher.acked
                if (n := numbers[event_id]) in missing
            }
            switched = round(self.switched_at - self.killed_at, 2)
            assert missing == [], f"a stream missed {when}; new primary at {switched}"
        if keepalives:
            assert self.figures()["keep-alives per stream during the outage"] >= 1
        watcher = self.watchers[0]
        before = [i for i, (t, _) in enumerate(watcher.received) if t < self.killed_at]
        for index in (before[len(before) // 2], before[-1]):
            since = watcher.received[index][1]
            # What it received after that event, but for the unacknowledged events that
            # the failover lost (sent while replication was cut).
            after = [int(data) for data in watcher.data[index + 1 :]]
            wanted = [n for n in after if n in kept]
            for app in self.apps:
                got = resume_data(app, since, self.channels, set(wanted))
                assert len(got) == len(set(got)), "a resume repeated an event"
                missing = sorted(set(wanted) - set(got))
                assert missing == [], f"a resume missed {len(missing)} events: {missing[:5]}"
                assert set(got) <= set(after), "a resume repeated what came before its id"
                for channel in range(len(self.channels)):
                    mine = [n for n in got if n % len(self.channels) == channel]
                    assert mine == sorted(mine), f"a resume is out of order in {channel}"


def resume_data(
    app: Flask, last_event_id: str, channels: Sequence[str], until: set[int], timeout: float = 20
) -> list[int]:
    """Open a stream of *channels* resuming after *last_event_id* and read until every
    number of *until* arrived (or it ends, or *timeout*); return the numbers received."""
    got: list[int] = []
    deadline = time.monotonic() + timeout
    with open_stream(app, last_event_id, channels) as reader:
        for _ in range(10_000):
            got += [int(e.data) for e in reader.events(timeout=0.2) if e.type == "message"]
            if until <= set(got) or reader.ended or time.monotonic() > deadline:
                break
    return got

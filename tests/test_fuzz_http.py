"""An HTTP fuzzer against the stream endpoint of a real ``gunicorn -k gevent``, on both buses.

Every request is built byte by byte (method, target, version, headers, body) and sent on a
raw socket: channel lists of every shape, ``Last-Event-ID`` headers and ``lastEventId``
parameters of every shape (empty, huge, latin-1 and UTF-8 bytes, NUL, stream-id shaped
with numbers past 2**64, caller-id shaped, real ids and mutations of them), odd ``Accept``,
``Content-Length`` and ``Transfer-Encoding`` headers, bodies, garbage methods and versions.

For every request:

- an answer comes within ``HEAD_TIMEOUT`` seconds, with a 2xx or 4xx status (never 5xx;
  501 only for a transfer coding gunicorn does not implement, as RFC 9112 asks); a framed
  body (length or chunks) that is not a stream ends;
- a ``200 text/event-stream`` answer to ``GET`` is a live stream: a probe event published
  afterwards on each of its channels (up to three) arrives within ``PROBE_TIMEOUT``
  seconds, or an ``sse-reset`` whose head id covers it; what arrives before is exactly
  what a model of the bus predicts (the replay after the resume point, or a reset naming
  the client's id and the newest id, and nothing else);
- once the client closes (with a FIN or a reset), the worker holds no subscription within
  ``CLEAN_TIMEOUT`` seconds (stats endpoint), its pid has not changed, and it logged no
  traceback.

One gunicorn per bus serves the whole module. In CI each bus runs ``FUZZ_EXAMPLES``
(default 150) derandomized examples, without shrinking, so failures reproduce and the run
stays bounded; the failing request's bytes are printed. A longer run::

    FUZZ_EXAMPLES=5000 FUZZ_SHRINK=1 .venv/bin/python -m pytest --timeout=0 \\
        tests/test_fuzz_http.py -k fuzz

(``FUZZ_SEED=<n>`` explores randomly from that seed instead of derandomized.)

The same checks also run on chosen requests: resume ids at and past 2**64, and ``HEAD``.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar, cast

import pytest
import redis
import requests
from fuzzkit import (
    RESET,
    Published,
    PublishLog,
    close_abruptly,
    id_key,
    log_since,
    publish_logged,
    send_raw,
    serve_module,
    stream_count,
    wait_streams_closed,
)
from gunicorn.util import split_request_uri
from hypothesis import HealthCheck, Phase, given, note, seed, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from support.clients import Collector
from support.gunicorn import GunicornServer
from support.http import RawResponse, StreamClosedError
from support.redis_server import RedisServer, require_redis_server
from werkzeug.wrappers import Request

from flask_sse_push.config import CHANNEL_RE

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
SEED = os.environ.get("FUZZ_SEED")
SHRINK = os.environ.get("FUZZ_SHRINK") == "1"
HEAD_TIMEOUT = 10.0
PROBE_TIMEOUT = 6.0
CLEAN_TIMEOUT = 10.0
#: SSE_HISTORY_SIZE of the served app (the default); the Redis stream keeps at least as many.
HISTORY = 1000
#: The most bytes of a request line or header field gunicorn accepts.
LINE_LIMIT = 8190
#: Bus ids past this are outside Redis's two unsigned 64-bit numbers.
U64 = 2**64

CHANNEL_POOL = ["a", "b", "sse", "fz.1", "x@y/z:w-v_u"]
#: The Redis stream of the served app (``flask-sse-push:<import name>``).
REDIS_KEY = "flask-sse-push:apps.streaming"
Entries = list[tuple[bytes, dict[bytes, bytes]]]


# -- the served targets -----------------------------------------------------------------


@dataclass
class Target:
    """One served app on one bus, and everything published to it."""

    bus: str
    server: GunicornServer
    pid: int
    log: PublishLog = field(default_factory=PublishLog)
    redis: redis.Redis | None = None
    log_offset: int = 0
    probes: int = 0

    @property
    def url(self) -> str:
        return self.server.url

    def entries(self) -> list[Published]:
        return self.log.ordered()

    def publish(self, channel: str) -> Published:
        self.probes += 1
        return publish_logged(self.url, self.log, f"probe-{self.probes}", channel)

    def publish_caller_id(self, channel: str, event_id: str) -> Published:
        """Publish with a caller-given id; its place in the order is asked from the bus."""
        self.probes += 1
        data = f"probe-{self.probes}"
        response = requests.post(
            self.url + "/publish",
            json={"data": data, "channel": channel, "id": event_id},
            timeout=15,
        )
        assert response.status_code == 200, response.text
        if self.redis is not None:
            newest = cast(Entries, self.redis.xrevrange(REDIS_KEY, count=1))
            key = id_key(newest[0][0].decode())
        else:  # the in-process bus counts every event: this one's sequence number is next
            last = self.entries()
            key = (0, last[-1].key[1] + 1 if last else 1)
        assert key is not None
        entry = Published(event_id, channel, data, key)
        self.log.add(entry)
        return entry


@pytest.fixture(scope="module", params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    """A gunicorn serving the streaming app on one bus, for the whole module."""
    redis_server: RedisServer | None = None
    env: dict[str, str] = {}
    if request.param == "redis":
        redis_server = RedisServer(
            tmp_path_factory.mktemp("fuzz-redis"), executable=require_redis_server()
        ).start()
        env["SSE_BUS_URL"] = redis_server.url
    try:
        server = serve_module(
            tmp_path_factory.mktemp(f"fuzz-{request.param}"), env=env, SSE_KEEPALIVE=0.2
        )
        try:
            target = Target(request.param, server, stream_count(server.url)[1])
            if redis_server is not None:
                target.redis = redis_server.client()
            # Caller-given ids first, then bus ids on a few channels: ids to resume from.
            target.publish_caller_id("a", "fz-caller-a")
            target.publish_caller_id("b", "fz-caller-b")
            for channel in ("a", "b", "sse", "a"):
                target.publish(channel)
            yield target
        finally:
            server.stop(timeout=10)
    finally:
        if redis_server is not None:
            redis_server.stop()


# -- what a request is made of ------------------------------------------------------------

T = TypeVar("T")


def mostly(usual: T, other: st.SearchStrategy[T], weight: int = 3) -> st.SearchStrategy[T]:
    """*usual* about *weight* times out of ``weight + 1``, else something *other* draws."""
    return st.one_of([st.just(usual)] * weight + [other])


ID_LITERALS = [
    "0-0",
    "0-1",
    "1-0",
    "-1",
    "-1-0",
    "0--1",
    "18446744073709551615-18446744073709551615",
    "18446744073709551616-0",
    "0-18446744073709551616",
    "99999999999999999999-0",
    "0-99999999999999999999",
    "99999999999999999999-99999999999999999999",
    "000000000000000000001-0",
    "1e3-0",
    "0x1-0",
    "\u0661-\u0662",
    "nonsense",
    "fz-caller-a",
    "fz-caller-b",
    "FZ-CALLER-A",
    "a,b",
    " ",
    "1-0 ",
    "x" * 256,
    "x" * 257,
    "null",
    "é",
    "a\x00b",
    "a\r\nX-Injected: 1",
    "a\r\n b",
]
SUFFIXES = [
    "0",
    "00",
    "-1",
    "",
    str(U64 - 1),
    str(U64),
    "99999999999999999999",
    "+1",
    " 1",
    "1.0",
    "\u0661",
]

IdShape = tuple[Any, ...]


def id_shapes() -> st.SearchStrategy[IdShape]:
    """Shapes of a resume id; rendered against the target's real ids by :func:`render_id`."""
    index = st.integers(min_value=0, max_value=10**6)
    return st.one_of(
        st.tuples(st.just("known"), index),
        st.tuples(st.just("literal"), st.sampled_from(ID_LITERALS)),
        st.tuples(st.just("head")),
        st.tuples(st.just("derived"), index, st.sampled_from(SUFFIXES)),
        st.tuples(st.just("shift"), index, st.integers(min_value=-3, max_value=3)),
        st.tuples(st.just("text"), st.text(max_size=40)),
        st.tuples(st.just("bytes"), st.binary(max_size=40)),
        st.tuples(st.just("huge"), st.sampled_from([300, 4000, LINE_LIMIT - 40, LINE_LIMIT + 10])),
    )


def render_id(shape: IdShape, target: Target) -> bytes:
    """The bytes of a resume id of *shape*, against *target*'s published ids."""
    entries = target.entries()
    bus_ids = [e for e in entries if id_key(e.id) is not None]
    kind = shape[0]
    if kind == "known":
        return entries[int(shape[1]) % len(entries)].id.encode()
    if kind == "literal":
        return str(shape[1]).encode("utf-8")
    if kind == "head":
        return entries[-1].id.encode()
    if kind == "derived":
        base = bus_ids[int(shape[1]) % len(bus_ids)].id
        return (base.rpartition("-")[0] + "-" + str(shape[2])).encode("utf-8")
    if kind == "shift":  # a neighbour of a real id, maybe one not given out yet
        base = bus_ids[int(shape[1]) % len(bus_ids)].id
        head, _, seq = base.rpartition("-")
        if target.bus == "redis":
            return f"{int(head) + shape[2]}-{seq}".encode()
        return f"{head}-{int(seq) + shape[2]}".encode()
    if kind == "text":
        text: str = shape[1]
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError:
            return text.encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return bytes(shape[1])
    return b"9" * int(shape[1])


CHANNEL_JUNK = [
    "%",
    "%z",
    "%zz",
    "%f",
    "%ff",
    "%c3",
    "%c3%28",
    "%ed%a0%80",
    "%f4%90%80%80",
    "%00",
    "+",
    "a+b",
    "%20",
    "a%2Fb",
    "%25",
    "a=b",
    "a;b",
    "%u00e9",
    "..",
    "/",
    ".",
    "a#b",
]

ChannelShape = tuple[Any, ...]


def channel_shapes() -> st.SearchStrategy[ChannelShape]:
    pool = st.tuples(st.just("pool"), st.sampled_from(CHANNEL_POOL), st.booleans())
    return st.one_of(
        pool,
        pool,
        pool,
        st.tuples(st.just("valid"), st.from_regex(CHANNEL_RE, fullmatch=True)),
        st.tuples(st.just("long"), st.integers(min_value=129, max_value=3000)),
        st.tuples(st.just("empty")),
        st.tuples(st.just("text"), st.text(max_size=20)),
        st.tuples(st.just("junk"), st.sampled_from(CHANNEL_JUNK)),
        st.tuples(
            st.just("raw"),
            st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12),
        ),
    )


def render_channel(shape: ChannelShape) -> str:
    """The query-string form of a channel value."""
    kind = shape[0]
    if kind == "pool":
        return urllib.parse.quote(shape[1], safe="@/:" if shape[2] else "")
    if kind == "valid":
        return str(shape[1])
    if kind == "long":
        return "a" * int(shape[1])
    if kind == "empty":
        return ""
    if kind == "text":
        return urllib.parse.quote(str(shape[1]).encode("utf-8", "surrogatepass"), safe="")
    return str(shape[1])


QUERY_KEYS = ["channel", "lastEventId", "Channel", "chan%6eel", "channel%5B%5D", "", "x"]

Param = tuple[Any, ...]


def params() -> st.SearchStrategy[Param]:
    channel = st.tuples(st.just("channel"), channel_shapes())
    return st.one_of(
        channel,
        channel,
        channel,
        st.tuples(st.just("lastEventId"), id_shapes()),
        st.tuples(st.just("lastEventId"), id_shapes()),
        st.tuples(st.just("key"), st.sampled_from(QUERY_KEYS), channel_shapes()),
        st.tuples(st.just("bare"), st.sampled_from(QUERY_KEYS)),
        st.tuples(st.just("repeat"), st.sampled_from([32, 33, 100, 300])),
    )


def render_params(items: list[Param], target: Target) -> str:
    parts: list[str] = []
    for item in items:
        kind = item[0]
        if kind == "channel":
            parts.append("channel=" + render_channel(item[1]))
        elif kind == "lastEventId":
            value = urllib.parse.quote(render_id(item[1], target), safe="")
            parts.append("lastEventId=" + value)
        elif kind == "key":
            parts.append(f"{item[1]}={render_channel(item[2])}")
        elif kind == "bare":
            parts.append(str(item[1]))
        else:
            parts.extend(["channel=a"] * int(item[1]))
    return "&".join(parts)


METHODS = [
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"OPTIONS",
    b"PATCH",
    b"TRACE",
    b"CONNECT",
    b"get",
    b"GeT",
    b"G",
    b"BREW",
    b"M-SEARCH",
    b"A" * 21,
    b"GET\x00",
    b"",
]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b""]
PATHS = ["/stream", "/stream/", "/stream/stats", "//stream", "/stream%2F", "/STREAM", "*"]
LEI_NAMES = [
    b"Last-Event-ID",
    b"last-event-id",
    b"LAST-EVENT-ID",
    b"Last_Event_ID",
    b"Last-Event-ID ",
]
ACCEPTS = [
    None,
    b"text/event-stream",
    b"*/*",
    b"application/json",
    b"text/event-stream;q=0",
    b"\xff\xfe",
    b"a" * 5000,
]
CONTENT_LENGTHS = [
    "none",
    "exact",
    "short",
    "long",
    "zero",
    "negative",
    "junk",
    "huge",
    "twice",
    "conflict",
    "plus",
]
TRANSFER_CODINGS = [
    None,
    b"chunked",
    b"gzip",
    b"chunked, chunked",
    b"identity",
    b"gzip, chunked",
    b"Chunked",
    b"chunked;x=1",
]
CONNECTIONS = [None, b"close", b"keep-alive", b"upgrade", b"Upgrade, HTTP2-Settings", b"\x01"]
EXPECTS = [None, b"100-continue", b"nonsense"]
HOSTS = ["normal", "missing", "twice", "garbage", "empty"]


@dataclass(frozen=True)
class Plan:
    """One request, as drawn; :meth:`render` makes its bytes."""

    method: bytes = b"GET"
    path: str = "/stream"
    absolute: bool = False
    query: list[Param] | None = None
    fragment: bool = False
    version: bytes = b"HTTP/1.1"
    bare_lf: bool = False
    host: str = "normal"
    resume: list[tuple[bytes, IdShape]] = field(default_factory=list)
    accept: bytes | None = b"text/event-stream"
    content_length: str = "none"
    transfer_coding: bytes | None = None
    chunk_body: bool = False
    connection: bytes | None = None
    expect: bytes | None = None
    extra: list[tuple[str, bytes]] = field(default_factory=list)
    body: bytes = b""
    abrupt_close: bool = False
    #: A plain request sent before this one on the same connection (keep-alive).
    pipelined: str | None = None
    #: Offsets at which the request is cut into pieces sent a moment apart.
    splits: tuple[int, ...] = ()

    def prefix(self) -> bytes:
        """The request pipelined before this one, if any."""
        if self.pipelined is None:
            return b""
        return f"GET {self.pipelined} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()

    def render(self, target: Target) -> bytes:
        """The request's bytes, against *target*'s port and published ids."""
        query = "" if self.query is None else "?" + render_params(self.query, target)
        path = self.path + query + ("#frag" if self.fragment else "")
        if self.absolute:
            path = f"http://127.0.0.1:{target.server.port}{path}"
        eol = b"\n" if self.bare_lf else b"\r\n"
        headers: list[tuple[bytes, bytes]] = []
        if self.host != "missing":
            value = {"garbage": b"\xff bad host", "empty": b""}.get(self.host, b"127.0.0.1")
            headers.append((b"Host", value))
            if self.host == "twice":
                headers.append((b"Host", b"localhost"))
        if self.accept is not None:
            headers.append((b"Accept", self.accept))
        for name, shape in self.resume:
            headers.append((name, render_id(shape, target)))
        body = self.body
        if self.transfer_coding is not None:
            headers.append((b"Transfer-Encoding", self.transfer_coding))
            if self.chunk_body:
                body = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        length = {
            "exact": str(len(body)),
            "short": str(max(len(body) - 1, 0)),
            "long": str(len(body) + 10),
            "zero": "0",
            "negative": "-1",
            "junk": "12abc",
            "huge": "99999999999999999999",
            "twice": str(len(body)),
            "conflict": str(len(body)),
            "plus": f"+{len(body)}",
        }.get(self.content_length)
        if length is not None:
            headers.append((b"Content-Length", length.encode()))
            if self.content_length in ("twice", "conflict"):
                other = len(body) + (self.content_length == "conflict")
                headers.append((b"Content-Length", str(other).encode()))
        if self.connection is not None:
            headers.append((b"Connection", self.connection))
        if self.expect is not None:
            headers.append((b"Expect", self.expect))
        headers.extend((name.encode("latin-1"), value) for name, value in self.extra)
        head = self.method + b" " + path.encode("utf-8") + b" " + self.version + eol
        head += b"".join(name + b": " + value + eol for name, value in headers)
        return head + eol + body


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    """Requests, most of them plausible enough to open a stream: each oddity is drawn
    rarely, so that several of them seldom hide each other behind one 400."""
    if draw(st.integers(min_value=0, max_value=4)) > 0:
        method, path, version = b"GET", "/stream", b"HTTP/1.1"
        absolute = fragment = bare_lf = False
        host = "normal"
    else:
        method = draw(
            st.one_of(
                st.sampled_from(METHODS),
                st.from_regex(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,25}", fullmatch=True),
                st.binary(max_size=8),
            )
        )
        path = draw(mostly("/stream", st.sampled_from(PATHS), 1))
        version = draw(mostly(b"HTTP/1.1", st.sampled_from(VERSIONS), 1))
        absolute = draw(mostly(False, st.just(True)))
        fragment = draw(mostly(False, st.just(True)))
        bare_lf = draw(mostly(False, st.just(True)))
        host = draw(mostly("normal", st.sampled_from(HOSTS)))
    query = draw(st.none() | st.lists(params(), max_size=6))
    name = mostly(b"Last-Event-ID", st.sampled_from(LEI_NAMES))
    resumed = st.lists(st.tuples(name, id_shapes()), min_size=1, max_size=2)
    resume = draw(st.one_of(st.just([]), resumed, resumed))
    extra = draw(
        mostly(
            [],
            st.lists(
                st.tuples(
                    st.from_regex(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,20}", fullmatch=True),
                    st.binary(max_size=30),
                ),
                min_size=1,
                max_size=3,
            ),
        )
    )
    transfer_coding = draw(mostly(None, st.sampled_from(TRANSFER_CODINGS), 5))
    return Plan(
        method=method,
        path=path,
        absolute=absolute,
        query=query,
        fragment=fragment,
        version=version,
        bare_lf=bare_lf,
        host=host,
        resume=resume,
        accept=draw(mostly(b"text/event-stream", st.sampled_from(ACCEPTS))),
        content_length=draw(mostly("none", st.sampled_from(CONTENT_LENGTHS), 4)),
        transfer_coding=transfer_coding,
        chunk_body=transfer_coding is not None and draw(st.booleans()),
        connection=draw(mostly(None, st.sampled_from(CONNECTIONS), 5)),
        expect=draw(mostly(None, st.sampled_from(EXPECTS), 6)),
        extra=extra,
        body=draw(mostly(b"", st.binary(min_size=1, max_size=64))),
        abrupt_close=draw(st.booleans()),
        pipelined=draw(mostly(None, st.sampled_from(["/health", "/stream/stats"]), 5)),
        splits=draw(
            mostly((), st.lists(st.integers(1, 400), min_size=1, max_size=3).map(tuple), 5)
        ),
    )


# -- the model: what gunicorn and the app make of the request bytes ----------------------


@dataclass(frozen=True)
class Seen:
    """The request as the app sees it, as far as a stream depends on it."""

    channels: list[str]
    last_event_id: str | None


def as_seen(wire: bytes) -> Seen:
    """Parse *wire* the way gunicorn and Werkzeug do, for a request that was answered with
    a stream: the channel list and the effective resume id (header, else parameter)."""
    head = wire.split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")
    target = lines[0].split(b" ", 2)[1].decode("latin-1")
    values: list[str] = []
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        if name.upper() == "LAST-EVENT-ID":  # names with "_" are dropped, trailing " " refused
            values.append(value.strip(" \t"))
    request = Request({"QUERY_STRING": split_request_uri(target).query or ""})
    header = ",".join(values) if values else None
    last_event_id = header or request.args.get("lastEventId")
    names = request.args.getlist("channel")
    return Seen(names or ["sse"], last_event_id)


@dataclass(frozen=True)
class Expected:
    """What a stream must start with: a reset (with the reasons allowed) or not, and the
    position after which the log is replayed (``None``: nothing is replayed)."""

    reset: tuple[str, ...] = ()
    after: tuple[int, int] | None = None


def expected_resume(target: Target, last_event_id: str | None) -> Expected:
    """What the bus must answer to *last_event_id*, from the log of what was published."""
    if last_event_id is None:
        return Expected()
    if not last_event_id or len(last_event_id) > 256:
        return Expected(reset=("malformed",))
    entries = target.entries()
    head = entries[-1].key
    position: tuple[int, int] | None
    if target.bus == "memory":
        epoch, _, seq = last_event_id.rpartition("-")
        own = next(entry.id for entry in entries if id_key(entry.id) is not None)
        if epoch == own.rpartition("-")[0] and seq.isdigit() and seq.isascii():
            number = int(seq)
            position = (0, number) if number <= head[1] else None
        else:
            position = _newest_with_id(entries, last_event_id)
    else:
        match = re.fullmatch(r"(\d{1,20})-(\d{1,20})", last_event_id)
        if match:
            position = (int(match[1]), int(match[2]))
            if max(position) >= U64:
                # Not an id Redis can hold: no replay is possible, only a reset.
                return Expected(reset=("malformed", "unknown", "too-old"))
        else:
            position = _newest_with_id(entries, last_event_id)
        if position is not None and position > head:
            position = None
        if match and position is not None and (0, 0) < position < entries[0].key:
            # Older than the stream's first entry: from a deleted stream if nothing was
            # trimmed yet (unknown), else trimmed away (too old); never a silent replay.
            return Expected(reset=("unknown", "too-old"))
    if position is None:
        return Expected(reset=("unknown",))
    later = sum(entry.key > position for entry in entries)
    if later > HISTORY:
        # Memory keeps exactly HISTORY events; Redis at least that many (trims roughly).
        return Expected(reset=("too-old",), after=position if target.bus == "redis" else None)
    return Expected(after=position)


def _newest_with_id(entries: list[Published], event_id: str) -> tuple[int, int] | None:
    for entry in reversed(entries):
        if entry.id == event_id:
            return entry.key
    return None


# -- running one request ------------------------------------------------------------------


def status_allowed(status: int, wire: bytes) -> bool:
    if 200 <= status < 300 or 400 <= status < 500:
        return True
    # RFC 9112 section 6.1: a transfer coding the server does not implement gets a 501.
    head = wire.split(b"\r\n\r\n", 1)[0].lower()
    return status == 501 and b"transfer-encoding:" in head


def say(text: str) -> None:
    """Note *text* for Hypothesis's report of a failing example (outside one: nothing)."""
    if currently_in_test_context():
        note(text)


def check_request(target: Target, plan: Plan, *, settle: bool = False) -> bool:
    """Send one fuzzed request and check everything the module docstring promises; return
    whether it opened a stream.

    :param settle: publish the probes only once the reset, when one is expected, came
        (so that a test about ids does not depend on publishing racing the resume).
    """
    wire = plan.render(target)
    say(f"request bytes: {wire!r}")
    where = f"\nrequest bytes: {wire!r}"
    prefix = plan.prefix()
    if prefix:
        say(f"pipelined after: {prefix!r}")
        where += f" (pipelined after {prefix!r})"
    splits = [len(prefix) + cut for cut in plan.splits]
    try:
        sock, response = send_raw(
            target.server.port, prefix + wire, HEAD_TIMEOUT, splits=splits, skip=1 if prefix else 0
        )
    except StreamClosedError as exc:
        pytest.fail(f"the connection closed without an answer ({exc}){where}")
    except TimeoutError as exc:
        pytest.fail(f"no answer within {HEAD_TIMEOUT}s ({exc}){where}")
    opened = False
    try:
        status = response.status
        assert status_allowed(status, wire), f"status {status}: {response.raw_bytes!r}{where}"
        content_type = response.header("Content-Type") or ""
        is_stream = (
            status == 200
            and content_type.startswith("text/event-stream")
            and wire.startswith(b"GET ")
        )
        if is_stream:
            opened = True
            check_stream(target, wire, response, where, settle)
        elif not wire.startswith(b"HEAD ") and (
            response.chunked or response.header("Content-Length")
        ):
            try:
                response.read_to_end(HEAD_TIMEOUT)
            except TimeoutError as exc:
                pytest.fail(f"the {status} answer's body did not end ({exc}){where}")
    finally:
        if plan.abrupt_close:
            close_abruptly(sock)
        else:
            sock.close()
    if opened:
        left = wait_streams_closed(target.url, CLEAN_TIMEOUT)
        assert left == 0, f"{left} stream(s) still open {CLEAN_TIMEOUT}s after the close{where}"
    pid = stream_count(target.url)[1]
    assert pid == target.pid, f"the worker changed ({target.pid} -> {pid}){where}"
    text, target.log_offset = log_since(target.server, target.log_offset)
    assert "Traceback" not in text, f"the server logged an error:\n{text}{where}"
    return opened


def check_stream(
    target: Target, wire: bytes, response: RawResponse, where: str, settle: bool
) -> None:
    """A live stream: probes published now arrive after exactly the predicted replay."""
    before = target.entries()
    seen = as_seen(wire)
    invalid = [name for name in seen.channels if not CHANNEL_RE.fullmatch(name)]
    assert not invalid, f"a stream was opened on invalid channels {invalid!r}{where}"
    expected = expected_resume(target, seen.last_event_id)
    say(f"as seen: {seen}; expected: {expected}")
    collector = Collector()
    if settle and expected.reset:
        try:
            response.read_body_until(collector.at_least(1), PROBE_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"no reset within {PROBE_TIMEOUT}s: {response.body[-600:]!r}{where}")
    probes = [target.publish(channel) for channel in list(dict.fromkeys(seen.channels))[:3]]

    def covered(body: bytes) -> bool:
        collector.update(body)
        got = {event.last_event_id for event in collector.events}
        resets = [e for e in collector.events if e.type == RESET]
        reset_key = _key_of(target, resets[0].last_event_id) if resets else None
        return all(p.id in got or (reset_key is not None and reset_key >= p.key) for p in probes)

    try:
        response.read_body_until(covered, PROBE_TIMEOUT)
    except StreamClosedError as exc:
        collector.update(exc.body)
        assert b"retry later" in exc.body, f"the stream ended early: {exc.body!r}{where}"
        return
    except TimeoutError:
        pytest.fail(
            f"neither the probes {[p.id for p in probes]} nor a reset covering them came "
            f"within {PROBE_TIMEOUT}s; body {response.body[-600:]!r}{where}"
        )
    check_events(target, before, probes, seen, expected, collector, where)


def _key_of(target: Target, event_id: str) -> tuple[int, int] | None:
    for entry in target.entries():
        if entry.id == event_id:
            return entry.key
    return None


def check_events(
    target: Target,
    before: list[Published],
    probes: list[Published],
    seen: Seen,
    expected: Expected,
    collector: Collector,
    where: str,
) -> None:
    events = list(collector.events)
    entries = target.entries()
    after = expected.after
    if events and events[0].type == RESET:
        reset = events.pop(0)
        notice = json.loads(reset.data)
        assert notice["reason"] in expected.reset, f"unexpected reset {notice}{where}"
        assert notice["lastEventId"] == (seen.last_event_id or "")[:256], (
            f"the reset echoes {notice['lastEventId']!r}, not the id sent{where}"
        )
        head_key = _key_of(target, reset.last_event_id)
        assert head_key is not None and head_key >= before[-1].key, (
            f"the reset's head {reset.last_event_id!r} is not the newest id "
            f"{before[-1].id!r}{where}"
        )
        after = head_key
    else:
        assert not expected.reset or expected.after is not None, (
            f"no reset ({expected.reset} expected); events {events[:3]}{where}"
        )
    if after is None:  # a fresh stream: the probes only
        wanted = [p.id for p in probes]
    else:
        channels = set(seen.channels)
        wanted = [e.id for e in entries if e.key > after and e.channel in channels]
    got = [event.last_event_id for event in events]
    assert got == wanted, f"events {got} where {wanted} were expected{where}"
    data = {e.id: e.data for e in entries}
    assert [event.data for event in events] == [data[i] for i in got], f"wrong data{where}"


# -- the tests ----------------------------------------------------------------------------


def fuzz_settings() -> settings:
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else [])
    return settings(
        max_examples=EXAMPLES,
        deadline=timedelta(seconds=HEAD_TIMEOUT + PROBE_TIMEOUT + CLEAN_TIMEOUT + 15),
        derandomize=SEED is None,
        database=None,
        phases=phases,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
    )


def _fuzz(target: Target, plan: Plan) -> None:
    check_request(target, plan)


_fuzz_test = given(plan=plans())(_fuzz)
if SEED is not None:
    _fuzz_test = seed(int(SEED))(_fuzz_test)
fuzz_requests = fuzz_settings()(_fuzz_test)


def test_fuzz_requests(target: Target) -> None:
    """Fuzzed requests on each bus (see the module docstring)."""
    fuzz_requests(target)


HUGE_IDS = [
    "0-18446744073709551616",
    "{ms}-18446744073709551616",
    "0-99999999999999999999",
    "{ms}-18446744073709551615",
    "18446744073709551616-0",
    "99999999999999999999-0",
    "18446744073709551615-18446744073709551615",
    "99999999999999999999-99999999999999999999",
]


@pytest.mark.parametrize("template", HUGE_IDS)
def test_resume_ids_past_64_bits(target: Target, template: str) -> None:
    """Stream-id shaped ``Last-Event-ID`` values with numbers at and past 2**64: a reset or
    a replay, then live events (``{ms}``: the time part of the newest id)."""
    newest = next(e.id for e in reversed(target.entries()) if id_key(e.id) is not None)
    value = template.format(ms=newest.rpartition("-")[0])
    literal: IdShape = ("literal", value)
    assert check_request(target, Plan(resume=[(b"Last-Event-ID", literal)]), settle=True)
    assert check_request(target, Plan(query=[("lastEventId", literal)]), settle=True)


def test_head_answers_like_get(target: Target) -> None:
    """HEAD gets GET's status and headers (RFC 9110 section 9.3.2) and subscribes nothing."""
    get_sock, get = send_raw(target.server.port, Plan().render(target), HEAD_TIMEOUT)
    get_sock.close()
    head_sock, head = send_raw(
        target.server.port, Plan(method=b"HEAD").render(target), HEAD_TIMEOUT
    )
    head_sock.close()
    assert wait_streams_closed(target.url, CLEAN_TIMEOUT) == 0
    assert head.status == get.status == 200
    for name in ("Content-Type", "Cache-Control", "X-Accel-Buffering", "Content-Length"):
        assert head.header(name) == get.header(name), (name, head.headers, get.headers)


@pytest.mark.parametrize(
    "plan",
    [
        Plan(pipelined="/health"),
        Plan(pipelined="/stream/stats", query=[("channel", ("pool", "a", False))]),
        Plan(splits=(3, 17, 40)),
        Plan(pipelined="/health", splits=(1,), resume=[(b"Last-Event-ID", ("head",))]),
    ],
    ids=["after-health", "after-stats", "in-pieces", "after-health-in-pieces-resumed"],
)
def test_pipelined_and_fragmented_requests(target: Target, plan: Plan) -> None:
    """A stream request after another on a kept-alive connection, or sent in pieces."""
    assert check_request(target, plan)

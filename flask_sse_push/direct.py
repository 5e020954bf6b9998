"""Writing events to a client's socket straight from the fan-out.

A stream that waits for events costs, for each one, a switch into its greenlet, the WSGI
server's write path and a switch back. When the server is gunicorn's gevent worker writing
chunked HTTP/1.1 on a plain socket, the fan-out can instead hand the event's chunk to the
kernel itself: one non-blocking ``send`` per stream, with the greenlet left asleep. When the
socket buffer cannot take the whole chunk, the mailbox falls back to its queue and wakes the
greenlet, which writes what was left (see :class:`~flask_sse_push.mailbox.Mailbox`).

Writing past the server is only safe when the bytes on the wire are exactly what it would
write, so this is allowed only when everything is known:

- the request is a ``GET`` over HTTP/1.1 served by gunicorn's HTTP parser, on a socket
  without TLS (gunicorn's ``is_ssl`` off, and a plain socket object);
- the iteration of the stream's body is driven by gunicorn's own request handler, and what
  it iterates is the body itself (no WSGI middleware in between that could change it, not
  even one that wraps it in C, as ``map`` does, leaving no frame of its own), and its
  response has sent its headers and frames the body in chunks.

Anything else (Werkzeug's server, HTTP/2, TLS, the uWSGI protocol, a middleware) keeps the
ordinary path. The check runs once per stream, when its body starts waiting for events.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from . import concurrency, shutdown

#: A direct writer: ``send`` of the socket under gevent's wrapper, which never blocks.
Send = Callable[[bytes], int]


def candidate(environ: Mapping[str, Any]) -> socket.socket | None:
    """The client's socket if the request could be written to directly (the rest is
    checked by :func:`writer` once the body runs), else ``None``."""
    sock: socket.socket | None = environ.get("gunicorn.socket")
    if (
        sock is None
        or environ.get("REQUEST_METHOD") != "GET"
        or environ.get("SERVER_PROTOCOL") != "HTTP/1.1"
        or not concurrency.gevent_active()
        or concurrency.away()
    ):
        return None
    from gevent.socket import socket as gevent_socket

    if type(sock) is not gevent_socket:  # TLS sockets are a subclass
        return None
    worker = shutdown.find_worker()
    cfg = getattr(worker, "cfg", None)
    if cfg is None or cfg.is_ssl or getattr(cfg, "protocol", "http") != "http":
        return None
    return sock


def writer(sock: socket.socket, caller: FrameType | None, body: object) -> tuple[Send, Any] | None:
    """The direct writer of *sock* and gunicorn's response object (whose byte count, for
    the access log, the stream brings up to date at its end), when *caller* (the frame that
    asked the body for its next bytes) is gunicorn's request handler writing *body* itself
    in chunks; ``None`` otherwise."""
    if caller is None or caller.f_code.co_name != "handle_request":
        return None
    if not caller.f_globals.get("__name__", "").startswith("gunicorn.workers."):
        return None
    local = caller.f_locals
    if local.get("respiter") is not body:  # a wrapper (map, a middleware) writes its own
        return None
    response: Any = local.get("resp")
    from gunicorn.http.wsgi import Response

    if type(response) is not Response:  # HTTP/2 and others frame differently
        return None
    if not (response.headers_sent and response.chunked):
        return None
    raw = getattr(sock, "_sock", None)
    if raw is None or raw.gettimeout() != 0.0:  # must never block the fan-out
        return None
    send: Send = raw.send
    return send, response

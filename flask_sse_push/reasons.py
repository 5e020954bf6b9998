"""Why a stream ended, and why a resume turned into a reset.

Both are :class:`enum.StrEnum`: a member *is* its string value, so it is written as is in
the ``: <reason>`` comment that ends a stream, in the reset event's JSON and in the
``reason`` argument of :data:`~flask_sse_push.signals.stream_closed`.
"""

from __future__ import annotations

from enum import StrEnum


class EndReason(StrEnum):
    """Why a stream ended."""

    #: The client went away, or the server closed the response.
    CLOSED = "closed"
    #: The client read too slowly and its queue overflowed.
    SLOW = "slow"
    #: The process is shutting down or reloading.
    SHUTDOWN = "shutdown"
    #: :func:`~flask_sse_push.end_streams` ended it (access revoked).
    REVOKED = "revoked"
    #: ``SSE_MAX_LIFETIME`` passed.
    LIFETIME = "lifetime"
    #: Redis trimmed events before this worker's receiver read them.
    LAGGED = "lagged"
    #: A per-request stream's generator finished.
    DONE = "done"
    #: A per-request stream's generator raised, or Redis refused to read a stream's replay.
    ERROR = "error"


class ResetReason(StrEnum):
    """Why the events missed since a ``Last-Event-ID`` cannot be replayed."""

    #: An id this bus never gave out (another process, before a restart, a deleted stream).
    UNKNOWN = "unknown"
    #: Older than the history kept.
    TOO_OLD = "too-old"
    #: Not an id at all (empty, too long, out of range).
    MALFORMED = "malformed"

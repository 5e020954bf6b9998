"""A tiny throwaway Flask app used by ``test_infra.py`` to check the fixtures."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Flask, Response

app = Flask(__name__)


@app.get("/ping")
def ping() -> str:
    """Answer ``pong``.

    :returns: The body.
    """
    return "pong"


@app.get("/count")
def count() -> Response:
    """Stream three events, one chunk each: ``data: 1`` .. ``data: 3``.

    :returns: A streaming ``text/event-stream`` response.
    """

    def generate() -> Iterator[bytes]:
        for n in range(1, 4):
            yield f"data: {n}\n\n".encode()

    return Response(generate(), mimetype="text/event-stream")

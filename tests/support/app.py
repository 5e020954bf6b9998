"""The test app (``tests/apps/streaming.py``) under gunicorn, and calls to its routes."""

from __future__ import annotations

import json
from typing import Any

import requests

from support.gunicorn import GunicornFactory, GunicornServer, answering

__all__ = ["APP", "CONF", "publish", "serve", "stats"]

APP = "apps.streaming:app"
CONF = "python:flask_sse_push.gunicorn_conf"


def serve(
    gunicorn: GunicornFactory,
    *,
    workers: int = 1,
    env: dict[str, str] | None = None,
    config: str | None = CONF,
    **sse: Any,
) -> GunicornServer:
    """Serve the test app under ``gunicorn -k gevent`` with the package's gunicorn config
    (*config*; ``None`` for the bare command); keyword arguments are ``SSE_*`` settings.
    Returns once the app answers."""
    full_env = {key: json.dumps(value) for key, value in sse.items()}
    full_env.update(env or {})
    return answering(gunicorn(APP, workers=workers, env=full_env, config=config), "/health")


def publish(url: str, data: Any, **kwargs: Any) -> str:
    """Publish through the test app's ``/publish`` route; return the event id."""
    response = requests.post(url + "/publish", json={"data": data, **kwargs}, timeout=10)
    assert response.status_code == 200, response.text
    event_id: str = response.json()["id"]
    return event_id


def stats(url: str) -> dict[str, Any]:
    """The answering worker's stream counts."""
    result: dict[str, Any] = requests.get(url + "/stream/stats", timeout=5).json()
    return result

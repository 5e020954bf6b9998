"""The test app (``tests/apps/streaming.py``) under gunicorn, and calls to its routes; small
apps in the test process (:class:`Apps`)."""

from __future__ import annotations

import json
from typing import Any

import requests
from flask import Flask

from flask_sse_push import SSEBlueprint, get_state
from support.gunicorn import GunicornFactory, GunicornServer, answering

__all__ = ["APP", "CONF", "Apps", "publish", "serve", "stats"]

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


class Apps:
    """Makes apps in the test process, each with the blueprint at ``/stream`` and a bus of its
    own (so a receiver of its own, like a worker); :meth:`close` closes their buses.

    :param url: the default ``SSE_BUS_URL``.
    """

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self.made: list[Flask] = []

    def __call__(self, url: str | None = None, **config: Any) -> Flask:
        """A new app on *url*, with short keep-alives and publish timeouts, and *config*."""
        app = Flask(__name__)
        app.config.update(
            {"SSE_BUS_URL": url or self.url, "SSE_KEEPALIVE": 0.2, "SSE_PUBLISH_TIMEOUT": 1}
        )
        app.config.update(config)
        app.register_blueprint(SSEBlueprint(), url_prefix="/stream")
        self.made.append(app)
        return app

    def close(self) -> None:
        """Close the bus of every app made."""
        for app in self.made:
            get_state(app).bus.close()

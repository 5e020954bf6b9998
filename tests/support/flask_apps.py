"""Apps made in the test process with an :class:`~flask_sse_push.SSEBlueprint` at
``/stream``, whose buses are closed when the test is done."""

from __future__ import annotations

from typing import Any

from flask import Flask

from flask_sse_push import SSEBlueprint, get_state

__all__ = ["AppFactory"]


class AppFactory:
    """Makes apps: each call registers a new blueprint on a new app, with *defaults* and
    then the call's keyword arguments as config. :meth:`close` closes every bus made.

    :param defaults: ``SSE_*`` settings of every app.
    """

    def __init__(self, **defaults: Any) -> None:
        self.defaults = defaults
        self.made: list[Flask] = []

    def __call__(self, **config: Any) -> tuple[Flask, SSEBlueprint]:
        """Make an app; return it and its blueprint."""
        app = Flask(__name__)
        app.config.update({**self.defaults, **config})
        blueprint = SSEBlueprint()
        app.register_blueprint(blueprint, url_prefix="/stream")
        self.made.append(app)
        return app, blueprint

    def close(self) -> None:
        """Close the buses of every app made (their connections and receivers)."""
        for app in self.made:
            get_state(app).bus.close()

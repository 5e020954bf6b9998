"""A live dashboard: one EventSource follows several public channels and, once you log in
(Flask-Login, no passwords), your private channel; a form and a JSON endpoint publish with
``send_event``, and a background publisher streams the open-stream counts to a live chart.

Run it with ``bash dev.sh example`` and open http://127.0.0.1:8000/. ``SSE_*`` environment
variables override the config (``SSE_BUS_URL=redis://127.0.0.1:6379/0`` for the Redis bus);
``EXAMPLE_METRICS_INTERVAL`` sets the seconds between metrics samples (0 turns them off).
"""

from __future__ import annotations

import os
import re
import secrets
import time
from typing import Any

from flask import Flask, jsonify, redirect, render_template, request, url_for
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user
from werkzeug.wrappers import Response

from flask_sse_push import Event, SSEBlueprint, end_streams, send_event
from flask_sse_push.config import from_environ

from .metrics import METRICS, start_metrics_publisher

CHANNELS = ("news", "alerts", METRICS)
#: Login names: what a channel name may hold (see ``private_channel``), at most 32 long.
NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
#: The user who may read the stats (open streams per channel, private ones included).
ADMIN = os.environ.get("EXAMPLE_ADMIN", "admin")


def private_channel(user: str) -> str:
    """The channel only *user* may read."""
    return f"user:{user}"


def valid_name(name: object) -> bool:
    """Whether *name* may log in; its private channel is then a valid channel name."""
    return isinstance(name, str) and NAME.fullmatch(name) is not None


class User(UserMixin):
    """A user of the demo: the login name is the id, and there are no passwords.

    :param name: a login name (see :func:`valid_name`).
    """

    def __init__(self, name: str) -> None:
        self.id = name

    @property
    def channel(self) -> str:
        """The user's private channel."""
        return private_channel(self.id)


def load_user(user_id: str) -> User | None:
    """Flask-Login's user loader: the user of a signed session, if the name is valid."""
    return User(user_id) if valid_name(user_id) else None


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the example app; *config* overrides ``app.config`` and the environment."""
    app = Flask(__name__)
    app.config.update(
        # Flask-Login keeps the user id in the session, which this key signs.
        SECRET_KEY=os.environ.get("SECRET_KEY") or secrets.token_hex(16),
        SSE_STATS=True,
        METRICS_INTERVAL=float(os.environ.get("EXAMPLE_METRICS_INTERVAL", "1")),
        METRICS_CHANNELS=CHANNELS,
        **from_environ(),
    )
    app.config.update(config or {})
    login_manager = LoginManager(app)
    login_manager.user_loader(load_user)
    # A blueprint of its own per app keeps hooks apart when create_app() runs twice (tests);
    # a single app can simply use the ready `flask_sse_push.sse`.
    sse = SSEBlueprint()
    app.register_blueprint(sse, url_prefix="/stream")

    @sse.authorize
    def can_read(channel: str) -> bool:
        # Public channels for everyone; "user:<name>" only for <name>, logged in.
        if channel in CHANNELS:
            return True
        return bool(current_user.is_authenticated and channel == current_user.channel)

    @sse.identify
    def identify() -> str | None:
        # The id end_streams(user=...) finds the user's streams by (None when anonymous).
        user_id: str | None = current_user.get_id()
        return user_id

    @sse.authorize_stats
    def is_admin() -> bool:
        # The stats name the open private channels, so who is logged in: not for everyone.
        return bool(current_user.is_authenticated and current_user.get_id() == ADMIN)

    @sse.on_connect
    def hello(channels: frozenset[str]) -> list[Event]:
        # The current state goes to the new connection only, before live events.
        return [Event({"channels": sorted(channels), "time": time.time()}, event="hello")]

    @app.before_request
    def metrics() -> None:
        # Lazily, in the process that serves (after gunicorn forked it, gevent patched it).
        start_metrics_publisher(app)

    @app.get("/")
    def index() -> str:
        user = current_user if current_user.is_authenticated else None
        channels = [*CHANNELS, *([user.channel] if user else [])]
        return render_template(
            "index.html",
            channels=channels,
            public=CHANNELS,
            user=user,
            admin=ADMIN,
            interval=f"{app.config['METRICS_INTERVAL']:g}",
        )

    @app.post("/login")
    def login() -> Response:
        name = request.form.get("name", "").strip()
        if not valid_name(name):
            return Response(
                "choose a name of 1-32 ASCII letters, digits and '_.-'\n",
                400,
                mimetype="text/plain",
            )
        login_user(User(name))
        return redirect(url_for("index"), 303)

    @app.post("/logout")
    def logout() -> Response:
        user_id = current_user.get_id()
        logout_user()
        if user_id is not None:
            # Access is gone: end the user's open streams everywhere.
            end_streams(user=user_id)
        return redirect(url_for("index"), 303)

    @app.post("/publish")
    def publish_form() -> Response:
        channel = request.form.get("channel", "news")
        if channel not in CHANNELS:
            return Response(f"unknown channel {channel!r}\n", 400, mimetype="text/plain")
        send_event(
            {"channel": channel, "text": request.form.get("text", ""), "time": time.time()},
            event="note",
            channel=channel,
        )
        return redirect(url_for("index"), 303)

    @app.post("/api/events")
    def publish_json() -> tuple[Response, int]:
        # A demo: anyone may publish, even to a user's private channel (reading it is what
        # the authorization hook guards). A real app checks who may publish where.
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or "data" not in body:
            return jsonify(error='send a JSON object such as {"data": ..., "channel": "news"}'), 400
        channel = body.get("channel", "news")
        user = body.get("user")
        if user is not None:
            if not valid_name(user):
                return jsonify(error="user must be a login name (ASCII letters, digits, _.-)"), 400
            channel = private_channel(user)
        elif channel not in CHANNELS:
            return jsonify(error=f"unknown channel {channel!r}; use one of {list(CHANNELS)}"), 400
        try:
            event_id = send_event(
                {"channel": channel, "data": body["data"]},
                event=body.get("event", "note"),
                channel=channel,
            )
        except (TypeError, ValueError) as exc:
            return jsonify(error=str(exc)), 400
        return jsonify(id=event_id, channel=channel), 201

    return app


app = create_app()

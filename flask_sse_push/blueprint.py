"""The streaming blueprint: ``GET <prefix>?channel=a&channel=b``."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from flask.globals import app_ctx, request_ctx
from flask.sansio.app import App
from flask.sansio.blueprints import BlueprintSetupState

from . import direct, lifecycle, signals
from .bus import Resume, Subscription
from .encoding import Event, comment, encode_event, reset_event, retry_line, stream_head
from .errors import ConfigurationError
from .publish import check_channel
from .state import EXTENSION_KEY, SSEState, get_state
from .stream import BusStream, client_socket, event_stream_response

if TYPE_CHECKING:
    from .metrics import Metrics

AuthorizeHook = Callable[[str], bool]
IdentifyHook = Callable[[], object]
StatsHook = Callable[[], bool]
ConnectHook = Callable[[frozenset[str]], "Iterable[Event | Any] | None"]
F = TypeVar("F", bound=Callable[..., Any])

#: Where a stream view keeps its stream until the request is over (in ``flask.g``).
_STREAM = "flask_sse_push.stream"


def _plain(status: int, message: str) -> Response:
    return Response(message + "\n", status, content_type="text/plain; charset=utf-8")


class SSEBlueprint(Blueprint):
    """A blueprint that serves event streams at its URL prefix.

    Registering it sets the extension up on the app: config defaults, settings and the bus
    in ``app.extensions["sse_push"]``. :data:`flask_sse_push.sse` is a ready instance; build
    your own to keep hooks apart between apps.

    :param name: the blueprint's name (endpoint prefix).
    :param import_name: passed to :class:`flask.Blueprint`.
    :param url_prefix: the stream's URL when none is given at registration.
    :param kwargs: passed to :class:`flask.Blueprint`.
    """

    def __init__(
        self,
        name: str = "sse",
        import_name: str = __name__,
        *,
        url_prefix: str | None = "/stream",
        **kwargs: Any,
    ) -> None:
        super().__init__(name, import_name, url_prefix=url_prefix, **kwargs)
        self._authorize: AuthorizeHook | None = None
        self._identify: IdentifyHook | None = None
        self._on_connect: list[ConnectHook] = []
        self._authorize_stats: StatsHook | None = None
        self._authorize_metrics: StatsHook | None = None
        self.add_url_rule("", "stream", self.stream_view, methods=["GET"])
        self.add_url_rule("/stats", "stats", self.stats_view, methods=["GET"])
        self.add_url_rule("/health", "health", self.health_view, methods=["GET"])
        self.teardown_request(_close_unsent)
        self.record(self._setup)

    def register(self, app: App, options: dict[str, Any]) -> None:
        """Register on *app*; a second registration on the same app is refused."""
        if EXTENSION_KEY in app.extensions:
            raise ConfigurationError(
                "flask-sse-push is already registered on this app; register the blueprint "
                "once. One stream can follow several channels: '?channel=a&channel=b'."
            )
        super().register(app, options)

    def _setup(self, state: BlueprintSetupState) -> None:
        if not isinstance(state.app, Flask):
            raise ConfigurationError("flask-sse-push needs a flask.Flask app")
        sse_state = state.app.extensions[EXTENSION_KEY] = SSEState(state.app, self)
        path = sse_state.settings.metrics_path
        if path is not None:
            # On the app, not under the prefix: scrapers look for /metrics.
            state.app.add_url_rule(path, f"{self.name}.metrics", self.metrics_view, methods=["GET"])

    # -- hooks ---------------------------------------------------------------------------

    def authorize(self, func: F) -> F:
        """Register ``func(channel) -> bool``, called for each channel a client asks for,
        inside the request (``flask.g``, the session and the logged-in user are there).
        A false answer refuses the whole request with 403 before anything is subscribed.
        Without this hook every channel is public."""
        self._authorize = func
        return func

    def identify(self, func: F) -> F:
        """Register ``func() -> identity``, called inside the request; the identity is
        attached to the stream so :func:`~flask_sse_push.end_streams` can end a user's
        streams."""
        self._identify = func
        return func

    def authorize_stats(self, func: F) -> F:
        """Register ``func() -> bool``, called inside each ``GET <prefix>/stats`` request; a
        false answer refuses it with 403. The stats name every open channel, private ones
        included, so guard them unless every channel is public."""
        self._authorize_stats = func
        return func

    def authorize_metrics(self, func: F) -> F:
        """Register ``func() -> bool``, called inside each request for the metrics
        (:confval:`SSE_METRICS_PATH`); a false answer refuses it with 403. The metrics
        name no channel and no user, but tell how busy the service is: guard them unless
        only your monitoring can reach the path."""
        self._authorize_metrics = func
        return func

    def on_connect(self, func: F) -> F:
        """Register ``func(channels) -> iterable of events`` whose events go to the new
        connection only, after any replay and before live events (for example the current
        state of a dashboard). Items may be :class:`~flask_sse_push.Event` objects or plain
        data. Several hooks run in registration order, inside the request's context.

        The hooks run once the stream's place among the events is fixed and its replay
        read, so the state they return is never older than an event written before it (on
        the Redis bus with a ``Last-Event-ID`` that is when the stream starts, after the
        view returned; the request's context is pushed again for them). Events published
        meanwhile may follow the state: apply updates idempotently."""
        self._on_connect.append(func)
        return func

    # -- the view ------------------------------------------------------------------------

    def _channels(self, state: SSEState) -> list[str] | Response:
        names = request.args.getlist("channel")
        settings = state.settings
        if not names:
            return [settings.default_channel]
        if len(names) > settings.max_channels:
            return _plain(
                400,
                f"too many channels: {len(names)} given, at most {settings.max_channels} "
                "per connection (SSE_MAX_CHANNELS)",
            )
        unique: list[str] = []
        for name in names:
            try:
                check_channel(name)
            except ValueError as exc:
                return _plain(400, str(exc))
            if name not in unique:
                unique.append(name)
        return unique

    def stream_view(self) -> Response:
        """Open a stream on the channels of the query string."""
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        state = get_state(app)
        settings = state.settings
        channels = self._channels(state)
        if isinstance(channels, Response):
            return channels
        if self._authorize is not None:
            for channel in channels:
                if not self._authorize(channel):
                    return _plain(403, f"not allowed to read channel {channel!r}")
        if request.method == "HEAD":
            # An empty iterable, not b"": no Content-Length, as for GET.
            return event_stream_response(iter(()))
        state.check_process()
        bus = state.bus
        if lifecycle.stopping():
            return _come_back_later(settings.retry, "server shutting down")
        if not bus.hold_place(settings.max_streams):
            return _come_back_later(settings.retry, "too many streams")

        last_event_id = request.headers.get("Last-Event-ID") or request.args.get("lastEventId")
        try:
            user = self._identify() if self._identify is not None else None
            sub = Subscription(channels, settings.queue_size, user)
            resume = bus.subscribe(sub, last_event_id)
        finally:
            bus.let_go()  # subscribed, the stream is counted by itself
        dumps = app.json.dumps
        head = stream_head(settings.retry)
        catch_up: Callable[[], bytes] | None = None
        metrics = state.metrics
        try:
            if resume.pending is None:
                head += _render(resume, last_event_id, dumps, metrics)
                head += self._initial(sub, dumps)
            else:
                catch_up = self._catch_up(sub, resume.pending, last_event_id, dumps, metrics)
            state.totals["opened"] += 1
            if metrics is not None:
                metrics.opened()
            signals.stream_opened.send(app, channels=sub.channels)
        except BaseException:
            bus.unsubscribe(sub)
            raise

        def closed() -> None:
            state.totals["closed"] += 1
            if metrics is not None:
                metrics.closed()
            signals.stream_closed.send(app, channels=sub.channels, reason=sub.reason)

        stream = BusStream(
            sub,
            bus,
            head,
            catch_up=catch_up,
            keepalive=settings.keepalive,
            max_lifetime=settings.max_lifetime,
            on_close=closed,
            sock=client_socket(request.environ, settings.send_timeout),
            direct=direct.candidate(request.environ),
            lag=None if metrics is None else metrics.lag,
        )
        setattr(g, _STREAM, stream)
        return event_stream_response(stream)

    def stats_view(self) -> Response:
        """Open streams of the answering process, per channel, as JSON (when ``SSE_STATS``)."""
        state = get_state()
        if not state.settings.stats:
            return _plain(404, "stats are off; set SSE_STATS = True to serve them")
        if self._authorize_stats is not None and not self._authorize_stats():
            return _plain(403, "not allowed to read the stats")
        return jsonify(state.stats())

    def health_view(self) -> Response:
        """Whether this process can serve streams and reach its bus, as JSON: ``200``, or
        ``503`` with the ``problems`` (when :confval:`SSE_HEALTH`; see
        :meth:`~flask_sse_push.state.SSEState.health`). Not an event stream, so a ``503``
        stops no browser."""
        state = get_state()
        if not state.settings.health:
            return _plain(404, "the health check is off; set SSE_HEALTH = True to serve it")
        health = state.health()
        response = jsonify(health)
        response.status_code = 200 if health["healthy"] else 503
        response.headers["Cache-Control"] = "no-store"
        return response

    def metrics_view(self) -> Response:
        """The app's Prometheus metrics (at :confval:`SSE_METRICS_PATH`), summed over the
        processes in ``prometheus_client``'s multiprocess mode."""
        metrics = get_state().metrics
        if metrics is None:  # pragma: no cover - the route exists only with metrics
            return _plain(404, "metrics are off; set SSE_METRICS_PATH to serve them")
        if self._authorize_metrics is not None and not self._authorize_metrics():
            return _plain(403, "not allowed to read the metrics")
        body, content_type = metrics.exposition(request.headers.get("Accept"))
        return Response(body, content_type=content_type)

    def _catch_up(
        self,
        sub: Subscription,
        pending: Callable[[], Resume],
        last_event_id: str | None,
        dumps: Callable[[Any], str],
        metrics: Metrics | None,
    ) -> Callable[[], bytes]:
        """What a stream whose replay is read later writes first: the replay, then the
        on_connect state, taken after the replay was read, in the request's contexts."""
        contexts = [
            app_ctx._get_current_object(),  # type: ignore[attr-defined]
            request_ctx._get_current_object(),  # type: ignore[attr-defined]
        ]

        def catch_up() -> bytes:
            replay = _render(pending(), last_event_id, dumps, metrics)
            if not self._on_connect:
                return replay
            app_context, request_context = contexts
            with app_context, request_context:
                return replay + self._initial(sub, dumps)

        return catch_up

    def _initial(self, sub: Subscription, dumps: Callable[[Any], str]) -> bytes:
        parts = []
        for hook in self._on_connect:
            result = hook(sub.channels)
            if isinstance(result, (str, bytes, dict, Event)):
                raise TypeError(
                    f"on_connect hook {getattr(hook, '__name__', hook)!r} returned a "
                    f"{type(result).__name__}; return a list (or yield) of events, "
                    "e.g. [Event(...)]"
                )
            for item in result or ():
                event = item if isinstance(item, Event) else Event(item)
                parts.append(encode_event(event, dumps))
        return b"".join(parts)


def _render(
    resume: Resume,
    last_event_id: str | None,
    dumps: Callable[[Any], str],
    metrics: Metrics | None,
) -> bytes:
    """The replay, or the reset event, as bytes."""
    if metrics is not None:
        metrics.resumed(len(resume.replay), resume.reset and resume.reset.reason)
    replay = b"".join(resume.replay)
    if resume.reset is not None:
        reason, head_id = resume.reset
        return reset_event(reason, last_event_id, head_id, dumps) + replay
    return replay


def _close_unsent(error: BaseException | None) -> None:
    """Close the request's stream when the request failed after the view made it (an
    ``after_request`` handler raised): its response was replaced and is never read."""
    stream = g.pop(_STREAM, None)
    if error is not None and stream is not None:
        stream.close()


def _come_back_later(retry: int | None, why: str) -> Response:
    """End a stream at once with a retry hint: 200, never 503/429/204, on which a browser
    stops reconnecting for good. The random part spreads the reconnections."""
    delay = (retry or 3000) + random.randint(0, 5000)
    return event_stream_response(retry_line(delay) + comment(f" {why}, retry later"))


#: The ready blueprint: ``app.register_blueprint(sse, url_prefix="/stream")``.
sse = SSEBlueprint()

"""Sphinx configuration of the flask-sse-push documentation.

Build with ``.venv/bin/sphinx-build -W --keep-going -n -b html docs docs/_build/html``.
No inventory is fetched over the network (``intersphinx_mapping`` is empty), so references to
third-party and standard-library types cannot resolve and are listed in ``nitpick_ignore``.
"""

from __future__ import annotations

from flask_sse_push import __version__

project = "flask-sse-push"
author = "the flask-sse-push authors"
copyright = "the flask-sse-push authors"

release = __version__  # the one source of the version
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc", "sphinx.ext.intersphinx"]

# No inventories: the build must not touch the network.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

root_doc = "index"
exclude_patterns = ["_build"]
templates_path: list[str] = []

html_theme = "alabaster"
html_theme_options = {
    "description": "Server-Sent Events for Flask",
    "fixed_sidebar": True,
}
html_static_path: list[str] = []

pygments_style = "sphinx"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

nitpicky = True

# Without intersphinx these targets cannot resolve: third-party and standard-library types
# that appear in signatures and docstrings.
nitpick_ignore = [
    # Flask and Werkzeug
    ("py:class", "flask.Blueprint"),
    ("py:class", "flask.blueprints.Blueprint"),
    ("py:class", "flask.sansio.app.App"),
    ("py:class", "flask.app.Flask"),
    # flask_sse_push.state.SSEState.__init__ annotates ``blueprint: SSEBlueprint`` with a
    # name imported only under TYPE_CHECKING, so autodoc cannot evaluate the annotations and
    # shows them as written: "Flask" stays a bare name.
    ("py:class", "Flask"),
    ("py:class", "flask.wrappers.Response"),
    # flask_sse_push.blueprint: the hook decorators are annotated with a private TypeVar
    # (``F = TypeVar("F", bound=Callable[..., Any])``) that has no documentation entry.
    ("py:class", "flask_sse_push.blueprint.F"),
    # the standard library
    ("py:class", "collections.abc.AsyncIterable"),
    ("py:class", "collections.abc.Callable"),
    ("py:class", "collections.abc.Iterable"),
    ("py:class", "collections.abc.Iterator"),
    ("py:class", "collections.abc.Mapping"),
    ("py:class", "collections.abc.Generator"),
    ("py:class", "collections.abc.Coroutine"),
    ("py:class", "asyncio.events.AbstractEventLoop"),
    ("py:class", "enum.StrEnum"),
    ("py:class", "socket.socket"),
    ("py:class", "types.FrameType"),
    # redis-py, an optional extra
    ("py:class", "redis.Redis"),
    # prometheus_client, an optional extra, imported by flask_sse_push.metrics only under
    # TYPE_CHECKING for its annotations
    ("py:class", "CollectorRegistry"),
]

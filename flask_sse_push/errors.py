"""The package's exceptions."""

from __future__ import annotations


class SSEError(Exception):
    """Base class of every error raised by flask-sse-push."""


class ConfigurationError(SSEError):
    """A configuration value or the way the extension is set up is wrong."""


class NotRegisteredError(SSEError, RuntimeError):
    """The blueprint is not registered on the current app, or there is no app context."""


class BusError(SSEError):
    """The bus could not carry out an operation (for example Redis is unreachable).

    The original exception of the backend's client library is chained as ``__cause__``.
    """


class PublishError(BusError):
    """An event could not be published; it was not sent to anyone."""

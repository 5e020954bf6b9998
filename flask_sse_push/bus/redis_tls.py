"""TLS for the Redis bus's topology URLs (``rediss+sentinel://``, ``rediss+cluster://``): the
query parameters, read the way redis-py's ``from_url`` reads them for ``rediss://``, and what
a failed handshake means.

The parameters::

    ssl_cert_reqs       required (the default), optional or none: whether the servers'
                        certificates are verified
    ssl_ca_certs        a file of the CA certificates to verify them with (the system's
                        trust store by default)
    ssl_certfile        a client certificate, for servers that ask for one
    ssl_keyfile         its private key (with ssl_certfile only)
    ssl_check_hostname  true (the default) or false: whether the certificate must name the
                        host connected to
    sentinel_ssl        (Sentinel only) true (the default) or false: whether the sentinels
                        also speak TLS; false for plaintext sentinels in front of TLS servers

One set of parameters serves every connection: the sentinels, the primary they name, and
every node of a cluster (as Redis servers share one CA when ``tls-replication`` and
``tls-cluster`` are on).
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["TLS_OPTIONS", "TlsOptionError", "handshake_error", "tls_hint", "tls_options"]

_CERT_REQS = ("required", "optional", "none")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
#: The TLS query parameters a ``rediss+`` topology URL takes.
TLS_OPTIONS = ("ssl_cert_reqs", *_FILES, "ssl_check_hostname")


class TlsOptionError(ValueError):
    """A TLS query parameter with a value that cannot work; the message says which."""


def _flag(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise TlsOptionError(f"{name}={value!r} is neither true nor false")


def _cert_reqs(value: str) -> str:
    if value.lower() not in _CERT_REQS:
        raise TlsOptionError(f"ssl_cert_reqs={value!r} is none of {', '.join(_CERT_REQS)}")
    return value.lower()


def _file(name: str) -> Callable[[str], str]:
    def read(value: str) -> str:
        if not os.path.isfile(value):
            raise TlsOptionError(f"{name}={value!r} is not a readable file")
        return value

    return read


_READERS: dict[str, Callable[[str], Any]] = {
    "ssl_cert_reqs": _cert_reqs,
    "ssl_check_hostname": lambda value: _flag("ssl_check_hostname", value),
    **{name: _file(name) for name in _FILES},
}


def tls_options(options: dict[str, str]) -> tuple[dict[str, Any], bool]:
    """Take the TLS parameters out of *options* (a URL's query parameters).

    :returns: redis-py's keyword arguments for TLS connections (``ssl=True`` among them),
        and whether the sentinels speak TLS too.
    :raises TlsOptionError: for a value that cannot work.
    """
    kwargs: dict[str, Any] = {"ssl": True}
    for name in TLS_OPTIONS:
        if name in options:
            kwargs[name] = _READERS[name](options.pop(name))
    if "ssl_keyfile" in kwargs and "ssl_certfile" not in kwargs:
        raise TlsOptionError("ssl_keyfile needs ssl_certfile (the certificate it belongs to)")
    if kwargs.get("ssl_cert_reqs") == "none" and kwargs.get("ssl_check_hostname"):
        raise TlsOptionError("ssl_check_hostname=true needs certificates checked (ssl_cert_reqs)")
    if kwargs.get("ssl_cert_reqs") == "none":
        kwargs["ssl_check_hostname"] = False  # nothing to check it against
    sentinel_tls = _flag("sentinel_ssl", options.pop("sentinel_ssl", "true"))
    return kwargs, sentinel_tls


_SILENT = "no answer to the TLS handshake"
_SSL_SIGNS = ("[SSL", "_ssl.c", "CERTIFICATE_VERIFY_FAILED", "certificate verify failed")


def _hint(text: str) -> str:
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        what = (
            "the server's certificate was not accepted: check that ssl_ca_certs names the CA "
            "that signed it and that it names the host connected to (or ssl_check_hostname)"
        )
    elif any(sign in text for sign in ("WRONG_VERSION_NUMBER", "record layer", _SILENT)):
        what = "the server did not answer in TLS: check that its port is its tls-port"
    else:
        what = (
            "the TLS handshake failed: check ssl_ca_certs, and ssl_certfile and ssl_keyfile "
            "if the servers ask for a client certificate (tls-auth-clients)"
        )
    return f" TLS: {what}."


def _context(tls: dict[str, Any]) -> ssl.SSLContext:
    """A client context as redis-py makes one from the same keyword arguments."""
    context = ssl.create_default_context(cafile=tls.get("ssl_ca_certs"))
    reqs = tls.get("ssl_cert_reqs", "required")
    context.check_hostname = reqs != "none" and tls.get("ssl_check_hostname", True)
    context.verify_mode = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}.get(
        reqs, ssl.CERT_REQUIRED
    )
    if "ssl_certfile" in tls:
        context.load_cert_chain(tls["ssl_certfile"], tls.get("ssl_keyfile"))
    return context


def handshake_error(
    nodes: Iterable[tuple[str, int]], tls: dict[str, Any], timeout: float
) -> str | None:
    """What failed in a TLS handshake (and one ``PING``) with the first of *nodes* that
    takes a TCP connection, made as the bus makes its connections; ``None`` when it worked
    or no node answered. (redis-py's Sentinel errors keep no text of the error behind
    them.)"""
    context = _context(tls)
    for host, port in nodes:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError:
            continue
        with context.wrap_socket(
            sock, server_hostname=host, do_handshake_on_connect=False
        ) as tls_sock:
            try:
                tls_sock.do_handshake()
                tls_sock.sendall(b"PING\r\n")
                tls_sock.recv(64)  # TLS 1.3 servers refuse a client certificate only here
            except ssl.SSLError as exc:
                return str(exc)
            except TimeoutError:  # a plaintext server waits for the end of a command line
                return _SILENT
            except OSError:
                return None
        return None
    return None


def tls_hint(exc: BaseException, probe: Callable[[], str | None] | None = None) -> str:
    """A sentence saying what to check when *exc* comes from a failed TLS handshake; ``""``
    otherwise.

    :param exc: what redis-py raised.
    :param probe: asked what failed when the text of *exc* shows no TLS error (for a TLS
        target: :func:`handshake_error`).
    """
    text = str(exc)
    if any(sign in text for sign in _SSL_SIGNS):
        return _hint(text)
    found = probe() if probe is not None and isinstance(exc, Exception) else None
    return "" if found is None else _hint(found)

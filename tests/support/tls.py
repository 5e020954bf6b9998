"""A throwaway self-signed TLS certificate for 127.0.0.1, made with the ``openssl`` command,
and what a Redis server (or sentinel) and its clients need to speak TLS with it.

The certificate is its own CA: servers present it, verify each other with it (replication,
sentinels, the cluster bus) and ask clients for it (``tls-auth-clients yes``).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["OPENSSL_REQ", "RedisTls", "record_tls", "self_signed_certificate", "tls_of"]

#: The ``openssl`` command, as the deployment docs show it for trying nginx out locally.
OPENSSL_REQ = (
    "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2"
    " -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1,DNS:localhost"
    " -keyout key.pem -out cert.pem"
)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """Make a self-signed certificate valid for ``127.0.0.1`` and ``localhost`` for two days,
    running :data:`OPENSSL_REQ` in *directory*.

    :param directory: Existing directory receiving ``cert.pem`` and ``key.pem``.
    :returns: The certificate's and the private key's paths.
    :raises FileNotFoundError: If ``openssl`` is not on ``PATH``.
    :raises subprocess.CalledProcessError: If ``openssl`` fails.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl is not on PATH; install the Debian package openssl")
    subprocess.run(
        [openssl, *OPENSSL_REQ.split()[1:]],
        cwd=directory,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
        timeout=30,
    )
    cert, key = directory / "cert.pem", directory / "key.pem"
    return cert, key


@dataclass(frozen=True)
class RedisTls:
    """A certificate and its key, for Redis servers, sentinels and their clients.

    :ivar cert: the certificate (also the CA file).
    :ivar key: its private key.
    """

    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> RedisTls:
        """A new certificate in *directory* (see :func:`self_signed_certificate`)."""
        return cls(*self_signed_certificate(directory))

    def server_options(self) -> dict[str, str]:
        """A server's or a sentinel's TLS settings, by name (without the port)."""
        return {
            "tls-cert-file": str(self.cert),
            "tls-key-file": str(self.key),
            "tls-ca-cert-file": str(self.cert),
            "tls-auth-clients": "yes",
            "tls-replication": "yes",
        }

    def client_kwargs(self) -> dict[str, Any]:
        """redis-py's keyword arguments for a client."""
        return {
            "ssl": True,
            "ssl_ca_certs": str(self.cert),
            "ssl_certfile": str(self.cert),
            "ssl_keyfile": str(self.key),
        }

    def query(self) -> str:
        """The same as a bus URL's query string."""
        return f"ssl_ca_certs={self.cert}&ssl_certfile={self.cert}&ssl_keyfile={self.key}"

    def cli_args(self) -> list[str]:
        """``redis-cli``'s options."""
        files = ["--cacert", self.cert, "--cert", self.cert, "--key", self.key]
        return ["--tls", *map(str, files)]


_BY_PORT: dict[int, RedisTls | None] = {}


def record_tls(port: int, tls: RedisTls | None) -> None:
    """Record what the server on *port* speaks (``None``: plaintext); every launcher does it
    when it starts a server there."""
    _BY_PORT[port] = tls


def tls_of(port: int) -> RedisTls | None:
    """What the server on *port* speaks, so that the tests' admin clients can connect to any
    server by its port alone."""
    return _BY_PORT.get(port)

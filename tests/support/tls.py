"""A throwaway self-signed TLS certificate for 127.0.0.1, made with the ``openssl`` command."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["OPENSSL_REQ", "self_signed_certificate"]

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

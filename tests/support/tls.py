"""A throwaway self-signed TLS certificate for 127.0.0.1, made with the ``openssl`` command."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["self_signed_certificate"]


def self_signed_certificate(directory: Path, days: int = 2) -> tuple[Path, Path]:
    """Make a self-signed certificate valid for ``127.0.0.1`` and ``localhost``.

    :param directory: Existing directory receiving ``cert.pem`` and ``key.pem``.
    :param days: Validity in days.
    :returns: The certificate's and the private key's paths.
    :raises FileNotFoundError: If ``openssl`` is not on ``PATH``.
    :raises subprocess.CalledProcessError: If ``openssl`` fails.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl is not on PATH; install the Debian package openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            str(days),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
        timeout=30,
    )
    return cert, key

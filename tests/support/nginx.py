"""nginx in front of gunicorn, configured with the shipped site template (the ``nginx`` fixture).

The site configuration is ``deploy/nginx/flask-sse-push.conf``, rendered with ``envsubst`` as
the deployment docs show; only the main context around it (pid file, logs, temporary
directories, all inside the server's own directory) is written here. nginx runs in the
foreground (``daemon off``) as a child of the test, on a free 127.0.0.1 port.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from signal import SIGTERM

import psutil

from support.procs import (
    HOST,
    REPO_ROOT,
    descendants,
    free_port,
    kill_all,
    missing,
    port_accepts,
    read_log,
    start_logged,
    stop_each,
    wait_for,
)
from support.tls import self_signed_certificate

__all__ = [
    "NGINX_MISSING_MESSAGE",
    "SITE_TEMPLATE",
    "NginxFactory",
    "NginxServer",
    "nginx_executable",
    "placeholders",
    "render_site",
    "require_nginx",
]

#: The site configuration shipped in the repository and shown in the docs.
SITE_TEMPLATE = REPO_ROOT / "deploy" / "nginx" / "flask-sse-push.conf"

NGINX_MISSING_MESSAGE = (
    "nginx is not installed; install the Debian package nginx "
    "(apt-get install nginx) to run the proxy tests"
)

_PLACEHOLDER = re.compile(r"\$\{(SSE_[A-Z_]+)\}")

#: The main context around the site: everything nginx writes stays in its directory.
_MAIN = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{
    worker_connections 512;
}}
http {{
    log_format sse '$request_method $request_uri $server_protocol $status $body_bytes_sent';
    access_log {dir}/access.log sse;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/site.conf;
}}
"""


def nginx_executable() -> str | None:
    """Locate ``nginx`` (Debian installs it in ``/usr/sbin``, outside a user's ``PATH``).

    :returns: Its path, or ``None``.
    """
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def require_nginx() -> str:
    """Return the ``nginx`` path, or skip the current test (fail it when ``CI`` is set).

    :returns: The executable's path.
    """
    exe = nginx_executable()
    if exe is None:
        missing(NGINX_MISSING_MESSAGE)
    return exe


def placeholders(template: str) -> list[str]:
    """Return the names of the ``${SSE_...}`` placeholders of a site template.

    :param template: The template's text.
    :returns: The names, sorted, each once.
    """
    return sorted(set(_PLACEHOLDER.findall(template)))


def render_site(values: Mapping[str, str], template: Path = SITE_TEMPLATE) -> str:
    """Render the site template with ``envsubst``, naming its placeholders as the docs do
    (so nginx's own ``$host`` and ``$scheme`` are left alone).

    :param values: A value for every placeholder, and only for those.
    :param template: The template file.
    :returns: The rendered configuration.
    :raises ValueError: If *values* and the placeholders differ, or one is left over.
    :raises FileNotFoundError: If ``envsubst`` (Debian package ``gettext-base``) is missing.
    """
    text = template.read_text()
    names = placeholders(text)
    if sorted(values) != names:
        raise ValueError(f"the template's placeholders are {names}, got {sorted(values)}")
    envsubst = shutil.which("envsubst")
    if envsubst is None:
        raise FileNotFoundError("envsubst is not on PATH; install the Debian package gettext-base")
    done = subprocess.run(
        [envsubst, " ".join(f"${name}" for name in names)],
        input=text,
        env={"PATH": os.environ.get("PATH", ""), **values},
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    if _PLACEHOLDER.search(done.stdout):
        raise ValueError(f"placeholder left in the rendered site:\n{done.stdout}")
    return done.stdout


class NginxServer:
    """An nginx master process in the foreground, with its own directory for everything.

    :ivar port: The TLS port it listens on (127.0.0.1).
    :ivar url: ``https://127.0.0.1:<port>``.
    :ivar directory: Its configuration, pid file, logs and temporary files.
    """

    def __init__(self, executable: str, directory: Path, site: str, port: int) -> None:
        """Prepare (but do not start) a server.

        :param executable: Path of ``nginx``.
        :param directory: Existing, empty directory of this server.
        :param site: The rendered site configuration (listening on *port*).
        :param port: Its port.
        """
        self.executable = executable
        self.directory = directory
        self.port = port
        self.url = f"https://{HOST}:{port}"
        (directory / "site.conf").write_text(site)
        (directory / "nginx.conf").write_text(_MAIN.format(dir=directory))
        self.proc: subprocess.Popen[bytes] | None = None
        self._seen: dict[int, psutil.Process] = {}

    def error_log(self) -> str:
        """Return nginx's error log (its start-up output included).

        :returns: The log's text.
        """
        return read_log(self.directory / "error.log") + read_log(self.directory / "stderr.log")

    def access_log(self) -> list[str]:
        """Return the access log's lines: method, URI, protocol, status, body bytes.

        :returns: One line per finished request.
        """
        return read_log(self.directory / "access.log").splitlines()

    def start(self, timeout: float = 10) -> NginxServer:
        """Start nginx and wait until its port accepts connections.

        :param timeout: Maximum seconds to wait.
        :returns: ``self``.
        :raises RuntimeError: If it exits or does not listen in time (the message holds its
            error log); it is stopped first.
        """
        cmd = [
            self.executable,
            "-p",
            str(self.directory),
            "-c",
            str(self.directory / "nginx.conf"),
            "-e",
            str(self.directory / "error.log"),
            "-g",
            "daemon off;",
        ]
        proc = start_logged(cmd, self.directory, self.directory / "stderr.log")
        self.proc = proc
        ok = wait_for(lambda: proc.poll() is not None or port_accepts(self.port), timeout)
        self._track()
        if proc.poll() is not None or not ok:
            self.stop()
            raise RuntimeError(f"nginx on port {self.port} did not start:\n{self.error_log()}")
        return self

    def _track(self) -> None:
        """Remember the master's workers, to kill any left behind in :meth:`stop`."""
        if self.proc is not None and self.proc.poll() is None:
            for proc in descendants(self.proc.pid):
                self._seen.setdefault(proc.pid, proc)

    def stop(self, timeout: float = 10) -> None:
        """Stop nginx at once (SIGTERM, its fast shutdown) and wait; SIGKILL after *timeout*.

        Workers still running afterwards are killed too (only processes seen as its
        descendants, by pid, with psutil's pid-reuse check). No-op if not running.

        :param timeout: Seconds to wait before SIGKILL.
        """
        proc = self.proc
        if proc is None:
            return
        self._track()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        kill_all(list(self._seen.values()))
        self.proc = None


class NginxFactory:
    """Starts nginx servers in front of gunicorn servers, and stops them at the end.

    All share one self-signed certificate for ``127.0.0.1``, made at the first start.

    :ivar servers: Every server started, in order.
    """

    def __init__(self, work_dir: Path, executable: str) -> None:
        """Start nothing yet.

        :param work_dir: Existing directory for the servers' directories and the certificate.
        :param executable: Path of ``nginx``.
        """
        self.work_dir = work_dir
        self.executable = executable
        self.servers: list[NginxServer] = []
        self._certificate: tuple[Path, Path] | None = None

    def certificate(self) -> tuple[Path, Path]:
        """Return the certificate and key, made on first use.

        :returns: Their paths.
        """
        if self._certificate is None:
            self._certificate = self_signed_certificate(self.work_dir)
        return self._certificate

    def __call__(
        self,
        upstream_port: int,
        *,
        read_timeout: str = "60s",
        edit: Callable[[str], str] | None = None,
    ) -> NginxServer:
        """Render the shipped site for gunicorn on *upstream_port* and start nginx with it.

        :param upstream_port: gunicorn's port on 127.0.0.1.
        :param read_timeout: ``SSE_READ_TIMEOUT``: nginx's ``proxy_read_timeout``.
        :param edit: Changes the rendered site before use (for the tests that show what a
            directive does by taking it away).
        :returns: The running server.
        """
        cert, key = self.certificate()
        port = free_port()
        site = render_site(
            {
                "SSE_UPSTREAM": f"{HOST}:{upstream_port}",
                "SSE_LISTEN": f"{HOST}:{port}",
                "SSE_SERVER_NAME": "localhost",
                "SSE_TLS_CERT": str(cert),
                "SSE_TLS_KEY": str(key),
                "SSE_READ_TIMEOUT": read_timeout,
            }
        )
        if edit is not None:
            site = edit(site)
        directory = self.work_dir / f"nginx-{port}"
        directory.mkdir()
        server = NginxServer(self.executable, directory, site, port)
        self.servers.append(server)
        return server.start()

    def stop_all(self) -> None:
        """Stop every server started.

        :raises Exception: The first error of a stop, after trying every one.
        """
        stop_each(server.stop for server in self.servers)

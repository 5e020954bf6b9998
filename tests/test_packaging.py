"""The package as users install it: ``python -m build`` makes an sdist and a wheel that
``twine check`` passes, and the wheel, installed with pip into a fresh virtual environment,
serves a stream with the documented gunicorn command.

One build and one installation serve the whole session. pip uses its cache and index as
``dev.sh`` does.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest
import requests
from support.clients import Collector
from support.gunicorn import GunicornServer, answering
from support.http import raw_sse
from support.procs import HOST, REPO_ROOT, free_port, port_accepts, wait_for

import flask_sse_push

#: The README's quick start, plus a route telling where the package was imported from.
APP = """\
import flask_sse_push
from flask import Flask
from flask_sse_push import sse, send_event

app = Flask(__name__)
app.register_blueprint(sse, url_prefix="/stream")


@app.post("/orders")
def create_order():
    send_event({"id": 42, "status": "paid"}, event="order", channel="orders")
    return "", 201


@app.get("/where")
def where():
    return {"file": flask_sse_push.__file__, "version": flask_sse_push.__version__}
"""

#: The documented command (docs/deployment.rst, "The configuration module").
GUNICORN_COMMAND = ["gunicorn", "-c", "python:flask_sse_push.gunicorn_conf", "app:app"]


def run(
    cmd: list[str], timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run *cmd*, failing the test with its output if it fails."""
    done = subprocess.run(
        cmd,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist and the wheel, built once by ``python -m build`` (isolated, as users do)."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO_ROOT)], timeout=300)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory, dist: tuple[Path, Path]) -> Path:
    """A new virtual environment with the wheel and ``gunicorn[gevent]`` installed by its
    own pip, and nothing from the checkout."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    run([*pip, str(dist[1]), "gunicorn[gevent]"], timeout=300, cwd=venv)
    return venv


def test_twine_check_passes(dist: tuple[Path, Path]) -> None:
    run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist)], timeout=60)


def test_the_wheel_holds_the_package_its_types_and_the_gunicorn_module(
    dist: tuple[Path, Path],
) -> None:
    version = flask_sse_push.__version__
    wheel = dist[1]
    assert wheel.name == f"flask_sse_push-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"flask_sse_push-{version}.dist-info"
        metadata = HeaderParser().parsestr(archive.read(f"{info}/METADATA").decode())
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    for module in ("__init__.py", "py.typed", "gunicorn_conf.py", "bus/redis.py"):
        assert f"flask_sse_push/{module}" in names
    assert f"{info}/licenses/LICENSE" in names
    assert not [n for n in names if n.split("/")[0] not in ("flask_sse_push", info)]
    assert metadata["Name"] == "flask-sse-push"
    assert metadata["Version"] == version
    assert metadata["License"] == "BSD-3-Clause"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert "pip install 'flask-sse-push[redis]'" in metadata.get_payload()
    classifiers = metadata.get_all("Classifier") or []
    assert {"Framework :: Flask", "Typing :: Typed"} <= set(classifiers)
    assert "gunicorn[gevent]>=23.0" in (metadata.get_all("Requires-Dist") or [])
    assert "sse = flask_sse_push.cli:sse_cli" in entry_points


def test_the_sdist_holds_the_docs_the_tests_and_the_nginx_site(dist: tuple[Path, Path]) -> None:
    sdist = dist[0]
    root = sdist.name.removesuffix(".tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.removeprefix(f"{root}/") for name in archive.getnames()}
    for path in (
        "LICENSE",
        "README.md",
        "setup.cfg",
        "pyproject.toml",
        "flask_sse_push/py.typed",
        "deploy/nginx/flask-sse-push.conf",
        "docs/deployment.rst",
        "tests/conftest.py",
    ):
        assert path in names, path
    assert not [n for n in names if "__pycache__" in n or "_build" in n or n.endswith(".pyc")]


def test_the_version_has_one_source(fresh_venv: Path) -> None:
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    assert setup["metadata"]["version"] == "attr: flask_sse_push.__version__"
    assert importlib.metadata.version("flask-sse-push") == flask_sse_push.__version__
    probe = (
        "import importlib.metadata, json, flask_sse_push;"
        "print(json.dumps([importlib.metadata.version('flask-sse-push'),"
        " flask_sse_push.__version__]))"
    )
    done = run([str(fresh_venv / "bin" / "python"), "-c", probe], timeout=60, cwd=fresh_venv)
    assert json.loads(done.stdout) == [flask_sse_push.__version__] * 2


@pytest.mark.e2e
def test_the_installed_wheel_serves_a_stream(fresh_venv: Path, tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    env.update(
        PATH=f"{fresh_venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        GUNICORN_BIND=f"{HOST}:{port}",
        XDG_RUNTIME_DIR=str(tmp_path),  # gunicorn's control socket, private to this server
    )
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            GUNICORN_COMMAND,
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = GunicornServer(proc, port, log_path)
    try:
        assert wait_for(lambda: not server.running() or port_accepts(port), 30), server.log_text()
        assert server.running(), server.log_text()
        assert wait_for(lambda: server.workers_ready(1), 20), server.log_text()
        where = requests.get(answering(server, "/where").url + "/where", timeout=10).json()
        assert Path(where["file"]).is_relative_to(fresh_venv), where
        assert where["version"] == flask_sse_push.__version__

        with raw_sse(server.url, "/stream?channel=orders", timeout=10) as stream:
            assert stream.status == 200
            assert stream.header("Content-Type") == "text/event-stream; charset=utf-8"
            assert requests.post(server.url + "/orders", timeout=10).status_code == 201
            events = Collector()
            stream.read_body_until(events.at_least(1), timeout=10)
        first = events.events[0]
        assert (first.type, json.loads(first.data)) == ("order", {"id": 42, "status": "paid"})
        assert "Using worker: gevent" in server.log_text()
    finally:
        server.stop(timeout=15)

#!/usr/bin/env bash
# Set-up and run commands for flask-sse-push, for a fresh Debian machine with Python 3.11.
#
#   bash dev.sh example   # install, then serve example_app under gunicorn with gevent workers
#   bash dev.sh test      # install everything the tests need, then run lint, types and tests
#
# System packages (python3-venv, redis-server and redis-sentinel, chromium for the browser
# tests, nginx, openssl and gettext-base for the proxy tests) are installed with apt-get when
# missing. Playwright drives Debian's Chromium; it never downloads a browser.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "dev.sh: installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}"
    fi
}

venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
            rm -rf "$VENV"
            apt_install python3-venv
            "$PYTHON" -m venv "$VENV"
        fi
    fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$1]"
}

case "${1:-}" in
    example)
        venv "redis,example"
        echo "dev.sh: open http://127.0.0.1:8000/ (Ctrl-C stops)"
        exec "$VENV/bin/gunicorn" -c python:flask_sse_push.gunicorn_conf \
            --bind "${BIND:-127.0.0.1:8000}" example_app.app:app
        ;;
    test)
        command -v redis-server >/dev/null 2>&1 || apt_install redis-server
        command -v redis-sentinel >/dev/null 2>&1 || apt_install redis-sentinel
        [ -x /usr/bin/chromium ] || apt_install chromium
        [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || apt_install nginx
        command -v openssl >/dev/null 2>&1 || apt_install openssl
        command -v envsubst >/dev/null 2>&1 || apt_install gettext-base
        venv "test,redis,docs"
        "$VENV/bin/ruff" check flask_sse_push tests example_app benchmarks
        "$VENV/bin/mypy" flask_sse_push
        "$VENV/bin/sphinx-build" -q -W --keep-going -n -b html docs docs/_build/html
        shift
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash dev.sh example | bash dev.sh test [pytest args]" >&2
        exit 2
        ;;
esac

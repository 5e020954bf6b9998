"""Debian's Chromium, headless, driven by Playwright; never a downloaded browser.

Needs the Debian package ``chromium`` (``/usr/bin/chromium``, or the path in ``$CHROMIUM``)
and the Python package ``playwright``; never ``playwright install``. Without them the test is
skipped, or failed when ``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from support.procs import missing

if TYPE_CHECKING:
    from playwright.sync_api import Browser

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "WAIT_MS", "chromium"]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Upper bound of every wait in the browser, in milliseconds.
WAIT_MS = 20_000


@contextmanager
def chromium(extra_args: Sequence[str] = ()) -> Iterator[Browser]:
    """Launch Debian's Chromium, headless, with a throwaway profile; close it at the end.

    :param extra_args: Command-line switches added to :data:`CHROMIUM_ARGS`.
    :returns: The browser, as a context manager.
    """
    executable = shutil.which(CHROMIUM)
    if executable is None:
        missing(
            f"{CHROMIUM} not found; install the Debian package chromium "
            "(apt-get install chromium) to run the browser tests"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing(
            "the Python package playwright is missing; pip install playwright "
            "(do not run `playwright install`: the tests use Debian's chromium)"
        )
    assert executable is not None
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            args=[*CHROMIUM_ARGS, *extra_args],
            timeout=WAIT_MS,
        )
        try:
            yield browser
        finally:
            browser.close()
    finally:
        playwright.stop()

"""The one-waiter park used under gevent, in a subprocess (gevent patches the process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    from gevent import monkey; monkey.patch_all()
    import gevent
    from flask_sse_push.concurrency import Park, new_event

    assert isinstance(new_event(), Park)
    park = Park()
    log = []

    def waiter():
        woke = park.wait()
        log.append(("woke", woke))
        park.clear()
        log.append(("timed out", park.wait(0.05)))
        try:
            park.wait()
        except gevent.GreenletExit:
            log.append("killed")
            gevent.sleep(0.05)  # a stale wake-up must not land here
            log.append("slept")
            raise

    greenlet = gevent.spawn(waiter)
    gevent.sleep(0.01)
    park.set()
    gevent.sleep(0.2)
    greenlet.kill(block=False)  # interrupts the wait...
    park.set()  # ...and a wake-up is scheduled as well
    gevent.sleep(0.3)
    print(log, greenlet.dead, greenlet.exception)
    """
)


def test_park_wakes_times_out_and_survives_an_interrupted_wait() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "[('woke', True), ('timed out', False), 'killed', 'slept'] True None"
    ), result.stderr

"""The primitives used under gevent, in a subprocess (gevent patches the process): the
one-waiter park, and bus calls from other OS threads run at home."""

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


def run_script(script: str) -> str:
    """Run *script* in a new Python process; return what it printed."""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_park_wakes_times_out_and_survives_an_interrupted_wait() -> None:
    assert run_script(SCRIPT) == (
        "[('woke', True), ('timed out', False), 'killed', 'slept'] True None"
    )


AT_HOME = textwrap.dedent(
    """
    from gevent import monkey; monkey.patch_all()
    import gevent
    from gevent._hub_local import get_hub_if_exists
    from gevent.monkey import get_original
    from flask import Flask
    from flask_sse_push import send_event, sse
    from flask_sse_push.bus import Subscription
    from flask_sse_push.concurrency import at_home, away
    from flask_sse_push.state import get_state

    app = Flask("threads")
    app.config["SSE_KEEPALIVE"] = 0
    app.register_blueprint(sse)
    sub = Subscription(["a"], 100)
    get_state(app).bus.subscribe(sub, None)
    ident = get_original("_thread", "get_ident")
    main = ident()
    seen = []

    def where():
        return ident() == main, away()

    def fail():
        raise KeyError("from home")

    def job():
        seen.append(("thread", ident() != main, away()))
        seen.append(("home", at_home(where)))
        try:
            at_home(fail)
        except KeyError as exc:
            seen.append(("raised", str(exc)))
        with app.app_context():
            send_event("from a thread", channel="a")
            seen.append(("ended", get_state(app).bus.end_streams(channel="a")))
        seen.append(("hub made here", get_hub_if_exists() is not None))

    done = get_original("_thread", "allocate_lock")()
    done.acquire()
    get_original("_thread", "start_new_thread")(lambda: (job(), done.release()), ())
    for _ in range(500):
        if done.acquire(False):
            break
        gevent.sleep(0.01)
    print(seen, sub.take(0), sub.reason)
    """
)


def test_other_threads_run_bus_calls_at_home() -> None:
    assert run_script(AT_HOME) == (
        "[('thread', True, True), ('home', (True, False)), ('raised', \"'from home'\"), "
        "('ended', 1), ('hub made here', False)] None revoked"
    )

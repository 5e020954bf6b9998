"""``flask sse ...`` commands, registered through the ``flask.commands`` entry point."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlencode, urljoin

import click
from flask import current_app, url_for
from flask.cli import AppGroup

from .errors import BusError
from .parser import EventParser
from .publish import send_event
from .state import get_state

sse_cli = AppGroup("sse", help="Publish, listen to and inspect Server-Sent Events streams.")

_DEFAULT_BASE = "http://127.0.0.1:5000"


def _stream_url(base: str, channels: tuple[str, ...]) -> str:
    if base.startswith(("http://", "https://")) and "?" in base:
        return base
    with current_app.test_request_context():
        path = url_for(f"{get_state().blueprint.name}.stream")
    query = urlencode([("channel", c) for c in channels])
    return urljoin(base, path) + (f"?{query}" if query else "")


@sse_cli.command("send")
@click.argument("channel")
@click.argument("data", required=False)
@click.option("--event", "-e", help="Event type (default: message).")
@click.option("--id", "event_id", help="Event id (default: assigned by the bus).")
@click.option("--retry", type=click.IntRange(min=0), help="Reconnection delay in ms.")
@click.option("--json", "as_json", is_flag=True, help="Parse DATA as JSON.")
def send_command(
    channel: str,
    data: str | None,
    event: str | None,
    event_id: str | None,
    retry: int | None,
    as_json: bool,
) -> None:
    """Publish DATA (or standard input) to CHANNEL and print the event id."""
    text = sys.stdin.read() if data is None else data
    value: Any = text
    if as_json:
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise click.BadParameter(f"not valid JSON: {exc}", param_hint="DATA") from None
    warning = get_state().local_bus_warning("publishes from this command's own process")
    if warning is not None:
        click.echo(f"warning: {warning}", err=True)
    try:
        click.echo(send_event(value, event=event, id=event_id, retry=retry, channel=channel))
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    except BusError as exc:
        raise click.ClickException(str(exc)) from None


@sse_cli.command("listen")
@click.argument("channels", nargs=-1)
@click.option(
    "--url",
    default=_DEFAULT_BASE,
    show_default=True,
    help="Base URL of the running app, or a full stream URL with its query string.",
)
@click.option("--last-event-id", help="Resume after this id.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many events.")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
def listen_command(
    channels: tuple[str, ...],
    url: str,
    last_event_id: str | None,
    count: int | None,
    timeout: float | None,
) -> None:
    """Print the events of CHANNELS from a running app, one block per event."""
    target = _stream_url(url, channels)
    headers = {"Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    request = urllib.request.Request(target, headers=headers)
    parser = EventParser()
    seen = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            click.echo(f"# {response.status} {target}", err=True)
            while count is None or seen < count:
                chunk = response.read1(65536)
                if not chunk:
                    break
                for event in parser.feed(chunk):
                    click.echo(f"id: {event.id}\nevent: {event.type}\ndata: {event.data}\n")
                    seen += 1
                    if count is not None and seen >= count:
                        break
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise click.ClickException(f"cannot read {target}: {exc}") from None


@sse_cli.command("stats")
@click.option("--url", default=_DEFAULT_BASE, show_default=True, help="Base URL of the app.")
def stats_command(url: str) -> None:
    """Print open streams per channel of a running app (needs SSE_STATS = True)."""
    with current_app.test_request_context():
        path = url_for(f"{get_state().blueprint.name}.stats")
    target = urljoin(url, path)
    try:
        with urllib.request.urlopen(target, timeout=10) as response:
            stats = json.load(response)
    except urllib.error.HTTPError as exc:
        raise click.ClickException(
            f"{target} answered {exc.code}: {exc.read().decode(errors='replace').strip()}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise click.ClickException(f"cannot read {target}: {exc}") from None
    cluster = stats.get("cluster")
    if cluster is not None:
        click.echo(
            f"{len(cluster['processes'])} processes ({stats['bus']} bus): "
            f"{cluster['streams']} streams"
        )
        for origin, process in sorted(cluster["processes"].items()):
            click.echo(f"  {origin}: {process['streams']}")
        click.echo("channels:")
        counts = cluster["channels"]
    else:
        click.echo(f"process {stats['pid']} ({stats['bus']} bus): {stats['streams']} streams")
        counts = stats["channels"]
    for channel, number in sorted(counts.items()):
        click.echo(f"  {channel}: {number}")
    totals = stats.get("totals")
    if totals is not None:
        click.echo(
            f"process {stats['pid']} since start: {totals['opened']} streams opened, "
            f"{totals['closed']} closed, {totals['published']} events published, "
            f"{totals['dropped']} slow streams dropped"
        )

"""A separate process publishing through the test app's bus, like a cron job or worker:
``python -m apps.publish_script CHANNEL N`` prints one event id per line."""

from __future__ import annotations

import sys

from apps.streaming import app

from flask_sse_push import send_event


def main() -> None:
    channel, count = sys.argv[1], int(sys.argv[2])
    with app.app_context():
        for i in range(count):
            print(send_event({"from": "script", "n": i}, channel=channel), flush=True)


if __name__ == "__main__":
    main()

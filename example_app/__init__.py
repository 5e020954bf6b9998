"""A small app showing flask-sse-push at work."""

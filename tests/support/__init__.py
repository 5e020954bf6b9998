"""Support code for the tests and the benchmarks, one module per concern.

- :mod:`support.procs`: ports, bounded waits, file limits, stopping processes by pid.
- :mod:`support.http`: the raw HTTP/1.1 client and THE chunked-transfer decoder.
- :mod:`support.gunicorn`: starting and stopping ``gunicorn -k gevent``.
- :mod:`support.redis_server`: throwaway ``redis-server`` processes.
- :mod:`support.redis_ha`, :mod:`support.redis_cluster`: a primary with replicas under three
  ``redis-sentinel`` processes; a cluster of three primaries and three replicas.
- :mod:`support.failover`: the scenario of a Redis primary killed while events are published
  and streams are open, and what it measures.
- :mod:`support.netns`, :mod:`support.netload`: hosts made of network namespaces, and the
  client and publisher agents that run inside them.
- :mod:`support.clients`: stream readers built on raw sockets (one, many, reconnecting).
- :mod:`support.app`: serving the test app (``apps.streaming``) and calling its routes.
- :mod:`support.flask_apps`: apps made in the test process, their buses closed after.
- :mod:`support.nginx`: nginx with the shipped site configuration in front of gunicorn.
- :mod:`support.tls`: a throwaway self-signed certificate.
- :mod:`support.browser`: Debian's Chromium, headless, through Playwright.

The tests find this package through pytest's ``pythonpath`` setting; the benchmarks through
``benchmarks/benchutil.py``. Nothing is imported here, so a benchmark process that needs one
module loads only that module's dependencies.
"""

"""The benchmark scripts load, and the benchmark client's stream parser passes its self-test.

Both run the commands of ``benchmarks/README.md`` as they are typed, so they also check that
the benchmarks find the tests' support package on their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.procs import REPO_ROOT


def run_script(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``python benchmarks/<argv>`` from the repository root, without ``PYTHONPATH``."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, *argv],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_benchmark_client_self_test() -> None:
    done = run_script("benchmarks/sse_client.py", "--self-test")
    assert done.returncode == 0, done.stderr
    assert "self-test passed" in done.stderr


@pytest.mark.parametrize(
    ("script", "option"),
    [("broadcast.py", "--mode"), ("bare.py", "--port"), ("stream_memory.py", "--streams")],
)
def test_benchmark_command_line(script: str, option: str) -> None:
    done = run_script(f"benchmarks/{script}", "--help")
    assert done.returncode == 0, done.stderr
    assert option in done.stdout


def test_scale_command_line() -> None:
    done = run_script("benchmarks/scale.py", "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--quick", "--only", "--repeat", "--json", "--docs", "--readme"):
        assert option in done.stdout


def _figures(server: str, scenario: str, cpu: float, **more: object) -> dict[str, object]:
    return {
        "scenario": scenario,
        "server": server,
        "run": 1,
        "cpu_us_per_delivery": cpu,
        "cpu_us_per_delivery_all": cpu,
        "latency_p50_ms": cpu / 2,
        "latency_p99_ms": cpu,
        "rss_kb_per_stream": cpu,
        "lost": 0,
        "call_cpu_us": cpu,
        "publisher_max_lag_ms": 0.0,
        "fixed_rss_kb": 30000.0,
        "saturated": False,
        **more,
    }


def _synthetic() -> dict[str, object]:
    """A small report as ``scale.py --json`` writes it (figures made up)."""
    failed = {"failure": "connect errors {'EMFILE': 3}", "held": 150, "wanted": 200}
    records: list[dict[str, object]] = [
        _figures("bare", "broadcast", 10.0),
        _figures("memory", "broadcast", 14.0),
        {"scenario": "broadcast", "server": "flask-sse", "run": 1, **failed},
        {
            "scenario": "footprint",
            "server": "-",
            "run": 1,
            "idle": {},
            "unneeded": {
                "packages": {"asyncio": 1},
                "modules": ["asyncio"],
                "package_modules": [],
                "package_modules_to_review": ["flask_sse_push.aio"],
            },
            "steps": [
                {"step": "python", "rss_kb": 10000.0, "modules": 70},
                {"step": "flask", "rss_kb": 20000.0, "modules": 400},
            ],
        },
        {
            "scenario": "machine",
            "server": "redis",
            "run": 1,
            "wanted": 300,
            "held": 300,
            "per_worker": [150, 150],
            "single": {"latency_p99_ms": 80.0},
            "latency_p99_ms": 90.0,
            "lost": 0,
            "cpu_us_per_delivery_all": 20.0,
        },
    ]
    for level in (100, 200):
        records += [
            _figures("bare", "growth", 10.0, level=level),
            _figures("memory", "growth", 13.0, level=level),
        ]
    records += [
        _figures(server, "single", 8.0, level=200, rss_kb_per_stream=rss)
        for server, rss in (("bare", 10.0), ("memory", 13.0))
    ]
    records.append({"scenario": "growth", "server": "flask-sse", "run": 1, "level": 200, **failed})
    for rate in (25.0, 50.0):
        records += [_figures(s, "rate", 10.0 + rate, rate=rate) for s in ("bare", "memory")]
        records += [_figures(s, "targeted", 5.0 + rate, rate=rate) for s in ("bare", "memory")]
    config = {
        "clients": 200,
        "rate": 50.0,
        "duration": 2.0,
        "growth_rate": 4.0,
        "broadcasts": 3,
        "machine_rate": 1.0,
        "repeat": 1,
    }
    environment = {
        "date": "2026-01-01 00:00 UTC",
        "cpu_model": "test CPU",
        "cores": 2,
        "kernel": "6.1",
        "python": "3.11",
        "gevent": "26",
        "gunicorn": "27",
        "commit": "0123456789abcdef",
        "seconds": 1.0,
    }
    return {"config": config, "environment": environment, "records": records}


def test_scale_report_from_json(tmp_path: Path) -> None:
    """The report, the plots, the docs page and the README table, from a synthetic JSON."""
    saved = tmp_path / "scale.json"
    saved.write_text(json.dumps(_synthetic()))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Performance\n\nold table\n\nSee `docs/performance.rst`.\n")
    rst = tmp_path / "performance_results.rst"
    done = run_script(
        "benchmarks/scale.py",
        "--from-json",
        str(saved),
        "--docs",
        "--readme",
        "--plot-dir",
        str(tmp_path / "perf"),
        "--results-rst",
        str(rst),
        "--readme-path",
        str(readme),
    )
    assert done.returncode == 0, done.stderr
    assert "held 150 of 200" in done.stdout
    assert "PASS: CPU/delivery memory at 100 streams" in done.stdout
    assert "FAIL: RSS per stream memory at 200" in done.stdout  # 13 KB against 10 KB
    assert "PASS: 300 streams on 2 workers, nothing lost" in done.stdout
    assert sorted(p.name for p in (tmp_path / "perf").iterdir()) == [
        "cpu_per_delivery.png",
        "p99_vs_rate.png",
        "p99_vs_streams.png",
        "rss_per_stream.png",
    ]
    assert ".. image:: _static/perf/p99_vs_rate.png" in rst.read_text()
    text = readme.read_text()
    assert "old table" not in text and "| flask-sse-push memory |" in text
    assert "1.40x" in text and text.endswith("See `docs/performance.rst`.\n")


def test_stream_memory_names_the_package_of_each_file() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        from stream_memory import package_of
    finally:
        sys.path.pop(0)
    assert package_of("/x/site-packages/gunicorn/http/wsgi.py") == "gunicorn"
    assert package_of("/x/flask_sse_push/mailbox.py") == "flask-sse-push"
    assert package_of("/x/site-packages/flask/app.py") == "flask"
    assert package_of("/usr/lib/python3.11/socket.py") == "standard library / other"

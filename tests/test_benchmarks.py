"""The benchmark scripts load, and the benchmark client's stream parser passes its self-test.

Both run the commands of ``benchmarks/README.md`` as they are typed, so they also check that
the benchmarks find the tests' support package on their own.
"""

from __future__ import annotations

import os
import subprocess
import sys

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


@pytest.mark.parametrize(("script", "option"), [("broadcast.py", "--mode"), ("bare.py", "--port")])
def test_benchmark_command_line(script: str, option: str) -> None:
    done = run_script(f"benchmarks/{script}", "--help")
    assert done.returncode == 0, done.stderr
    assert option in done.stdout

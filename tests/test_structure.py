"""The package's shape: no import cycle between its modules, and no module too long to read
in one sitting."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import flask_sse_push

PACKAGE = Path(flask_sse_push.__file__).parent
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules *path* imports when it runs (not those under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            subs = {f"{base}.{a.name}" for a in node.names} & modules
            found |= subs
            if len(subs) < len(node.names) and base in modules:
                found.add(base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & modules
    return found - {name}


def test_no_import_cycles() -> None:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imports(path, set(paths)) for name, path in paths.items()}
    assert "flask_sse_push.state" in graph["flask_sse_push.publish"]  # the walk sees imports
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        for target in sorted(graph[name]):
            assert target not in stack, "import cycle: " + " -> ".join([*stack, target])
            if target not in done:
                visit(target, [*stack, target])
        done.add(name)

    for name in sorted(graph):
        visit(name, [name])


def test_no_module_is_too_long() -> None:
    lengths = {
        str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")
    }
    assert max(lengths.values()) > 50  # the files were read
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


def test_a_worker_on_the_in_process_bus_loads_no_redis_and_no_asyncio() -> None:
    """What a worker does not need is not loaded: the Redis bus's modules and asyncio are
    imported when a Redis bus or an async generator is first used."""
    script = (
        "import sys\n"
        "from flask import Flask\n"
        "from flask_sse_push import send_event, sse\n"
        "app = Flask('x')\n"
        "app.register_blueprint(sse, url_prefix='/s')\n"
        "with app.app_context():\n"
        "    send_event('x')\n"
        "print(' '.join(m for m in sys.modules if 'redis' in m or m.startswith('asyncio')))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert loaded == []


def test_the_redis_schemes_are_registered_before_the_redis_bus_is_imported() -> None:
    from flask_sse_push.bus import REDIS_SCHEMES
    from flask_sse_push.bus.redis import RedisBus

    assert sorted(REDIS_SCHEMES) == sorted(RedisBus.schemes)

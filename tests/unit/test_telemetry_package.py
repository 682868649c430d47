"""The package as a whole: its public surface, and what importing it costs."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = [
    "gateway.telemetry",
    "gateway.telemetry._otel",
    "gateway.telemetry.core",
    "gateway.telemetry.logs",
    "gateway.telemetry.metrics",
    "gateway.telemetry.record",
    "gateway.telemetry.settings",
    "gateway.telemetry.tracing",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_exactly_the_public_names_defined_there(name: str) -> None:
    """(ruff's RUF022 keeps each `__all__` sorted.)"""
    module = importlib.import_module(name)
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text())
    defined = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
    public = {n for n in defined if not n.startswith("_")}
    if name == "gateway.telemetry":  # the package re-exports what callers need
        assert set(module.__all__) == {"RequestRecord", "Telemetry", "TelemetrySettings"}
    else:
        assert set(module.__all__) == public


def test_tracing_off_never_loads_opentelemetry() -> None:
    script = (
        "import sys\n"
        "from gateway.telemetry import Telemetry\n"
        "telemetry = Telemetry(environ={})\n"
        "record = telemetry.start('chat', {}, 'r')\n"
        "with record.trace.span('triage.auth'):\n"
        "    pass\n"
        "telemetry.finish(record)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True)

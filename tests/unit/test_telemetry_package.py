"""The package as a whole: what importing it costs. (Its public surface is checked with every
other module's, in test_public_surface.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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

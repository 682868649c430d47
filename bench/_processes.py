"""The servers a bench script runs (stubs, gateways, LiteLLM): start one, stop one.

Each leads a process group of its own, so stopping it also stops the workers it forks, and
any answer below 500 from its health URL counts as up (the relay has no health route).
The process helpers are the tests' (tests/support/processes.py): the checkout's root goes
on sys.path, as tests/ is not an installed package.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.processes import free_port, start_process, stop_process

__all__ = ["PYTHON", "free_port", "start", "stop"]

PYTHON = sys.executable


def _below_500(status: int) -> bool:
    return status < 500


def start(
    args: list[str],
    health: str,
    *,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.Popen[bytes]:
    """Start `args` in the checkout and wait until `health` answers; output to `log`, or to a
    temporary file that outlives the run."""
    if log is None:
        with tempfile.NamedTemporaryFile(prefix="bench-", suffix=".log", delete=False) as file:
            log = Path(file.name)
    return start_process(
        args, health, log, env=env, timeout=timeout, healthy=_below_500, own_session=True
    )


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None:
        stop_process(process, group=True)

"""Servers run as child processes, for the tests and the bench scripts: a free loopback port,
a process started and waited for until it answers, and its stop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
LOG_TAIL_CHARS = 4000  # of a failed start's output, in its error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _is_200(status: int) -> bool:
    return status == 200


def start_process(
    args: list[str],
    health_url: str,
    log: Path,
    *,
    name: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30,
    healthy: Callable[[int], bool] = _is_200,
    own_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `args` in the checkout, output to `log`, and wait until `health_url` answers
    with a status `healthy` accepts.

    `env` is added to this process's environment. With `own_session` the child leads a
    process group of its own, and `stop_process(..., group=True)` also stops what it forks.
    Raises RuntimeError, with the end of `log`, if the child exits first or is not healthy
    within `timeout` seconds (it is stopped then).
    """
    label = name or " ".join(args[:4])
    with log.open("wb") as out:
        process = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=own_session,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{label} exited early:\n{_tail(log)}")
        try:
            if healthy(httpx.get(health_url, timeout=1).status_code):
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    stop_process(process, group=own_session)
    raise RuntimeError(f"{label} did not become healthy:\n{_tail(log)}")


def stop_process(process: subprocess.Popen[bytes], *, group: bool = False) -> None:
    """SIGTERM (to its whole process group with `group`), then SIGKILL after 10 s."""
    if process.poll() is not None:
        return

    def send(sig: signal.Signals) -> None:
        if group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)

    send(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL_CHARS:]

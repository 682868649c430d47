"""The process's shutdown deadline, which streams watch so they can end cleanly.

When the server stops it lets in-flight work finish for a grace period, then cancels what
is left: a stream cut that way just stops, and the client cannot tell a shutdown from a
network fault. Streams still running shortly before that moment are interrupted here
instead, so they can send an error event and `[DONE]` while the connection is still up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

__all__ = ["INTERRUPTED", "SHUTDOWN", "ShutdownDeadline", "stream_deadline"]

INTERRUPTED = "the gateway is shutting down"


class ShutdownDeadline:
    def __init__(self) -> None:
        self.passed = False
        self._watched: set[asyncio.Future[None]] = set()

    def start(self, loop: asyncio.AbstractEventLoop, after_s: float) -> None:
        """Interrupt watched streams `after_s` from now; safe to call from a signal handler."""
        loop.call_soon_threadsafe(loop.call_later, max(0.0, after_s), self._expire)

    @contextlib.contextmanager
    def interrupts(self, task: asyncio.Future[None]) -> Iterator[None]:
        """While in this block, `task` is cancelled (with `INTERRUPTED`) at the deadline."""
        if self.passed:
            task.cancel(INTERRUPTED)
        self._watched.add(task)
        try:
            yield
        finally:
            self._watched.discard(task)

    def _expire(self) -> None:
        self.passed = True
        for task in list(self._watched):
            task.cancel(INTERRUPTED)


def stream_deadline(grace_s: float) -> float:
    """When to interrupt streams: shortly before the server's grace period runs out, leaving
    time to write their last events."""
    return grace_s - min(1.0, grace_s / 4)


SHUTDOWN = ShutdownDeadline()

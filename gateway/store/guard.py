"""Keeping a Redis call short without blaming Redis for this process's own stalls.

`CircuitBreaker` stops calling a Redis that keeps failing. `Deadline` bounds one call by
the time this event loop was free to read its reply (`LoopLag` measures the rest); a reply
the loop could not get to within `LAG_ALLOWANCE_S` more raises `LoopBusy`, which is no
verdict on Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Literal

from gateway.store.errors import StoreUnavailable

__all__ = ["LAG_ALLOWANCE_S", "BreakerState", "CircuitBreaker", "Deadline", "LoopBusy", "LoopLag"]

# A call whose reply the loop was too busy to read waits at most this long past its
# timeout; redis-py's socket timeouts, a backstop only, are set past it.
LAG_ALLOWANCE_S = 1.0


class LoopBusy(StoreUnavailable):
    """No reply was read in time, but this process's event loop, not Redis, was too busy."""


BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `reset_s` lets one probe through.

    A call asks `allow()` first and then reports exactly one of `success()`, `failure()`
    or `cancel()` (ended without a verdict, e.g. the caller was cancelled).
    """

    def __init__(
        self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if failures < 1 or reset_s <= 0:
            raise ValueError(f"need failures >= 1 and reset_s > 0, got {failures}, {reset_s}")
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_started: float | None = None

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        if self._state == "closed":
            return True
        now = self._clock()
        if self._state == "open":
            if now - self._opened_at < self.reset_s:
                return False
            self._state = "half_open"
        # Half-open: one probe at a time. A probe that never reported (a lost task) is
        # given up after `reset_s` so the breaker cannot stay stuck.
        if self._probe_started is not None and now - self._probe_started < self.reset_s:
            return False
        self._probe_started = now
        return True

    def success(self) -> None:
        self._state = "closed"
        self._consecutive = 0
        self._probe_started = None

    def failure(self) -> None:
        self._consecutive += 1
        if self._state == "half_open" or self._consecutive >= self.failures:
            self._state = "open"
            self._opened_at = self._clock()
            self._probe_started = None

    def cancel(self) -> None:
        if self._state == "half_open":
            self._probe_started = None


class LoopLag:
    """How long this event loop was too busy to run a callback on time, while calls wait.

    A timer that runs late proves the loop spent the delay on other work, and a reply that
    arrived meanwhile sat unread. `stalled_s` only grows: a call keeps its value at the
    start and subtracts. Ticks run only while some call is in flight.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.stalled_s = 0.0
        self._seen = 0.0  # loop time up to which stalls are counted
        self._due = 0.0  # when the next tick should run
        self._users = 0
        self._tick: asyncio.TimerHandle | None = None

    def enter(self, loop: asyncio.AbstractEventLoop) -> float:
        """A call starts: returns the stall so far, counting a tick that is overdue now."""
        self._users += 1
        now = loop.time()
        if self._tick is None:
            self._seen = now
            self._schedule(loop, now)
        else:
            self.late(self._due, now)
        return self.stalled_s

    def leave(self) -> None:
        self._users -= 1
        if self._users == 0 and self._tick is not None:
            self._tick.cancel()
            self._tick = None

    def late(self, due: float, now: float) -> None:
        """A callback due at `due` ran at `now`: the loop was busy in between."""
        if now > due and now > self._seen:
            self.stalled_s += now - max(due, self._seen)
            self._seen = now

    def _schedule(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        self._due = now + self.interval_s
        self._tick = loop.call_at(self._due, self._ticked, loop)

    def _ticked(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        self.late(self._due, now)
        self._seen = max(self._seen, now)
        self._schedule(loop, now)


class Deadline:
    """`timeout_s` of time the loop was free to read a reply, within `timeout_s` plus
    `LAG_ALLOWANCE_S` in all; raises `TimeoutError`, or `LoopBusy` past the allowance."""

    def __init__(self, lag: LoopLag, timeout_s: float, operation: str) -> None:
        self._lag = lag
        self._timeout_s = timeout_s
        self._operation = operation
        self._loop = asyncio.get_running_loop()
        self._timeout = asyncio.timeout(None)
        self._check: asyncio.TimerHandle | None = None
        self._start = self._mark = 0.0
        self._busy = self._last_look = False

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()
        self._start = self._loop.time()
        self._mark = self._lag.enter(self._loop)
        self._arm(self._start + self._timeout_s)

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._check is not None:
            self._check.cancel()
        self._lag.leave()
        try:
            await self._timeout.__aexit__(*exc_info)
        except TimeoutError as exc:
            if self._busy:
                raise LoopBusy(
                    f"redis {self._operation}: no reply read within "
                    f"{self._timeout_s + LAG_ALLOWANCE_S:g} s: this process was too busy"
                ) from exc
            raise

    def _arm(self, when: float) -> None:
        self._check = self._loop.call_at(when, self._expired, when)

    def _expired(self, due: float) -> None:
        now = self._loop.time()
        self._lag.late(due, now)
        elapsed = now - self._start
        free = elapsed - (self._lag.stalled_s - self._mark)
        give_up = self._timeout_s + LAG_ALLOWANCE_S
        # Re-armed only for a real shortfall: a timer's own small lateness counts as a
        # stall too, and chasing it in ever smaller steps would never end.
        short = self._timeout_s - free > self._lag.interval_s / 2
        if short and elapsed < give_up:
            # The loop was busy for part of the time: Redis gets what it missed.
            self._arm(now + min(self._timeout_s - free, give_up - elapsed))
            return
        if short and not self._last_look:
            # Past the allowance, but a reply that came in while the loop was blocked may
            # be read just now: give the loop a moment to get to it before giving up.
            self._last_look = True
            self._arm(now + self._lag.interval_s / 2)
            return
        self._busy = short
        self._check = None
        self._timeout.reschedule(now)

"""Latency objectives: per-request targets, deadlines, hedge delays, budgets, waiting room.

The estimators the balancer learns from live in `gateway.estimators`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Literal, get_args

from gateway.estimators import LatencyWindow

__all__ = [
    "PRIORITIES",
    "Deadline",
    "FirstByteTracker",
    "Priority",
    "RatioBudget",
    "SloTarget",
    "WaitingRoom",
    "request_priority",
    "request_target",
]

Priority = Literal["critical", "standard", "sheddable"]
PRIORITIES: tuple[Priority, ...] = get_args(Priority)  # most important first
_RANKS: dict[str, int] = {name: rank for rank, name in enumerate(PRIORITIES)}
# Hedging waits for this many first-byte samples before trusting their p95.
_MIN_HEDGE_SAMPLES = 20
_HEDGE_DELAY_REFRESH = 8  # new first-byte samples before the hedge delay is recomputed


@dataclass(frozen=True, slots=True)
class SloTarget:
    """Time to first token and end to end, to be met by `percentile` % of requests."""

    ttft_s: float
    e2e_s: float
    percentile: float = 95.0

    def met(self, ttft_s: float | None, e2e_s: float | None) -> tuple[bool, bool]:
        """(TTFT met, e2e met). Without a TTFT (a non-streamed answer) only e2e is judged;
        without an e2e (none was measured) it is not judged missed."""
        return (ttft_s is None or ttft_s <= self.ttft_s), (e2e_s is None or e2e_s <= self.e2e_s)


def request_priority(tenant_priority: Priority, hint: Priority | None) -> Priority:
    """The request's priority: its hint (`x-triage-priority`) may lower the tenant's, never
    raise it."""
    if hint is None:
        return tenant_priority
    return PRIORITIES[max(_RANKS[tenant_priority], _RANKS[hint])]


def request_target(
    target: SloTarget | None, ttft_s: float | None, e2e_s: float | None
) -> SloTarget | None:
    """The tier's target tightened by the request's own (`x-slo-ttft-ms`, `x-slo-e2e-ms`),
    never loosened."""
    if ttft_s is None and e2e_s is None:
        return target
    base = target or SloTarget(math.inf, math.inf)
    return SloTarget(
        min(base.ttft_s, ttft_s if ttft_s is not None else math.inf),
        min(base.e2e_s, e2e_s if e2e_s is not None else math.inf),
        base.percentile,
    )


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a request is due, on the event loop's clock.

    The target's times are the SLO: admission, queueing and hedging aim at them. Upstream
    timeouts come `timeout_factor` times later: an answer a little late is still worth
    more to a client than an error, one much later is not worth a GPU slot.
    """

    started: float
    target: SloTarget | None
    timeout_factor: float = 2.0

    @property
    def ttft_at(self) -> float:
        return self.started + (self.target.ttft_s if self.target else math.inf)

    @property
    def e2e_at(self) -> float:
        return self.started + (self.target.e2e_s if self.target else math.inf)

    @property
    def ttft_timeout_at(self) -> float:
        return self.started + (self.ttft_at - self.started) * self.timeout_factor

    @property
    def e2e_timeout_at(self) -> float:
        return self.started + (self.e2e_at - self.started) * self.timeout_factor

    def first_byte_timeout_at(self, stream: bool) -> float:
        """When a send without its first byte is given up on. A stream's first byte is its
        first token; a non-streamed answer's headers come with its whole body (llama.cpp,
        Ollama, vLLM alike), so only the e2e timeout bounds it."""
        return self.ttft_timeout_at if stream else self.e2e_timeout_at

    def budget(self, now: float, headroom: float = 1.0) -> tuple[float, float]:
        """Seconds left for the first token and for the last, times `headroom`."""
        return (self.ttft_at - now) * headroom, (self.e2e_at - now) * headroom


class FirstByteTracker:
    """Each serving tier's recent time to first byte, streamed or not: when to hedge.

    One for the gateway's life, so hedging does not start cold again after a reload.
    """

    def __init__(self) -> None:
        # Short windows, so the hedge delay follows load swings.
        self._first_byte: dict[tuple[str, bool], LatencyWindow] = {}
        self._hedge_delays: dict[tuple[str, bool], tuple[int, float | None]] = {}

    def first_byte(self, tier: str, stream: bool, seconds: float) -> None:
        window = self._first_byte.get((tier, stream))
        if window is None:
            window = self._first_byte[(tier, stream)] = LatencyWindow(256)
        window.add(seconds)

    def hedge_delay(self, tier: str, stream: bool) -> float | None:
        """The tier's recent p95 time to first byte (TTFT for streams); None until known."""
        key = (tier, stream)
        window = self._first_byte.get(key)
        if window is None or len(window) < _MIN_HEDGE_SAMPLES:
            return None
        # Sorting the window for every request was ~1 % of its CPU; a p95 that lags by a
        # few samples hedges just as well.
        cached = self._hedge_delays.get(key)
        if cached is not None and window.added - cached[0] < _HEDGE_DELAY_REFRESH:
            return cached[1]
        delay = window.percentiles(0.95)[0]
        self._hedge_delays[key] = (window.added, delay)
        return delay


class RatioBudget:
    """Extra sends (retries, hedges) allowed: `ratio` per request over the last `window_s`,
    plus `floor_per_s` so a quiet pool can still retry. Keeps retries from melting a pool."""

    def __init__(
        self, ratio: float, floor_per_s: float = 1.0, window_s: float = 10.0, slots: int = 10
    ) -> None:
        self.ratio = ratio
        self.floor_per_s = floor_per_s
        self._slot_s = window_s / slots
        self._slots = slots
        self._deposits = [0] * slots
        self._spends = [0] * slots
        self._stamps = [-1] * slots

    def _slot(self, now: float) -> int:
        tick = int(now / self._slot_s)
        index = tick % self._slots
        if self._stamps[index] != tick:
            self._stamps[index], self._deposits[index], self._spends[index] = tick, 0, 0
        return index

    def _live(self, now: float) -> Iterable[int]:
        oldest = int(now / self._slot_s) - self._slots + 1
        return (i for i in range(self._slots) if self._stamps[i] >= oldest)

    def deposit(self, now: float) -> None:
        """One request sent for the first time."""
        self._deposits[self._slot(now)] += 1

    def try_spend(self, now: float) -> bool:
        """Take one extra send if the budget has it."""
        index = self._slot(now)
        live = list(self._live(now))
        allowed = self.ratio * sum(self._deposits[i] for i in live)
        allowed += self.floor_per_s * self._slot_s * self._slots
        if sum(self._spends[i] for i in live) + 1 > allowed:
            return False
        self._spends[index] += 1
        return True


@dataclass(eq=False)
class _Waiter:
    rank: tuple[int, int]
    keys: frozenset[Hashable]
    woken: asyncio.Future[None]


class WaitingRoom:
    """Requests waiting briefly for capacity on some pools, woken in priority order.

    A waiter may go ahead only while no more important request waits for any of the same
    pools: capacity that frees up goes to critical, then standard, then sheddable requests.
    """

    def __init__(self, max_waiting: int = 1024) -> None:
        self.max_waiting = max_waiting
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._waiters)

    def full(self) -> bool:
        return len(self._waiters) >= self.max_waiting

    def enter(self, priority: Priority, keys: Iterable[Hashable]) -> _Waiter:
        rank = (PRIORITIES.index(priority), next(self._seq))
        loop = asyncio.get_running_loop()
        waiter = _Waiter(rank, frozenset(keys), loop.create_future())
        self._waiters.append(waiter)
        return waiter

    def leave(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def may_go(self, waiter: _Waiter) -> bool:
        """No waiter of higher priority wants any of the same pools."""
        return not any(
            other.rank[0] < waiter.rank[0] and other.keys & waiter.keys for other in self._waiters
        )

    async def wait(self, waiter: _Waiter, timeout_s: float) -> None:
        """Until a wake-up for one of the waiter's pools, or `timeout_s`."""
        if waiter.woken.done():
            waiter.woken = asyncio.get_running_loop().create_future()
        await asyncio.wait((waiter.woken,), timeout=max(timeout_s, 0.0))

    def wake(self, key: Hashable) -> None:
        """Capacity may have freed up on `key`: wake its waiters, most important first."""
        for waiter in sorted(self._waiters, key=lambda w: w.rank):
            if key in waiter.keys and not waiter.woken.done():
                waiter.woken.set_result(None)

"""Latency objectives: per-request targets, deadlines, latency tracking, budgets, waiting room.

The estimators the balancer learns from live in `gateway.estimators`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from gateway.estimators import LatencyWindow

__all__ = [
    "PRIORITIES",
    "Deadline",
    "LatencyTracker",
    "Priority",
    "RatioBudget",
    "SloTarget",
    "TierSnapshot",
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

    def met(self, ttft_s: float | None, e2e_s: float) -> tuple[bool, bool]:
        """(TTFT met, e2e met). Without a TTFT (a non-streamed answer) only e2e is judged."""
        return (ttft_s is None or ttft_s <= self.ttft_s), e2e_s <= self.e2e_s


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


@dataclass(frozen=True, slots=True)
class TierSnapshot:
    """One tier's SLO record: counters since start, latency percentiles over recent requests.

    Requests are counted under the tier whose SLO they were held to (the tier the router
    chose), even when a fallback tier served them. Clients that went away are not counted.
    """

    requests: int
    met: int  # answered within both the TTFT and the e2e target
    ttft_met: int
    e2e_met: int
    shed: int  # refused with 429: no tier could meet the SLO in time
    expired: int  # refused with 503: the deadline passed while queued
    failed: int  # upstream errors and timeouts
    hedged: int
    retried: int
    fell_back: int  # served by a fallback tier
    target: float | None  # share of requests that should meet the SLO (percentile / 100)
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_p99_s: float | None
    e2e_p50_s: float | None
    e2e_p95_s: float | None
    e2e_p99_s: float | None

    @property
    def attainment(self) -> float | None:
        """Share of requests that met both targets; None before the first request."""
        return self.met / self.requests if self.requests else None


_Refusal = Literal["shed", "expired", "failed"]


@dataclass
class _TierRecord:
    window: int
    target: float | None = None
    requests: int = 0
    met: int = 0
    ttft_met: int = 0
    e2e_met: int = 0
    shed: int = 0
    expired: int = 0
    failed: int = 0
    hedged: int = 0
    retried: int = 0
    fell_back: int = 0
    ttft: LatencyWindow = field(init=False)
    e2e: LatencyWindow = field(init=False)

    def __post_init__(self) -> None:
        self.ttft = LatencyWindow(self.window)
        self.e2e = LatencyWindow(self.window)

    def snapshot(self) -> TierSnapshot:
        ttft = self.ttft.percentiles(0.5, 0.95, 0.99)
        e2e = self.e2e.percentiles(0.5, 0.95, 0.99)
        return TierSnapshot(
            self.requests, self.met, self.ttft_met, self.e2e_met, self.shed, self.expired,
            self.failed, self.hedged, self.retried, self.fell_back, self.target,
            *ttft, *e2e,
        )  # fmt: skip


class LatencyTracker:
    """What each tier's requests experienced, and each tier's recent time to first byte."""

    def __init__(self, targets: Mapping[str, SloTarget | None], window: int = 2048) -> None:
        self._window = window
        self._tiers = {name: self._record(t) for name, t in targets.items()}
        # By serving tier, streamed or not: when to hedge. Short, so it follows load swings.
        self._first_byte: dict[tuple[str, bool], LatencyWindow] = {}
        self._hedge_delays: dict[tuple[str, bool], tuple[int, float | None]] = {}

    def retarget(self, targets: Mapping[str, SloTarget | None]) -> None:
        """A reloaded policy's tiers: counters of tiers it keeps go on, others go."""
        self._tiers = {
            name: self._tiers.get(name) or self._record(target) for name, target in targets.items()
        }
        for name, target in targets.items():
            self._tiers[name].target = target.percentile / 100 if target else None

    def _record(self, target: SloTarget | None) -> _TierRecord:
        return _TierRecord(self._window, target.percentile / 100 if target else None)

    def _tier(self, tier: str) -> _TierRecord:
        record = self._tiers.get(tier)
        if record is None:
            record = self._tiers[tier] = self._record(None)
        return record

    def answered(
        self,
        tier: str,
        *,
        target: SloTarget | None,
        ttft_s: float | None,
        e2e_s: float,
        hedged: bool = False,
        retries: int = 0,
        fell_back: bool = False,
    ) -> None:
        """A request that got its whole answer. `ttft_s` is None for non-streamed answers."""
        record = self._tier(tier)
        record.requests += 1
        ttft_ok, e2e_ok = target.met(ttft_s, e2e_s) if target else (True, True)
        record.ttft_met += ttft_ok
        record.e2e_met += e2e_ok
        record.met += ttft_ok and e2e_ok
        if ttft_s is not None:
            record.ttft.add(ttft_s)
        record.e2e.add(e2e_s)
        self._count(record, hedged, retries, fell_back)

    def refused(
        self,
        tier: str,
        reason: _Refusal,
        *,
        hedged: bool = False,
        retries: int = 0,
        fell_back: bool = False,
    ) -> None:
        """A request that got an error instead of an answer: it missed its SLO."""
        record = self._tier(tier)
        record.requests += 1
        if reason == "shed":
            record.shed += 1
        elif reason == "expired":
            record.expired += 1
        else:
            record.failed += 1
        self._count(record, hedged, retries, fell_back)

    @staticmethod
    def _count(record: _TierRecord, hedged: bool, retries: int, fell_back: bool) -> None:
        record.hedged += hedged
        record.retried += retries
        record.fell_back += fell_back

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

    def snapshot(self) -> dict[str, TierSnapshot]:
        """Per tier: SLO attainment, counters and p50/p95/p99 TTFT and e2e (seconds)."""
        return {name: record.snapshot() for name, record in self._tiers.items()}


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

"""What the policy says about dispatching: per-tier rules and the balancer's settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.pools import Balancer
from gateway.slo import SloTarget

__all__ = ["SHED_CODES", "DispatchSettings", "TierRules"]

# The error codes of requests refused on purpose: 429 over capacity, 503 deadline passed.
SHED_CODES = frozenset({"over_capacity", "deadline_expired"})


@dataclass(frozen=True, slots=True)
class TierRules:
    """What the policy says about the requests routed to one tier.

    A request goes to the first of its tier's models, then its fallback tiers' models,
    predicted to meet its SLO. When none is: a critical request goes at once to the one
    predicted fastest; a standard one waits up to `max_queue_s` for capacity (a sheddable
    one does not wait); then, with `shed`, it is refused with 429 (or 503 when its TTFT
    deadline passed while it waited), and without, it goes to the one predicted fastest.
    """

    target: SloTarget | None = None
    max_queue_s: float = 0.5
    shed: bool = True
    # Sending a request twice is harmless: hedging is allowed, and retries after 5xx.
    idempotent: bool = True


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """Balancing and resilience settings; the baselines (`least_outstanding`, `round_robin`)
    send each request once, to one replica, with no SLO admission, hedging or retries."""

    balancer: Balancer = "slo"
    tiers: Mapping[str, TierRules] = field(default_factory=dict)
    max_attempts: int = 3  # sends of one request before the first byte, hedges excluded
    retry_ratio: float = 0.1  # retries per request, at most, over the last 10 s
    retry_floor_per_s: float = 1.0
    hedge: bool = True
    hedge_ratio: float = 0.05  # hedged requests per request, at most, over the last 10 s
    hedge_floor_per_s: float = 0.2
    min_hedge_delay_s: float = 0.02
    timeout_factor: float = 2.0  # upstream timeouts, as a multiple of the SLO's times
    # Admission wants a prediction within this share of the time left: predictions are
    # averages, and a request that only just fits on average misses half the time.
    headroom: float = 0.85
    sheddable_headroom: float = 0.7  # less for sheddable requests: they go first
    # Share of each replica's slots that only critical requests may be admitted into: a
    # critical request that arrives in a burst finds one free.
    critical_reserve: float = 0.2

"""The gateway's own request headers, read once at the edge into typed values.

A bad one is a 400 naming the header before the request touches any state (cache,
budget); what the values then mean (a tier the policy has, a priority the tenant may
lower) is decided where that is known: the router, the dispatcher.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import InvalidRequest
from gateway.slo import PRIORITIES, Priority

__all__ = [
    "E2E_HEADER",
    "NO_HINTS",
    "PRIORITY_HEADER",
    "SESSION_HEADER",
    "TIER_HEADER",
    "TTFT_HEADER",
    "RequestHints",
    "read_hints",
]

TIER_HEADER = "x-triage-tier"
PRIORITY_HEADER = "x-triage-priority"
TTFT_HEADER = "x-slo-ttft-ms"
E2E_HEADER = "x-slo-e2e-ms"
SESSION_HEADER = "x-session-id"


@dataclass(frozen=True, slots=True)
class RequestHints:
    """What the client asked of the gateway itself; None where it asked nothing."""

    tier: str | None = None  # `x-triage-tier`: which tier `auto` should use
    priority: Priority | None = None  # `x-triage-priority`: may lower the tenant's
    ttft_s: float | None = None  # `x-slo-ttft-ms`, in seconds: may tighten the tier's
    e2e_s: float | None = None  # `x-slo-e2e-ms`, in seconds: may tighten the tier's
    session: str | None = None  # `x-session-id`: what a session-aware balancer keys on


NO_HINTS = RequestHints()


def read_hints(headers: Mapping[str, str]) -> RequestHints:
    """The hints in `headers` (lower-case names), or `InvalidRequest` naming the bad one.
    Most requests send none: five lookups and a shared value, nothing built."""
    tier = headers.get(TIER_HEADER)
    priority = headers.get(PRIORITY_HEADER)
    ttft = headers.get(TTFT_HEADER)
    e2e = headers.get(E2E_HEADER)
    session = headers.get(SESSION_HEADER) or None
    if tier is None and priority is None and ttft is None and e2e is None and session is None:
        return NO_HINTS
    return RequestHints(
        tier,
        None if priority is None else _priority(priority),
        None if ttft is None else _seconds(TTFT_HEADER, ttft),
        None if e2e is None else _seconds(E2E_HEADER, e2e),
        session,
    )


def _priority(raw: str) -> Priority:
    wanted = raw.strip().lower()
    for priority in PRIORITIES:
        if priority == wanted:
            return priority
    raise InvalidRequest(
        f"{PRIORITY_HEADER} must be one of {', '.join(PRIORITIES)}; got {raw!r}.",
        param=PRIORITY_HEADER,
    )


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise InvalidRequest(
            f"{name} must be a positive number of milliseconds; got {raw!r}.", param=name
        )
    return value / 1000

"""How the ledger reads to people: reset delays as OpenAI writes them, usage report rows."""

from __future__ import annotations

import time
from typing import Any

from gateway.budgets.plan import NANO_PER_USD, Check
from gateway.budgets.windows import Window

__all__ = ["duration", "iso", "usage_row", "usd"]


def usd(nano: int) -> str:
    """Nano-USD as dollars with six decimals."""
    return f"{nano / NANO_PER_USD:.6f}"


def iso(seconds: float) -> str:
    """Epoch seconds as a UTC timestamp, `2026-11-27T12:05:00Z`."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def duration(seconds: float) -> str:
    """A reset delay the way OpenAI writes it: `20ms`, `1s`, `6m0s`, `2h3m4s`."""
    if (millis := round(seconds * 1000)) < 1000:
        return f"{max(0, millis)}ms"
    hours, rest = divmod(int(-(-seconds // 1)), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def usage_row(check: Check, window: Window, settled: int, held: int, now: float) -> dict[str, Any]:
    """One limit's line in the usage report (USD fields for budgets, counts for limits)."""
    row: dict[str, Any] = {
        "scope": check.scope,
        "tier": check.tier,
        "window": window.kind,
        "window_start": iso(window.start),
        "resets_at": iso(window.end),
        "reset_in_s": round(window.reset_in(now), 3),
    }
    if check.kind == "u":
        row |= {
            "limit_usd": check.limit / NANO_PER_USD,
            "spent_usd": settled / NANO_PER_USD,
            "reserved_usd": held / NANO_PER_USD,
            "remaining_usd": max(0, check.limit - settled - held) / NANO_PER_USD,
        }
    else:
        row |= {
            "limit": check.limit,
            "used": settled,
            "reserved": held,
            "remaining": max(0, check.limit - settled - held),
        }
    return row

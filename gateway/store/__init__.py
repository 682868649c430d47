"""The shared state backend (Redis, Redis Cluster or in-process) that cache and budgets use.

Redis trouble never hangs a request. Every Redis call runs inside a deadline of
`timeout_ms` (redis-py's own retries are off) and behind a `CircuitBreaker`: after
`breaker_failures` consecutive failures calls fail at once without touching the network,
and after `breaker_reset_s` one probe call is let through to find out whether Redis is
back. redis-py's exceptions are converted to `StoreUnavailable` in `redis` and nowhere
else, so callers choose fail-open or fail-closed.

The deadline counts only the time this process's event loop was free to read a reply
(`guard`): a reply that arrived while the loop was busy with the gateway's own work is not
a Redis failure. A call whose reply the loop could not get to within `LAG_ALLOWANCE_S`
more fails without a verdict on Redis (the breaker does not count it).

`errors` holds what a store raises, `keys` the key rules both stores share, `guard` the
breaker and the deadline, `redis` the Redis store and `embedded` the in-process one.
"""

from __future__ import annotations

from typing import Protocol

from gateway.policy import StoreSettings
from gateway.store.embedded import EmbeddedStore
from gateway.store.errors import StoreCommandError, StoreUnavailable
from gateway.store.guard import BreakerState, CircuitBreaker
from gateway.store.redis import RedisStore

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "EmbeddedStore",
    "RedisStore",
    "Store",
    "StoreCommandError",
    "StoreUnavailable",
    "open_store",
]


class Store(Protocol):
    """Key/value state with expiry. Keys are full strings; the store adds its prefix.

    Every call raises `StoreUnavailable` when it cannot be served (except `ping`).
    """

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        """SET NX PX: True if this call stored the value (a lock taken)."""
        ...

    async def delete(self, *keys: str) -> int:
        """How many of the keys existed."""
        ...

    async def delete_if_equals(self, key: str, value: bytes) -> bool:
        """Delete the key only if it holds `value` (a lock released by its owner only)."""
        ...

    async def delete_matching(self, pattern: str) -> int:
        """Delete every key matching a Redis glob pattern; return how many were deleted."""
        ...

    async def ping(self) -> bool:
        """True when the store answers; never raises (for readiness checks)."""
        ...

    async def close(self) -> None: ...


def open_store(settings: StoreSettings) -> Store:
    """Redis (or a Redis Cluster) when `redis_url` is set, else the in-process store."""
    if settings.redis_url is None:
        return EmbeddedStore(settings)
    return RedisStore(settings)

"""What a store raises, so callers choose fail-open or fail-closed without knowing Redis.

StoreUnavailable                 Redis failed, timed out, or the breaker is open
├── StoreCommandError            Redis answered with an error: a bug, not an outage
├── LoopBusy (guard)             this process's loop, not Redis, was too busy to read a reply
└── _LayoutPending (redis)       a cluster's slot map is still being read
"""

from __future__ import annotations

__all__ = ["StoreCommandError", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """The store could not serve the call: Redis failed, timed out, or the breaker is open."""


class StoreCommandError(StoreUnavailable):
    """Redis answered, with an error (a Lua error, a wrong type): a bug, not an outage."""

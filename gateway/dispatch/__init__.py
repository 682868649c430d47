"""Getting one request answered: SLO admission, tier fallback, replica choice, retries,
hedging, and the answer handed back.

`settings` holds what the policy says, `admission` which tier takes a request now (or
its wait, or refusal), `race` the sends (first, retries, hedges, abandon), `books` what
each send and answer teach the balancer, and `answer` the dispatched
answer that is read or relayed, then finished.
"""

from __future__ import annotations

from gateway.dispatch.answer import Dispatched
from gateway.dispatch.race import Dispatcher, Sender
from gateway.dispatch.settings import SHED_CODES, DispatchSettings, TierRules

__all__ = ["SHED_CODES", "DispatchSettings", "Dispatched", "Dispatcher", "Sender", "TierRules"]

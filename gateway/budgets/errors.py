"""What the budget ledger raises: quota exceeded (429) and budget store unavailable (503).

TriageError (gateway.errors)
├── RateLimited                  429
│   └── QuotaExceeded            carries scope, tier, window, on_exhausted
│       ├── BudgetExceeded       type/code insufficient_quota (USD budgets)
│       └── RateLimitExceeded    type requests|tokens, code rate_limit_exceeded
└── BudgetStoreUnavailable       503 budget_store_unavailable (fail_closed)
"""

from __future__ import annotations

from typing import Literal

from gateway.errors import RateLimited, TriageError
from gateway.policy import OnExhausted

__all__ = [
    "BudgetExceeded",
    "BudgetStoreUnavailable",
    "QuotaExceeded",
    "RateLimitExceeded",
    "Scope",
]

# tenant: the tenant's own USD budget; tenant_tier: its budget on one tier; global_tier: the
# tier's budget across all tenants; rpm and tpm: the tenant's rate limits.
Scope = Literal["tenant", "tenant_tier", "global_tier", "rpm", "tpm"]


class QuotaExceeded(RateLimited):
    """A budget or rate limit would be exceeded; `on_exhausted` says downgrade or reject."""

    def __init__(
        self,
        message: str,
        *,
        scope: Scope,
        tier: str,
        window: str,
        on_exhausted: OnExhausted,
        retry_after: float,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.scope = scope
        self.tier = tier  # the tier the reservation was for
        self.window = window
        self.on_exhausted = on_exhausted

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, scope={self.scope!r}, tier={self.tier!r}, "
            f"window={self.window!r}, on_exhausted={self.on_exhausted!r})"
        )


class BudgetExceeded(QuotaExceeded):
    error_type = "insufficient_quota"  # what OpenAI sends for an exhausted quota
    default_code = "insufficient_quota"


class RateLimitExceeded(QuotaExceeded):
    default_code = "rate_limit_exceeded"

    @property
    def error_type(self) -> str:  # type: ignore[override]
        """OpenAI names the limit that was hit in `type`: "requests" or "tokens"."""
        return "requests" if self.scope == "rpm" else "tokens"


class BudgetStoreUnavailable(TriageError):
    """The shared budget store cannot be reached and the policy says `fail_closed`."""

    status_code = 503
    error_type = "api_error"
    default_code = "budget_store_unavailable"

"""Which limits apply to one (tenant, tier): the checks per ledger, built once from the policy.

Money is counted in integer nano-USD (1e-9 USD), so Redis and Python add exactly and no
float drift builds up over a month: $0.05 per million tokens is 50 nano-USD per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

from gateway.api.schemas import RequestKind
from gateway.budgets.errors import Scope
from gateway.budgets.windows import WINDOW_KINDS, Window, WindowKind
from gateway.policy import OnExhausted, Policy, Price, Tenant, WindowBudget

__all__ = [
    "NANO_PER_USD",
    "Check",
    "Kind",
    "LedgerChecks",
    "Plan",
    "build_plan",
    "cost_nano",
    "downgrade_order",
    "global_key",
    "tenant_key",
    "tier_price",
    "usage_checks",
    "usd_to_nano",
]

NANO_PER_USD = 1_000_000_000

# What a counter counts: u = nano-USD, t = tokens (both reserved, then settled), r = requests.
Kind = Literal["u", "t", "r"]


def usd_to_nano(usd: float) -> int:
    return round(usd * NANO_PER_USD)


def cost_nano(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """(prompt x input + completion x output) / 1e6 USD, in nano-USD; monotone in both counts."""
    return round(
        (prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok) * 1000
    )


def tier_price(policy: Policy, tier: str) -> Price:
    """The dearest price among a tier's models: safe to reserve with whichever model serves."""
    prices = [policy.models[model].price for model in policy.tiers[tier].models]
    return Price(
        input_per_mtok=max(p.input_per_mtok for p in prices),
        output_per_mtok=max(p.output_per_mtok for p in prices),
    )


def downgrade_order(policy: Policy, tier: str, kind: RequestKind) -> list[str]:
    """`tier`, then the cheaper tiers nearest first (the policy lists tiers cheapest first)
    that serve the request's endpoint."""
    names = list(policy.tiers)
    return [t for t in names[names.index(tier) :: -1] if kind in policy.tier_endpoints[t]]


def _safe(name: str) -> str:
    # Tenant and tier names come from YAML keys; braces would break the hash tag, and
    # spaces or newlines the Lua record format. Percent-encoding keeps names distinct.
    return quote(name, safe="._-")


def tenant_key(tenant: str) -> str:
    """The tenant's ledger; every key of it carries the tenant as Redis Cluster hash tag."""
    return f"bud:{{t:{_safe(tenant)}}}"


def global_key(tier: str) -> str:
    """A tier's ledger across all tenants: its own hash tag, so its own script call."""
    return f"bud:{{tier:{_safe(tier)}}}"


@dataclass(frozen=True, slots=True)
class Check:
    """One limit: `limit` is in nano-USD, tokens or requests per window of `window`."""

    scope: Scope
    kind: Kind
    window: WindowKind
    limit: int
    on_exhausted: OnExhausted
    tier: str | None = None  # set for per-tier budgets: the counter is the tier's

    def counter(self, window: Window) -> str:
        """The counter's name inside its ledger, e.g. `u:day:2026-11-27:large`."""
        return f"{self.kind}:{window.kind}:{window.stamp}:{_safe(self.tier) if self.tier else '*'}"

    @property
    def label(self) -> str:
        if self.kind == "u":
            return f"usd_per_{self.window}"
        return "rpm" if self.kind == "r" else "tpm"


@dataclass(frozen=True, slots=True)
class LedgerChecks:
    """The checks that one script call makes atomically, on one ledger (one hash tag)."""

    key: str
    checks: tuple[Check, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """Ledgers in the order they are reserved: the tenant's first, then the tier's global one."""

    ledgers: tuple[LedgerChecks, ...]


def _window_checks(budget: WindowBudget | None, scope: Scope, tier: str | None) -> list[Check]:
    if budget is None:
        return []
    caps = {
        "minute": budget.usd_per_minute,
        "hour": budget.usd_per_hour,
        "day": budget.usd_per_day,
        "month": budget.usd_per_month,
    }
    return [
        Check(scope, "u", kind, usd_to_nano(usd), budget.on_exhausted, tier)
        for kind in WINDOW_KINDS
        if (usd := caps[kind]) is not None
    ]


def _limit_checks(settings: Tenant) -> list[Check]:
    limits = settings.limits
    if limits is None:
        return []
    checks = []
    if limits.rpm is not None:
        checks.append(Check("rpm", "r", "minute", limits.rpm, limits.on_exceeded))
    if limits.tpm is not None:
        checks.append(Check("tpm", "t", "minute", limits.tpm, limits.on_exceeded))
    return checks


def build_plan(policy: Policy, tenant: str, settings: Tenant, tier: str) -> Plan:
    """Every limit on a request of `tenant` on `tier`; no ledgers at all means no store call."""
    checks: list[Check] = []
    budget = settings.budget
    if budget is not None:
        checks += _window_checks(budget, "tenant", None)
        checks += _window_checks(budget.tiers.get(tier), "tenant_tier", tier)
    checks += _limit_checks(settings)
    ledgers = [LedgerChecks(tenant_key(tenant), tuple(checks))] if checks else []
    shared = _window_checks(policy.budgets.tiers.get(tier), "global_tier", tier)
    if shared:
        ledgers.append(LedgerChecks(global_key(tier), tuple(shared)))
    return Plan(tuple(ledgers))


def usage_checks(policy: Policy, tenant: str, settings: Tenant) -> tuple[LedgerChecks, ...]:
    """Every limit that can apply to `tenant` on any tier, and every global tier budget."""
    checks: list[Check] = []
    budget = settings.budget
    if budget is not None:
        checks += _window_checks(budget, "tenant", None)
        for tier, tier_budget in budget.tiers.items():
            checks += _window_checks(tier_budget, "tenant_tier", tier)
    checks += _limit_checks(settings)
    ledgers = [LedgerChecks(tenant_key(tenant), tuple(checks))] if checks else []
    for tier, shared in policy.budgets.tiers.items():
        if found := _window_checks(shared, "global_tier", tier):
            ledgers.append(LedgerChecks(global_key(tier), tuple(found)))
    return tuple(ledgers)

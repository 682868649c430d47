"""Which tier and model serve a request: `Router.decide`, a pure function of request and policy.

Order: a concrete model name pins that model; a tier name pins that tier; for `auto`,
the `x-triage-tier` header, then the policy's rules (first match wins), then the
difficulty classifier's score against the policy's thresholds, then the default tier.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import NotFound
from gateway.policy import Policy

AUTO = "auto"
TIER_HEADER = "x-triage-tier"


class DifficultyScorer(Protocol):
    """What a difficulty classifier offers the router: P(the cheap tier is clearly worse)."""

    def score(self, request: Mapping[str, Any]) -> float: ...


@dataclass(frozen=True, slots=True)
class RouteInput:
    """What routing may look at: the requested name, the body, headers, a prompt-size estimate."""

    model: str
    body: Mapping[str, Any]
    headers: Mapping[str, str]
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen tier, and the (tier, model) pairs to try in order until one has a replica."""

    tier: str
    candidates: tuple[tuple[str, str], ...]
    reason: str
    difficulty: float | None = None

    @property
    def model(self) -> str:
        return self.candidates[0][1]

    def restricted_to(self, may_use: Callable[[str], bool]) -> Decision | None:
        """Only the candidates in tiers the caller may use; None if the chosen tier is not."""
        if not may_use(self.tier):
            return None
        candidates = tuple((tier, model) for tier, model in self.candidates if may_use(tier))
        return Decision(self.tier, candidates, self.reason, self.difficulty)


class Router:
    def __init__(
        self,
        policy: Policy,
        scorer: DifficultyScorer | None = None,
        thresholds: Mapping[str, float] | None = None,
    ) -> None:
        self.policy = policy
        self.scorer = scorer
        # Strongest tier first, so the first threshold the score reaches wins.
        order = list(policy.tiers)
        self.thresholds = sorted(
            (thresholds or {}).items(), key=lambda item: order.index(item[0]), reverse=True
        )

    def decide(self, route: RouteInput) -> Decision:
        policy = self.policy
        if route.model in policy.models:
            tier = policy.tier_of_model(route.model)
            return Decision(tier, ((tier, route.model),), "model")
        if route.model in policy.tiers:
            return Decision(route.model, self._tier_models(route.model), "tier")
        if route.model != AUTO:
            raise NotFound(
                f"The model '{route.model}' does not exist. Use 'auto', a tier "
                f"({', '.join(policy.tiers)}) or a model ({', '.join(policy.models)}).",
                param="model",
            )
        return self._route_auto(route)

    def _route_auto(self, route: RouteInput) -> Decision:
        pinned = route.headers.get(TIER_HEADER)
        if pinned is not None:
            if pinned not in self.policy.tiers:
                raise NotFound(
                    f"The tier '{pinned}' in {TIER_HEADER} does not exist "
                    f"({', '.join(self.policy.tiers)}).",
                    param=TIER_HEADER,
                    code="tier_not_found",
                )
            return self._with_fallback(pinned, "header")
        for index, rule in enumerate(self.policy.routing.rules):
            when = rule.when
            if when.header is not None and any(
                route.headers.get(name.lower()) != value for name, value in when.header.items()
            ):
                continue
            if (
                when.prompt_tokens_over is not None
                and route.prompt_tokens <= when.prompt_tokens_over
            ):
                continue
            return self._with_fallback(rule.tier, f"rule:{index}")
        if self.scorer is None:
            return self._with_fallback(self.policy.default_tier, "default")
        difficulty = self.scorer.score(route.body)
        tier = next(
            (name for name, threshold in self.thresholds if difficulty >= threshold),
            self.policy.default_tier,
        )
        decision = self._with_fallback(tier, "classifier")
        return Decision(decision.tier, decision.candidates, decision.reason, difficulty)

    def _tier_models(self, tier: str) -> tuple[tuple[str, str], ...]:
        return tuple((tier, model) for model in self.policy.tiers[tier].models)

    def downgraded(self, decision: Decision, tier: str) -> Decision:
        """The same request sent to a cheaper `tier` because a budget ran out."""
        moved = self._with_fallback(tier, "budget")
        return Decision(tier, moved.candidates, f"{decision.reason}+budget", decision.difficulty)

    def _with_fallback(self, tier: str, reason: str) -> Decision:
        candidates = self._tier_models(tier)
        for fallback in self.policy.routing.fallback.get(tier, ()):
            candidates += self._tier_models(fallback)
        return Decision(tier, candidates, reason)

"""Which tier and model serve a request: `Router.decide`, a pure function of request and policy.

Order: a concrete model name pins that model; a tier name pins that tier; for `auto`,
the `x-triage-tier` header, then the policy's rules (first match wins), then the
difficulty classifier's score against the policy's thresholds, then the default tier.
Only tiers and models that serve the request's endpoint (chat, completions, embeddings)
are ever chosen: a chat prompt never reaches a tier of embedding models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.api.hints import TIER_HEADER
from gateway.api.schemas import UPSTREAM_PATHS, RequestKind
from gateway.errors import NotFound
from gateway.policy import ENDPOINTS, GENERATION, Policy

__all__ = [
    "AUTO",
    "NOT_SERVED",
    "Decision",
    "DifficultyScorer",
    "RouteInput",
    "Router",
]

AUTO = "auto"
NOT_SERVED = "endpoint_not_served"  # the error code for a model or tier asked the wrong thing


class DifficultyScorer(Protocol):
    """What a difficulty classifier offers the router: P(the cheap tier is clearly worse)."""

    def score(self, request: Mapping[str, Any]) -> float: ...


@dataclass(frozen=True, slots=True)
class RouteInput:
    """What routing may look at: the requested name, the body, headers (for the policy's
    rules), a prompt-size estimate, the endpoint it came to, and the tier the client pinned
    (`x-triage-tier`, as `gateway.api.hints` read it)."""

    model: str
    body: Mapping[str, Any]
    headers: Mapping[str, str]
    prompt_tokens: int
    kind: RequestKind = "chat"
    tier: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen tier, and the (tier, model) pairs to try in order until one has a replica."""

    tier: str
    candidates: tuple[tuple[str, str], ...]
    reason: str
    difficulty: float | None = None
    kind: RequestKind = "chat"

    @property
    def model(self) -> str:
        return self.candidates[0][1]

    def restricted_to(self, may_use: Callable[[str], bool]) -> Decision | None:
        """Only the candidates in tiers the caller may use; None if the chosen tier is not."""
        if not may_use(self.tier):
            return None
        candidates = tuple((tier, model) for tier, model in self.candidates if may_use(tier))
        return Decision(self.tier, candidates, self.reason, self.difficulty, self.kind)


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
        policy, kind = self.policy, route.kind
        if policy.aliases:
            route = dataclasses.replace(route, model=policy.resolve_alias(route.model))
        if route.model in policy.models:
            served = policy.models[route.model].endpoints
            if kind not in served:
                raise self._not_served(f"The model '{route.model}'", served, kind, "model")
            tier = policy.tier_of_model(route.model)
            return Decision(tier, ((tier, route.model),), "model", kind=kind)
        if route.model in policy.tiers:
            self._check_serves(route.model, kind, f"The tier '{route.model}'", "model")
            return Decision(route.model, self._tier_models(route.model, kind), "tier", kind=kind)
        if route.model != AUTO:
            raise NotFound(
                f"The model '{route.model}' does not exist. Use 'auto', a tier "
                f"({', '.join(policy.tiers)}) or a model ({', '.join(policy.models)}).",
                param="model",
            )
        return self._route_auto(route)

    def _route_auto(self, route: RouteInput) -> Decision:
        kind, served = route.kind, self.policy.tier_endpoints
        pinned = route.tier
        if pinned is not None:
            if pinned not in self.policy.tiers:
                raise NotFound(
                    f"The tier '{pinned}' in {TIER_HEADER} does not exist "
                    f"({', '.join(self.policy.tiers)}).",
                    param=TIER_HEADER,
                    code="tier_not_found",
                )
            self._check_serves(pinned, kind, f"The tier '{pinned}' in {TIER_HEADER}", TIER_HEADER)
            return self._with_fallback(pinned, "header", kind)
        for index, rule in enumerate(self.policy.routing.rules):
            when = rule.when
            if kind not in served[rule.tier]:
                continue
            if when.header is not None and any(
                route.headers.get(name.lower()) != value for name, value in when.header.items()
            ):
                continue
            if (
                when.prompt_tokens_over is not None
                and route.prompt_tokens <= when.prompt_tokens_over
            ):
                continue
            return self._with_fallback(rule.tier, f"rule:{index}", kind)
        default = self._default_tier(kind)
        if self.scorer is None or kind not in GENERATION:
            return self._with_fallback(default, "default", kind)
        difficulty = self.scorer.score(route.body)
        tier = next(
            (
                name
                for name, threshold in self.thresholds
                if difficulty >= threshold and kind in served[name]
            ),
            default,
        )
        decision = self._with_fallback(tier, "classifier", kind)
        return Decision(decision.tier, decision.candidates, decision.reason, difficulty, kind)

    def _default_tier(self, kind: RequestKind) -> str:
        """The policy's default tier; for an endpoint it does not serve, the first that does."""
        default = self.policy.default_tier
        if kind in self.policy.tier_endpoints[default]:
            return default
        serving = self.policy.tiers_serving(kind)
        if not serving:
            raise NotFound(
                f"No tier serves {kind} ({_endpoint(kind)}).",
                param="model",
                code=NOT_SERVED,
            )
        return serving[0]

    def _tier_models(self, tier: str, kind: RequestKind) -> tuple[tuple[str, str], ...]:
        models = self.policy.models
        return tuple(
            (tier, m) for m in self.policy.tiers[tier].models if kind in models[m].endpoints
        )

    def downgraded(self, decision: Decision, tier: str) -> Decision:
        """The same request sent to a cheaper `tier` because a budget ran out."""
        moved = self._with_fallback(tier, "budget", decision.kind)
        return Decision(
            tier, moved.candidates, f"{decision.reason}+budget", decision.difficulty, decision.kind
        )

    def _with_fallback(self, tier: str, reason: str, kind: RequestKind) -> Decision:
        """The tier's models, then its fallbacks' (those of them that serve `kind`)."""
        candidates = self._tier_models(tier, kind)
        for fallback in self.policy.routing.fallback.get(tier, ()):
            candidates += self._tier_models(fallback, kind)
        return Decision(tier, candidates, reason, kind=kind)

    def _check_serves(self, tier: str, kind: RequestKind, subject: str, param: str) -> None:
        served = self.policy.tier_endpoints[tier]
        if kind not in served:
            raise self._not_served(subject, served, kind, param)

    def _not_served(
        self, subject: str, served: Collection[RequestKind], kind: RequestKind, param: str
    ) -> NotFound:
        """404, as OpenAI answers a chat request for an embedding model: what the name serves,
        and the tiers that serve this endpoint."""
        serving = self.policy.tiers_serving(kind)
        where = f"Tiers that serve {kind}: {', '.join(serving)}." if serving else "No tier does."
        return NotFound(
            f"{subject} serves {_listed(served)}, not {kind} ({_endpoint(kind)}). {where}",
            param=param,
            code=NOT_SERVED,
        )


def _endpoint(kind: RequestKind) -> str:
    return f"POST /v1{UPSTREAM_PATHS[kind]}"


def _listed(served: Collection[RequestKind]) -> str:
    return " and ".join(kind for kind in ENDPOINTS if kind in served)

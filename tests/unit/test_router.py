from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import NotFound
from gateway.policy import Policy, load_policy
from gateway.router import Decision, RouteInput, Router

ROOT = Path(__file__).resolve().parents[2]
SMALL, LARGE = "llama-3.1-8b-instruct", "llama-3.1-70b-instruct"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(ROOT / "policies/demo.yaml")


class FixedScorer:
    def __init__(self, value: float) -> None:
        self.value = value
        self.seen: list[Mapping[str, Any]] = []

    def score(self, request: Mapping[str, Any]) -> float:
        self.seen.append(request)
        return self.value


def decide(
    router: Router, model: str = "auto", headers: dict[str, str] | None = None, tokens: int = 10
) -> Decision:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return router.decide(RouteInput(model, body, headers or {}, tokens))


def test_concrete_model_is_pinned_without_fallback(policy: Policy) -> None:
    decision = decide(Router(policy), LARGE)
    assert (decision.tier, decision.candidates, decision.reason) == (
        "large",
        (("large", LARGE),),
        "model",
    )


def test_tier_name_pins_the_tier(policy: Policy) -> None:
    decision = decide(Router(policy), "large")
    assert decision.candidates == (("large", LARGE),)


def test_auto_goes_to_default_with_fallback(policy: Policy) -> None:
    decision = decide(Router(policy))
    assert decision.tier == "cheap"
    assert decision.candidates == (("cheap", SMALL), ("large", LARGE))
    assert decision.reason == "default"


def test_header_pins_tier(policy: Policy) -> None:
    assert decide(Router(policy), headers={"x-triage-tier": "large"}).tier == "large"


def test_unknown_header_tier_is_404(policy: Policy) -> None:
    with pytest.raises(NotFound, match="cheap, large"):
        decide(Router(policy), headers={"x-triage-tier": "medium"})


def test_prompt_size_rule(policy: Policy) -> None:
    router = Router(policy)
    assert decide(router, tokens=6000).tier == "cheap"
    decision = decide(router, tokens=6001)
    assert (decision.tier, decision.reason) == ("large", "rule:1")


def test_unknown_model_lists_valid_names(policy: Policy) -> None:
    with pytest.raises(NotFound) as info:
        decide(Router(policy), "gpt-4o")
    assert "'gpt-4o'" in info.value.message
    assert "cheap, large" in info.value.message and SMALL in info.value.message
    assert info.value.param == "model"


def test_classifier_thresholds_pick_tier(policy: Policy) -> None:
    hard = Router(policy, FixedScorer(0.7), {"large": 0.62})
    decision = decide(hard)
    assert (decision.tier, decision.reason, decision.difficulty) == ("large", "classifier", 0.7)
    easy = Router(policy, FixedScorer(0.61), {"large": 0.62})
    assert decide(easy).tier == "cheap"


def test_rules_win_over_classifier(policy: Policy) -> None:
    scorer = FixedScorer(0.0)
    router = Router(policy, scorer, {"large": 0.5})
    assert decide(router, headers={"x-triage-tier": "large"}).tier == "large"
    assert scorer.seen == []


def test_pinned_models_skip_the_classifier(policy: Policy) -> None:
    scorer = FixedScorer(1.0)
    assert decide(Router(policy, scorer, {"large": 0.5}), "cheap").tier == "cheap"
    assert scorer.seen == []

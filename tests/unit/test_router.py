from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.api.hints import read_hints
from gateway.api.schemas import RequestKind
from gateway.errors import NotFound
from gateway.policy import Policy, load_policy, parse_policy
from gateway.router import Decision, RouteInput, Router
from gateway.runtime import load_classifier

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
    headers = headers or {}
    return router.decide(RouteInput(model, body, headers, tokens, tier=read_hints(headers).tier))


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
        decide(Router(policy), "mistral-large")
    assert "'mistral-large'" in info.value.message
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


EMBED = "tiny-embed"


def policy_with(**tiers: list[str]) -> Policy:
    """The demo's models plus an embedding model, `tiers` replacing the demo's."""
    raw = yaml.safe_load((ROOT / "policies/demo.yaml").read_text())
    raw["models"][EMBED] = {"simulate": {"profile": "instant"}, "endpoints": ["embeddings"]}
    raw["tiers"] = {name: {"models": models} for name, models in tiers.items()}
    raw["routing"] = {"fallback": {"cheap": ["large"]}}
    return parse_policy(raw, {})


@pytest.fixture(scope="module")
def embed_last() -> Policy:
    return policy_with(cheap=[SMALL], large=[LARGE], embed=[EMBED])


def ask(
    router: Router,
    model: str = "auto",
    kind: RequestKind = "chat",
    headers: dict[str, str] | None = None,
    tokens: int = 10,
) -> Decision:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    headers = headers or {}
    return router.decide(RouteInput(model, body, headers, tokens, kind, read_hints(headers).tier))


def test_thresholds_skip_tiers_that_do_not_serve_chat(embed_last: Policy) -> None:
    """Defect: a classifier threshold on an embeddings tier sent chat prompts there."""
    router = Router(embed_last, FixedScorer(0.3), {"embed": 0.2386, "large": 0.6})
    decision = ask(router)
    assert (decision.tier, decision.candidates) == ("cheap", (("cheap", SMALL), ("large", LARGE)))
    assert ask(Router(embed_last, FixedScorer(0.7), {"embed": 0.2, "large": 0.6})).tier == "large"


def test_strong_fraction_calibrates_the_last_chat_tier(embed_last: Policy) -> None:
    """The threshold `strong_fraction` yields is for the strongest tier that serves chat."""
    raw = yaml.safe_load((ROOT / "policies/demo.yaml").read_text())
    raw["models"][EMBED] = {"simulate": {"profile": "instant"}, "endpoints": ["embeddings"]}
    raw["tiers"]["embed"] = {"models": [EMBED]}
    policy = parse_policy(raw, {}, base_dir=ROOT)
    _, thresholds = load_classifier(policy, ROOT)
    assert list(thresholds) == ["large"]


def test_a_model_asked_for_an_endpoint_it_does_not_serve_is_404(embed_last: Policy) -> None:
    with pytest.raises(NotFound) as info:
        ask(Router(embed_last), EMBED)
    assert info.value.message == (
        "The model 'tiny-embed' serves embeddings, not chat (POST /v1/chat/completions). "
        "Tiers that serve chat: cheap, large."
    )
    assert (info.value.param, info.value.code) == ("model", "endpoint_not_served")
    with pytest.raises(NotFound) as info:
        ask(Router(embed_last), SMALL, "embeddings")
    assert info.value.message == (
        "The model 'llama-3.1-8b-instruct' serves chat and completions, not embeddings "
        "(POST /v1/embeddings). Tiers that serve embeddings: embed."
    )


def test_a_tier_asked_for_an_endpoint_it_does_not_serve_is_404(embed_last: Policy) -> None:
    with pytest.raises(NotFound) as info:
        ask(Router(embed_last), "embed")
    assert info.value.message == (
        "The tier 'embed' serves embeddings, not chat (POST /v1/chat/completions). "
        "Tiers that serve chat: cheap, large."
    )
    assert info.value.param == "model"
    with pytest.raises(NotFound) as info:
        ask(Router(embed_last), headers={"x-triage-tier": "embed"})
    assert info.value.message.startswith("The tier 'embed' in x-triage-tier serves embeddings")
    assert info.value.param == "x-triage-tier"


def test_embeddings_go_to_the_tier_and_model_that_serve_them(embed_last: Policy) -> None:
    router = Router(embed_last)
    for name in ("embed", EMBED):
        decision = ask(router, name, "embeddings")
        assert (decision.tier, decision.candidates, decision.kind) == (
            "embed",
            (("embed", EMBED),),
            "embeddings",
        )


def test_candidates_and_fallbacks_only_include_models_that_serve_the_endpoint() -> None:
    policy = policy_with(cheap=[SMALL, EMBED], large=[LARGE], embed=[EMBED])
    router = Router(policy)
    assert ask(router).candidates == (("cheap", SMALL), ("large", LARGE))
    assert ask(router, kind="embeddings").candidates == (("cheap", EMBED),)
    assert ask(router, "cheap", "embeddings").candidates == (("cheap", EMBED),)


def test_rules_for_tiers_that_do_not_serve_the_endpoint_are_skipped() -> None:
    raw = yaml.safe_load((ROOT / "policies/demo.yaml").read_text())
    raw["models"][LARGE]["endpoints"] = ["chat"]
    del raw["routing"]["classifier"], raw["routing"]["strong_fraction"]
    router = Router(parse_policy(raw, {}))
    chat = ask(router, tokens=6001)
    assert (chat.tier, chat.reason) == ("large", "rule:1")
    completion = ask(router, kind="completions", tokens=6001)
    assert (completion.tier, completion.reason, completion.candidates) == (
        "cheap",
        "default",
        (("cheap", SMALL),),
    )


def test_auto_finds_a_tier_for_an_endpoint_the_default_does_not_serve() -> None:
    raw = yaml.safe_load((ROOT / "policies/demo.yaml").read_text())
    raw["models"][SMALL]["endpoints"] = ["chat"]
    del raw["routing"]["classifier"], raw["routing"]["strong_fraction"]
    router = Router(parse_policy(raw, {}))
    assert ask(router, kind="completions").candidates == (("large", LARGE),)
    raw["models"][LARGE]["endpoints"] = ["chat"]
    router = Router(parse_policy(raw, {}))
    with pytest.raises(NotFound, match=r"^No tier serves completions \(POST /v1/completions\)\.$"):
        ask(router, kind="completions")
    with pytest.raises(NotFound) as info:
        ask(router, "cheap", "completions")
    assert info.value.message == (
        "The tier 'cheap' serves chat, not completions (POST /v1/completions). No tier does."
    )


def test_budget_downgrades_keep_the_endpoint() -> None:
    policy = policy_with(cheap=[SMALL, EMBED], large=[LARGE])
    router = Router(policy)
    decision = ask(router, "large", "completions")
    moved = router.downgraded(decision, "cheap")
    assert moved.kind == "completions"
    assert moved.candidates == (("cheap", SMALL), ("large", LARGE))
    restricted = moved.restricted_to(lambda tier: True)
    assert restricted is not None and restricted.kind == "completions"


def test_an_alias_routes_as_its_target() -> None:
    raw = yaml.safe_load((ROOT / "policies/demo.yaml").read_text())
    raw["aliases"] = {"claude-*": "large", "gpt-5": "auto"}
    router = Router(parse_policy(raw, {}))
    assert decide(router, "claude-sonnet-4-5").candidates == (("large", LARGE),)
    assert decide(router, "gpt-5").tier == "cheap"  # auto: the default tier
    with pytest.raises(NotFound):
        decide(router, "gemini-3")  # neither an alias nor a name the policy knows

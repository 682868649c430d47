from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.policy import PolicyError, hash_key, load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]


def demo() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load((ROOT / "policies/demo.yaml").read_text())
    return raw


def errors_of(raw: Any, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(raw, environ or {})
    return info.value.errors


def test_shipped_policies_load() -> None:
    policy = load_policy(ROOT / "policies/demo.yaml")
    assert list(policy.tiers) == ["cheap", "large"]
    assert policy.default_tier == "cheap"
    env = {
        "REDIS_URL": "redis://localhost:6379/0",
        "LARGE_POOL_KEY": "k",
        "ADMIN_KEY_HASH": hash_key("a"),
    }
    load_policy(ROOT / "policies/production.example.yaml", env)


def test_structural_errors_are_reported_together_with_paths() -> None:
    raw = demo()
    raw["tiers"]["large"]["slo"]["ttft_ms"] = 0
    raw["tiers"]["large"]["modls"] = ["x"]
    raw["models"]["extra"] = {"replicas": ["ftp://nope"]}
    raw["server"] = {"max_body_bytes": -1}
    assert sorted(errors_of(raw)) == [
        "models.extra.replicas: must be http(s) base URLs like http://host:8000/v1, got 'ftp://nope'",
        "server.max_body_bytes: must be > 0",
        "tiers.large.modls: unknown key",
        "tiers.large.slo.ttft_ms: must be > 0",
    ]


def test_reference_errors_name_the_path() -> None:
    raw = demo()
    raw["tiers"]["large"]["models"] = ["gpt-9"]
    raw["routing"]["fallback"]["cheap"] = ["huge"]
    raw["routing"]["rules"][0]["tier"] = "medium"
    raw["routing"]["default_tier"] = "tiny"
    assert errors_of(raw) == [
        "tiers.large.models.0: unknown model 'gpt-9'",
        "models.llama-3.1-70b-instruct: in no tier; add it to a tier's models or remove it",
        "routing.default_tier: unknown tier 'tiny' (cheap, large)",
        "routing.rules.0.tier: unknown tier 'medium' (cheap, large)",
        "routing.fallback.cheap.0: unknown tier 'huge'",
    ]


def test_model_needs_exactly_one_source() -> None:
    raw = demo()
    raw["models"]["llama-3.1-8b-instruct"]["replicas"] = ["http://a:1/v1"]
    assert errors_of(raw) == [
        "models.llama-3.1-8b-instruct: give exactly one of `replicas` (URLs) or `simulate`"
    ]


def test_reserved_and_clashing_names() -> None:
    raw = demo()
    raw["models"]["auto"] = {"replicas": ["http://a:1/v1"]}
    raw["models"]["cheap"] = {"replicas": ["http://a:1/v1"]}
    raw["tiers"]["cheap"]["models"] += ["auto", "cheap"]
    assert errors_of(raw) == [
        "models.auto: name is reserved or used by a tier",
        "models.cheap: name is reserved or used by a tier",
    ]


def test_classifier_settings_are_checked() -> None:
    raw = demo()
    del raw["routing"]["classifier"]
    raw["routing"]["strong_fraction"] = 0.3
    raw["routing"]["thresholds"] = {"large": 1.5}
    assert errors_of(raw) == [
        "routing: give `thresholds` or `strong_fraction`, not both",
        "routing.thresholds.large: must be between 0 and 1",
        "routing.classifier: required when `thresholds` or `strong_fraction` is set",
    ]


def test_classifier_needs_a_model_directory() -> None:
    raw = demo()
    raw["routing"]["classifier"] = "classifiers/models/missing"
    assert errors_of(raw) == [
        "routing.classifier: no model directory at 'classifiers/models/missing'"
    ]


def test_environment_substitution() -> None:
    raw = demo()
    raw["models"]["llama-3.1-8b-instruct"]["api_key"] = "${POOL_KEY}"
    raw["server"] = {"upstream_timeout_s": "${TIMEOUT:-30}"}
    policy = parse_policy(raw, {"POOL_KEY": "secret"})
    assert policy.models["llama-3.1-8b-instruct"].api_key == "secret"
    assert policy.server.upstream_timeout_s == 30
    assert "secret" not in repr(policy)


def test_unset_variable_names_variable_and_path() -> None:
    raw = demo()
    raw["models"]["llama-3.1-8b-instruct"]["api_key"] = "${POOL_KEY}"
    assert errors_of(raw) == [
        "models.llama-3.1-8b-instruct.api_key: "
        "environment variable POOL_KEY is not set (no default)"
    ]


def test_empty_default_means_unset() -> None:
    raw = demo()
    raw["server"] = {"admin_key": "${ADMIN:-}"}
    assert parse_policy(raw, {}).server.admin_key is None


def test_admin_key_must_be_a_hash() -> None:
    raw = demo()
    raw["server"] = {"admin_key": "plaintext"}
    assert errors_of(raw) == [
        "server.admin_key: must be a key hash `sha256:<64 hex>` (see `triage key new`)"
    ]


def test_policy_is_immutable() -> None:
    policy = parse_policy(demo(), {})
    with pytest.raises(ValueError):
        policy.server.max_body_bytes = 1  # type: ignore[misc]


def test_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: [1\n")
    with pytest.raises(PolicyError) as info:
        load_policy(bad)
    assert info.value.errors[0].startswith("<yaml>:")
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "missing.yaml")
    assert info.value.errors[0].startswith("<file>: cannot read")


SMALL, LARGE = "llama-3.1-8b-instruct", "llama-3.1-70b-instruct"


def with_embed_tier(raw: dict[str, Any]) -> dict[str, Any]:
    """The demo with a tier of embedding models declared last, after the strongest chat tier."""
    raw["models"]["tiny-embed"] = {"simulate": {"profile": "instant"}, "endpoints": ["embeddings"]}
    raw["tiers"]["embed"] = {"models": ["tiny-embed"]}
    return raw


def test_a_model_in_no_tier_is_rejected() -> None:
    """It would be listed by /v1/models, and every request for it had nowhere to go (a 500)."""
    raw = demo()
    raw["models"]["spare"] = {"replicas": ["http://a:1/v1"]}
    assert errors_of(raw) == ["models.spare: in no tier; add it to a tier's models or remove it"]


def test_every_model_has_a_tier() -> None:
    policy = parse_policy(with_embed_tier(demo()), {})
    assert {m: policy.tier_of_model(m) for m in policy.models} == {
        SMALL: "cheap",
        LARGE: "large",
        "tiny-embed": "embed",
    }


def test_endpoints_default_to_chat_and_completions_and_are_strict() -> None:
    policy = parse_policy(with_embed_tier(demo()), {})
    assert policy.models[SMALL].endpoints == ("chat", "completions")
    assert policy.tier_endpoints == {
        "cheap": {"chat", "completions"},
        "large": {"chat", "completions"},
        "embed": {"embeddings"},
    }
    for value, error in [
        (
            ["chat", "embedding"],
            "endpoints.1: must be one of 'chat', 'completions' or 'embeddings'",
        ),
        (["chat", "chat"], "endpoints: 'chat' is listed twice"),
        ([], "endpoints: must name at least one of chat, completions, embeddings"),
        ("embeddings", "endpoints: must be a list, like [chat, completions] or [embeddings]"),
    ]:
        raw = demo()
        raw["models"][SMALL]["endpoints"] = value
        raw["models"][SMALL].pop("simulate")
        raw["models"][SMALL]["replicas"] = ["http://a:1/v1"]
        assert errors_of(raw) == [f"models.{SMALL}.{error}"]


def test_a_tier_serves_what_any_of_its_models_serves() -> None:
    raw = with_embed_tier(demo())
    raw["tiers"]["cheap"]["models"].append("tiny-embed")
    policy = parse_policy(raw, {})
    assert policy.tier_endpoints["cheap"] == {"chat", "completions", "embeddings"}
    assert policy.tiers_serving("embeddings") == ("cheap", "embed")
    assert policy.tiers_serving("chat") == ("cheap", "large")


def test_strong_fraction_goes_to_the_last_tier_that_serves_chat() -> None:
    """Defect: with an embeddings tier declared last, `strong_fraction` sent chat there."""
    policy = parse_policy(with_embed_tier(demo()), {})
    assert (policy.default_tier, policy.strongest_tier) == ("cheap", "large")


def test_the_implicit_default_tier_is_the_first_that_serves_chat() -> None:
    raw = demo()
    raw["models"]["tiny-embed"] = {"simulate": {"profile": "instant"}, "endpoints": ["embeddings"]}
    raw["tiers"] = {"embed": {"models": ["tiny-embed"]}, **raw["tiers"]}
    del raw["routing"]["default_tier"]
    assert parse_policy(raw, {}).default_tier == "cheap"


def test_routing_to_tiers_that_cannot_serve_it_is_an_error() -> None:
    raw = with_embed_tier(demo())
    raw["routing"]["default_tier"] = "embed"
    raw["routing"]["rules"][1]["tier"] = "embed"
    raw["routing"]["fallback"]["cheap"] = ["large", "embed"]
    raw["routing"]["fallback"]["embed"] = ["large"]
    del raw["routing"]["strong_fraction"]
    raw["routing"]["thresholds"] = {"large": 0.6, "embed": 0.2}
    assert errors_of(raw) == [
        "routing.default_tier: tier 'embed' does not serve chat (tiers that do: cheap, large)",
        "routing.rules.1.tier: tier 'embed' serves neither chat nor completions, "
        "the requests rules route",
        "routing.fallback.cheap.1: tier 'embed' serves nothing tier 'cheap' serves "
        "(embed: embeddings; cheap: chat, completions)",
        "routing.fallback.embed.0: tier 'large' serves nothing tier 'embed' serves "
        "(large: chat, completions; embed: embeddings)",
        "routing.thresholds.embed: tier 'embed' serves neither chat nor completions, "
        "the requests the classifier routes",
    ]


def test_strong_fraction_needs_two_tiers_that_serve_chat() -> None:
    raw = with_embed_tier(demo())
    del raw["tiers"]["large"]
    del raw["models"][LARGE]
    raw["routing"]["rules"] = []
    raw["routing"]["fallback"] = {}
    assert errors_of(raw) == [
        "routing.strong_fraction: needs a second tier that serves chat (only cheap does)"
    ]


def test_some_tier_must_serve_chat() -> None:
    raw = {
        "version": 1,
        "models": {"tiny-embed": {"replicas": ["http://a:1/v1"], "endpoints": ["embeddings"]}},
        "tiers": {"embed": {"models": ["tiny-embed"]}},
    }
    assert errors_of(raw) == ["tiers: no tier serves chat; `auto` needs one to send chat to"]


def test_aliases_resolve_exact_names_first_then_patterns_in_order() -> None:
    raw = demo()
    tiers = list(raw["tiers"])
    raw["aliases"] = {
        "claude-haiku-*": tiers[0],
        "claude-*": "auto",
        "claude-opus-4": tiers[-1],
    }
    policy = parse_policy(raw, {})
    assert policy.resolve_alias("claude-opus-4") == tiers[-1]  # exact beats the patterns
    assert policy.resolve_alias("claude-haiku-4-5-20251001") == tiers[0]  # first pattern
    assert policy.resolve_alias("claude-sonnet-4-5") == "auto"
    assert policy.resolve_alias("gpt-5") == "gpt-5"  # no alias: the name itself
    assert policy.resolve_alias("xclaude-1") == "xclaude-1"  # patterns match whole names


def test_alias_targets_and_names_are_checked() -> None:
    raw = demo()
    model = next(iter(raw["models"]))
    raw["aliases"] = {"claude-*": "no-such-tier", model: "auto", "auto": "auto"}
    errors = errors_of(raw)
    assert any(e.startswith("aliases.claude-*: unknown target 'no-such-tier'") for e in errors)
    assert f"aliases.{model}: already names a model, a tier or 'auto'" in errors
    assert "aliases.auto: already names a model, a tier or 'auto'" in errors

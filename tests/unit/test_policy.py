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

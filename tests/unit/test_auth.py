"""API key -> tenant: keys looked up by their hash, anonymous callers, tier restrictions."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.auth import ANONYMOUS, Authenticator, Caller, tier_forbidden
from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.policy import Policy, hash_key, parse_policy

KEYS = {"team-a": "sk-team-a-0123456789", "team-b": "sk-team-b-9876543210"}
SPARE = "sk-team-a-second-key"


def policy_with(tenants: dict[str, Any] | None = None, **sections: Any) -> Policy:
    raw: dict[str, Any] = {
        "version": 1,
        "models": {
            "small": {"replicas": ["http://s:1/v1"]},
            "big": {"replicas": ["http://l:1/v1"]},
        },
        "tiers": {"cheap": {"models": ["small"]}, "large": {"models": ["big"]}},
        "tenants": tenants if tenants is not None else {},
        **sections,
    }
    return parse_policy(raw)


def two_tenants(**sections: Any) -> Policy:
    return policy_with(
        {
            "team-a": {"keys": [hash_key(KEYS["team-a"]), hash_key(SPARE)], "priority": "critical"},
            "team-b": {"keys": [hash_key(KEYS["team-b"])], "tiers": ["cheap"]},
        },
        **sections,
    )


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def refused(authenticator: Authenticator, headers: dict[str, str]) -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed) as caught:
        authenticator.authenticate(headers)
    assert caught.value.status_code == 401
    return caught.value


# --- keys ---------------------------------------------------------------------------------


def test_each_key_finds_its_own_tenant_and_settings() -> None:
    authenticator = Authenticator(two_tenants())
    a = authenticator.authenticate(bearer(KEYS["team-a"]))
    b = authenticator.authenticate(bearer(KEYS["team-b"]))
    assert (a.tenant, a.settings.priority) == ("team-a", "critical")
    assert (b.tenant, b.settings.tiers) == ("team-b", ("cheap",))
    assert authenticator.authenticate(bearer(SPARE)).tenant == "team-a"  # a second key


def test_the_scheme_is_case_insensitive_and_the_key_is_trimmed() -> None:
    authenticator = Authenticator(two_tenants())
    for header in (f"bearer {KEYS['team-a']}", f"BEARER {KEYS['team-a']}  "):
        assert authenticator.authenticate({"authorization": header}).tenant == "team-a"


def test_keys_differing_in_case_or_one_character_are_other_keys() -> None:
    authenticator = Authenticator(two_tenants())
    key = KEYS["team-a"]
    for variant in (key.upper(), key + "x", key[:-1], key.replace("-", "_"), ""):
        assert refused(authenticator, bearer(variant)).code == "invalid_api_key"


def test_presenting_the_stored_hash_is_not_a_key() -> None:
    authenticator = Authenticator(two_tenants())
    stored = hash_key(KEYS["team-a"])
    for presented in (stored, stored.removeprefix("sha256:")):
        assert refused(authenticator, bearer(presented)).code == "invalid_api_key"


def test_only_the_bearer_scheme_carries_a_key() -> None:
    authenticator = Authenticator(two_tenants())
    for header in (f"Basic {KEYS['team-a']}", KEYS["team-a"], f"Token {KEYS['team-a']}"):
        error = refused(authenticator, {"authorization": header})
        assert (error.code, error.message) == ("invalid_api_key", "Incorrect API key provided.")


def test_x_api_key_carries_the_same_key_and_authorization_wins() -> None:
    """The Anthropic SDKs send `x-api-key`: it maps to the same tenant as the Bearer key;
    when both are sent, `Authorization` is the one read."""
    required = Authenticator(two_tenants(auth={"anonymous": None}))
    assert required.authenticate({"x-api-key": KEYS["team-a"]}).tenant == "team-a"
    both = {"x-api-key": KEYS["team-b"], **bearer(KEYS["team-a"])}
    assert required.authenticate(both).tenant == "team-a"
    assert refused(required, {"x-api-key": "sk-wrong"}).code == "invalid_api_key"
    assert refused(required, {"x-api-key": ""}).code == "missing_api_key"


# --- anonymous callers --------------------------------------------------------------------


def test_without_a_key_the_caller_is_anonymous_by_default() -> None:
    caller = Authenticator(two_tenants()).authenticate({})
    assert caller.tenant == ANONYMOUS == "anonymous"
    assert (caller.settings.keys, caller.settings.tiers) == ((), None)


def test_the_anonymous_tenants_settings_come_from_the_policy() -> None:
    policy = two_tenants(auth={"anonymous": {"tiers": ["cheap"], "priority": "sheddable"}})
    caller = Authenticator(policy).authenticate({"authorization": ""})  # empty: no key
    assert (caller.tenant, caller.settings.tiers) == (ANONYMOUS, ("cheap",))
    assert caller.settings.priority == "sheddable"


def test_anonymous_null_requires_a_key() -> None:
    authenticator = Authenticator(two_tenants(auth={"anonymous": None}))
    error = refused(authenticator, {})
    assert error.code == "missing_api_key"
    expected = "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
    assert error.message == expected
    assert authenticator.authenticate(bearer(KEYS["team-b"])).tenant == "team-b"


def test_a_wrong_key_is_refused_even_when_anonymous_callers_are_allowed() -> None:
    """Once tenants have keys, a key that matches none is an error, not anonymity."""
    authenticator = Authenticator(two_tenants())
    assert refused(authenticator, bearer("sk-not-a-key")).code == "invalid_api_key"


def test_with_no_tenants_keys_are_not_checked_at_all() -> None:
    authenticator = Authenticator(policy_with())
    assert authenticator.authenticate(bearer("sk-anything")).tenant == ANONYMOUS
    assert authenticator.authenticate({}).tenant == ANONYMOUS
    closed = Authenticator(policy_with(auth={"anonymous": None}))
    assert refused(closed, bearer("sk-anything")).code == "invalid_api_key"


# --- what a caller may do -----------------------------------------------------------------


def test_tier_restrictions() -> None:
    policy = two_tenants()
    a = Caller("team-a", policy.tenants["team-a"])
    b = Caller("team-b", policy.tenants["team-b"])
    assert a.may_use("cheap") and a.may_use("large")  # no list: every tier
    assert b.may_use("cheap") and not b.may_use("large")


def test_a_forbidden_tier_is_a_403_that_lists_the_allowed_ones() -> None:
    policy = policy_with({"narrow": {"keys": [hash_key("sk-n")], "tiers": ["cheap", "large"]}})
    error = tier_forbidden(Caller("narrow", policy.tenants["narrow"]), "premium")
    assert isinstance(error, PermissionDenied)
    assert (error.status_code, error.code) == (403, "tier_not_allowed")
    assert error.message == "Tenant 'narrow' may not use tier 'premium' (allowed: cheap, large)."


def test_the_cache_scope_is_the_tenant_unless_shared() -> None:
    policy = policy_with(
        {
            "solo": {"keys": [hash_key("sk-solo")]},
            "shared-1": {"keys": [hash_key("sk-s1")], "cache_scope": "org"},
        }
    )
    assert Caller("solo", policy.tenants["solo"]).cache_scope == "solo"
    assert Caller("shared-1", policy.tenants["shared-1"]).cache_scope == "org"

from __future__ import annotations

import random
import re
from typing import Any

import orjson
import pytest

from gateway.cache.plan import (
    IGNORED_FIELDS,
    CachePlan,
    CacheStatus,
    cache_key,
    invalidation_pattern,
    make_plan,
)
from gateway.policy import CacheSettings, TierCache
from gateway.store.embedded import _glob_regex

BODY: dict[str, Any] = {
    "model": "auto",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ],
    "temperature": 0,
    "top_p": 1,
    "max_tokens": 64,
    "stop": ["\n"],
    "seed": 7,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "response_format": {"type": "json_object"},
    "logprobs": True,
    "top_logprobs": 2,
}


def key(body: dict[str, Any], scope: str = "team-a", model: str = "llama-8b") -> str:
    return cache_key(scope, model, "chat", body)


def shuffled(value: Any, rng: random.Random) -> Any:
    """The same JSON with every object's keys in a random order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    return value


# --- the key ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_key_ignores_key_order_at_every_depth(seed: int) -> None:
    assert key(shuffled(BODY, random.Random(seed))) == key(BODY)


def test_key_ignores_whitespace_of_the_wire_json() -> None:
    compact = orjson.loads(orjson.dumps(BODY))
    spaced = orjson.loads(orjson.dumps(BODY, option=orjson.OPT_INDENT_2).replace(b":", b" : "))
    assert key(compact) == key(spaced) == key(BODY)


def test_key_ignores_integral_float_spelling_of_top_level_numbers() -> None:
    assert key({**BODY, "temperature": 0.0, "top_p": 1.0}) == key(BODY)
    assert key({**BODY, "temperature": 0.5}) != key(BODY)


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [*BODY["messages"], {"role": "assistant", "content": "Hello"}]},
        {"temperature": 0.7},
        {"top_p": 0.9},
        {"max_tokens": 65},
        {"stop": ["\n\n"]},
        {"seed": 8},
        {"tools": []},
        {"tool_choice": "required"},
        {"response_format": {"type": "text"}},
        {"logprobs": False},
        {"top_logprobs": 3},
        {"n": 2},
        {"presence_penalty": 0.1},
        {"logit_bias": {"42": 1}},
        {"some_backend_extension": True},  # unknown fields may change the answer
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_meaningful_field_changes_the_key(change: dict[str, Any]) -> None:
    assert key({**BODY, **change}) != key(BODY)


def test_a_removed_field_changes_the_key() -> None:
    without = {k: v for k, v in BODY.items() if k != "stop"}
    assert key(without) != key(BODY)


def test_bool_is_not_a_number() -> None:
    assert key({**BODY, "logprobs": 1}) != key({**BODY, "logprobs": True})


@pytest.mark.parametrize(
    "change",
    [
        {"model": "tier-large"},
        {"stream": True},
        {"stream_options": {"include_usage": True}},
        {"user": "someone"},
        {"metadata": {"trace": "x"}},
        {"store": True},
    ],
    ids=lambda change: next(iter(change)),
)
def test_fields_that_cannot_change_the_answer_do_not_change_the_key(
    change: dict[str, Any],
) -> None:
    assert set(change) <= IGNORED_FIELDS
    assert key({**BODY, **change}) == key(BODY)


def test_scope_model_and_kind_separate_keys() -> None:
    base = key(BODY)
    assert key(BODY, scope="team-b") != base
    assert key(BODY, model="llama-70b") != base
    assert cache_key("team-a", "llama-8b", "completions", BODY) != base
    # no way to make two different (scope, model) pairs collide by moving a separator
    assert key(BODY, scope="a:b", model="c") != key(BODY, scope="a", model="b:c")


def test_key_layout_is_cluster_and_glob_safe() -> None:
    weird = key(BODY, scope="t{e}a*m:[x]?\\ %", model="org/model:v1")
    match = re.fullmatch(r"cache:([^:{}]*):([^:{}]*):\{([0-9a-f]{64})\}", weird)
    assert match is not None, weird
    assert not set(match.group(1) + match.group(2)) & set("*?[]\\{}:")
    plan = CachePlan("chat", "m", weird, lookup=True, store=True, ttl_s=1)
    # the single-flight lock shares the entry's hash tag, so its cluster slot
    assert plan.lock_key.startswith(weird) and plan.lock_key.count("{") == 1


# --- invalidation patterns -------------------------------------------------------


def matches(pattern: str, candidate: str) -> bool:
    return _glob_regex(pattern).fullmatch(candidate) is not None


def test_invalidation_selects_by_scope_model_or_both() -> None:
    scopes, models = ["team-a", "team-a:x", "team*"], ["m1", "m1:v2", "m*"]
    entries = {(s, m): key(BODY, scope=s, model=m) for s in scopes for m in models}
    for scope in [None, *scopes]:
        for model in [None, *models]:
            pattern = invalidation_pattern(scope, model)
            selected = {sm for sm, k in entries.items() if matches(pattern, k)}
            expected = {(s, m) for s, m in entries if scope in (None, s) and model in (None, m)}
            assert selected == expected, (scope, model)


def test_invalidation_leaves_single_flight_locks_alone() -> None:
    entry = key(BODY)
    assert not matches(invalidation_pattern(None, None), entry + ":lock")
    assert matches(invalidation_pattern(None, None), entry)


# --- the plan ----------------------------------------------------------------------


def plan(
    settings: CacheSettings | None = None,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    tier: str = "cheap",
    kind: Any = "chat",
) -> CachePlan:
    return make_plan(
        settings or CacheSettings(),
        scope="team-a",
        tier=tier,
        model="llama-8b",
        kind=kind,
        body=BODY if body is None else body,
        headers=headers or {},
    )


def test_deterministic_request_is_looked_up_and_stored() -> None:
    got = plan()
    assert (got.lookup, got.store, got.ttl_s, got.reason) == (True, True, 3600.0, None)
    assert got.key == key(BODY)
    assert got.status is CacheStatus.MISS


@pytest.mark.parametrize(
    ("headers", "lookup", "store"),
    [
        ({"cache-control": "no-cache"}, False, True),
        ({"cache-control": "max-age=0, No-Store"}, True, False),
        ({"x-triage-cache": "bypass"}, False, True),
        ({"x-triage-cache": "BYPASS", "cache-control": "no-store"}, False, False),
        ({"cache-control": "no-cache, no-store"}, False, False),
        ({"cache-control": "max-age=60"}, True, True),
    ],
)
def test_client_headers(headers: dict[str, str], lookup: bool, store: bool) -> None:
    got = plan(headers=headers)
    assert (got.lookup, got.store) == (lookup, store)
    assert got.status is (CacheStatus.MISS if lookup else CacheStatus.BYPASS)
    assert (got.reason is None) == (lookup and store)


@pytest.mark.parametrize(
    ("change", "cacheable"),
    [
        ({"temperature": None}, False),
        ({"temperature": 0.2}, False),
        ({"temperature": False}, False),
        ({"temperature": 0.0}, True),
    ],
)
def test_only_temperature_zero_is_deterministic(change: dict[str, Any], cacheable: bool) -> None:
    body = {k: v for k, v in {**BODY, **change}.items() if v is not None}
    got = plan(body=body)
    assert (got.lookup, got.store) == (cacheable, cacheable)
    if not cacheable:
        assert got.status is CacheStatus.BYPASS
        assert got.reason == "not deterministic: needs temperature 0"


def test_seed_counts_only_when_the_policy_says_so() -> None:
    seeded = {**BODY, "temperature": 0.8, "seed": 1}
    assert not plan(body=seeded).lookup
    assert plan(CacheSettings(cache_seeded=True), body=seeded).lookup
    unseeded = {k: v for k, v in seeded.items() if k != "seed"}
    assert plan(CacheSettings(cache_seeded=True), body=unseeded).reason == (
        "not deterministic: needs temperature 0 or a seed"
    )


def test_deterministic_only_off_caches_sampled_requests() -> None:
    assert plan(CacheSettings(deterministic_only=False), body={**BODY, "temperature": 1}).lookup


def test_n_above_one_is_never_cached() -> None:
    got = plan(CacheSettings(deterministic_only=False), body={**BODY, "n": 2})
    assert not got.lookup and got.reason == "n > 1 is not cached"
    assert plan(body={**BODY, "n": 1}).lookup


def test_embeddings_are_deterministic() -> None:
    got = plan(body={"model": "e5", "input": "hello"}, kind="embeddings")
    assert got.lookup and got.store


def test_per_tier_ttl_and_switch() -> None:
    settings = CacheSettings(
        ttl_s=100, tiers={"cheap": TierCache(ttl_s=5), "large": TierCache(enabled=False)}
    )
    assert plan(settings, tier="cheap").ttl_s == 5
    assert plan(settings, tier="other").ttl_s == 100
    off = plan(settings, tier="large")
    assert not off.lookup and not off.store and off.reason == "the cache is off for tier 'large'"


def test_cache_switched_off() -> None:
    got = plan(CacheSettings(enabled=False))
    assert got.status is CacheStatus.BYPASS and got.reason == "the cache is off"


def test_status_is_the_header_value() -> None:
    assert [str(s) for s in CacheStatus] == ["hit", "miss", "bypass"]

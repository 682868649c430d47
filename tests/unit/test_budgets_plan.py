from __future__ import annotations

from typing import Any

import pytest
from redis.crc import key_slot

from gateway.budgets.plan import (
    build_plan,
    cost_nano,
    downgrade_order,
    global_key,
    tenant_key,
    tier_price,
    usage_checks,
    usd_to_nano,
)
from gateway.policy import Policy, Price, Tenant, parse_policy


def policy(**sections: Any) -> Policy:
    raw: dict[str, Any] = {
        "version": 1,
        "models": {
            "small": {
                "replicas": ["http://s:1/v1"],
                "price": {"input_per_mtok": 0.05, "output_per_mtok": 0.1},
            },
            "mid-a": {
                "replicas": ["http://m:1/v1"],
                "price": {"input_per_mtok": 0.3, "output_per_mtok": 0.2},
            },
            "mid-b": {
                "replicas": ["http://m:1/v1"],
                "price": {"input_per_mtok": 0.1, "output_per_mtok": 0.5},
            },
            "big": {
                "replicas": ["http://l:1/v1"],
                "price": {"input_per_mtok": 0.6, "output_per_mtok": 0.8},
            },
        },
        "tiers": {
            "cheap": {"models": ["small"]},
            "mid": {"models": ["mid-a", "mid-b"]},
            "large": {"models": ["big"]},
        },
    }
    raw.update(sections)
    return parse_policy(raw)


def test_cost_is_integer_nano_usd() -> None:
    price = Price(input_per_mtok=0.05, output_per_mtok=0.1)
    assert cost_nano(price, 1, 0) == 50
    assert cost_nano(price, 1000, 500) == 100_000
    assert cost_nano(Price(input_per_mtok=0.6, output_per_mtok=0.8), 3, 7) == 7400
    assert cost_nano(price, 0, 0) == 0
    assert usd_to_nano(30) == 30_000_000_000 and usd_to_nano(0.1) == 100_000_000


def test_tier_price_is_the_dearest_of_its_models() -> None:
    assert tier_price(policy(), "mid") == Price(input_per_mtok=0.3, output_per_mtok=0.5)


def test_downgrade_order_walks_to_cheaper_tiers() -> None:
    p = policy()
    assert downgrade_order(p, "large", "chat") == ["large", "mid", "cheap"]
    assert downgrade_order(p, "cheap", "chat") == ["cheap"]


def test_downgrade_order_skips_tiers_that_do_not_serve_the_endpoint() -> None:
    models = policy().model_dump(exclude_unset=True)["models"]
    models["mid-a"]["endpoints"] = models["mid-b"]["endpoints"] = ["embeddings"]
    p = policy(models=models)
    assert downgrade_order(p, "large", "chat") == ["large", "cheap"]
    assert downgrade_order(p, "mid", "embeddings") == ["mid"]


def test_no_limits_means_no_ledger() -> None:
    assert build_plan(policy(), "acme", Tenant(), "large").ledgers == ()


def test_plan_collects_tenant_tier_and_global_checks() -> None:
    p = policy(
        tenants={
            "acme": {
                "budget": {
                    "usd_per_day": 50,
                    "usd_per_month": 900,
                    "tiers": {"large": {"usd_per_hour": 3, "on_exhausted": "downgrade"}},
                },
                "limits": {"rpm": 600, "tpm": 200000},
            }
        },
        budgets={"tiers": {"large": {"usd_per_minute": 1}}},
    )
    tenant = p.tenants["acme"]
    plan = build_plan(p, "acme", tenant, "large")
    own, shared = plan.ledgers
    assert own.key == "bud:{t:acme}" and shared.key == "bud:{tier:large}"
    assert [(c.scope, c.kind, c.window, c.limit, c.on_exhausted) for c in own.checks] == [
        ("tenant", "u", "day", 50 * 10**9, "reject"),
        ("tenant", "u", "month", 900 * 10**9, "reject"),
        ("tenant_tier", "u", "hour", 3 * 10**9, "downgrade"),
        ("rpm", "r", "minute", 600, "reject"),
        ("tpm", "t", "minute", 200000, "reject"),
    ]
    assert [(c.scope, c.window, c.tier) for c in shared.checks] == [
        ("global_tier", "minute", "large")
    ]
    cheap = build_plan(p, "acme", tenant, "cheap")
    assert len(cheap.ledgers) == 1 and len(cheap.ledgers[0].checks) == 4
    every = usage_checks(p, "acme", tenant)
    assert [len(ledger.checks) for ledger in every] == [5, 1]


@pytest.mark.parametrize("name", ["acme", "we{ird}", "sp ace", "new\nline", "a:b", "100%"])
def test_keys_of_one_ledger_share_a_slot_and_names_stay_distinct(name: str) -> None:
    key = tenant_key(name)
    assert key_slot((key).encode()) == key_slot((key + ":exp").encode())
    assert key_slot(("triage:" + key).encode()) == key_slot(key.encode())
    assert "\n" not in key and " " not in key and key.count("{") == 1 == key.count("}")
    assert tenant_key("a:b") != tenant_key("a%3Ab") and global_key(name) != key


def test_counter_names_carry_window_and_tier() -> None:
    from gateway.budgets.windows import window_at

    p = policy(tenants={"t": {"budget": {"tiers": {"large": {"usd_per_day": 1}}}}})
    check = build_plan(p, "t", p.tenants["t"], "large").ledgers[0].checks[0]
    assert check.counter(window_at("day", 0)) == "u:day:1970-01-01:large"
    assert check.label == "usd_per_day"

"""Budgets and rate limits through real gateway processes sharing one real Redis."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.policy import hash_key
from tests.integration.conftest import Service, policy_for, start_gateway, start_sim
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration
ADMIN = "sk-admin"
KEY = "sk-acme"
TOKENS = 8  # every answer is exactly max_tokens long: worst case == real cost
USD_PER_MTOK = 1000.0  # output only, so the cost of one request is known exactly
COST = TOKENS * USD_PER_MTOK / 1e6


@pytest.fixture(scope="module")
def sims(log_dir: Path, services: Callable[[Service], Service]) -> tuple[Service, Service]:
    fast = ("--ttft-ms", "1", "--itl-ms", "0", "--prefill-ms-per-token", "0", "--jitter", "0")
    return (
        services(start_sim(log_dir, "small", *fast)),
        services(start_sim(log_dir, "large", *fast)),
    )


def budget_policy(
    sims: tuple[Service, Service], redis_url: str | None, tenant: dict[str, Any], **sections: Any
) -> dict[str, Any]:
    policy = policy_for(
        [sims[0].url],
        [sims[1].url],
        tenants={"acme": {"keys": [hash_key(KEY)], **tenant}},
        auth={"anonymous": None},
        server={"admin_key": hash_key(ADMIN)},
        store={"redis_url": redis_url, "timeout_ms": 1000},
        **sections,
    )
    for spec in policy["models"].values():
        spec["price"] = {"input_per_mtok": 0, "output_per_mtok": USD_PER_MTOK}
    return policy


def ask(gateway: Service, model: str = "cheap", **extra: Any) -> httpx.Response:
    body = {
        "model": model,
        "max_tokens": TOKENS,
        "temperature": 0.5,
        "messages": [{"role": "user", "content": "spend some"}],
        **extra,
    }
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        json=body,
        timeout=30,
        headers={"authorization": f"Bearer {KEY}"},
    )


def usage(gateway: Service) -> dict[str, Any]:
    response = httpx.get(
        gateway.url + "/admin/tenants/acme/usage", headers={"authorization": f"Bearer {ADMIN}"}
    )
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def test_budget_holds_exactly_across_two_gateways(
    log_dir: Path,
    services: Callable[[Service], Service],
    sims: tuple[Service, Service],
    fresh_redis: RedisServer,
) -> None:
    allowed = 37
    policy = budget_policy(sims, fresh_redis.url, {"budget": {"usd_per_day": allowed * COST}})
    gateways = [services(start_gateway(log_dir, policy)) for _ in range(2)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda i: ask(gateways[i % 2]), range(300)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == allowed
    assert statuses.count(429) == 300 - allowed
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert int(refused.headers["retry-after"]) > 0
    [day] = usage(gateways[1])["budgets"]
    assert day["spent_usd"] == pytest.approx(allowed * COST)
    assert day["reserved_usd"] == 0


def test_rpm_limit_rejects_with_retry_after(
    log_dir: Path,
    services: Callable[[Service], Service],
    sims: tuple[Service, Service],
    redis_server: RedisServer,
) -> None:
    redis_server.client().flushall()
    gateway = services(
        start_gateway(log_dir, budget_policy(sims, redis_server.url, {"limits": {"rpm": 5}}))
    )
    # The window is the calendar minute: six requests straddling its end would see two.
    if (seconds_left := 60 - time.time() % 60) < 5:
        time.sleep(seconds_left + 0.1)
    responses = [ask(gateway) for _ in range(6)]
    assert [r.status_code for r in responses] == [200] * 5 + [429]
    assert responses[0].headers["x-ratelimit-limit-requests"] == "5"
    assert responses[4].headers["x-ratelimit-remaining-requests"] == "0"
    error = responses[5].json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert 0 < int(responses[5].headers["retry-after"]) <= 60


def test_exhausted_tier_budget_downgrades(
    log_dir: Path,
    services: Callable[[Service], Service],
    sims: tuple[Service, Service],
) -> None:
    tenant = {
        "budget": {"tiers": {"large": {"usd_per_day": 2 * COST, "on_exhausted": "downgrade"}}}
    }
    gateway = services(start_gateway(log_dir, budget_policy(sims, None, tenant)))
    tiers = [ask(gateway, "large").headers.get("x-triage-tier") for _ in range(3)]
    assert tiers == ["large", "large", "cheap"]
    third = ask(gateway, "large")
    assert third.headers["x-triage-downgraded"] == "large->cheap"


def test_cache_hits_cost_nothing(
    log_dir: Path,
    services: Callable[[Service], Service],
    sims: tuple[Service, Service],
) -> None:
    gateway = services(
        start_gateway(log_dir, budget_policy(sims, None, {"budget": {"usd_per_day": COST}}))
    )
    first = ask(gateway, temperature=0)
    again = ask(gateway, temperature=0)
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.headers["x-triage-cache"] == "hit"
    assert ask(gateway).status_code == 429  # the one real request used the whole budget
    assert usage(gateway)["budgets"][0]["spent_usd"] == pytest.approx(COST)


def test_stream_cut_off_settles_what_was_generated(
    log_dir: Path,
    services: Callable[[Service], Service],
) -> None:
    slow = services(start_sim(log_dir, "small", "--ttft-ms", "1", "--itl-ms", "30"))
    large = services(start_sim(log_dir, "large", "--ttft-ms", "1", "--itl-ms", "30"))
    gateway = services(
        start_gateway(log_dir, budget_policy((slow, large), None, {"budget": {"usd_per_day": 1.0}}))
    )
    body = {
        "model": "cheap",
        "max_tokens": 200,
        "stream": True,
        "messages": [{"role": "user", "content": "a long story"}],
    }
    seen = 0
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json=body,
        timeout=10,
        headers={"authorization": f"Bearer {KEY}"},
    ) as response:
        for line in response.iter_lines():
            seen += line.startswith("data: {")
            if seen == 6:
                break
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and usage(gateway)["budgets"][0]["reserved_usd"] > 0:
        time.sleep(0.05)
    [day] = usage(gateway)["budgets"]
    assert day["reserved_usd"] == 0
    assert 5 * USD_PER_MTOK / 1e6 <= day["spent_usd"] < 200 * USD_PER_MTOK / 1e6


def test_fail_closed_is_503_and_fail_open_serves(
    log_dir: Path,
    services: Callable[[Service], Service],
    sims: tuple[Service, Service],
    fresh_redis: RedisServer,
) -> None:
    tenant = {"budget": {"usd_per_day": 1.0}}
    closed = services(start_gateway(log_dir, budget_policy(sims, fresh_redis.url, tenant)))
    opened = services(
        start_gateway(
            log_dir,
            budget_policy(sims, fresh_redis.url, tenant, budgets={"failure_mode": "fail_open"}),
        )
    )
    fresh_redis.kill()
    refused = ask(closed)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "budget_store_unavailable"
    assert ask(opened).status_code == 200

"""The response cache through the gateway: hits, stream replay, tenants, Redis trouble."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.policy import hash_key
from tests.integration.conftest import (
    Service,
    Services,
    SimPair,
    policy_for,
    request_line,
    set_faults,
    sim_stats,
    start_gateway,
    start_sim,
    start_sim_pair,
)
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration
FAST = ("--ttft-ms", "5", "--itl-ms", "2")
KEYS = {"team-a": "sk-team-a", "team-b": "sk-team-b"}
ADMIN = "sk-admin"


@pytest.fixture(scope="module")
def sims(log_dir: Path, services: Services) -> SimPair:
    return start_sim_pair(log_dir, services, *FAST)


def cached_policy(sims: SimPair, **store: Any) -> dict[str, Any]:
    tenants = {name: {"keys": [hash_key(key)]} for name, key in KEYS.items()}
    return policy_for(
        [sims[0].url],
        [sims[1].url],
        tenants=tenants,
        auth={"anonymous": None},
        store=store,
        server={"admin_key": hash_key(ADMIN)},
    )


@pytest.fixture(scope="module")
def gateway(log_dir: Path, services: Services, sims: SimPair) -> Service:
    return services(start_gateway(log_dir, cached_policy(sims)))


@pytest.fixture(autouse=True)
def clean(sims: SimPair) -> None:
    for sim in sims:
        set_faults(sim, rate=0.0)


def ask(gateway: Service, content: str, key: str = "sk-team-a", **extra: Any) -> httpx.Response:
    body = {
        "model": "cheap",
        "temperature": 0,
        "max_tokens": 6,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }
    headers = {"authorization": f"Bearer {key}", **extra.pop("headers", {})}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=10)


def requests_seen(sim: Service) -> int:
    return int(sim_stats(sim)["requests_total"])


def test_second_identical_request_is_a_hit(gateway: Service, sims: SimPair) -> None:
    first = ask(gateway, "cache me once")
    before = requests_seen(sims[0])
    second = ask(gateway, "cache me once")
    assert first.headers["x-triage-cache"] == "miss"
    assert second.headers["x-triage-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert requests_seen(sims[0]) == before


def test_non_deterministic_requests_bypass(gateway: Service) -> None:
    response = ask(gateway, "warm", temperature=0.7)
    assert response.headers["x-triage-cache"] == "bypass"


def test_no_cache_and_no_store_headers(gateway: Service) -> None:
    assert (
        ask(gateway, "nostore", headers={"cache-control": "no-store"}).headers["x-triage-cache"]
        == "miss"
    )
    assert ask(gateway, "nostore").headers["x-triage-cache"] == "miss"  # nothing was written
    assert ask(gateway, "nostore").headers["x-triage-cache"] == "hit"
    assert (
        ask(gateway, "nostore", headers={"x-triage-cache": "bypass"}).headers["x-triage-cache"]
        == "bypass"
    )


def test_stream_then_json_then_stream(gateway: Service) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-team-a", max_retries=0)
    messages: Any = [{"role": "user", "content": "stream me, then replay me"}]
    streamed = list(
        client.chat.completions.create(
            model="cheap", messages=messages, temperature=0, max_tokens=8, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    raw = client.chat.completions.with_raw_response.create(
        model="cheap", messages=messages, temperature=0, max_tokens=8
    )
    assert raw.headers["x-triage-cache"] == "hit"
    assert raw.parse().choices[0].message.content == text
    assert raw.parse().choices[0].finish_reason == "length"
    replay = list(
        client.chat.completions.create(
            model="cheap",
            messages=messages,
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert [c.id for c in replay if c.choices] == [c.id for c in streamed]
    assert "".join(c.choices[0].delta.content or "" for c in replay if c.choices) == text
    assert replay[-1].usage is not None and replay[-1].usage.completion_tokens == 8


def test_tenants_never_share_entries(gateway: Service) -> None:
    assert ask(gateway, "private answer", "sk-team-a").headers["x-triage-cache"] == "miss"
    assert ask(gateway, "private answer", "sk-team-a").headers["x-triage-cache"] == "hit"
    assert ask(gateway, "private answer", "sk-team-b").headers["x-triage-cache"] == "miss"


def test_forged_tenant_header_is_ignored(gateway: Service) -> None:
    ask(gateway, "forgery target", "sk-team-a")
    forged = ask(gateway, "forgery target", "sk-team-b", headers={"x-triage-tenant": "team-a"})
    assert forged.headers["x-triage-cache"] == "miss"


def test_errors_are_never_cached(gateway: Service, sims: SimPair) -> None:
    set_faults(sims[0], rate=1.0, kind="500")
    assert ask(gateway, "fails first").status_code == 502
    set_faults(sims[0], rate=0.0)
    assert ask(gateway, "fails first").headers["x-triage-cache"] == "miss"


def test_interrupted_stream_is_not_stored(gateway: Service, sims: SimPair) -> None:
    set_faults(sims[0], rate=1.0, kind="stall")
    body = {
        "model": "cheap",
        "temperature": 0,
        "max_tokens": 6,
        "stream": True,
        "messages": [{"role": "user", "content": "stall me"}],
    }
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json=body,
        timeout=2,
        headers={"authorization": "Bearer sk-team-a"},
    ) as response:
        request_id = response.headers["x-triage-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break
    set_faults(sims[0], rate=0.0)
    # The gateway is done with the request it was left with once it logs it: it has stored
    # its answer by then, or let it go.
    request_line(gateway, request_id)
    assert ask(gateway, "stall me", stream=False).headers["x-triage-cache"] == "miss"


def test_missing_and_wrong_keys_are_401(gateway: Service) -> None:
    body = {"model": "cheap", "messages": [{"role": "user", "content": "x"}]}
    response = httpx.post(gateway.url + "/v1/chat/completions", json=body)
    assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="cheap", messages=[{"role": "user", "content": "x"}])


def test_admin_invalidation_by_tenant(gateway: Service) -> None:
    ask(gateway, "invalidate me", "sk-team-a")
    ask(gateway, "invalidate me", "sk-team-b")
    response = httpx.delete(
        gateway.url + "/admin/cache",
        params={"tenant": "team-a"},
        headers={"authorization": f"Bearer {ADMIN}"},
    )
    assert response.status_code == 200 and response.json()["deleted"] >= 1
    assert ask(gateway, "invalidate me", "sk-team-a").headers["x-triage-cache"] == "miss"
    assert ask(gateway, "invalidate me", "sk-team-b").headers["x-triage-cache"] == "hit"
    assert httpx.delete(gateway.url + "/admin/cache").status_code == 401


# --- shared Redis ----------------------------------------------------------------------------


def test_two_gateways_share_one_redis_with_single_flight(
    log_dir: Path,
    services: Services,
    sims: SimPair,
    fresh_redis: RedisServer,
) -> None:
    slow = services(start_sim(log_dir, "small", "--ttft-ms", "300", "--itl-ms", "5"))
    # A generous store timeout: on a loaded machine a 50 ms timeout fails open (a miss),
    # which is right for serving but would hide what this test checks.
    policy = cached_policy((slow, sims[1]), redis_url=fresh_redis.url, timeout_ms=1000)
    first = services(start_gateway(log_dir, policy))
    second = services(start_gateway(log_dir, policy))
    before = requests_seen(slow)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(ask, gw, "one flight only") for gw in [first, second] * 6]
        responses = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in responses)
    assert len({r.json()["choices"][0]["message"]["content"] for r in responses}) == 1
    assert requests_seen(slow) == before + 1
    assert ask(second, "one flight only").headers["x-triage-cache"] == "hit"


def test_redis_outage_serves_uncached_and_recovers(
    log_dir: Path,
    services: Services,
    sims: SimPair,
    fresh_redis: RedisServer,
) -> None:
    policy = cached_policy(sims, redis_url=fresh_redis.url, breaker_reset_s=0.3)
    gateway = services(start_gateway(log_dir, policy))
    assert ask(gateway, "before the outage").headers["x-triage-cache"] == "miss"
    fresh_redis.kill()
    for _ in range(5):
        start = time.perf_counter()
        response = ask(gateway, "during the outage")
        assert response.status_code == 200
        assert response.headers["x-triage-cache"] == "miss"
        assert time.perf_counter() - start < 2.0  # bounded by the store timeout, never a hang
    fresh_redis.restart()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if ask(gateway, "after the outage").headers["x-triage-cache"] == "hit":
            break
        time.sleep(0.2)
    assert ask(gateway, "after the outage").headers["x-triage-cache"] == "hit"

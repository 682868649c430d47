"""A bad gateway header is refused at the edge: a 400 naming it, before the request reads
the cache or holds any budget (a real gateway, real sims, real Redis)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.policy import hash_key
from tests.integration.conftest import (
    ERROR_FIELDS,
    Service,
    Services,
    SimPair,
    policy_for,
    request_line,
    sim_stats,
    start_gateway,
    start_sim_pair,
)
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration
ADMIN = "sk-admin"
KEY = "sk-acme"
FAST = ("--ttft-ms", "1", "--itl-ms", "0", "--prefill-ms-per-token", "0", "--jitter", "0")
CONTENT = "remember this answer"


def ask(gateway: Service, content: str = CONTENT, **headers: str) -> httpx.Response:
    body = {
        "model": "cheap",
        "max_tokens": 4,
        "temperature": 0,  # cacheable
        "messages": [{"role": "user", "content": content}],
    }
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {KEY}", **headers},
        timeout=30,
    )


def usage(gateway: Service) -> dict[str, Any]:
    response = httpx.get(
        gateway.url + "/admin/tenants/acme/usage",
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=5,
    )
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return {key: report[key] for key in ("budgets", "rate_limits", "pending_settlements")}


def ledger_state(report: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What a request would move: spend and holds, counts and holds (not the clock)."""
    return [
        (row["scope"], row["window"], row.get("spent_usd"), row.get("reserved_usd"))
        for row in report["budgets"]
    ] + [
        (row["scope"], row["window"], row["used"], row["reserved"]) for row in report["rate_limits"]
    ]


def redis_reads(redis: RedisServer) -> dict[str, int]:
    """Keys read, found or not: a cache lookup and a budget hold each read some (so does
    the usage report, which is never asked for between two readings)."""
    stats = redis.client().info("stats")
    return {name: int(stats[name]) for name in ("keyspace_hits", "keyspace_misses")}


@pytest.fixture(scope="module")
def served(
    log_dir: Path, services: Services, store_section: dict[str, Any]
) -> tuple[Service, SimPair]:
    sims = start_sim_pair(log_dir, services, *FAST)
    tenant = {"keys": [hash_key(KEY)], "budget": {"usd_per_day": 100}, "limits": {"rpm": 1000}}
    policy = policy_for(
        [sims[0].url],
        [sims[1].url],
        tenants={"acme": tenant},
        auth={"anonymous": None},
        server={"admin_key": hash_key(ADMIN)},
        store=store_section,
    )
    return services(start_gateway(log_dir, policy)), sims


@pytest.mark.parametrize(
    ("header", "value"),
    [("x-slo-ttft-ms", "soon"), ("x-slo-e2e-ms", "-1"), ("x-triage-priority", "urgent")],
)
def test_a_bad_header_is_refused_before_the_cache_and_the_ledger(
    served: tuple[Service, SimPair], redis_server: RedisServer, header: str, value: str
) -> None:
    gateway, sims = served
    first = ask(gateway)
    assert first.status_code == 200, first.text
    assert ask(gateway).headers["x-triage-cache"] == "hit"  # the answer is cached
    ledger_before = ledger_state(usage(gateway))
    assert ledger_before, "the tenant has a budget and a limit to move"
    sent_before = [int(sim_stats(sim)["requests_total"]) for sim in sims]
    reads_before = redis_reads(redis_server)

    # The cached request, and one the cache has never seen: neither is looked up.
    for content in (CONTENT, "never asked before"):
        refused = ask(gateway, content, **{header: value})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert set(error) == ERROR_FIELDS
        assert (error["param"], error["type"]) == (header, "invalid_request_error")
        assert value in error["message"]
        assert "x-triage-cache" not in refused.headers
        assert request_line(gateway, refused.headers["x-triage-request-id"])["status"] == 400

    assert redis_reads(redis_server) == reads_before  # no cache lookup, no budget hold
    assert ledger_state(usage(gateway)) == ledger_before
    assert [int(sim_stats(sim)["requests_total"]) for sim in sims] == sent_before

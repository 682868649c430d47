"""Health and outlier ejection through the whole gateway, on real sim servers that behave like
llama-cpp-python (`--quirks llama_cpp_python`: no `/health`, 500 for a malformed request).

A replica without a health endpoint must keep serving; one tenant's malformed requests must
eject nothing and never reach the fallback tier; a replica nothing listens on must still be
ejected, logged and counted, while the other serves.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import (
    LARGE,
    SMALL,
    TRIAGE,
    Service,
    Services,
    eventually,
    metric,
    policy_for,
    sim_stats,
    start_gateway,
    start_service,
)
from tests.support.processes import free_port

pytestmark = pytest.mark.integration

FAST = ("--ttft-ms", "5", "--itl-ms", "2")
LlamaSims = tuple[Service, Service, Service]  # two small replicas, one large


def start_llama_sim(log_dir: Path, profile: str) -> Service:
    """A sim with llama-cpp-python's quirks; it has no /health, so wait on /v1/models."""
    port = free_port()
    args = [*TRIAGE, "sim", "--profile", profile, "--port", str(port), *FAST]
    root = f"http://127.0.0.1:{port}"
    args += ["--quirks", "llama_cpp_python"]
    return start_service(f"llama-sim-{port}", args, root + "/v1/models", root + "/v1", log_dir)


@pytest.fixture(scope="module")
def sims(log_dir: Path, services: Services) -> LlamaSims:
    return (
        services(start_llama_sim(log_dir, "small")),
        services(start_llama_sim(log_dir, "small")),
        services(start_llama_sim(log_dir, "large")),
    )


@pytest.fixture(scope="module")
def gateway(log_dir: Path, services: Services, sims: LlamaSims) -> Service:
    """Probes every 0.1 s. The small model keeps the default server kind, so its probe goes
    to /health and gets llama-cpp-python's 404; the large one says what it is (no probe)."""
    small_a, small_b, large = sims
    policy = policy_for(
        [small_a.url, small_b.url],
        [large.url],
        server={"upstream_timeout_s": 5, "health_check_interval_s": 0.1},
    )
    policy["models"][LARGE]["server"] = "llama_cpp_python"
    return services(start_gateway(log_dir, policy))


def chat(**extra: Any) -> dict[str, Any]:
    body = {"model": "cheap", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    return {**body, **extra}


def send(gateway: Service, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10)


def ready(gateway: Service) -> tuple[int, Any]:
    response = httpx.get(gateway.url + "/readyz", timeout=5)
    return response.status_code, response.json()


def test_replicas_without_a_health_endpoint_keep_serving(gateway: Service) -> None:
    """Their probe gets 404: "no health endpoint", not "down". Before, every probe ejected
    them and most requests were 503 `no_healthy_replica`."""
    statuses, readiness = [], []
    for _ in range(30):  # steady low traffic, across many probe intervals
        statuses.append(send(gateway, chat()).status_code)
        readiness.append(ready(gateway))
        time.sleep(0.05)
    assert "has no health endpoint at /health" in gateway.output()  # so it was probed
    assert statuses == [200] * 30
    assert readiness == [(200, {"ready": True, "tiers": {"cheap": True, "large": True}})] * 30
    assert "ejected" not in gateway.output()


def test_one_tenants_malformed_requests_take_nothing_out(gateway: Service, sims: LlamaSims) -> None:
    """llama-cpp-python answers a malformed request with 500. Interleaved with good requests,
    such requests get 502, eject no replica, are never replayed on the fallback tier, and
    good requests keep getting 200 from the cheap tier."""
    small_a, small_b, large = sims
    large_before = sim_stats(large)["requests_total"]
    failed_before = sum(sim_stats(s)["requests_failed"] for s in (small_a, small_b))
    for _ in range(40):
        bad = send(gateway, chat(min_tokens="many"))
        assert bad.status_code == 502, bad.text
        assert "min_tokens must be an integer" in bad.json()["error"]["message"]
        good = send(gateway, chat())
        assert good.status_code == 200, good.text
        assert good.headers["x-triage-tier"] == "cheap"
        assert ready(gateway)[0] == 200
    assert sim_stats(large)["requests_total"] == large_before  # the fallback tier saw none
    failed = sum(sim_stats(s)["requests_failed"] for s in (small_a, small_b)) - failed_before
    assert 40 <= failed <= 80  # each bad request: its replica, and at most one more
    assert metric(gateway, "triage_replica_up", model=SMALL) == 2
    assert "ejected" not in gateway.output()


def test_a_replica_nothing_listens_on_is_ejected_logged_and_counted(
    log_dir: Path, services: Services, sims: LlamaSims
) -> None:
    small_a, _, large = sims
    dead = f"http://127.0.0.1:{free_port()}/v1"  # port closed: connection refused
    policy = policy_for(
        [dead, small_a.url],
        [large.url],
        server={"upstream_timeout_s": 5, "health_check_interval_s": 0.1},
    )
    gateway = services(start_gateway(log_dir, policy))
    pattern = rf"replica {re.escape(dead)} \(model {SMALL}\) ejected: connection refused"
    assert eventually(lambda: re.search(pattern, gateway.output()) is not None, seconds=10)
    for _ in range(20):
        response = send(gateway, chat())
        assert response.status_code == 200, response.text
        assert response.headers["x-triage-tier"] == "cheap"
    assert ready(gateway) == (200, {"ready": True, "tiers": {"cheap": True, "large": True}})
    assert metric(gateway, "triage_replica_up", model=SMALL, replica=dead) == 0
    assert metric(gateway, "triage_replica_ejections_total", model=SMALL, replica=dead) >= 1

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Route

from gateway.errors import RateLimited, UpstreamStatus, UpstreamUnavailable
from gateway.policy import Policy, parse_policy
from gateway.pools import Pool
from gateway.router import Decision
from gateway.telemetry import RequestRecord, Telemetry
from gateway.telemetry.metrics import reset_multiprocess_dir

ROOT = Path(__file__).resolve().parents[2]
RAW_POLICY = {
    "version": 1,
    "models": {
        "small": {"replicas": ["http://s0:8000/v1", "http://s1:8000/v1"]},
        "big": {"replicas": ["http://b0:8000/v1"]},
    },
    "tiers": {
        "cheap": {"models": ["small"], "slo": {"ttft_ms": 300, "e2e_ms": 5000, "percentile": 95}},
        "large": {"models": ["big"], "slo": {"ttft_ms": 1200, "e2e_ms": 30000, "percentile": 90}},
    },
    "tenants": {"team-a": {}, "team-b": {}},
}
S0 = "http://s0:8000/v1"
REFUSED = "connect_refused"  # the ejection reason of `Replica.mark_down`
ALLOWED_LABELS = {
    "tier", "model", "tenant", "status", "cache", "type", "result", "reason", "replica",
    "from_tier", "to_tier", "window", "objective", "le", "source",
    "gen_ai_operation_name", "gen_ai_response_model", "gen_ai_token_type",
}  # fmt: skip

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def policy() -> Policy:
    return parse_policy(RAW_POLICY, {})


def pools_of(policy: Policy) -> dict[str, Pool]:
    return {n: Pool.from_urls(n, s.replicas, None, None) for n, s in policy.models.items()}


def bound_telemetry(environ: Mapping[str, str] | None = None) -> Telemetry:
    telemetry = Telemetry(environ=environ or {})
    loaded = policy()
    telemetry.bind(loaded, pools_of(loaded))
    return telemetry


async def scrape(telemetry: Telemetry, accept: str = "") -> httpx.Response:
    app = Starlette(routes=[Route("/metrics", telemetry.metrics_endpoint)])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        return await client.get("/metrics", headers={"accept": accept} if accept else {})


async def samples(telemetry: Telemetry) -> Samples:
    response = await scrape(telemetry)
    assert response.status_code == 200
    return parse(response.text)


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def stream_record(
    telemetry: Telemetry,
    *,
    ttft: float = 0.1,
    e2e: float = 1.0,
    tenant: str = "team-a",
    tier: str = "cheap",
    model: str = "small",
) -> RequestRecord:
    record = telemetry.start("chat", {}, "req-secret-id")
    record.tenant, record.requested_model, record.stream, record.cache = (
        tenant,
        "auto",
        True,
        "miss",
    )
    record.decided_tier, record.decision_reason, record.difficulty = tier, "classifier", 0.42
    record.served(tier, model, S0)
    record.prompt_tokens, record.completion_tokens, record.cost_usd = 100, 11, 0.002
    # finish() stamps the end: start the request `e2e` seconds ago.
    record.started_at = time.perf_counter() - e2e
    record.first_token_at = record.started_at + ttft
    return record


async def test_a_streamed_request_updates_every_request_metric() -> None:
    telemetry = bound_telemetry()
    telemetry.finish(stream_record(telemetry))
    found = await samples(telemetry)
    labels = {"tier": "cheap", "model": "small", "tenant": "team-a", "status": "200"}
    assert value(found, "triage_requests_total", **labels, cache="miss") == 1
    spender = {"tenant": "team-a", "tier": "cheap", "model": "small"}
    assert value(found, "triage_tokens_total", **spender, type="input") == 100
    assert value(found, "triage_tokens_total", **spender, type="output") == 11
    assert value(found, "triage_cost_usd_total", **spender) == 0.002
    gen_ai = {"gen_ai_operation_name": "chat", "gen_ai_response_model": "small", "tier": "cheap"}
    assert value(found, "gen_ai_client_token_usage_sum", **gen_ai, gen_ai_token_type="input") == 100
    assert value(found, "gen_ai_server_time_to_first_token_seconds_count", **gen_ai) == 1
    assert value(found, "gen_ai_server_time_per_output_token_seconds_count", **gen_ai) == 1
    assert value(found, "gen_ai_server_request_duration_seconds_count", **gen_ai) == 1
    assert value(found, "triage_routing_decisions_total", tier="cheap", reason="classifier") == 1
    assert value(found, "triage_classifier_score_count") == 1
    assert value(found, "triage_classifier_score_bucket", le="0.45") == 1
    assert value(found, "triage_classifier_score_bucket", le="0.4") == 0
    replica = {"model": "small", "replica": S0}
    assert value(found, "triage_upstream_requests_total", **replica, status="200") == 1
    assert value(found, "triage_upstream_duration_seconds_count", model="small", replica=S0) == 1


async def test_slo_attainment_per_tier() -> None:
    telemetry = bound_telemetry()
    cases = [(0.1, 1.0), (0.5, 1.0), (0.1, 6.0), (0.1, 4.9)]  # met, ttft, e2e missed, met
    for ttft, e2e in cases:
        telemetry.finish(stream_record(telemetry, ttft=ttft, e2e=e2e))
    failed = telemetry.start("chat", {}, "r")
    failed.tenant, failed.tier, failed.model, failed.status = "team-a", "cheap", "small", 503
    telemetry.finish(failed)
    client_error = telemetry.start("chat", {}, "r")
    client_error.tier, client_error.model, client_error.status = "cheap", "small", 400
    telemetry.finish(client_error)
    found = await samples(telemetry)
    results = ("met", "ttft_missed", "e2e_missed", "error")
    slo = {r: value(found, "triage_slo_requests_total", tier="cheap", result=r) for r in results}
    assert slo == {"met": 2, "ttft_missed": 1, "e2e_missed": 1, "error": 1}
    assert value(found, "triage_slo_target_ratio", tier="cheap") == 0.95
    assert value(found, "triage_slo_target_ratio", tier="large") == 0.9
    assert value(found, "triage_slo_objective_seconds", tier="cheap", objective="ttft") == 0.3
    assert value(found, "triage_slo_objective_seconds", tier="large", objective="e2e") == 30


async def test_non_streamed_requests_have_no_ttft_objective() -> None:
    telemetry = bound_telemetry()
    record = stream_record(telemetry, ttft=2.0, e2e=2.0)
    record.stream = False
    telemetry.finish(record)
    found = await samples(telemetry)
    assert value(found, "triage_slo_requests_total", tier="cheap", result="ttft_missed") == 0
    gen_ai = {"gen_ai_operation_name": "chat", "gen_ai_response_model": "small", "tier": "cheap"}
    assert value(found, "gen_ai_server_time_to_first_token_seconds_count", **gen_ai) == 0


async def test_cache_hits_count_savings_not_latency_or_tokens() -> None:
    telemetry = bound_telemetry()
    hit = telemetry.start("chat", {}, "r")
    hit.tenant, hit.cache, hit.saved_usd, hit.tier, hit.model = (
        "team-b",
        "hit",
        0.01,
        "large",
        "big",
    )
    hit.prompt_tokens = 50
    telemetry.finish(hit)
    miss = telemetry.start("chat", {}, "r")
    miss.tenant, miss.cache = "team-b", "miss"
    telemetry.finish(miss)
    found = await samples(telemetry)
    hit_labels = {"tier": "large", "model": "big", "tenant": "team-b", "status": "200"}
    miss_labels = {"tier": "none", "model": "none", "tenant": "team-b", "status": "200"}
    assert value(found, "triage_requests_total", **hit_labels, cache="hit") == 1
    assert value(found, "triage_requests_total", **miss_labels, cache="miss") == 1
    assert value(found, "triage_cache_saved_usd_total", tenant="team-b", tier="large") == 0.01
    assert not any(name == "triage_tokens_total" for name, _ in found)
    assert not any(name == "triage_slo_requests_total" for name, _ in found)


async def test_reroutes_retries_hedges_and_sheds() -> None:
    telemetry = bound_telemetry()
    fallback = stream_record(telemetry, tier="cheap")
    fallback.decided_tier, fallback.retries, fallback.hedges = "large", 2, 1
    telemetry.finish(fallback)
    downgraded = stream_record(telemetry, tier="cheap")
    downgraded.decided_tier, downgraded.budget_downgraded = "large", True
    telemetry.finish(downgraded)
    shed = telemetry.start("chat", {}, "r")
    shed.tier, shed.status, shed.shed = "large", 503, True
    telemetry.finish(shed)
    found = await samples(telemetry)
    reroutes = "triage_tier_reroutes_total"
    assert value(found, reroutes, from_tier="large", to_tier="cheap", reason="fallback") == 1
    assert value(found, reroutes, from_tier="large", to_tier="cheap", reason="budget") == 1
    assert value(found, "triage_retries_total", tier="cheap") == 2
    assert value(found, "triage_hedges_total", tier="cheap") == 1
    assert value(found, "triage_requests_shed_total", tier="large") == 1


async def test_tenant_labels_are_bounded_by_the_policy() -> None:
    telemetry = bound_telemetry()
    for tenant in ("team-a", "anonymous", "someone-new", None):
        record = telemetry.start("chat", {}, "r")
        record.tenant, record.status = tenant, 401
        telemetry.finish(record)
    found = await samples(telemetry)
    tenants = {dict(labels)["tenant"] for name, labels in found if name == "triage_requests_total"}
    assert tenants == {"team-a", "anonymous", "other", "none"}


async def test_no_unbounded_labels() -> None:
    telemetry = bound_telemetry()
    telemetry.finish(stream_record(telemetry))
    telemetry.budget_remaining("team-a", None, "day", 12.5)
    response = await scrape(telemetry)
    assert "req-secret-id" not in response.text
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample


async def test_replica_gauges_are_read_at_scrape_time() -> None:
    telemetry = Telemetry(environ={})
    loaded = policy()
    pools = pools_of(loaded)
    telemetry.bind(loaded, pools)
    s0, s1 = pools["small"].replicas
    s0.in_flight = 3
    s1.mark_down(now=1e12)  # its breaker opens: one ejection
    found = await samples(telemetry)
    assert value(found, "triage_replica_up", model="small", replica=S0) == 1
    assert value(found, "triage_replica_up", model="small", replica=s1.url) == 0
    assert value(found, "triage_replica_in_flight", model="small", replica=S0) == 3
    assert value(found, "triage_replica_consecutive_failures", model="small", replica=s1.url) == 1
    ejections = {"model": "small", "replica": s1.url}
    assert value(found, "triage_replica_ejections_total", **ejections, reason=REFUSED) == 1
    assert value(found, "triage_replica_ejections_total", **ejections, reason="outlier") == 0
    # Every reason has its series from the start, at 0.
    for reason in ("connect_refused", "health_probe_failed", "failures", "outlier"):
        key = ("triage_replica_ejections_total", frozenset({**ejections, "reason": reason}.items()))
        assert key in found
    # Its cooldown over, an ejected replica is still out until a probe brings it back.
    s1.down_until = 0.0
    found = await samples(telemetry)
    assert value(found, "triage_replica_up", model="small", replica=s1.url) == 0
    s1.succeeded(now=1.0)
    found = await samples(telemetry)
    assert value(found, "triage_replica_up", model="small", replica=s1.url) == 1
    # A reload that drops a replica drops its gauges.
    models = {"small": {"replicas": [S0]}, "big": {"replicas": ["http://b0:8000/v1"]}}
    reloaded = parse_policy({**RAW_POLICY, "models": models}, {})
    telemetry.bind(reloaded, pools_of(reloaded))
    found = await samples(telemetry)
    assert ("triage_replica_up", frozenset({("model", "small"), ("replica", s1.url)})) not in found
    assert value(found, "triage_replica_in_flight", model="small", replica=S0) == 0


async def test_budget_remaining() -> None:
    telemetry = bound_telemetry()
    telemetry.budget_remaining("team-a", "large", "day", 30.0)
    telemetry.budget_remaining("team-a", "large", "day", 29.5)
    telemetry.budget_remaining("team-a", None, "month", 400)
    found = await samples(telemetry)
    name = "triage_budget_remaining_usd"
    assert value(found, name, tenant="team-a", tier="large", window="day") == 29.5
    assert value(found, name, tenant="team-a", tier="all", window="month") == 400


async def test_apps_in_one_process_have_their_own_registries() -> None:
    first, second = bound_telemetry(), bound_telemetry()
    first.finish(stream_record(first))
    found = await samples(second)
    assert not any(name == "triage_requests_total" for name, _ in found)


async def test_openmetrics_when_the_scraper_asks() -> None:
    telemetry = bound_telemetry()
    telemetry.finish(stream_record(telemetry))
    plain = await scrape(telemetry)
    assert plain.headers["content-type"].startswith("text/plain")
    openmetrics = await scrape(telemetry, "application/openmetrics-text; version=1.0.0")
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")


_WORKER = textwrap.dedent(
    """
    import asyncio
    from gateway.pools import Pool
    from gateway.telemetry import Telemetry

    async def main() -> None:
        telemetry = Telemetry()
        pool = Pool.from_urls("small", ["http://s0:8000/v1"], None, None)
        pool.replicas[0].in_flight = 2
        telemetry.metrics.bind({"small": pool}, {}, None)
        for _ in range(2):
            record = telemetry.start("chat", {}, "r")
            record.tenant = "team-a"
            telemetry.finish(record)
        telemetry.budget_remaining("team-a", None, "day", 7.0)
        await telemetry.close()

    asyncio.run(main())
    """
)


async def test_multiprocess_mode_merges_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    environ = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", _WORKER], env=environ, cwd=ROOT, check=True)
    # This process plays a second worker: prometheus-client picks its value class at
    # import time from the environment, so switch it the way the variable would have.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())  # type: ignore[no-untyped-call]
    telemetry = Telemetry(environ={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    loaded = policy()
    pools = pools_of(loaded)
    pools["small"].replicas[0].in_flight = 1
    telemetry.bind(loaded, pools)
    s1 = pools["small"].replicas[1]
    s1.mark_down(now=1e12)  # one ejection, copied into the shared files by the sampler
    telemetry.metrics.sample_replicas()
    telemetry.metrics.sample_replicas()  # counted once, not once per sample
    record = telemetry.start("chat", {}, "r")
    record.tenant = "team-a"
    telemetry.finish(record)
    try:
        found = await samples(telemetry)
    finally:
        await telemetry.close()
    labels = {"tier": "none", "model": "none", "tenant": "team-a", "status": "200"}
    assert value(found, "triage_requests_total", **labels, cache="bypass") == 3
    assert value(found, "triage_replica_in_flight", model="small", replica=S0) == 3
    assert value(found, "triage_replica_up", model="small", replica=S0) == 1
    ejections = {"model": "small", "replica": s1.url}
    assert value(found, "triage_replica_ejections_total", **ejections, reason=REFUSED) == 1
    assert value(found, "triage_replica_ejections_total", **ejections, reason="failures") == 0
    budget = {"tenant": "team-a", "tier": "all", "window": "day"}
    assert value(found, "triage_budget_remaining_usd", **budget) == 7
    assert value(found, "triage_slo_target_ratio", tier="cheap") == 0.95


async def test_requests_in_flight_counts_started_but_unfinished() -> None:
    telemetry = bound_telemetry()
    first, second = telemetry.start("chat", {}, "a"), telemetry.start("chat", {}, "b")
    assert value(await samples(telemetry), "triage_requests_in_flight") == 2
    telemetry.finish(first)
    telemetry.finish(first)  # a second finish changes nothing
    assert value(await samples(telemetry), "triage_requests_in_flight") == 1
    telemetry.finish(second)
    assert value(await samples(telemetry), "triage_requests_in_flight") == 0


def test_reset_multiprocess_dir(tmp_path: Path) -> None:
    directory = tmp_path / "prom"
    reset_multiprocess_dir(directory)
    (directory / "counter_123.db").write_bytes(b"x")
    (directory / "keep.txt").write_text("x")
    reset_multiprocess_dir(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]


async def test_requests_admission_refused_are_slo_results_of_their_tier() -> None:
    """A tier that refuses everything shows it: shed (429) and expired (503) are results."""
    telemetry = bound_telemetry()
    telemetry.finish(stream_record(telemetry))
    for error in (
        RateLimited("over capacity", code="over_capacity"),
        UpstreamUnavailable("too late", code="deadline_expired"),
        UpstreamUnavailable("too late", code="deadline_expired"),
    ):
        refused = telemetry.start("chat", {}, "r")
        refused.tenant = "team-a"
        refused.routed(Decision("cheap", (("cheap", "small"),), "tier"))
        refused.fail(error)
        refused.shed = True
        telemetry.finish(refused)
    found = await samples(telemetry)
    results = ("met", "shed", "expired", "error")
    slo = {r: value(found, "triage_slo_requests_total", tier="cheap", result=r) for r in results}
    assert slo == {"met": 1, "shed": 1, "expired": 2, "error": 0}
    assert value(found, "triage_requests_shed_total", tier="cheap") == 3
    labels = {"tier": "cheap", "model": "small", "tenant": "team-a", "cache": "bypass"}
    assert value(found, "triage_requests_total", **labels, status="429") == 1
    assert value(found, "triage_requests_total", **labels, status="503") == 2
    assert not any(dict(labels).get("tier") == "none" for _, labels in found)


async def test_a_request_that_failed_upstream_is_counted_on_its_tier_model_and_replica() -> None:
    telemetry = bound_telemetry()
    failed = telemetry.start("chat", {}, "r")
    failed.tenant = "team-a"
    failed.routed(Decision("cheap", (("cheap", "small"), ("large", "big")), "tier"))
    error = UpstreamStatus(502, "bad gateway")
    error.failed_at("large", "big", "http://b0:8000/v1")  # as the dispatcher does
    failed.fail(error)
    telemetry.finish(failed)
    found = await samples(telemetry)
    labels = {"tier": "large", "model": "big", "tenant": "team-a", "cache": "bypass"}
    assert value(found, "triage_requests_total", **labels, status="502") == 1
    replica = {"model": "big", "replica": "http://b0:8000/v1"}
    assert value(found, "triage_upstream_requests_total", **replica, status="502") == 1
    assert value(found, "triage_slo_requests_total", tier="large", result="error") == 1
    reroute = {"from_tier": "cheap", "to_tier": "large", "reason": "fallback"}
    assert value(found, "triage_tier_reroutes_total", **reroute) == 1


async def test_no_created_series() -> None:
    """prometheus-client's `_created` samples come out as gauge families of their own in the
    text format, stamped with the first scrape's time: there are none."""
    telemetry = bound_telemetry()
    telemetry.finish(stream_record(telemetry))
    for accept in ("", "application/openmetrics-text; version=1.0.0"):
        response = await scrape(telemetry, accept)
        assert "_created" not in response.text
        names = {family.name for family in text_string_to_metric_families(response.text)}
        assert "triage_requests" in names or "triage_requests_total" in names

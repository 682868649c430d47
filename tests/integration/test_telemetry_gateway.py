"""Telemetry of a real gateway process: trace context to the backend, /metrics, request logs.

Each test sends its own requests and then reads what they left behind: the sims' recorded
trace headers, the parsed Prometheus exposition, the gateway's JSON log lines, and (with
tracing on) the spans the gateway exported over OTLP/HTTP to a receiver in this process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from prometheus_client.parser import text_string_to_metric_families

from gateway.policy import hash_key
from tests.integration.conftest import (
    LARGE,
    SMALL,
    Service,
    Services,
    policy_for,
    request_lines,
    set_faults,
    start_gateway,
    start_sim,
)
from tests.support.otlp import Received, otlp_receiver

pytestmark = pytest.mark.integration
FAST = ("--ttft-ms", "2", "--itl-ms", "1", "--jitter", "0")
KEY, POOR_KEY = "sk-telemetry-team", "sk-telemetry-poor"
BUDGET_KEY, BUDGET_USD = "sk-telemetry-budget", 5.0
SECRET = "the secret prompt text"  # must never reach a log line
SMALL_PRICE = (0.05, 0.1)  # USD per million input, output tokens (conftest's policy)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def traceparent(trace_id: str, span_id: str = "b7ad6b7169203331") -> str:
    return f"00-{trace_id}-{span_id}-01"


def new_trace_id() -> str:
    return os.urandom(16).hex()


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sims(log_dir: Path, services: Services) -> dict[str, list[Service]]:
    return {
        "small": [services(start_sim(log_dir, "small", *FAST)) for _ in range(2)],
        "large": [services(start_sim(log_dir, "large", *FAST))],
    }


def telemetry_policy(sims: dict[str, list[Service]], **sections: Any) -> dict[str, Any]:
    return policy_for(
        [s.url for s in sims["small"]],
        [s.url for s in sims["large"]],
        tenants={
            "team-a": {"keys": [hash_key(KEY)]},
            # Any request costs more than this budget: each one is refused with a 429.
            "team-poor": {"keys": [hash_key(POOR_KEY)], "budget": {"usd_per_day": 1e-9}},
            "team-budget": {"keys": [hash_key(BUDGET_KEY)], "budget": {"usd_per_day": BUDGET_USD}},
        },
        **sections,
    )


@pytest.fixture(scope="module")
def gateway(log_dir: Path, services: Services, sims: dict[str, list[Service]]) -> Service:
    """Tracing off (no OTLP endpoint): the client's traceparent goes on unchanged."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}
    return services(start_gateway(log_dir, telemetry_policy(sims), env))


@pytest.fixture(scope="module")
def otlp() -> Iterator[Received]:
    """An OTLP/HTTP trace receiver: its URL and what it has received."""
    with otlp_receiver() as received:
        yield received


@pytest.fixture(scope="module")
def traced_gateway(
    log_dir: Path,
    services: Services,
    sims: dict[str, list[Service]],
    otlp: Received,
) -> Service:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    return services(start_gateway(log_dir, telemetry_policy(sims), env))


# --- helpers -------------------------------------------------------------------------------


def ask(gateway: Service, key: str | None = KEY, **body: Any) -> httpx.Response:
    headers = dict(body.pop("headers", {}))
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    payload = {
        "model": "cheap",
        "messages": [{"role": "user", "content": SECRET}],
        "max_tokens": 8,
        "temperature": 0.7,
        **body,
    }
    return httpx.post(
        gateway.url + "/v1/chat/completions", json=payload, headers=headers, timeout=30
    )


def stream(gateway: Service, **body: Any) -> tuple[httpx.Headers, list[dict[str, Any]]]:
    payload = {
        "model": "cheap",
        "messages": [{"role": "user", "content": SECRET}],
        "max_tokens": 6,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
        **body,
    }
    url = gateway.url + "/v1/chat/completions"
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", url, json=payload, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
        return response.headers, [orjson.loads(line[6:]) for line in lines]


def sim_traces(sims: dict[str, list[Service]]) -> list[dict[str, str]]:
    found: list[dict[str, str]] = []
    for sim in sims["small"] + sims["large"]:
        root = sim.url.removesuffix("/v1")
        found.extend(httpx.get(root + "/admin/traces", timeout=5).json())
    return found


def scrape(gateway: Service) -> Samples:
    response = httpx.get(gateway.url + "/metrics", timeout=5)
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Summed over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def settled(
    gateway: Service, before: Samples, name: str, expected: float, **labels: str
) -> tuple[Samples, Samples]:
    """Scrape until `name` has grown by `expected` since `before` (requests are accounted
    after their answer); the scrape, and what grew since `before`."""
    deadline = time.monotonic() + 5
    while True:
        after = scrape(gateway)
        grown = {key: v - before.get(key, 0.0) for key, v in after.items()}
        if total(grown, name, **labels) >= expected or time.monotonic() > deadline:
            return after, grown
        time.sleep(0.05)


def cost(usage: dict[str, Any], price: tuple[float, float] = SMALL_PRICE) -> float:
    prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    return (prompt * price[0] + completion * price[1]) / 1e6


# --- trace context -------------------------------------------------------------------------


def test_tracing_off_forwards_the_clients_traceparent_unchanged(
    gateway: Service, sims: dict[str, list[Service]]
) -> None:
    sent = traceparent(new_trace_id())
    response = ask(gateway, headers={"traceparent": sent, "tracestate": "vendor=1"})
    assert response.status_code == 200
    assert {"traceparent": sent, "tracestate": "vendor=1"} in sim_traces(sims)


def test_tracing_on_continues_the_clients_trace_to_the_backend(
    traced_gateway: Service,
    sims: dict[str, list[Service]],
    otlp: Received,
) -> None:
    trace_id, client_span = new_trace_id(), "00f067aa0ba902b7"
    response = ask(traced_gateway, headers={"traceparent": traceparent(trace_id, client_span)})
    assert response.status_code == 200
    (forwarded,) = [t for t in sim_traces(sims) if trace_id in t["traceparent"]]
    version, forwarded_trace, forwarded_span, flags = forwarded["traceparent"].split("-")
    assert (version, forwarded_trace, flags) == ("00", trace_id, "01")
    assert forwarded_span != client_span  # the gateway's own span, not the client's
    # The forwarded span is the upstream attempt, a child of the request's span, which is
    # a child of the client's.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ours = {s.span_id.hex(): s for s in otlp.spans if s.trace_id.hex() == trace_id}
        if forwarded_span in ours and any(
            s.kind == SpanProto.SPAN_KIND_SERVER for s in ours.values()
        ):
            break
        time.sleep(0.05)
    attempt = ours[forwarded_span]
    assert attempt.kind == SpanProto.SPAN_KIND_CLIENT
    assert attempt.name == f"chat {SMALL}"
    root = ours[attempt.parent_span_id.hex()]
    assert root.kind == SpanProto.SPAN_KIND_SERVER
    assert root.parent_span_id.hex() == client_span
    attributes = {a.key: a.value for a in root.attributes}
    assert attributes["gen_ai.response.model"].string_value == SMALL
    assert [
        v.string_value for v in attributes["gen_ai.response.finish_reasons"].array_value.values
    ] == ["length"]
    assert attributes["triage.tenant"].string_value == "team-a"


# --- metrics -------------------------------------------------------------------------------


def test_metrics_after_a_scripted_run(gateway: Service, sims: dict[str, list[Service]]) -> None:
    """A miss, its hit, a stream, a large-tier request and a budget refusal, as series."""
    before = scrape(gateway)
    prompt = [{"role": "user", "content": f"metrics {new_trace_id()}"}]
    miss = ask(gateway, messages=prompt, temperature=0)
    hit = ask(gateway, messages=prompt, temperature=0)
    assert (miss.headers["x-triage-cache"], hit.headers["x-triage-cache"]) == ("miss", "hit")
    _, chunks = stream(gateway)
    large = ask(gateway, model="large", max_tokens=4)
    refused = ask(gateway, key=POOR_KEY)
    assert (large.status_code, refused.status_code) == (200, 429)

    after, samples = settled(gateway, before, "triage_requests_total", 5)
    team = {"tenant": "team-a"}
    cheap = {"tier": "cheap", "model": SMALL, **team, "status": "200"}
    assert value(samples, "triage_requests_total", **cheap, cache="miss") == 1
    assert value(samples, "triage_requests_total", **cheap, cache="hit") == 1
    assert value(samples, "triage_requests_total", **cheap, cache="bypass") == 1  # the stream
    assert (
        value(
            samples,
            "triage_requests_total",
            tier="large",
            model=LARGE,
            **team,
            status="200",
            cache="bypass",
        )
        == 1
    )
    assert total(samples, "triage_requests_total", tenant="team-poor", status="429") == 1
    assert total(samples, "triage_requests_total") == 5
    assert value(after, "triage_requests_in_flight") == 0

    # Tokens and cost: the backend's usage, at the policy's prices; a hit costs nothing.
    stream_usage = chunks[-1]["usage"]
    miss_usage = miss.json()["usage"]
    out = {"tenant": "team-a", "tier": "cheap", "model": SMALL}
    assert value(samples, "triage_tokens_total", **out, type="output") == 8 + 6
    assert value(samples, "triage_tokens_total", **out, type="input") == (
        miss_usage["prompt_tokens"] + stream_usage["prompt_tokens"]
    )
    assert value(samples, "triage_cost_usd_total", **out) == pytest.approx(
        cost(miss_usage) + cost(stream_usage)
    )
    assert value(samples, "triage_cost_usd_total", **team, tier="large", model=LARGE) > 0
    assert value(samples, "triage_cache_saved_usd_total", **team, tier="cheap") == pytest.approx(
        cost(miss_usage)
    )
    assert total(samples, "triage_cost_usd_total", tenant="team-poor") == 0

    # Latency: the stream has a TTFT; the hit is not the tier's latency.
    genai = {"gen_ai_operation_name": "chat", "gen_ai_response_model": SMALL, "tier": "cheap"}
    assert value(samples, "gen_ai_server_time_to_first_token_seconds_count", **genai) == 1
    assert value(samples, "gen_ai_server_request_duration_seconds_count", **genai) == 2
    assert value(samples, "gen_ai_server_time_per_output_token_seconds_count", **genai) == 1
    usage = {**genai, "gen_ai_token_type": "output"}
    assert value(samples, "gen_ai_client_token_usage_count", **usage) == 2
    assert value(samples, "gen_ai_client_token_usage_sum", **usage) == 14
    assert value(samples, "triage_routing_decisions_total", tier="cheap", reason="tier") == 4
    assert value(samples, "triage_routing_decisions_total", tier="large", reason="tier") == 1

    # Replica health, from the policy's pools.
    for sim in sims["small"]:
        assert value(after, "triage_replica_up", model=SMALL, replica=sim.url) == 1
        assert value(after, "triage_replica_in_flight", model=SMALL, replica=sim.url) == 0
    per_replica = total(samples, "triage_upstream_requests_total", model=SMALL, status="200")
    assert per_replica == 2  # the miss and the stream went upstream; the hit did not


def test_budget_remaining_after_a_request(gateway: Service) -> None:
    response = ask(gateway, key=BUDGET_KEY, max_tokens=4)
    assert response.status_code == 200
    left = float(response.headers["x-triage-budget-remaining-usd"])
    assert 0 < left < BUDGET_USD
    series = {"tenant": "team-budget", "tier": "all", "window": "day"}
    assert value(scrape(gateway), "triage_budget_remaining_usd", **series) == pytest.approx(left)


def test_overhead_header_excludes_the_backend(gateway: Service) -> None:
    """A 64-token answer takes the sim 64 ms or more; the gateway's own share is far less."""
    for stream_it in (False, True):
        started = time.perf_counter()
        response = ask(gateway, model="large", max_tokens=64, ignore_eos=True, stream=stream_it)
        elapsed_ms = (time.perf_counter() - started) * 1000
        assert response.status_code == 200
        overhead = float(response.headers["x-triage-overhead-ms"])
        assert 0 < overhead < elapsed_ms - 50, (overhead, elapsed_ms)
    prompt = [{"role": "user", "content": f"overhead {new_trace_id()}"}]
    ask(gateway, messages=prompt, temperature=0)
    hit = ask(gateway, messages=prompt, temperature=0)
    assert hit.headers["x-triage-cache"] == "hit"
    assert float(hit.headers["x-triage-overhead-ms"]) > 0


def test_metrics_labels_stay_bounded(gateway: Service) -> None:
    before = scrape(gateway)
    ask(gateway, key=None)  # anonymous
    samples, grown = settled(gateway, before, "triage_requests_total", 1, tenant="anonymous")
    assert total(grown, "triage_requests_total", tenant="anonymous") == 1
    labels = {k for (_, have) in samples for k, _ in have}
    assert not labels & {"request_id", "key", "trace_id", "prompt"}
    for (_, have), _ in samples.items():
        for _, label in have:
            assert not label.startswith("sk-")


# --- request logs --------------------------------------------------------------------------


def test_one_json_line_per_request_without_prompt_text(gateway: Service) -> None:
    trace_id = new_trace_id()
    response = ask(gateway, headers={"traceparent": traceparent(trace_id)})
    request_id = response.headers["x-triage-request-id"]
    (line,) = request_lines(gateway, request_id)
    usage = response.json()["usage"]
    assert line["level"] == "info"
    assert line["request_id"] == request_id
    assert line["trace_id"] == trace_id  # from the client's traceparent, tracing off or on
    assert (line["tenant"], line["tier"], line["model"]) == ("team-a", "cheap", SMALL)
    assert (line["status"], line["cache"], line["stream"]) == (200, "bypass", False)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert line["cost_usd"] == pytest.approx(cost(usage))
    assert line["finish_reasons"] == ["length"]
    assert 0 < line["latency_ms"] < 10_000
    assert "prompt" not in line and "completion" not in line
    assert SECRET not in gateway.output()  # in no line, of any request


def test_log_lines_of_a_stream_a_hit_and_a_refusal(gateway: Service) -> None:
    headers, _ = stream(gateway)
    (streamed,) = request_lines(gateway, headers["x-triage-request-id"])
    assert (streamed["stream"], streamed["completion_tokens"]) == (True, 6)
    assert streamed["ttft_ms"] is not None and streamed["finish_reasons"] == ["length"]

    prompt = [{"role": "user", "content": f"log {new_trace_id()}"}]
    ask(gateway, messages=prompt, temperature=0)
    hit = ask(gateway, messages=prompt, temperature=0)
    (cached,) = request_lines(gateway, hit.headers["x-triage-request-id"])
    assert (cached["cache"], cached["cost_usd"]) == ("hit", 0)
    assert cached["saved_usd"] > 0 and cached["finish_reasons"] == ["length"]

    refused = ask(gateway, key=POOR_KEY)
    (line,) = request_lines(gateway, refused.headers["x-triage-request-id"])
    assert (line["status"], line["tenant"], line["cost_usd"]) == (429, "team-poor", 0)
    assert line["error_code"]


def test_each_worker_writes_its_request_lines(
    log_dir: Path, services: Services, sims: dict[str, list[Service]]
) -> None:
    """Worker processes are fresh interpreters: each must set up the JSON log itself."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}
    policy = telemetry_policy(sims)
    # No budgets: with the in-process store, `serve` refuses quotas under several workers.
    policy["tenants"] = {"team-a": policy["tenants"]["team-a"]}
    workers = services(start_gateway(log_dir, policy, env, workers=2))
    ids = [ask(workers).headers["x-triage-request-id"] for _ in range(6)]
    for request_id in ids:
        (line,) = request_lines(workers, request_id)
        assert line["status"] == 200


# --- failed requests: where they failed, what the client was told -------------------------

SLOW = ("--ttft-ms", "300", "--itl-ms", "2", "--jitter", "0")
OVERHEAD = "x-triage-overhead-ms"


@pytest.fixture(scope="module")
def failing(log_dir: Path, services: Services) -> tuple[Service, Service]:
    """A slow cheap replica (300 ms to a first token) with an SLO, faults set per test, no
    fallback tier (each failure stays where it happened); a 2 s upstream timeout."""
    small = services(start_sim(log_dir, "small", *SLOW))
    large = services(start_sim(log_dir, "large", *FAST))
    slo = {"ttft_ms": 2000, "e2e_ms": 5000, "max_queue_ms": 1000}
    policy = policy_for(
        [small.url],
        [large.url],
        server={"upstream_timeout_s": 2},
        tiers={"cheap": {"models": [SMALL], "slo": slo}},
        routing={"fallback": {}},
        cache={"enabled": False},
    )
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}
    return small, services(start_gateway(log_dir, policy, env))


def overhead_of(response: httpx.Response) -> float:
    """The gateway's own time the answer reports; it must be there, on errors too."""
    assert OVERHEAD in response.headers, (response.status_code, dict(response.headers))
    return float(response.headers[OVERHEAD])


def logged(gateway: Service, response: httpx.Response) -> dict[str, Any]:
    (line,) = request_lines(gateway, response.headers["x-triage-request-id"])
    error = response.json()["error"]
    # What the client was told, never a Python class name.
    assert (line["status"], line["error_code"], line["error_type"]) == (
        response.status_code,
        error["code"],
        error["type"],
    )
    return line


def test_failed_requests_are_put_on_the_tier_model_and_replica_they_failed_at(
    failing: tuple[Service, Service],
) -> None:
    small, gateway = failing
    before = scrape(gateway)
    # A backend 400: the replica's own answer, passed on (a field only the backend checks).
    bad = ask(gateway, key=None, min_tokens="many")
    assert bad.status_code == 400, bad.text
    line = logged(gateway, bad)
    assert (line["tier"], line["model"], line["replica"]) == ("cheap", SMALL, small.url)
    overhead_of(bad)

    # Shed: once the replica's 300 ms TTFT is known, a request that must start within
    # 100 ms is refused, sheddable at once (429), standard when its deadline passes (503).
    for _ in range(3):
        assert ask(gateway, key=None, stream=True).status_code == 200
    tight = {"x-slo-ttft-ms": "100"}
    shed = ask(gateway, key=None, headers={**tight, "x-triage-priority": "sheddable"})
    expired = ask(gateway, key=None, headers={**tight, "x-triage-priority": "standard"})
    assert (shed.status_code, shed.json()["error"]["code"]) == (429, "over_capacity")
    assert (expired.status_code, expired.json()["error"]["code"]) == (503, "deadline_expired")
    for refused in (shed, expired):
        line = logged(gateway, refused)
        assert (line["tier"], line["model"], line["replica"]) == ("cheap", SMALL, None)
        overhead_of(refused)

    # A backend 500, answered as 502.
    set_faults(small, rate=1.0, kind="500")
    try:
        broken = ask(gateway, key=None)
    finally:
        set_faults(small, rate=0.0)
    assert broken.status_code == 502, broken.text
    line = logged(gateway, broken)
    assert (line["tier"], line["model"], line["replica"]) == ("cheap", SMALL, small.url)
    overhead_of(broken)

    # No answer within the upstream timeout: 504.
    set_faults(small, rate=1.0, kind="hang")
    try:
        late = ask(gateway, key=None)
    finally:
        set_faults(small, rate=0.0)
    assert late.status_code == 504, late.text
    line = logged(gateway, late)
    assert (line["tier"], line["model"], line["replica"]) == ("cheap", SMALL, small.url)
    # The 2 s the backend took are not the gateway's.
    assert overhead_of(late) < 1000

    _, grown = settled(gateway, before, "triage_requests_total", 9)
    cheap = {"tier": "cheap", "model": SMALL, "tenant": "anonymous", "cache": "bypass"}
    for status, count in (("200", 3), ("400", 1), ("429", 1), ("502", 1), ("503", 1), ("504", 1)):
        assert value(grown, "triage_requests_total", **cheap, status=status) == count, status
    assert total(grown, "triage_requests_total", tier="none") == 0
    for status in ("400", "502", "504"):
        series = {"model": SMALL, "replica": small.url, "status": status}
        assert value(grown, "triage_upstream_requests_total", **series) == 1, status
    assert value(grown, "triage_requests_shed_total", tier="cheap") == 2
    slo = {r: value(grown, "triage_slo_requests_total", tier="cheap", result=r) for r in
           ("met", "shed", "expired", "error")}  # fmt: skip
    assert slo == {"met": 3, "shed": 1, "expired": 1, "error": 2}


def test_every_error_answer_says_the_gateways_overhead(gateway: Service) -> None:
    unauthorized = ask(gateway, key="sk-not-a-key")
    unknown = ask(gateway, model="no-such-model")
    not_json = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
        timeout=30,
    )
    assert (unauthorized.status_code, unknown.status_code, not_json.status_code) == (401, 404, 400)
    for response in (unauthorized, unknown, not_json):
        assert 0 < overhead_of(response) < 10_000
        line = logged(gateway, response)
        assert line["tier"] is None  # refused before routing: no tier to put it on
    # The routes Starlette serves too: their answers, errors included.
    for method, path, status in (
        ("GET", "/metrics", 200),
        ("GET", "/healthz", 200),
        ("GET", "/no-such-route", 404),
        ("GET", "/v1/chat/completions", 405),
        ("POST", "/admin/reload", 404),  # admin endpoints are off
    ):
        response = httpx.request(method, gateway.url + path, timeout=5)
        assert response.status_code == status, (path, response.text)
        assert overhead_of(response) >= 0, path


def test_no_created_families_on_metrics(gateway: Service) -> None:
    assert ask(gateway).status_code == 200
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    names = [family.name for family in text_string_to_metric_families(text)]
    assert "triage_requests" in names
    assert not [name for name in names if name.endswith("_created")]
    assert "_created" not in text

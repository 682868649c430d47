"""The span tree of a hit, a miss, a retry and a stream, from an in-memory span exporter.

The gateway runs in this process (httpx's ASGI transport, its lifespan entered by hand)
so its spans can go to memory; its backends are real sim processes on loopback.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import gateway.app
from gateway.telemetry import Telemetry, TelemetrySettings
from tests.integration.conftest import (
    SMALL,
    Service,
    policy_for,
    set_faults,
    start_sim,
)

pytestmark = pytest.mark.integration
FAST = ("--ttft-ms", "2", "--itl-ms", "1", "--jitter", "0")
FLAKY = "flaky-8b"  # a model on a replica that always answers 503; its tier falls back to cheap
SECRET = "the secret prompt text"
CLIENT_TRACE_ID, CLIENT_SPAN_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
STAGES = {"triage.auth", "triage.route", "triage.cache.lookup"}
FORWARDING = {"triage.budget.reserve", "triage.dispatch", "triage.budget.settle"}


@pytest.fixture(scope="module")
def sims(log_dir: Path, services: Callable[[Service], Service]) -> dict[str, Service]:
    started = {
        "small": services(start_sim(log_dir, "small", *FAST)),
        "large": services(start_sim(log_dir, "large", *FAST)),
        "flaky": services(start_sim(log_dir, "small", *FAST)),
    }
    set_faults(started["flaky"], rate=1.0, kind="503")  # not started: may fall back
    return started


@pytest.fixture
async def client(
    tmp_path: Path, sims: dict[str, Service], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[httpx.AsyncClient, InMemorySpanExporter]]:
    policy = policy_for([sims["small"].url], [sims["large"].url])
    policy["models"][FLAKY] = {
        "replicas": [sims["flaky"].url],
        "served_name": SMALL,
        "price": {"input_per_mtok": 0.05, "output_per_mtok": 0.1},
    }
    policy["tiers"]["flaky"] = {"models": [FLAKY]}
    policy["routing"]["fallback"]["flaky"] = ["cheap"]
    # A quota, so that requests reserve and settle (a policy without one skips both).
    policy["budgets"] = {"tiers": {"cheap": {"usd_per_day": 1000.0}}}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))

    exporter = InMemorySpanExporter()

    def in_memory(settings: TelemetrySettings) -> Telemetry:
        return Telemetry(settings, environ={}, span_processor=SimpleSpanProcessor(exporter))

    monkeypatch.setattr(gateway.app, "Telemetry", in_memory)
    app = gateway.app.build_app(path)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            yield http, exporter


async def chat(http: httpx.AsyncClient, **body: Any) -> httpx.Response:
    headers = body.pop("headers", {})
    payload = {
        "model": "cheap",
        "messages": [{"role": "user", "content": SECRET}],
        "max_tokens": 5,
        "temperature": 0.7,
        **body,
    }
    response = await http.post("/v1/chat/completions", json=payload, headers=headers)
    assert response.status_code == 200, response.text
    return response


def tree(exporter: InMemorySpanExporter) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The one request's root span, and its children; checks they form one tree."""
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.kind is SpanKind.SERVER]
    assert root.context is not None
    children = [s for s in spans if s is not root]
    for child in children:
        assert child.parent is not None and child.parent.span_id == root.context.span_id
        assert child.context is not None and child.context.trace_id == root.context.trace_id
    for span in spans:  # no prompt text anywhere unless the policy opts in
        assert all(SECRET not in str(v) for v in (span.attributes or {}).values())
    exporter.clear()
    return root, children


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def attempts(children: list[ReadableSpan]) -> list[dict[str, Any]]:
    found = [attrs(s) for s in children if s.kind is SpanKind.CLIENT]
    return sorted(found, key=lambda a: int(a["triage.attempt.number"]))


async def test_a_miss_then_its_hit(client: tuple[httpx.AsyncClient, InMemorySpanExporter]) -> None:
    http, exporter = client
    body = {"temperature": 0, "messages": [{"role": "user", "content": f"{SECRET} {os.getpid()}"}]}
    traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
    miss = await chat(http, headers={"traceparent": traceparent}, **body)
    assert miss.headers["x-triage-cache"] == "miss"
    root, children = tree(exporter)
    assert {s.name for s in children} == STAGES | FORWARDING | {f"chat {SMALL}"}
    assert root.name == "chat cheap"
    assert root.context is not None and root.parent is not None
    assert format(root.context.trace_id, "032x") == CLIENT_TRACE_ID  # the client's trace
    assert format(root.parent.span_id, "016x") == CLIENT_SPAN_ID
    usage = miss.json()["usage"]
    found = attrs(root)
    assert found["gen_ai.operation.name"] == "chat"
    assert found["gen_ai.request.model"] == "cheap"
    assert found["gen_ai.response.model"] == SMALL
    assert found["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert found["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 5
    assert found["gen_ai.response.finish_reasons"] == ("length",)
    assert found["gen_ai.request.temperature"] == 0
    assert found["gen_ai.request.stream"] is False
    assert (found["triage.tier"], found["triage.cache"]) == ("cheap", "miss")
    assert found["triage.tenant"] == "anonymous"
    assert found["triage.decision_reason"] == "tier"
    assert found["triage.cost_usd"] == pytest.approx(
        (usage["prompt_tokens"] * 0.05 + usage["completion_tokens"] * 0.1) / 1e6
    )
    assert found["triage.request_id"] == miss.headers["x-triage-request-id"]
    assert found["http.response.status_code"] == 200
    (attempt,) = attempts(children)
    assert attempt["triage.attempt"] == "first"
    assert attempt["triage.attempt.outcome"] == "answered"
    assert attempt["triage.replica"] == sims_url(attempt)
    assert attempt["gen_ai.response.finish_reasons"] == ("length",)

    hit = await chat(http, **body)
    assert hit.headers["x-triage-cache"] == "hit"
    root, children = tree(exporter)
    assert {s.name for s in children} == STAGES  # no budget, no backend
    found = attrs(root)
    assert (found["triage.cache"], found["triage.cost_usd"]) == ("hit", 0)
    assert found["triage.saved_usd"] > 0
    assert found["gen_ai.response.finish_reasons"] == ("length",)
    assert found["gen_ai.response.model"] == SMALL


def sims_url(attempt: dict[str, Any]) -> str:
    """The attempt's replica URL, rebuilt from its server.* attributes."""
    return f"http://{attempt['server.address']}:{attempt['server.port']}/v1"


async def test_a_retry_after_a_failed_send(
    client: tuple[httpx.AsyncClient, InMemorySpanExporter], sims: dict[str, Service]
) -> None:
    http, exporter = client
    # Pinned by header: a tier named in `model` gets no fallback, a pinned one does.
    response = await chat(http, model="auto", headers={"x-triage-tier": "flaky"})
    assert response.headers["x-triage-tier"] == "cheap"  # the fallback answered
    root, children = tree(exporter)
    first, retry = attempts(children)
    assert (first["triage.attempt"], first["triage.attempt.number"]) == ("first", 1)
    assert (first["triage.replica"], first["triage.attempt.outcome"]) == (
        sims["flaky"].url,
        "failed",
    )
    assert first["gen_ai.request.model"] == FLAKY
    assert first["error.type"]
    (failed,) = [s for s in children if attrs(s) == first]
    assert failed.status.status_code is StatusCode.ERROR
    assert (retry["triage.attempt"], retry["triage.attempt.number"]) == ("retry", 2)
    assert (retry["triage.replica"], retry["triage.attempt.outcome"]) == (
        sims["small"].url,
        "answered",
    )
    found = attrs(root)
    assert found["triage.retries"] == 1
    assert (found["triage.decided_tier"], found["triage.tier"]) == ("flaky", "cheap")
    assert root.status.status_code is StatusCode.UNSET  # the client got its answer


async def test_a_stream(client: tuple[httpx.AsyncClient, InMemorySpanExporter]) -> None:
    http, exporter = client
    response = await chat(http, stream=True)
    assert response.text.rstrip().endswith("data: [DONE]")
    root, children = tree(exporter)
    assert {s.name for s in children} == STAGES | FORWARDING | {f"chat {SMALL}"}
    found = attrs(root)
    assert found["gen_ai.request.stream"] is True
    assert found["gen_ai.response.finish_reasons"] == ("length",)
    assert found["gen_ai.usage.output_tokens"] == 5
    assert 0 < found["gen_ai.response.time_to_first_chunk"] < 5
    assert found["triage.cache"] == "bypass"  # temperature 0.7
    (attempt,) = attempts(children)
    assert attempt["triage.attempt.outcome"] == "answered"
    assert attempt["gen_ai.usage.output_tokens"] == 5
    # The attempt ends with the stream, after the dispatch span (which ends at the first token).
    by_name = {s.name: s for s in children}
    attempt_span, dispatch = by_name[f"chat {SMALL}"], by_name["triage.dispatch"]
    assert attempt_span.end_time is not None and dispatch.end_time is not None
    assert attempt_span.end_time > dispatch.end_time

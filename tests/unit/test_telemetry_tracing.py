from __future__ import annotations

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.errors import NotFound, UpstreamUnavailable
from gateway.telemetry import RequestRecord, Telemetry, TelemetrySettings
from gateway.telemetry.tracing import (
    NOOP_SPAN,
    NOOP_TRACE,
    _traces_endpoint,
    build_tracing,
    trace_id_from_traceparent,
)
from gateway.upstream import Outcome
from tests.support.otlp import otlp_receiver

CLIENT_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
BODY = {
    "model": "auto",
    "messages": [{"role": "user", "content": "the secret prompt"}],
    "max_tokens": 64,
    "temperature": 0.0,
    "stream": True,
}


def traced(**settings: object) -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(
        TelemetrySettings.model_validate(settings),
        environ={},
        span_processor=SimpleSpanProcessor(exporter),
    )
    return telemetry, exporter


def serve_one(
    telemetry: Telemetry, headers: dict[str, str]
) -> tuple[RequestRecord, dict[str, str]]:
    """What the request path does for a streamed chat request that needed one retry."""
    record = telemetry.start("chat", headers, "req-1")
    with record.trace.span("triage.auth"):
        record.tenant = "team-a"
    record.requested_model, record.stream, record.body = "auto", True, BODY
    with record.trace.span("triage.cache.lookup") as span:
        span.set("triage.cache", "miss")
        record.cache = "miss"
    with record.trace.span("triage.route"):
        record.decided_tier, record.decision_reason, record.difficulty = "cheap", "classifier", 0.2
    with record.trace.span("triage.budget.reserve"):
        pass
    first = record.trace.attempt("llama-8b", "http://pool-0:8000/v1")
    first.inject({})
    first.end(UpstreamUnavailable("refused", code="connect_failed"))
    record.retries += 1
    retry = record.trace.attempt("llama-8b", "https://pool-1/v1", kind="retry", number=2)
    client = {"Traceparent": headers.get("traceparent", ""), "x-request-id": "abc"}
    forwarded = dict(retry.inject(client))
    assert client["x-request-id"] == forwarded.pop("x-request-id")  # other headers pass
    assert "Traceparent" not in forwarded  # the client's is replaced, not sent twice
    outcome = Outcome(first_token_at=record.started_at + 0.05, completed=True)
    outcome.usage = {"prompt_tokens": 9, "completion_tokens": 4}
    record.served("cheap", "llama-8b", "https://pool-1/v1")
    record.add_outcome(outcome)
    record.cost_usd, record.finish_reasons = 0.00125, ("stop",)
    retry.end(outcome=outcome)
    with record.trace.span("triage.budget.settle"):
        pass
    telemetry.finish(record)
    return record, forwarded


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


# --- tracing off -------------------------------------------------------------------------


def test_off_by_default_and_shares_noop_objects() -> None:
    telemetry = Telemetry(environ={})
    assert not telemetry.tracing_enabled
    record = telemetry.start("chat", {"traceparent": TRACEPARENT}, "r")
    assert record.trace is NOOP_TRACE
    assert record.trace.span("triage.auth") is NOOP_SPAN
    assert record.trace.attempt("m", "http://r/v1", "hedge") is NOOP_SPAN
    headers = {"traceparent": TRACEPARENT}
    assert NOOP_SPAN.inject(headers) is headers
    assert headers == {"traceparent": TRACEPARENT}  # the client's header goes on unchanged
    with record.trace.span("x") as span:
        span.set("k", 1)
    assert record.trace_id == CLIENT_TRACE_ID  # logs still carry the client's trace id


def test_off_noop_span_lets_exceptions_through() -> None:
    with pytest.raises(NotFound), NOOP_SPAN:
        raise NotFound("x")


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
    ],
)
def test_tracing_stays_off(environ: dict[str, str]) -> None:
    assert build_tracing(TelemetrySettings(), environ) is None


@pytest.mark.parametrize(
    ("settings", "environ", "endpoint"),
    [
        ({"otlp_endpoint": "http://c:4318"}, {}, "http://c:4318/v1/traces"),
        ({"otlp_endpoint": "http://c:4318/v1/traces"}, {}, "http://c:4318/v1/traces"),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://e:4318/"}, "http://e:4318/v1/traces"),
        ({}, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x"}, "http://t/x"),
    ],
)
def test_endpoint_from_policy_or_otel_variables(
    settings: dict[str, str], environ: dict[str, str], endpoint: str
) -> None:
    parsed = TelemetrySettings.model_validate(settings)
    assert _traces_endpoint(parsed, environ) == endpoint
    tracing = build_tracing(parsed, environ)
    assert tracing is not None
    tracing.shutdown()


@pytest.mark.parametrize(
    ("header", "trace_id"),
    [
        (TRACEPARENT, CLIENT_TRACE_ID),
        (f" {TRACEPARENT} ", CLIENT_TRACE_ID),
        (None, None),
        ("garbage", None),
        (f"00-{'0' * 32}-{CLIENT_SPAN_ID}-01", None),
        (TRACEPARENT.upper(), None),
    ],
)
def test_trace_id_from_traceparent(header: str | None, trace_id: str | None) -> None:
    assert trace_id_from_traceparent(header) == trace_id


# --- tracing on --------------------------------------------------------------------------


def test_span_tree_continues_the_client_trace() -> None:
    telemetry, exporter = traced()
    record, _ = serve_one(telemetry, {"traceparent": TRACEPARENT})
    spans = exporter.get_finished_spans()
    names = [span.name for span in spans]
    assert names == [
        "triage.auth",
        "triage.cache.lookup",
        "triage.route",
        "triage.budget.reserve",
        "chat llama-8b",
        "chat llama-8b",
        "triage.budget.settle",
        "chat auto",
    ]
    root = spans[-1]
    assert root.kind is SpanKind.SERVER
    assert root.context is not None and root.parent is not None
    assert format(root.context.trace_id, "032x") == CLIENT_TRACE_ID
    assert format(root.parent.span_id, "016x") == CLIENT_SPAN_ID
    assert record.trace_id == CLIENT_TRACE_ID
    for child in spans[:-1]:
        assert child.parent is not None and child.parent.span_id == root.context.span_id
        assert child.context is not None and child.context.trace_id == root.context.trace_id


def test_root_span_attributes_follow_genai_conventions() -> None:
    telemetry, exporter = traced()
    serve_one(telemetry, {})
    root = by_name(exporter.get_finished_spans())["chat auto"]
    attributes = dict(root.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "auto"
    assert attributes["gen_ai.response.model"] == "llama-8b"
    assert attributes["gen_ai.usage.input_tokens"] == 9
    assert attributes["gen_ai.usage.output_tokens"] == 4
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["gen_ai.request.max_tokens"] == 64
    assert attributes["gen_ai.request.temperature"] == 0.0
    assert attributes["gen_ai.request.stream"] is True
    assert 0.04 < float(attributes["gen_ai.response.time_to_first_chunk"]) < 1  # type: ignore[arg-type]
    assert attributes["triage.tier"] == "cheap"
    assert attributes["triage.difficulty"] == 0.2
    assert attributes["triage.cache"] == "miss"
    assert attributes["triage.tenant"] == "team-a"
    assert attributes["triage.cost_usd"] == 0.00125
    assert attributes["triage.request_id"] == "req-1"
    assert attributes["triage.retries"] == 1
    assert attributes["http.response.status_code"] == 200
    assert root.status.status_code is StatusCode.UNSET


def test_no_prompt_or_completion_text_unless_the_policy_opts_in() -> None:
    telemetry, exporter = traced()
    serve_one(telemetry, {})
    for span in exporter.get_finished_spans():
        for value in (span.attributes or {}).values():
            assert "secret prompt" not in str(value)
    telemetry, exporter = traced(log_prompts=True)
    serve_one(telemetry, {})
    root = by_name(exporter.get_finished_spans())["chat auto"]
    assert "the secret prompt" in str((root.attributes or {})["gen_ai.input.messages"])


def test_completion_text_in_spans_when_opted_in() -> None:
    telemetry, exporter = traced(log_prompts=True)
    record = telemetry.start("chat", {}, "r")
    record.response_body = b'{"choices": [{"message": {"role": "assistant", "content": "42"}}]}'
    telemetry.finish(record)
    (root,) = exporter.get_finished_spans()
    assert '"content":"42"' in str((root.attributes or {})["gen_ai.output.messages"])


def test_attempt_spans_are_clients_and_record_failures() -> None:
    telemetry, exporter = traced()
    serve_one(telemetry, {})
    first, retry = (s for s in exporter.get_finished_spans() if s.name == "chat llama-8b")
    assert first.kind is SpanKind.CLIENT and retry.kind is SpanKind.CLIENT
    assert dict(first.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "llama-8b",
        "server.address": "pool-0",
        "server.port": 8000,
        "triage.replica": "http://pool-0:8000/v1",
        "triage.attempt": "first",
        "triage.attempt.number": 1,
        "error.type": "connect_failed",
    }
    assert first.status.status_code is StatusCode.ERROR
    retry_attributes = dict(retry.attributes or {})
    assert retry_attributes["triage.attempt"] == "retry"
    assert retry_attributes["triage.attempt.number"] == 2
    assert retry_attributes["server.port"] == 443
    assert retry_attributes["gen_ai.usage.output_tokens"] == 4
    assert retry.status.status_code is StatusCode.UNSET


def test_traceparent_forwarded_to_the_backend_is_the_attempt_span() -> None:
    telemetry, exporter = traced()
    _, forwarded = serve_one(telemetry, {"traceparent": TRACEPARENT})
    retry = [s for s in exporter.get_finished_spans() if s.name == "chat llama-8b"][1]
    assert retry.context is not None
    version, trace_id, span_id, flags = forwarded["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE_ID, "01")
    assert span_id == format(retry.context.span_id, "016x")


def test_an_exception_in_a_stage_marks_its_span_failed() -> None:
    telemetry, exporter = traced()
    record = telemetry.start("completions", {}, "r")
    with pytest.raises(NotFound), record.trace.span("triage.route"):
        raise NotFound("The model 'x' does not exist.")
    record.fail(NotFound("x"))
    telemetry.finish(record)
    route, root = exporter.get_finished_spans()
    assert route.status.status_code is StatusCode.ERROR
    assert route.status.description == "The model 'x' does not exist."
    assert (route.attributes or {})["error.type"] == "model_not_found"
    assert root.name == "text_completion"  # no model was read: the operation alone
    assert (root.attributes or {})["error.type"] == "model_not_found"
    assert root.status.status_code is StatusCode.UNSET  # a client error is not the server's


def test_server_errors_mark_the_root_span_failed() -> None:
    telemetry, exporter = traced()
    record = telemetry.start("embeddings", {}, "r")
    record.fail(UpstreamUnavailable("no replica"))
    telemetry.finish(record)
    (root,) = exporter.get_finished_spans()
    assert root.status.status_code is StatusCode.ERROR
    assert (root.attributes or {})["gen_ai.operation.name"] == "embeddings"


def test_unsampled_requests_export_nothing_but_still_propagate() -> None:
    telemetry, exporter = traced(sample_ratio=0.0)
    record = telemetry.start("chat", {}, "r")
    attempt = record.trace.attempt("m", "http://r:1/v1")
    forwarded = attempt.inject({})
    attempt.end()
    telemetry.finish(record)
    assert exporter.get_finished_spans() == ()
    assert forwarded["traceparent"].split("-")[1] == record.trace_id
    assert int(forwarded["traceparent"][-2:], 16) & 1 == 0  # the sampled flag is off
    # A client that sampled its trace wins over the ratio.
    record = telemetry.start("chat", {"traceparent": TRACEPARENT}, "r")
    telemetry.finish(record)
    assert len(exporter.get_finished_spans()) == 1


def test_service_name() -> None:
    telemetry, exporter = traced(service_name="triage-eu")
    telemetry.finish(telemetry.start("chat", {}, "r"))
    (root,) = exporter.get_finished_spans()
    assert root.resource.attributes["service.name"] == "triage-eu"


# --- OTLP export -------------------------------------------------------------------------


async def test_spans_are_exported_over_otlp_http() -> None:
    with otlp_receiver() as otlp:
        settings = TelemetrySettings(otlp_endpoint=otlp.url, service_name="triage-test")
        telemetry = Telemetry(settings, environ={})
        assert telemetry.tracing_enabled
        serve_one(telemetry, {"traceparent": TRACEPARENT})
        await telemetry.close()  # flushes the batch
    received = otlp.posts
    assert [path for path, _ in received] == ["/v1/traces"]
    request = ExportTraceServiceRequest.FromString(received[0][1])
    (resource_spans,) = request.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert service["service.name"] == "triage-test"
    spans = [span for scope in resource_spans.scope_spans for span in scope.spans]
    assert {span.name for span in spans} >= {"chat auto", "chat llama-8b", "triage.route"}
    assert {span.trace_id.hex() for span in spans} == {CLIENT_TRACE_ID}

"""The OpenTelemetry side of `tracing`: imported only when tracing is on.

Span and attribute names follow the OpenTelemetry GenAI semantic conventions: the
request's SERVER span is named `{gen_ai.operation.name} {gen_ai.request.model}`, and each
upstream attempt is a CLIENT span named `{gen_ai.operation.name} {model}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span as OtelSpan
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.errors import TriageError
from gateway.telemetry.logs import completion_text, prompt_text
from gateway.telemetry.tracing import (
    OPERATION_NAMES,
    AttemptKind,
    AttributeValue,
    RequestTrace,
    Span,
)

if TYPE_CHECKING:
    from gateway.telemetry.record import RequestRecord
    from gateway.telemetry.settings import TelemetrySettings
    from gateway.upstream import Outcome

__all__ = [
    "LiveSpan",
    "LiveTrace",
    "OtelTracing",
    "PropagatingSpan",
    "UnsampledTrace",
    "request_attributes",
]

# Request body fields -> GenAI request attributes (copied only when they are plain numbers).
_REQUEST_PARAMS = (
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("max_completion_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("seed", "gen_ai.request.seed"),
    ("n", "gen_ai.request.choice.count"),
    ("frequency_penalty", "gen_ai.request.frequency_penalty"),
    ("presence_penalty", "gen_ai.request.presence_penalty"),
)


class LiveSpan(Span):
    __slots__ = ("_span",)

    def __init__(self, span: OtelSpan) -> None:
        self._span = span

    def set(self, key: str, value: AttributeValue) -> None:
        self._span.set_attribute(key, value)

    def end(self, error: BaseException | None = None, outcome: Outcome | None = None) -> None:
        span = self._span
        if not span.is_recording():  # not sampled, or already ended
            return
        if outcome is not None:
            span.set_attribute("gen_ai.usage.input_tokens", outcome.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", outcome.completion_tokens)
            if outcome.finish_reasons:
                span.set_attribute("gen_ai.response.finish_reasons", outcome.finish_reasons)
            error = error or outcome.error
        if error is not None:
            _mark_failed(span, error)
        span.end()

    def inject(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        carrier = {k: v for k, v in headers.items() if k.lower() not in _TRACE_HEADERS}
        _PROPAGATOR.inject(carrier, context=set_span_in_context(self._span))
        return carrier


class LiveTrace(RequestTrace):
    __slots__ = ("_context", "_operation", "_root", "_tracing")

    def __init__(self, tracing: OtelTracing, root: OtelSpan, operation: str) -> None:
        self._tracing = tracing
        self._root = root
        self._operation = operation
        self._context = set_span_in_context(root)

    @property
    def trace_id(self) -> str | None:
        return format(self._root.get_span_context().trace_id, "032x")

    def span(self, name: str) -> Span:
        return LiveSpan(self._tracing.tracer.start_span(name, context=self._context))

    def attempt(
        self, model: str, replica_url: str, kind: AttemptKind = "first", number: int = 1
    ) -> Span:
        address, port = self._tracing.server_of(replica_url)
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": self._operation,
            "gen_ai.request.model": model,
            "server.address": address,
            "server.port": port,
            "triage.replica": replica_url,
            "triage.attempt": kind,
            "triage.attempt.number": number,
        }
        span = self._tracing.tracer.start_span(
            f"{self._operation} {model}",
            context=self._context,
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        return LiveSpan(span)

    def close(self, record: RequestRecord, capture_content: bool) -> None:
        root = self._root
        if not root.is_recording():
            return
        root.set_attributes(request_attributes(record, self._operation))
        if capture_content:
            root.set_attributes(_content_attributes(record))
        if record.requested_model is not None:
            root.update_name(f"{self._operation} {record.requested_model}")
        error_type = record.error_code or record.error_type  # the answer's code, else type
        if error_type is not None:
            root.set_attribute("error.type", error_type)
        if record.status >= 500:
            root.set_status(Status(StatusCode.ERROR, error_type))
        root.end()


class UnsampledTrace(RequestTrace):
    """A trace the sampler left out: no child spans (their parent records nothing, so
    they would not either), but attempts still pass the trace id on to the backend."""

    __slots__ = ("_attempt", "_root")

    def __init__(self, root: OtelSpan) -> None:
        self._root = root
        self._attempt = PropagatingSpan(set_span_in_context(root))

    @property
    def trace_id(self) -> str | None:
        return format(self._root.get_span_context().trace_id, "032x")

    def attempt(
        self, model: str, replica_url: str, kind: AttemptKind = "first", number: int = 1
    ) -> Span:
        return self._attempt


class PropagatingSpan(Span):
    """Records nothing; injects its trace context (the sampled flag stays off)."""

    __slots__ = ("_context",)

    def __init__(self, context: Context) -> None:
        self._context = context

    def inject(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        # The trace id still goes to the backend (sampled flag off): its logs line up.
        carrier = {k: v for k, v in headers.items() if k.lower() not in _TRACE_HEADERS}
        _PROPAGATOR.inject(carrier, context=self._context)
        return carrier


class OtelTracing:
    """The tracer provider of one app (not the global one: several apps share a process)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("triage")
        self._servers: dict[str, tuple[str, int]] = {}

    @classmethod
    def build(
        cls,
        settings: TelemetrySettings,
        environ: Mapping[str, str],
        endpoint: str | None,
        span_processor: SpanProcessor | None,
    ) -> OtelTracing:
        service = settings.service_name or environ.get("OTEL_SERVICE_NAME") or "triage"
        provider = TracerProvider(
            resource=Resource.create({"service.name": service}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        if span_processor is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            headers = dict(settings.otlp_headers) or None  # None: OTEL_EXPORTER_OTLP_HEADERS
            span_processor = BatchSpanProcessor(OTLPSpanExporter(endpoint, headers=headers))
        provider.add_span_processor(span_processor)
        return cls(provider)

    def start(self, operation: str, headers: Mapping[str, str], request_id: str) -> RequestTrace:
        name = OPERATION_NAMES.get(operation, operation)
        root = self.tracer.start_span(
            name,
            context=_PROPAGATOR.extract(headers),
            kind=SpanKind.SERVER,
            attributes={"gen_ai.operation.name": name, "triage.request_id": request_id},
        )
        if not root.is_recording():
            return UnsampledTrace(root)
        return LiveTrace(self, root, name)

    def shutdown(self) -> None:
        self.provider.shutdown()

    def server_of(self, url: str) -> tuple[str, int]:
        """`server.address` and `server.port` of a replica URL (few URLs: cached)."""
        server = self._servers.get(url)
        if server is None:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            server = self._servers[url] = (parts.hostname or "", port)
        return server


def request_attributes(record: RequestRecord, operation: str) -> dict[str, AttributeValue]:
    """The root span's attributes: GenAI conventions plus `triage.*`; never prompt text."""
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "http.response.status_code": record.status,
        "gen_ai.request.stream": record.stream,
        "triage.api": record.api,
        "triage.cache": record.cache,
        "triage.cost_usd": record.cost_usd,
        "triage.retries": record.retries,
        "triage.hedges": record.hedges,
    }
    optional = (
        ("gen_ai.request.model", record.requested_model),
        ("gen_ai.response.model", record.model),
        ("gen_ai.response.time_to_first_chunk", record.ttft_s if record.stream else None),
        ("triage.tenant", record.tenant),
        ("triage.tier", record.tier),
        ("triage.decided_tier", record.decided_tier),
        ("triage.decision_reason", record.decision_reason),
        ("triage.difficulty", record.difficulty),
        ("triage.replica", record.replica),
        ("triage.prefix_chars", record.prefix_chars),
        ("triage.usage.source", record.usage_source),
    )
    attributes.update((key, value) for key, value in optional if value is not None)
    if record.model is not None:
        attributes["gen_ai.usage.input_tokens"] = record.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = record.completion_tokens
    if record.finish_reasons:
        attributes["gen_ai.response.finish_reasons"] = record.finish_reasons
    if record.saved_usd:
        attributes["triage.saved_usd"] = record.saved_usd
    if record.shed:
        attributes["triage.shed"] = True
    if record.budget_downgraded:
        attributes["triage.budget_downgraded"] = True
    body = record.body or {}
    for field, key in _REQUEST_PARAMS:
        value = body.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool):
            attributes[key] = value
    return attributes


def _content_attributes(record: RequestRecord) -> dict[str, str]:
    """Prompt and completion text, only when the policy opts in (`log_prompts`).

    The prompt is the request's `messages` (or `prompt`/`input`) as JSON, as the client sent it.
    """
    attributes = {}
    if (prompt := prompt_text(record)) is not None:
        attributes["gen_ai.input.messages"] = prompt
    if (completion := completion_text(record)) is not None:
        attributes["gen_ai.output.messages"] = orjson.dumps(
            [{"role": "assistant", "parts": [{"type": "text", "content": completion}]}]
        ).decode()
    return attributes


def _mark_failed(span: OtelSpan, error: BaseException) -> None:
    """`error.type`: a `TriageError`'s OpenAI code, else its type; else the exception's
    class (a send cut off by a cancellation, say)."""
    if isinstance(error, TriageError):
        kind = error.code or error.error_type
    else:
        kind = type(error).__name__
    span.set_attribute("error.type", kind)
    span.set_status(Status(StatusCode.ERROR, str(error) or type(error).__name__))


_PROPAGATOR = TraceContextTextMapPropagator()
# The client's own trace headers are replaced by the gateway span's, never sent twice.
_TRACE_HEADERS = frozenset(("traceparent", "tracestate"))

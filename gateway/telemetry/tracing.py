"""Request traces: what the request path sees of tracing, and the no-ops it runs when off.

`Span` and `RequestTrace` are the interface; these base classes do nothing, and one
shared instance of each serves every request while tracing is off, so the request path
pays a method call per span and allocates nothing. The OpenTelemetry implementation is
in `_otel`, imported only when tracing is on (the SDK and exporter take ~150 ms to load).

Spans take their parent explicitly rather than from a context variable: a request's
span starts in the handler and ends in the task that streams its response.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor

    from gateway.telemetry.record import RequestRecord
    from gateway.telemetry.settings import TelemetrySettings
    from gateway.upstream import Outcome

__all__ = [
    "NOOP_SPAN",
    "NOOP_TRACE",
    "OPERATION_NAMES",
    "AttemptKind",
    "AttributeValue",
    "RequestTrace",
    "Span",
    "Tracing",
    "build_tracing",
    "trace_id_from_traceparent",
]

AttemptKind = Literal["first", "retry", "hedge"]
# Our request kinds -> `gen_ai.operation.name` values.
OPERATION_NAMES: Mapping[str, str] = {
    "chat": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}
AttributeValue = str | bool | int | float

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_NO_TRACE_ID = "0" * 32


class Span:
    """One timed step of a request. The base class is the no-op used when tracing is off.

    Use it as a context manager (an exception leaving the block marks the span failed),
    or call `end()` yourself when the work outlives the block, as a streamed reply does.
    """

    __slots__ = ()

    def __enter__(self) -> Span:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end(exc)

    def set(self, key: str, value: AttributeValue) -> None:
        """Set one attribute (`triage.*` or an OpenTelemetry semantic-convention name)."""

    def end(self, error: BaseException | None = None, outcome: Outcome | None = None) -> None:
        """End the span; `error` marks it failed, `outcome` adds an upstream call's usage."""

    def inject(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """`headers` with this span's W3C `traceparent` (and `tracestate`), for the backend.

        Returns a new mapping when tracing is on; the no-op returns `headers` itself, so
        the client's own `traceparent`, if the caller forwards it, goes on unchanged.
        """
        return headers


class RequestTrace:
    """One request's trace: its root span, and the way to start children under it.

    The base class is the no-op used when tracing is off.
    """

    __slots__ = ()

    @property
    def trace_id(self) -> str | None:
        return None

    def span(self, name: str) -> Span:
        """A child span for one stage: `triage.auth`, `triage.cache.lookup`, `triage.route`..."""
        return NOOP_SPAN

    def attempt(
        self, model: str, replica_url: str, kind: AttemptKind = "first", number: int = 1
    ) -> Span:
        """A client span for one upstream attempt; each retry and hedge gets its own.

        `number` counts the request's sends, from 1. The dispatcher ends the span with
        `triage.attempt.outcome` set, and the answer's `Outcome` for the one that won.
        """
        return NOOP_SPAN

    def close(self, record: RequestRecord, capture_content: bool) -> None:
        """End the root span with the request's outcome (called by `Telemetry.finish`)."""


NOOP_SPAN = Span()
NOOP_TRACE = RequestTrace()


class Tracing(Protocol):
    """Starts request traces for one app; built by `build_tracing` when tracing is on."""

    def start(self, operation: str, headers: Mapping[str, str], request_id: str) -> RequestTrace:
        """Begin a request's root span, continuing the client's `traceparent` if it sent one."""
        ...

    def shutdown(self) -> None:
        """Flush spans not yet exported and stop the exporter."""
        ...


def build_tracing(
    settings: TelemetrySettings,
    environ: Mapping[str, str],
    span_processor: SpanProcessor | None = None,
) -> Tracing | None:
    """An OpenTelemetry tracer provider for one app, or None when tracing is off.

    `span_processor` replaces the OTLP exporter (tests pass an in-memory one).
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    endpoint = _traces_endpoint(settings, environ)
    if span_processor is None and endpoint is None:
        return None
    from gateway.telemetry._otel import OtelTracing  # the SDK loads only when tracing is on

    return OtelTracing.build(settings, environ, endpoint, span_processor)


def trace_id_from_traceparent(value: str | None) -> str | None:
    """The trace id of a W3C `traceparent` header, or None if it is missing or malformed."""
    if value is None:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None or match.group(1) == _NO_TRACE_ID:
        return None
    return match.group(1)


def _traces_endpoint(settings: TelemetrySettings, environ: Mapping[str, str]) -> str | None:
    url = settings.traces_url()
    if url is not None:
        return url
    if traces := environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return traces
    if base := environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return base.rstrip("/") + "/v1/traces"
    return None

"""Each upstream send is its own span: the first, retries and hedges, with how each ended."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.dispatch import Dispatcher
from gateway.pools import Pool
from gateway.replica import Replica
from gateway.telemetry import RequestRecord, Telemetry, TelemetrySettings
from gateway.telemetry.tracing import NOOP_TRACE
from tests.unit.test_dispatch import (
    DECISION,
    FakeSender,
    Script,
    done,
    drain,
    make,
    parsed,
    slow,
    url,
)

CLIENT_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class HeaderSender(FakeSender):
    """A FakeSender that keeps the headers of each send."""

    headers: list[Mapping[str, str]] = field(default_factory=list)

    async def post(
        self, pool: Pool, replica: Replica, path: str, body: bytes, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        self.headers.append(headers)
        return await super().post(pool, replica, path, body, headers)


def traced() -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(
        TelemetrySettings(), environ={}, span_processor=SimpleSpanProcessor(exporter)
    )
    return telemetry, exporter


async def serve(dispatcher: Dispatcher, record: RequestRecord, forward: Mapping[str, str]) -> None:
    dispatched = await dispatcher.dispatch(DECISION, parsed(), forward, trace=record.trace)
    await drain(dispatched)
    dispatched.finish(done())


def attempts(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    spans = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT]
    return sorted(spans, key=lambda s: int(str((s.attributes or {})["triage.attempt.number"])))


async def test_a_retry_is_a_second_span_after_the_failed_first() -> None:
    telemetry, exporter = traced()
    sender = HeaderSender({url("s0"): [Script("connect")], url("s1"): [Script()]})
    dispatcher = make(sender, hedge=False)
    dispatcher.pools["small"].replicas[1].observe(0, first_byte_s=5)  # s0 first
    record = telemetry.start("chat", {"traceparent": CLIENT_TRACEPARENT}, "r")
    await serve(dispatcher, record, {"traceparent": CLIENT_TRACEPARENT})
    telemetry.finish(record)
    assert sender.sent == [url("s0"), url("s1")]
    first, retry = attempts(exporter)
    root = exporter.get_finished_spans()[-1]
    assert root.kind is SpanKind.SERVER and root.context is not None
    for span in (first, retry):
        assert span.parent is not None and span.parent.span_id == root.context.span_id
        assert span.name == "chat small"
    assert dict(first.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "small",
        "server.address": "s0",
        "server.port": 8000,
        "triage.replica": url("s0"),
        "triage.attempt": "first",
        "triage.attempt.number": 1,
        "triage.attempt.outcome": "failed",
        "error.type": "upstream_unavailable",
    }
    assert first.status.status_code is StatusCode.ERROR
    retried = dict(retry.attributes or {})
    assert retried["triage.attempt"] == "retry"
    assert retried["triage.attempt.number"] == 2
    assert retried["triage.attempt.outcome"] == "answered"
    assert retried["triage.replica"] == url("s1")
    assert retry.status.status_code is StatusCode.UNSET
    # Each send carries its own span's traceparent, in the client's trace.
    for headers, span in zip(sender.headers, (first, retry), strict=True):
        assert span.context is not None
        _, trace_id, span_id, _ = headers["traceparent"].split("-")
        assert trace_id == "0af7651916cd43dd8448eb211c80319c"
        assert span_id == format(span.context.span_id, "016x")


async def test_a_hedge_is_its_own_span_and_the_loser_says_so() -> None:
    telemetry, exporter = traced()
    sender = HeaderSender({url("s0"): [Script(first_after=0.3)], url("s1"): [Script()]})
    dispatcher = make(sender)
    slow(dispatcher.pools["small"].replicas[1], 0.05)  # s0 first; s1 still inside the SLO
    record = telemetry.start("chat", {}, "r")
    await serve(dispatcher, record, {})
    telemetry.finish(record)
    assert sender.sent == [url("s0"), url("s1")]
    first, hedge = attempts(exporter)
    assert dict(first.attributes or {})["triage.attempt.outcome"] == "cancelled"
    assert first.status.status_code is StatusCode.UNSET  # losing a race is not an error
    hedged = dict(hedge.attributes or {})
    assert (hedged["triage.attempt"], hedged["triage.attempt.number"]) == ("hedge", 2)
    assert hedged["triage.attempt.outcome"] == "answered"


async def test_the_winner_span_ends_with_the_answer() -> None:
    telemetry, exporter = traced()
    dispatcher = make(FakeSender(), small=("s0",))
    record = telemetry.start("chat", {}, "r")
    dispatched = await dispatcher.dispatch(DECISION, parsed(), {}, trace=record.trace)
    assert attempts(exporter) == []  # still streaming
    await drain(dispatched)
    dispatched.finish(done(completed=False))  # the client went away
    (span,) = attempts(exporter)
    assert dict(span.attributes or {})["triage.attempt.outcome"] == "client_closed"


async def test_tracing_off_forwards_the_headers_object_itself() -> None:
    sender = HeaderSender()
    dispatcher = make(sender, small=("s0",))
    forward = {"traceparent": CLIENT_TRACEPARENT}
    dispatched = await dispatcher.dispatch(DECISION, parsed(), forward, trace=NOOP_TRACE)
    await drain(dispatched)
    dispatched.finish(done())
    assert sender.headers == [forward]
    assert sender.headers[0] is forward  # nothing copied, nothing injected

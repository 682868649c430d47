"""Telemetry cost per request, in microseconds: `python bench/telemetry_overhead.py`.

Each scenario replays what the request path does for one streamed chat request (start,
five stage spans, one upstream attempt with `traceparent` injection, finish) in a
tight loop, and reports the median over several rounds:

- tracing off, span calls only: what the request path pays for tracing when it is off
- tracing off, metrics only: `finish()` with the request log line disabled
- tracing off, metrics + log line: the default (JSON line to /dev/null)
- tracing on, unsampled: `sample_ratio: 0` and no `traceparent` from the client
- tracing on, sampled: every span recorded, batched, and encoded to OTLP protobuf
  by the export thread (only the network send is left out)
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

from gateway.slo import SloTarget
from gateway.telemetry import Telemetry, TelemetrySettings
from gateway.telemetry.logs import REQUEST_LOGGER, JsonFormatter
from gateway.telemetry.tracing import NOOP_TRACE
from gateway.upstream import Outcome

REPLICA = "http://pool-small-0:8000/v1"
# The client sampled its trace: with tracing on, every span is recorded.
SAMPLED = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
BODY = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}


def one_request(telemetry: Telemetry, headers: Mapping[str, str] = SAMPLED) -> None:
    record = telemetry.start("chat", headers, "0123456789abcdef01234567")
    with record.trace.span("triage.auth"):
        record.tenant = "team-a"
    record.requested_model, record.stream, record.body = "auto", True, BODY
    with record.trace.span("triage.cache.lookup"):
        record.cache = "miss"
    with record.trace.span("triage.route"):
        record.decided_tier, record.decision_reason, record.difficulty = "cheap", "classifier", 0.3
    with record.trace.span("triage.budget.reserve"):
        pass
    attempt = record.trace.attempt("llama-8b", REPLICA)
    attempt.inject(headers)
    outcome = Outcome(first_token_at=record.started_at + 0.1, completed=True)
    outcome.usage = {"prompt_tokens": 120, "completion_tokens": 60}
    record.served("cheap", "llama-8b", REPLICA)
    record.add_outcome(outcome)
    record.cost_usd = 0.0000120
    attempt.end(outcome=outcome)
    with record.trace.span("triage.budget.settle"):
        pass
    telemetry.finish(record)


def span_calls_only(_: Telemetry) -> None:
    """The tracing calls of `one_request` against the shared no-op trace."""
    trace = NOOP_TRACE
    for name in ("triage.auth", "triage.cache.lookup", "triage.route", "triage.budget.reserve"):
        with trace.span(name):
            pass
    attempt = trace.attempt("llama-8b", REPLICA)
    attempt.inject(SAMPLED)
    attempt.end()
    with trace.span("triage.budget.settle"):
        pass


def timed(run: Callable[[Telemetry], None], telemetry: Telemetry, requests: int) -> float:
    start = time.perf_counter()
    for _ in range(requests):
        run(telemetry)
    return (time.perf_counter() - start) / requests * 1e6


def encoding_processor() -> object:
    """A batch processor whose exporter does the OTLP protobuf encoding but sends nothing."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class EncodeOnly(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            encode_spans(spans).SerializeToString()
            return SpanExportResult.SUCCESS

    # A queue big enough that no span is dropped: every span's encoding is paid for.
    return BatchSpanProcessor(EncodeOnly(), max_queue_size=1_000_000, schedule_delay_millis=100)


def build(settings: TelemetrySettings, processor: object | None = None) -> Telemetry:
    telemetry = Telemetry(settings, environ={}, span_processor=processor)  # type: ignore[arg-type]
    telemetry.metrics.bind({}, {"cheap": SloTarget(0.3, 5.0, 95.0)}, frozenset({"team-a"}))
    return telemetry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    request_log = logging.getLogger(REQUEST_LOGGER)
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115
    handler.setFormatter(JsonFormatter())
    request_log.addHandler(handler)
    request_log.propagate = False

    quiet = TelemetrySettings(request_log=False)
    scenarios: list[tuple[str, Callable[[Telemetry], None], Callable[[], Telemetry]]] = [
        ("tracing off, span calls only", span_calls_only, lambda: build(quiet)),
        ("tracing off, metrics only", one_request, lambda: build(quiet)),
        ("tracing off, metrics + log line", one_request, lambda: build(TelemetrySettings())),
        (
            "tracing on, unsampled",
            functools.partial(one_request, headers={}),
            lambda: build(TelemetrySettings(sample_ratio=0.0), encoding_processor()),
        ),
        (
            "tracing on, sampled (OTLP encode)",
            one_request,
            lambda: build(TelemetrySettings(), encoding_processor()),
        ),
    ]
    request_log.setLevel(logging.INFO)
    header = f"{'scenario':36} {'median':>8} {'min':>8}"
    print(f"{header}  µs/request, {args.rounds} rounds x {args.requests}")
    results: dict[str, list[float]] = {name: [] for name, _, _ in scenarios}
    for _ in range(args.rounds):  # rounds interleave scenarios, so load drifts hit all alike
        for name, run, make in scenarios:
            telemetry = make()
            timed(run, telemetry, 200)  # warm up: label children, caches
            elapsed = timed(run, telemetry, args.requests)
            if telemetry.tracing is not None:
                start = time.perf_counter()
                telemetry.tracing.shutdown()  # the export thread's backlog is part of the cost
                elapsed += (time.perf_counter() - start) / args.requests * 1e6
            results[name].append(elapsed)
    for name, figures in results.items():
        print(f"{name:36} {statistics.median(figures):8.1f} {min(figures):8.1f}")


if __name__ == "__main__":
    main()

from __future__ import annotations

import asyncio

from gateway.api.request import ParsedRequest
from gateway.errors import (
    InvalidRequest,
    NotFound,
    RateLimited,
    TriageError,
    UpstreamStatus,
    UpstreamTimeout,
)
from gateway.router import Decision
from gateway.telemetry import RequestRecord, Telemetry
from gateway.telemetry.record import CLIENT_CLOSED
from gateway.telemetry.tracing import NOOP_TRACE
from gateway.upstream import Outcome


def test_helpers_copy_what_the_request_path_holds() -> None:
    record = RequestRecord("r1", "chat")
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    record.requested(ParsedRequest("chat", body, "auto", True, False))
    record.routed(Decision("large", (("large", "big"), ("cheap", "small")), "classifier", 0.8))
    record.served("cheap", "small", "http://r0:8000/v1")
    assert (record.requested_model, record.stream, record.body) == ("auto", True, body)
    assert (record.decided_tier, record.decision_reason, record.difficulty) == (
        "large",
        "classifier",
        0.8,
    )
    assert (record.tier, record.model, record.replica) == ("cheap", "small", "http://r0:8000/v1")


def test_outcome_usage_and_timings() -> None:
    record = RequestRecord("r1", "chat", started_at=10.0, stream=True)
    outcome = Outcome(started_at=10.1, first_token_at=10.3, completed=True)
    outcome.usage = {"prompt_tokens": 12, "completion_tokens": 11}
    record.add_outcome(outcome)
    record.ended_at = 11.3
    assert (record.prompt_tokens, record.completion_tokens) == (12, 11)
    assert record.status == 200 and record.error_code is None
    assert round(record.ttft_s or 0, 9) == 0.3
    assert round(record.e2e_s or 0, 9) == 1.3
    assert round(record.inter_token_s or 0, 9) == 0.1  # 1.0 s over the 10 tokens after the first


def test_inter_token_only_for_streams_with_two_tokens() -> None:
    record = RequestRecord("r", "chat", started_at=0.0, first_token_at=1.0, ended_at=2.0)
    record.completion_tokens = 5
    assert record.inter_token_s is None  # not a stream
    record.stream, record.completion_tokens = True, 1
    assert record.inter_token_s is None
    assert RequestRecord("r", "chat").ttft_s is None
    assert RequestRecord("r", "chat").e2e_s is None


def test_a_failed_or_abandoned_stream_is_not_a_success() -> None:
    failed = RequestRecord("r", "chat")
    failed.add_outcome(Outcome(error=UpstreamTimeout("slow")))
    assert (failed.status, failed.error_code) == (504, "upstream_timeout")
    abandoned = RequestRecord("r", "chat")
    abandoned.add_outcome(Outcome(completed=False))
    assert (abandoned.status, abandoned.error_code) == (CLIENT_CLOSED, "client_closed")


def test_fail_maps_errors_to_status_and_code() -> None:
    cases = [
        (NotFound("no such model"), 404, "model_not_found"),
        (asyncio.CancelledError(), CLIENT_CLOSED, "client_closed"),
        (RuntimeError("bug"), 500, "internal_error"),
    ]
    for error, status, code in cases:
        record = RequestRecord("r", "chat")
        record.fail(error)
        assert (record.status, record.error_code) == (status, code)


def test_start_uses_the_shared_noop_trace_and_finish_is_idempotent() -> None:
    telemetry = Telemetry(environ={})
    record = telemetry.start("chat", {}, "r1")
    assert record.trace is NOOP_TRACE
    telemetry.finish(record)
    ended = record.ended_at
    telemetry.finish(record)
    assert record.ended_at == ended
    telemetry.metrics.flush()
    families = telemetry.metrics.requests.metric.collect()
    assert sum(s.value for f in families for s in f.samples if s.name.endswith("_total")) == 1


def test_the_error_code_is_the_one_the_client_saw_and_the_type_beside_it() -> None:
    """Never a Python class name: an error answered without a code is logged without one."""
    cases = [
        (UpstreamStatus(400, "bad", code="bad_param"), 400, "bad_param"),
        (InvalidRequest("bad json"), 400, None),
        (TriageError("boom"), 500, None),
        (NotFound("no such model"), 404, "model_not_found"),
    ]
    for error, status, code in cases:
        record = RequestRecord("r", "chat")
        record.fail(error)
        assert (record.status, record.error_code, record.error_type) == (
            status,
            code,
            error.error_type,
        )
    closed = RequestRecord("r", "chat")
    closed.fail(asyncio.CancelledError())
    assert (closed.error_code, closed.error_type) == ("client_closed", "invalid_request_error")


def routed() -> RequestRecord:
    record = RequestRecord("r", "chat")
    record.routed(Decision("cheap", (("cheap", "small"), ("large", "big")), "tier"))
    return record


def test_a_request_that_failed_after_routing_is_put_where_it_failed() -> None:
    sent = UpstreamStatus(502, "bad gateway")
    sent.failed_at("large", "big", "http://b0:8000/v1")
    record = routed()
    record.fail(sent)
    assert (record.tier, record.model, record.replica) == ("large", "big", "http://b0:8000/v1")
    # Nothing sent (over budget, shed before the dispatcher said where): the decision's.
    for error in (RateLimited("budget"), asyncio.CancelledError()):
        record = routed()
        record.fail(error)
        assert (record.tier, record.model, record.replica) == ("cheap", "small", None)
    # Served, then failed: where it was served stays.
    record = routed()
    record.served("cheap", "small", "http://s0:8000/v1")
    record.fail(sent)
    assert (record.tier, record.model, record.replica) == ("cheap", "small", "http://s0:8000/v1")
    # Never routed: nowhere.
    unrouted = RequestRecord("r", "chat")
    unrouted.fail(sent)
    assert (unrouted.tier, unrouted.model, unrouted.replica) == (None, None, None)


def test_the_first_to_say_where_it_failed_wins() -> None:
    error = UpstreamTimeout("late")
    error.failed_at("cheap", "small", "http://s0:8000/v1")
    error.failed_at("cheap", "small", "http://s1:8000/v1")
    assert error.replica == "http://s0:8000/v1"

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.errors import InvalidRequest, RateLimited
from gateway.router import Decision
from gateway.telemetry import Telemetry, TelemetrySettings
from gateway.telemetry.logs import (
    REQUEST_LOGGER,
    BatchedLineHandler,
    JsonFormatter,
    configure_logging,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
BODY = {"model": "auto", "messages": [{"role": "user", "content": "the secret prompt"}]}


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    """Where request log lines go, written by the JSON formatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger, triage = logging.getLogger(REQUEST_LOGGER), logging.getLogger("triage")
    saved = (triage.level, logger.level)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        triage.setLevel(saved[0])
        logger.setLevel(saved[1])


def lines(log: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.getvalue().splitlines()]


def finish_one(telemetry: Telemetry, **fields: Any) -> None:
    record = telemetry.start("chat", {"traceparent": TRACEPARENT}, "req-1")
    record.tenant, record.requested_model, record.body = "team-a", "auto", BODY
    record.served("cheap", "llama-8b", "http://r0:8000/v1")
    record.cache, record.prompt_tokens, record.completion_tokens = "miss", 10, 3
    record.cost_usd, record.decision_reason, record.difficulty = 0.0001, "classifier", 0.25
    record.finish_reasons = ("stop",)
    record.started_at -= 0.1
    record.first_token_at = record.started_at + 0.05
    record.response_body = b'{"choices": [{"message": {"content": "the answer"}}]}'
    for key, value in fields.items():
        setattr(record, key, value)
    telemetry.finish(record)


def test_one_json_line_per_request(log: io.StringIO) -> None:
    finish_one(Telemetry(environ={}))
    (line,) = lines(log)
    assert line["logger"] == "triage.request"
    assert line["level"] == "info"
    assert line["message"] == "request"
    expected = {
        "request_id": "req-1",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "operation": "chat",
        "tenant": "team-a",
        "requested_model": "auto",
        "tier": "cheap",
        "model": "llama-8b",
        "replica": "http://r0:8000/v1",
        "status": 200,
        "error_code": None,
        "cache": "miss",
        "stream": False,
        "decision_reason": "classifier",
        "difficulty": 0.25,
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "cost_usd": 0.0001,
        "saved_usd": 0.0,
        "retries": 0,
        "hedges": 0,
        "finish_reasons": ["stop"],
    }
    assert {k: line[k] for k in expected} == expected
    assert 50 <= line["ttft_ms"] <= line["latency_ms"]
    assert "prompt" not in line and "completion" not in line
    assert "secret prompt" not in json.dumps(line)


def test_errors_and_reroutes_are_in_the_line(log: io.StringIO) -> None:
    telemetry = Telemetry(environ={})
    record = telemetry.start("embeddings", {}, "req-2")
    record.decided_tier, record.tier = "large", "cheap"
    record.fail(RateLimited("budget"))
    telemetry.finish(record)
    (line,) = lines(log)
    assert (line["status"], line["error_code"]) == (429, "rate_limit_exceeded")
    assert line["decided_tier"] == "large"
    assert line["trace_id"] is None
    assert line["ttft_ms"] is None


def test_a_failed_request_logs_the_code_and_type_it_was_answered_with(
    log: io.StringIO,
) -> None:
    """Where the answer's `code` was null, so is the line's; never a Python class name."""
    telemetry = Telemetry(environ={})
    record = telemetry.start("chat", {}, "req-3")
    record.routed(Decision("cheap", (("cheap", "small"),), "tier"))
    error = InvalidRequest("The body is not JSON.")
    error.failed_at("cheap", "small", "http://r0:8000/v1")
    record.fail(error)
    telemetry.finish(record)
    (line,) = lines(log)
    assert (line["status"], line["error_code"], line["error_type"]) == (
        400,
        None,
        "invalid_request_error",
    )
    assert (line["tier"], line["model"], line["replica"]) == ("cheap", "small", "http://r0:8000/v1")


def test_prompt_and_completion_only_when_the_policy_opts_in(log: io.StringIO) -> None:
    finish_one(Telemetry(TelemetrySettings(log_prompts=True), environ={}))
    (line,) = lines(log)
    assert json.loads(line["prompt"]) == BODY["messages"]
    assert line["completion"] == "the answer"


def test_completion_text_set_by_the_request_path_wins(log: io.StringIO) -> None:
    finish_one(Telemetry(TelemetrySettings(log_prompts=True), environ={}), completion_text="x")
    assert lines(log)[0]["completion"] == "x"


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"choices": 3}', b'{"choices": [3, {"text": "legacy"}]}'],
)
def test_odd_reply_bodies_do_not_break_the_line(log: io.StringIO, body: bytes) -> None:
    finish_one(Telemetry(TelemetrySettings(log_prompts=True), environ={}), response_body=body)
    (line,) = lines(log)
    assert line["completion"] == ("legacy" if b"legacy" in body else None)


def test_request_log_can_be_turned_off(log: io.StringIO) -> None:
    finish_one(Telemetry(TelemetrySettings(request_log=False), environ={}))
    assert lines(log) == []


def test_log_level_from_the_policy(log: io.StringIO) -> None:
    logging.getLogger(REQUEST_LOGGER).setLevel(logging.NOTSET)  # inherit from "triage"
    finish_one(Telemetry(TelemetrySettings(log_level="warning"), environ={}))
    assert logging.getLogger("triage").level == logging.WARNING
    assert lines(log) == []


def test_configure_logging_level_from_argument_or_environment() -> None:
    triage = logging.getLogger("triage")
    saved = (triage.level, triage.handlers[:], triage.propagate)
    try:
        configure_logging(None, {"TRIAGE_LOG_LEVEL": "debug"})
        assert triage.level == logging.DEBUG
        configure_logging("error", {"TRIAGE_LOG_LEVEL": "debug"})
        assert triage.level == logging.ERROR
        configure_logging(None, {})
        assert triage.level == logging.INFO
        assert isinstance(triage.handlers[0].formatter, JsonFormatter)
    finally:
        triage.setLevel(saved[0])
        triage.handlers[:] = saved[1]
        triage.propagate = saved[2]


def test_formatter_adds_fields_and_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "triage", logging.ERROR, "f", 1, "msg %s", ("x",), sys.exc_info()
        )
    record.fields = {"a": 1}
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "msg x"
    assert line["a"] == 1
    assert "ValueError: boom" in line["exc"]
    assert line["ts"].endswith("Z")


# --- batched writes ---------------------------------------------------------------------


def batched(delay_s: float = 0.05, max_bytes: int = 1024) -> tuple[logging.Logger, io.BytesIO]:
    stream = io.BytesIO()
    handler = BatchedLineHandler(stream, delay_s=delay_s, max_bytes=max_bytes)
    handler.setFormatter(JsonFormatter())
    logger = logging.Logger("batched-test")
    logger.addHandler(handler)
    return logger, stream


def messages(stream: io.BytesIO) -> list[str]:
    return [json.loads(line)["message"] for line in stream.getvalue().splitlines()]


def test_without_an_event_loop_each_line_is_written_at_once() -> None:
    logger, stream = batched()
    logger.info("one")
    assert messages(stream) == ["one"]


async def test_in_the_event_loop_lines_wait_for_the_delay() -> None:
    logger, stream = batched(delay_s=0.05)
    logger.info("one")
    logger.info("two")
    assert messages(stream) == []
    await asyncio.sleep(0.1)
    assert messages(stream) == ["one", "two"]
    logger.info("three")  # a new delay starts with the next line held
    await asyncio.sleep(0.1)
    assert messages(stream) == ["one", "two", "three"]


async def test_a_warning_goes_out_at_once_after_the_lines_before_it() -> None:
    logger, stream = batched(delay_s=60)
    logger.info("request")
    logger.warning("trouble")
    assert messages(stream) == ["request", "trouble"]


async def test_a_full_buffer_is_written_without_waiting() -> None:
    logger, stream = batched(delay_s=60, max_bytes=300)
    for n in range(5):
        logger.info("line %d", n)
    written = messages(stream)
    assert 0 < len(written) < 5  # ~100 bytes a line: the buffer filled once
    for handler in logger.handlers:
        handler.flush()
    assert messages(stream) == [f"line {n}" for n in range(5)]

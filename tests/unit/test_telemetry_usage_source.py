"""Who counted a request's tokens, as the log line, the token metrics and the trace say it."""

from __future__ import annotations

import pytest

from gateway.telemetry import RequestRecord, Telemetry
from gateway.telemetry._otel import request_attributes
from gateway.telemetry.logs import request_fields
from gateway.upstream import Outcome
from tests.unit.test_telemetry_metrics import bound_telemetry, samples, value


def served(telemetry: Telemetry, outcome: Outcome) -> RequestRecord:
    record = telemetry.start("chat", {}, "req-1")
    record.tenant = "team-a"
    record.served("cheap", "small", "http://s0:8000/v1")
    record.add_outcome(outcome)
    return record


USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


@pytest.mark.parametrize("source", ["tokenized", "estimated"])
async def test_tokens_the_backend_did_not_report_are_marked(source: str) -> None:
    telemetry = bound_telemetry()
    record = served(telemetry, Outcome(usage=USAGE, completed=True, counted=source))  # type: ignore[arg-type]
    assert request_fields(record, capture_content=False)["usage_source"] == source
    assert request_attributes(record, "chat")["triage.usage.source"] == source
    telemetry.finish(record)
    found = await samples(telemetry)
    labels = {"tenant": "team-a", "tier": "cheap", "model": "small"}
    assert value(found, "triage_tokens_total", **labels, type="input") == 12
    assert (
        value(found, "triage_tokens_unreported_total", **labels, type="input", source=source) == 12
    )
    assert (
        value(found, "triage_tokens_unreported_total", **labels, type="output", source=source) == 5
    )
    await telemetry.close()


async def test_tokens_the_backend_reported_are_not_in_the_unreported_series() -> None:
    telemetry = bound_telemetry()
    record = served(telemetry, Outcome(usage=USAGE, completed=True))
    assert request_fields(record, capture_content=False)["usage_source"] == "backend"
    assert request_attributes(record, "chat")["triage.usage.source"] == "backend"
    telemetry.finish(record)
    found = await samples(telemetry)
    assert (
        value(
            found,
            "triage_tokens_total",
            tenant="team-a",
            tier="cheap",
            model="small",
            type="output",
        )
        == 5
    )
    assert not any(name == "triage_tokens_unreported_total" for name, _ in found)
    await telemetry.close()


def test_a_request_without_usage_has_no_source() -> None:
    record = RequestRecord("req-2", "chat")
    assert request_fields(record, capture_content=False)["usage_source"] is None
    assert "triage.usage.source" not in request_attributes(record, "chat")

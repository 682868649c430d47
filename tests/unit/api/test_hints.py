"""The gateway's own headers, read at the edge: typed values, or a 400 naming the header."""

from __future__ import annotations

import pytest

from gateway.api.hints import NO_HINTS, RequestHints, read_hints
from gateway.errors import InvalidRequest


def test_no_hints_is_the_shared_value() -> None:
    assert read_hints({}) is NO_HINTS
    assert read_hints({"authorization": "Bearer x", "x-other": "1"}) is NO_HINTS


def test_every_hint_is_read() -> None:
    headers = {
        "x-triage-tier": "large",
        "x-triage-priority": " Sheddable ",
        "x-slo-ttft-ms": "200",
        "x-slo-e2e-ms": "1500.5",
    }
    assert read_hints(headers) == RequestHints("large", "sheddable", 0.2, 1.5005)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("critical", "critical"), ("Standard ", "standard"), ("SHEDDABLE", "sheddable")],
)
def test_priority_is_read_case_and_space_blind(header: str, expected: str) -> None:
    assert read_hints({"x-triage-priority": header}).priority == expected


def test_unknown_priority() -> None:
    with pytest.raises(InvalidRequest) as caught:
        read_hints({"x-triage-priority": "urgent"})
    assert caught.value.message == (
        "x-triage-priority must be one of critical, standard, sheddable; got 'urgent'."
    )
    assert caught.value.param == "x-triage-priority"
    assert caught.value.status_code == 400


@pytest.mark.parametrize("name", ["x-slo-ttft-ms", "x-slo-e2e-ms"])
@pytest.mark.parametrize("value", ["0", "-5", "soon", "inf", "nan", ""])
def test_bad_slo_headers(name: str, value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        read_hints({name: value})
    assert caught.value.message == (
        f"{name} must be a positive number of milliseconds; got {value!r}."
    )
    assert caught.value.param == name


def test_slo_headers_are_seconds() -> None:
    hints = read_hints({"x-slo-e2e-ms": "1500"})
    assert (hints.ttft_s, hints.e2e_s) == (None, 1.5)
    assert read_hints({"x-slo-ttft-ms": "1e3"}).ttft_s == 1.0


def test_the_tier_is_carried_as_sent() -> None:
    """Whether the policy has it is the router's to say (a 404 naming the tiers)."""
    assert read_hints({"x-triage-tier": "medium"}).tier == "medium"

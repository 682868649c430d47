"""Unit tests for gateway.sim.faults."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from gateway.sim.faults import FaultConfig


def test_fault_config_defaults_to_no_faults() -> None:
    faults = FaultConfig()
    rng = random.Random(0)
    assert all(faults.draw(rng) is None for _ in range(100))
    assert rng.random() == random.Random(0).random()  # drew nothing


def test_fault_rate_is_a_probability_from_the_given_rng() -> None:
    always = FaultConfig(rate=1.0, kind="503")
    assert {always.draw(random.Random(1)) for _ in range(50)} == {"503"}
    half = FaultConfig(rate=0.5, kind="429")
    rng = random.Random(2)
    hits = sum(half.draw(rng) == "429" for _ in range(2000))
    assert 850 < hits < 1150


def test_fault_config_refuses_bad_values() -> None:
    for bad in ({"rate": 1.5}, {"kind": "teapot"}, {"surprise": 1}, {"stall_after_tokens": -1}):
        with pytest.raises(ValidationError):
            FaultConfig.model_validate(bad)

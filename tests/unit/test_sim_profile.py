"""Unit tests for gateway.sim.profile, gateway.sim.faults and gateway.sim.cli."""

from __future__ import annotations

import argparse
import random

import pytest
from pydantic import ValidationError

from gateway.sim.cli import add_sim_arguments, profile_from_args, run_from_args
from gateway.sim.engine import SimEngine
from gateway.sim.faults import FaultConfig
from gateway.sim.profile import PROFILES, SimProfile, profile_from_name


def test_profiles_are_immutable() -> None:
    with pytest.raises(TypeError):
        PROFILES["mine"] = PROFILES["small"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "low_s", "high_s", "itl_ms", "seqs"),
    [("small", 0.060, 0.120, 12.0, 64), ("large", 0.250, 0.400, 35.0, 32)],
)
def test_profiles_have_h100_like_figures(
    name: str, low_s: float, high_s: float, itl_ms: float, seqs: int
) -> None:
    profile = PROFILES[name]
    assert low_s <= SimEngine(profile).ttft_s(256) <= high_s
    assert profile.itl_ms == itl_ms
    assert profile.max_num_seqs == seqs


def test_instant_profile_never_waits() -> None:
    assert PROFILES["instant"].is_instant
    assert not PROFILES["small"].is_instant


def test_profile_from_name_applies_overrides_and_skips_none() -> None:
    profile = profile_from_name("large", model="big", itl_ms=None, seed=3)
    assert profile.model == "big"
    assert profile.itl_ms == PROFILES["large"].itl_ms
    assert profile.seed == 3


def test_unknown_profile_lists_the_valid_names() -> None:
    with pytest.raises(
        ValueError, match="unknown sim profile 'huge'; valid profiles: instant, large, small"
    ):
        profile_from_name("huge")


def test_unknown_override_lists_the_fields() -> None:
    with pytest.raises(ValueError, match="unknown SimProfile field\\(s\\) ttft; valid fields: "):
        profile_from_name("small", ttft=3)


def test_invalid_values_are_named() -> None:
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0") as caught:
        SimProfile(model="m", ttft_ms=-1, prefill_ms_per_token=0, itl_ms=0, max_num_seqs=0)
    assert "ttft_ms must be >= 0.0, got -1" in str(caught.value)


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


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    return parser.parse_args(argv)


def test_cli_flags_override_the_profile() -> None:
    args = _parse("--profile", "small", "--model", "m", "--ttft-ms", "200", "--max-num-seqs", "8")
    profile = profile_from_args(args)
    assert (profile.model, profile.ttft_ms, profile.max_num_seqs) == ("m", 200.0, 8)
    assert profile.itl_ms == PROFILES["small"].itl_ms
    assert (args.fault_rate, args.fault_kind) == (0.0, "500")


def test_cli_rejects_bad_values_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_from_args(_parse("--jitter", "2")) == 2
    assert "jitter must be in [0, 1), got 2.0" in capsys.readouterr().err
    assert run_from_args(_parse("--fault-rate", "3")) == 2
    assert "--fault-rate" in capsys.readouterr().err

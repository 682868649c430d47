"""Unit tests for gateway.sim.profile."""

from __future__ import annotations

import pytest

from gateway.sim.engine import SimEngine
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

"""Unit tests for gateway.sim.cli."""

from __future__ import annotations

import argparse

import pytest

from gateway.sim.cli import add_sim_arguments, profile_from_args, run_from_args
from gateway.sim.profile import PROFILES


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

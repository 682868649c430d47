"""`routing.shadow` in the policy: its shape, and what it must refer to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.policy import PolicyError, parse_policy

ROOT = Path(__file__).resolve().parents[2]


def demo(**shadow: Any) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load((ROOT / "policies/demo.yaml").read_text())
    raw["routing"].pop("classifier")
    raw["routing"].pop("strong_fraction")
    raw["routing"]["feedback"] = {"path": "feedback.jsonl"}
    settings = {"weak": "cheap", "strong": "large", "judge": "large", "usd_per_day": 5}
    raw["routing"]["shadow"] = {**settings, **shadow}
    return raw


def errors_of(raw: Any) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(raw, {})
    return info.value.errors


def test_a_shadow_section_loads_with_its_defaults() -> None:
    shadow = parse_policy(demo(), {}).routing.shadow
    assert shadow is not None
    assert (shadow.sample_rate, shadow.answered_by, shadow.prompts) == (0.1, "either", "hash")
    assert shadow.judge_prompt is None and shadow.path is None and shadow.max_in_flight == 4


def test_shape_errors_name_the_path() -> None:
    raw = demo(sample_rate=0, prompts="hashed", usd_per_day=-1, colour="red")
    del raw["routing"]["shadow"]["judge"]
    assert errors_of(raw) == [
        "routing.shadow.sample_rate: must be > 0",
        "routing.shadow.judge: required",
        "routing.shadow.usd_per_day: must be >= 0",
        "routing.shadow.prompts: must be one of 'hash' or 'text'",
        "routing.shadow.colour: unknown key",
    ]


def test_references_are_checked() -> None:
    raw = demo(weak="tiny", strong="tiny", judge="oracle")
    del raw["routing"]["feedback"]
    assert errors_of(raw) == [
        "routing.shadow.weak: unknown tier 'tiny' (cheap, large)",
        "routing.shadow.strong: unknown tier 'tiny' (cheap, large)",
        "routing.shadow.strong: must differ from routing.shadow.weak",
        "routing.shadow.judge: unknown model or tier 'oracle'",
        "routing.shadow: needs routing.feedback (the routing rows its labels join)",
    ]


def test_a_judge_may_be_a_model() -> None:
    shadow = parse_policy(demo(judge="llama-3.1-70b-instruct"), {}).routing.shadow
    assert shadow is not None and shadow.judge == "llama-3.1-70b-instruct"

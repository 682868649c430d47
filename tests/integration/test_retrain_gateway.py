"""`routing.retrain` in a running gateway: labels arrive, the gateway retrains in the
background, promotes, reloads, and routes by the new model without a restart."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import (
    Service,
    Services,
    eventually,
    policy_for,
    start_gateway,
    start_sim,
)
from tests.support.labels import append_labels, hard, prompt, write_base

pytestmark = pytest.mark.integration

TRAIN = (sys.executable, "-m", "classifiers.commands", "train")
FAST = ("--ttft-ms", "2", "--itl-ms", "0.2", "--jitter", "0")


def difficulty(gateway: Service, texts: list[str]) -> list[float]:
    found = []
    for text in texts:
        body = {"model": "auto", "messages": [{"role": "user", "content": text}]}
        answer = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        found.append(float(answer.headers["x-triage-difficulty"]))
    return found


def separation(gateway: Service, texts: list[str]) -> float:
    """Mean score of the prompts the strong tier fixes minus that of the others."""
    scores = difficulty(gateway, texts)
    up = [s for s, t in zip(scores, texts, strict=True) if hard(t)]
    down = [s for s, t in zip(scores, texts, strict=True) if not hard(t)]
    return sum(up) / len(up) - sum(down) / len(down)


def test_the_gateway_retrains_promotes_and_reloads_by_itself(
    log_dir: Path,
    services: Services,
    store_section: dict[str, Any],
    tmp_path: Path,
) -> None:
    base = write_base(tmp_path / "base.jsonl")
    current = tmp_path / "current"
    subprocess.run(
        [*TRAIN, "--data", str(base), "--out", str(current), "--holdout", "0"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    labels = tmp_path / "labels.jsonl"
    labels.touch()
    small = services(start_sim(log_dir, "small", *FAST))
    large = services(start_sim(log_dir, "large", *FAST))
    policy = policy_for(
        [small.url],
        [large.url],
        store=store_section,
        routing={
            "default_tier": "cheap",
            "rules": [],
            "classifier": str(current),
            "strong_fraction": 0.3,
            "retrain": {
                "data": [str(base)],
                "labels": [str(labels)],
                "candidates": str(tmp_path / "candidates"),
                "min_new_labels": 100,
                "interval_s": 1,
                "check_s": 0.2,
            },
        },
    )
    gateway = services(start_gateway(log_dir, policy))
    rng = random.Random(7)
    probes = [prompt(rng) for _ in range(40)]
    before = separation(gateway, probes)
    append_labels(labels, 300)
    assert eventually(lambda: "retrained on 300 labels and promoted" in gateway.output(), 60), (
        gateway.output()[-3000:]
    )
    assert eventually(lambda: "policy reloaded" in gateway.output(), 10)
    after = separation(gateway, probes)
    print(f"hard minus easy prompts' mean difficulty: {before:+.3f} -> {after:+.3f}")
    assert after > before + 0.1, (before, after)
    assert "model.previous.json" in {p.name for p in current.iterdir()}

"""The whole loop, on the sim's hidden truth: traffic -> shadow -> judge -> labels -> retrain
-> promote -> better routing.

The base model knows nothing of this deployment (trained on rows whose outcomes are noise).
Traffic through the gateway is compared in the shadow and judged by the sim, whose verdicts
follow a hidden per-word difficulty (gateway/sim/judge.py). `triage classifier train
--traffic` learns from those labels, `promote` installs the candidate only if it routes the
held-out labels better, and reloads the gateway; the gateway's scores on prompts it never
saw then rank the hidden gain better than before.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from classifiers.metrics import apgr
from gateway.feedback import prompt_sha256
from gateway.policy import hash_key
from gateway.sim.judge import answer_passes
from tests.integration.conftest import (
    LARGE,
    SMALL,
    Service,
    Services,
    eventually,
    policy_for,
    start_gateway,
    start_sim,
)

pytestmark = pytest.mark.integration

ADMIN_KEY = "loop-admin-key"
FAST = ("--ttft-ms", "2", "--itl-ms", "0.2", "--jitter", "0")
TOPICS = [
    "algebra",
    "biology",
    "chemistry",
    "databases",
    "economics",
    "finance",
    "geometry",
    "history",
    "linguistics",
    "music",
    "networks",
    "optics",
    "poetry",
    "quantum",
    "robotics",
    "statistics",
    "topology",
    "writing",
    "zoology",
]


def prompt(pair: tuple[str, str]) -> str:
    return f"Explain {pair[0]} with {pair[1]}"


def pairs(rng: random.Random) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Topic pairs for traffic, and others (never in traffic) to measure routing on."""
    every = [(a, b) for i, a in enumerate(TOPICS) for b in TOPICS[i + 1 :]]
    rng.shuffle(every)
    cut = len(every) * 3 // 5
    return every[:cut], every[cut:]


def gain(text: str) -> tuple[int, int]:
    return int(answer_passes(text, SMALL)), int(answer_passes(text, LARGE))


def classifier(args: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "classifiers.commands", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def chat_body(text: str) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}]}


def scores(gateway: Service, texts: list[str]) -> list[tuple[float, str]]:
    """The gateway's difficulty score of each prompt, and the request's id."""

    def one(text: str) -> tuple[float, str]:
        answer = httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(text), timeout=30)
        assert answer.status_code == 200, answer.text
        headers = answer.headers
        return float(headers["x-triage-difficulty"]), headers["x-triage-request-id"]

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, texts))


def routing_apgr(gateway: Service, texts: list[str]) -> tuple[float, set[str]]:
    """APGR of the gateway's scores against the hidden truth, and the requests' ids."""
    scored = scores(gateway, texts)
    weak, strong = zip(*(gain(text) for text in texts), strict=True)
    return apgr([score for score, _ in scored], weak, strong), {rid for _, rid in scored}


def test_labels_from_shadow_traffic_retrain_a_router_that_routes_better(
    log_dir: Path, services: Services, tmp_path: Path
) -> None:
    rng = random.Random(20)
    seen, unseen = pairs(rng)
    # A base model with no knowledge of this deployment: its outcomes are coin flips.
    base = tmp_path / "base.jsonl"
    with base.open("wb") as file:
        for source in ("public-a", "public-b"):
            for _ in range(200):
                text = prompt(rng.choice(seen + unseen))
                row = {"prompt": text, "weak": int(rng.random() < 0.5), "strong": 1}
                file.write(orjson.dumps({**row, "source": source}) + b"\n")
    current = tmp_path / "current"
    classifier(["train", "--data", str(base), "--out", str(current), "--holdout", "0"])

    small = services(start_sim(log_dir, "small", *FAST))
    large = services(start_sim(log_dir, "large", *FAST))
    labels = tmp_path / "labels.jsonl"
    policy = policy_for(
        [small.url],
        [large.url],
        server={"admin_key": hash_key(ADMIN_KEY), "upstream_timeout_s": 30},
        routing={
            "default_tier": "cheap",
            "rules": [],
            "classifier": str(current),
            "strong_fraction": 0.3,
            "feedback": {"path": str(tmp_path / "routing.jsonl")},
            "shadow": {
                "weak": "cheap",
                "strong": "large",
                "sample_rate": 1.0,
                "judge": "large",  # the strong tier judges (the sim's verdicts are the truth's)
                "usd_per_day": 100.0,
                "prompts": "hash",  # the privacy mode: rows keep features, not text
                "path": str(labels),
                "max_in_flight": 64,
            },
        },
    )
    gateway = services(start_gateway(log_dir, policy))
    evaluation = [prompt(pair) for pair in unseen]
    before, measured = routing_apgr(gateway, evaluation)

    def labelled() -> list[dict[str, Any]]:
        lines = labels.read_bytes().splitlines() if labels.exists() else []
        return [orjson.loads(line) for line in lines]

    traffic = [prompt(rng.choice(seen)) for _ in range(400)]
    sent = {rid for _, rid in scores(gateway, traffic)}
    assert eventually(lambda: len(sent & {r["request_id"] for r in labelled()}) >= 380, 300)
    # Only the traffic's labels are trained on: never a row of the evaluation prompts.
    rows = [row for row in labelled() if row["request_id"] in sent]
    hashes = {prompt_sha256(chat_body(text)) for text in traffic}
    assert all(row["prompt_sha256"] in hashes for row in rows)
    # No prompt text reaches the labels file: retraining and promote use stored features.
    assert all(row["prompt"] is None and row["request"] is None for row in rows)
    assert not any(word.encode() in labels.read_bytes() for word in TOPICS)
    assert not measured & {row["request_id"] for row in rows}
    train_rows = tmp_path / "train.jsonl"
    train_rows.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    candidate = tmp_path / "candidate"
    classifier(
        ["train", "--data", str(base), "--traffic", str(train_rows), "--out", str(candidate)]
    )
    env = {**os.environ, "TRIAGE_ADMIN_KEY": ADMIN_KEY}
    reload_url = gateway.url + "/admin/reload"
    promote = ["promote", "--candidate", str(candidate), "--current", str(current)]
    printed = classifier([*promote, "--labels", str(train_rows), "--reload", reload_url], env)
    assert "promoted" in printed, printed
    after, _ = routing_apgr(gateway, evaluation)
    print(f"routing APGR on unseen prompts, hidden truth: {before:.3f} -> {after:.3f}\n{printed}")
    assert after >= before + 0.05, (before, after, printed)

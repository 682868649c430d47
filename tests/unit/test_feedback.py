"""The routing feedback log: what a row holds, and that `train`'s reader takes it back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from starlette.testclient import TestClient

from classifiers.data import read_rows
from gateway.app import build_app
from gateway.feedback import FeedbackLog
from gateway.policy import FeedbackSettings
from gateway.telemetry import RequestRecord
from tests.unit.api.test_request import parse

SECRET = "the launch code is 0000"
CHAT = {"model": "auto", "messages": [{"role": "user", "content": SECRET}], "max_tokens": 5}


def rows(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def served(**fields: Any) -> RequestRecord:
    """The record of a request the cheap tier answered."""
    record = RequestRecord(fields.pop("request_id"), "chat")
    defaults = {"tier": "cheap", "decided_tier": "cheap", "decision_reason": "tier"}
    defaults |= {"model": "small", "cache": "miss", "finish_reasons": ("stop",)}
    defaults |= {"prompt_tokens": 5, "completion_tokens": 3}
    for name, value in {**defaults, **fields}.items():
        setattr(record, name, value)
    return record


def demo_with_feedback(tmp_path: Path, **feedback: Any) -> Path:
    policy = yaml.safe_load(Path("policies/demo.yaml").read_text())
    policy["routing"]["classifier"] = str(Path("classifiers/models/default").resolve())
    policy["routing"]["feedback"] = {"path": "feedback.jsonl", **feedback}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def test_requests_through_the_gateway_are_logged_without_prompt_text(tmp_path: Path) -> None:
    with TestClient(build_app(demo_with_feedback(tmp_path))) as client:
        answers = [client.post("/v1/chat/completions", json=CHAT) for _ in range(2)]
        refused = client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert [a.status_code for a in answers] == [200, 200] and refused.status_code == 404
    log = tmp_path / "feedback.jsonl"
    assert SECRET.encode() not in log.read_bytes()
    assert os.stat(log).st_mode & 0o777 == 0o600
    logged = rows(log)  # the refused request reached no tier: not logged
    assert [r["request_id"] for r in logged] == [a.headers["x-triage-request-id"] for a in answers]
    for row, answer in zip(logged, answers, strict=True):
        assert row["tier"] == answer.headers["x-triage-tier"]
        difficulty = float(answer.headers["x-triage-difficulty"])
        assert row["difficulty"] == pytest.approx(difficulty, abs=1e-4)
        assert row["prompt"] is None and row["request"] is None
        assert row["completion_tokens"] == answer.json()["usage"]["completion_tokens"]
    assert logged[0]["prompt_sha256"] == logged[1]["prompt_sha256"]  # joinable to judgements


async def test_text_rows_judged_later_are_training_rows(tmp_path: Path) -> None:
    log = tmp_path / "f.jsonl"
    feedback = FeedbackLog(FeedbackSettings(path=str(log), prompts="text", source="prod"))
    feedback.open()
    record = served(request_id="r1", decision_reason="classifier", difficulty=0.2)
    feedback.write(await parse(CHAT), record)
    (row,) = rows(log)
    assert row["prompt"] == SECRET and row["request"]["messages"] == CHAT["messages"]
    judged = tmp_path / "judged.jsonl"
    judged.write_bytes(orjson.dumps({**row, "weak": 3, "strong": 9}) + b"\n")
    (training,) = read_rows([judged])
    assert (training.text, training.weak, training.strong, training.source) == (
        SECRET,
        3,
        9,
        "prod",
    )


async def test_sample_rate(tmp_path: Path) -> None:
    log = tmp_path / "f.jsonl"
    draws = iter([0.1, 0.9, 0.4])
    settings = FeedbackSettings(path=str(log), sample_rate=0.5)
    feedback = FeedbackLog(settings, sample=lambda: next(draws))
    feedback.open()
    record = served(request_id="r")
    parsed = await parse(CHAT)
    for _ in range(3):
        feedback.write(parsed, record)
    assert len(rows(log)) == 2

"""POST /v1/feedback: the score's shape, and a policy without a feedback log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.testclient import TestClient

from gateway.api.feedback_route import read_score
from gateway.app import build_app
from gateway.errors import InvalidRequest


@pytest.mark.parametrize(
    ("score", "quality"), [(True, 1.0), (False, 0.0), (1, 1.0), (-1, 0.0), (0, 0.0), (0.7, 0.7)]
)
def test_scores_and_their_quality(score: bool | float, quality: float) -> None:
    assert read_score({"request_id": "abc", "score": score}) == ("abc", score, quality)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"request_id": "abc", "score": 1.5}, "score"),
        ({"request_id": "abc", "score": -0.5}, "score"),
        ({"request_id": "abc", "score": float("nan")}, "score"),
        ({"request_id": "abc", "score": None}, "score"),
        ({"request_id": "abc", "score": [1]}, "score"),
        ({"request_id": 7, "score": 1}, "request_id"),
        ({"request_id": "a b", "score": 1}, "request_id"),
        ({"request_id": "x" * 129, "score": 1}, "request_id"),
        ({"request_id": "abc"}, "score"),
        ({"request_id": "abc", "score": 1, "extra": 1}, "extra"),
    ],
)
def test_bad_scores_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        read_score(body)
    assert info.value.param == param


def test_without_a_feedback_log_the_route_says_so(tmp_path: Path) -> None:
    policy = yaml.safe_load(Path("policies/demo.yaml").read_text())
    policy["routing"]["classifier"] = str(Path("classifiers/models/default").resolve())
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    with TestClient(build_app(path)) as client:
        answer = client.post("/v1/feedback", json={"request_id": "abc", "score": 1})
        wrong_method = client.get("/v1/feedback")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "feedback_not_enabled"
    assert wrong_method.status_code == 405

"""The length blend: folded into the weights exactly, chosen by leaving sources out, shipped."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from classifiers.commands import main
from classifiers.crossval import choose_length_weight, leave_one_source_out, mixture_apgr
from classifiers.features import extract
from classifiers.metrics import apgr
from classifiers.model import DifficultyModel, blend_with_length, load_model
from classifiers.training import LabelledRequest, TrainConfig, fit

_CONFIG = TrainConfig(alpha=1.0, dense_alpha=100.0, min_count=2)
_DEFAULT = Path(__file__).resolve().parents[2] / "classifiers" / "models" / "default"


def _rows(n: int, seed: int, source: str) -> list[LabelledRequest]:
    """'zorblax' marks a hard prompt; hard prompts are short, easy ones long."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        hard = i % 2 == 0
        text = "zorblax quantum" if hard else "please tell me a little about cats " * 4
        strong = 1.0 if hard and rng.random() < 0.9 else 0.0
        rows.append(LabelledRequest({"prompt": f"{text} #{i}"}, 0.0, strong, source))
    return rows


@pytest.fixture(scope="module")
def model() -> DifficultyModel:
    return fit(_rows(200, 0, "syn"), _CONFIG)


_SHORT_HARD = {"prompt": "zorblax quantum"}
_LONG_EASY = {"prompt": "please tell me a little about cats " * 6}


def _length(request: dict[str, str]) -> float:
    return extract(request).dense[0]


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.7, 1.0])
def test_blend_is_the_weighted_sum_of_standardised_scores(
    model: DifficultyModel, weight: float
) -> None:
    stats = (0.5, 2.0, 3.0, 0.8)
    blended = blend_with_length(model, weight, *stats)
    for request in (_SHORT_HARD, _LONG_EASY, {"prompt": "name a colour"}):
        expected = (1 - weight) * (model.raw(extract(request)) - stats[0]) / stats[1] + weight * (
            _length(request) - stats[2]
        ) / stats[3]
        assert blended.raw(extract(request)) == pytest.approx(expected, abs=1e-9)


def test_blend_moves_a_disagreeing_score_toward_length(model: DifficultyModel) -> None:
    # The model ranks the short hard prompt above the long easy one; length ranks it below.
    assert model.raw(extract(_SHORT_HARD)) > model.raw(extract(_LONG_EASY))
    assert _length(_SHORT_HARD) < _length(_LONG_EASY)
    stats = (0.0, 1.0, 0.0, 1.0)

    def gap(weight: float) -> float:
        blended = blend_with_length(model, weight, *stats)
        return blended.raw(extract(_SHORT_HARD)) - blended.raw(extract(_LONG_EASY))

    model_gap = gap(0.0)
    length_gap = _length(_SHORT_HARD) - _length(_LONG_EASY)
    for weight in (0.25, 0.5, 0.75):
        # Exactly the configured share of the way from the model's gap to length's.
        assert gap(weight) == pytest.approx((1 - weight) * model_gap + weight * length_gap)
    assert gap(1.0) == pytest.approx(length_gap)


def test_weight_one_ranks_exactly_by_length() -> None:
    rows = _rows(200, 1, "syn")
    model = fit(rows, TrainConfig(alpha=1.0, dense_alpha=100.0, min_count=2, length_weight=1.0))
    assert not model.tokens
    weak = [r.weak for r in rows]
    strong = [r.strong for r in rows]
    scores = [model.score(r.request) for r in rows]
    lengths = [_length(dict(r.request)) for r in rows]
    assert apgr(scores, weak, strong) == pytest.approx(apgr(lengths, weak, strong))
    assert model.metadata["length_blend"]["weight"] == 1.0


def test_bad_weight_is_refused(model: DifficultyModel) -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        blend_with_length(model, 1.5, 0.0, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="length_weight"):
        TrainConfig(length_weight=-0.1)


def test_choose_length_weight_needs_two_sources() -> None:
    rows = _rows(120, 2, "a")
    assert choose_length_weight(rows, [extract(r.request) for r in rows], _CONFIG) == (None, {})


def test_choose_length_weight_keeps_a_model_that_transfers() -> None:
    # The same signal in three sources: the model beats length on each one left out.
    rows = _rows(120, 3, "a") + _rows(120, 4, "b") + _rows(120, 5, "c")
    weight, margins = choose_length_weight(rows, [extract(r.request) for r in rows], _CONFIG)
    assert weight is not None and weight < 1.0
    assert set(margins) == {"a", "b", "c"}
    assert min(margins.values()) > 0


def test_leave_one_source_out_table() -> None:
    rows = _rows(120, 3, "a") + _rows(120, 4, "b") + _rows(120, 5, "c")
    results, mixture = leave_one_source_out(rows, _CONFIG, grid=(0.0, 0.5, 1.0))
    assert [r.source for r in results] == ["a", "b", "c"]
    for result in results:
        assert result.random == pytest.approx(0.5)
        assert result.model >= result.length
    assert mixture.sources == 3
    assert mixture.random == pytest.approx(0.5)
    assert mixture.model >= mixture.length


def test_mixture_apgr_with_equal_weights_is_apgr() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=50)
    weak = rng.integers(0, 2, size=50)
    strong = np.maximum(weak, rng.integers(0, 2, size=50))
    gains = strong - weak
    assert mixture_apgr(scores, gains, np.ones(50)) == pytest.approx(apgr(scores, weak, strong))
    # Ties: a constant router is random.
    assert mixture_apgr(np.zeros(50), gains, rng.uniform(1, 2, 50)) == pytest.approx(0.5)


def test_train_auto_weight_is_reported(tmp_path: Path) -> None:
    lines = []
    for source, seed in (("a", 6), ("b", 7)):
        for row in _rows(80, seed, source):
            lines.append(
                json.dumps(
                    {"prompt": row.request["prompt"], "weak": row.weak, "strong": row.strong}
                    | {"source": source}
                )
            )
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = io.StringIO()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m")], out) == 0
    assert "length weight " in out.getvalue()
    blend = load_model(tmp_path / "m").metadata["length_blend"]
    assert 0.0 <= blend["weight"] <= 1.0
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "n"), "--length-weight",
                 "0.4"], out) == 0  # fmt: skip
    assert load_model(tmp_path / "n").metadata["length_blend"]["weight"] == 0.4


def test_shipped_model_loads() -> None:
    model = load_model(_DEFAULT)
    # A model from before the blend has no `length_blend`: it is the linear model (weight 0).
    blend = model.metadata.get("length_blend", {"weight": 0.0})
    assert 0.0 <= blend["weight"] <= 1.0
    score = model.score({"messages": [{"role": "user", "content": "Prove that √2 is irrational."}]})
    assert 0.0 <= score <= 1.0 and math.isfinite(score)


def test_candidate_trained_on_every_source_loads(tmp_path: Path) -> None:
    # The same path as the issue-20 candidate, on a small two-source file: auto weight, saved,
    # loaded back, same scores.
    rows = _rows(80, 8, "a") + _rows(80, 9, "b")
    config = TrainConfig(alpha=1.0, dense_alpha=100.0, min_count=2, length_weight=0.5)
    model = fit(rows, config)
    loaded = load_model(model.save(tmp_path / "m"))
    assert loaded.metadata["length_blend"]["weight"] == 0.5
    for row in rows[:10]:
        assert loaded.score(row.request) == pytest.approx(model.score(row.request))

"""Training on a synthetic signal, persistence round-trips, and refusing bad model files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from classifiers.metrics import apgr
from classifiers.model import (
    FORMAT_VERSION,
    MODEL_FILE,
    DifficultyModel,
    ModelLoadError,
    load_model,
)
from classifiers.tiers import threshold_for_fraction
from classifiers.training import LabelledRequest, TrainConfig, fit

_EASY = ["tell me about cats", "name a colour", "say hello to my friend", "what is a dog"]


def _synthetic(n: int, seed: int) -> list[LabelledRequest]:
    """Prompts mentioning 'zorblax' need the strong model; the rest do not."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        hard = i % 2 == 0
        text = rng.choice(_EASY) + (" zorblax quantum" if hard else " please")
        strong_wins = hard and rng.random() < 0.9
        rows.append(
            LabelledRequest({"prompt": f"{text} #{i}"}, 0.0, 1.0 if strong_wins else 0.0, "syn")
        )
    return rows


@pytest.fixture(scope="module")
def model() -> DifficultyModel:
    return fit(_synthetic(200, 0), TrainConfig(alpha=1.0, dense_alpha=100.0, min_count=2))


def test_learns_an_obvious_signal(model: DifficultyModel) -> None:
    test = _synthetic(100, 1)
    scores = [model.score(row.request) for row in test]
    # Every hard prompt above every easy one gives about 0.75 here (the oracle curve is flat
    # after k = 0.5, where the strong-model wins run out).
    assert apgr(scores, [r.weak for r in test], [r.strong for r in test]) > 0.73
    hard = model.score({"messages": [{"role": "user", "content": "zorblax quantum thing"}]})
    easy = model.score({"prompt": "tell me about cats please"})
    assert 0.0 <= easy < hard <= 1.0


def test_explain_names_the_signal(model: DifficultyModel) -> None:
    names = [name for name, _ in model.explain({"prompt": "zorblax quantum"}, top=3)]
    assert any("zorblax" in name or "quantum" in name for name in names)


def test_save_load_round_trip(model: DifficultyModel, tmp_path: Path) -> None:
    model.save(tmp_path)
    loaded = load_model(tmp_path)
    for request in ({"prompt": "zorblax quantum"}, {"prompt": "name a colour"}):
        assert loaded.score(request) == model.score(request)
    assert loaded.threshold_for_strong_fraction(0.3) == model.threshold_for_strong_fraction(0.3)


def test_strong_fraction_uses_reference_scores(model: DifficultyModel) -> None:
    threshold = model.threshold_for_strong_fraction(0.25)
    assert threshold == threshold_for_fraction(model.reference, 0.25)
    share = sum(s >= threshold for s in model.reference) / len(model.reference)
    assert share >= 0.25  # more only when reference scores tie at the threshold


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no difficulty model here"):
        load_model(tmp_path / "nope")


def test_corrupted_file(model: DifficultyModel, tmp_path: Path) -> None:
    file = model.save(tmp_path)
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="corrupted model file"):
        load_model(tmp_path)


def test_wrong_version(model: DifficultyModel, tmp_path: Path) -> None:
    data = model.to_json()
    data["format_version"] = FORMAT_VERSION + 1
    (tmp_path / MODEL_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=f"format version {FORMAT_VERSION + 1}"):
        load_model(tmp_path)


def test_malformed_field(model: DifficultyModel, tmp_path: Path) -> None:
    data = model.to_json()
    data["mean"] = data["mean"][:-1]
    (tmp_path / MODEL_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="malformed model"):
        load_model(tmp_path)


def test_not_a_model(tmp_path: Path) -> None:
    (tmp_path / MODEL_FILE).write_text('{"hello": 1}')
    with pytest.raises(ModelLoadError, match="not a triage-difficulty model"):
        load_model(tmp_path)


def test_shipped_default_model_loads() -> None:
    default = Path(__file__).resolve().parents[2] / "classifiers" / "models" / "default"
    model = load_model(default)
    score = model.score({"messages": [{"role": "user", "content": "Write a haiku about rain."}]})
    assert 0.0 <= score <= 1.0


def test_reference_weighs_sources_equally() -> None:
    rows = _synthetic(200, 2)
    chat = [
        LabelledRequest({"prompt": f"write a poem about {word}"}, 7.0, 8.0 + i % 3, "chat")
        for i, word in enumerate(["rain", "cats", "the sea", "autumn", "trains"] * 4)
    ]
    config = TrainConfig(alpha=1.0, dense_alpha=100.0, min_count=2, reference_per_source=50)
    model = fit(rows + chat, config)
    # 200 exam-like rows and 20 chat rows still give 50 reference scores each.
    assert len(model.reference) == 100
    chat_scores = sorted(model.score(row.request) for row in chat)
    below_chat_median = sum(s < chat_scores[len(chat_scores) // 2] for s in model.reference)
    assert 25 <= below_chat_median <= 75


def test_pooled_fit_still_learns() -> None:
    config = TrainConfig(alpha=1.0, dense_alpha=100.0, min_count=2, within_subject=False)
    model = fit(_synthetic(200, 0), config)
    assert model.score({"prompt": "zorblax quantum"}) > model.score({"prompt": "name a colour"})

"""The difficulty model: a linear score over request features, stored as versioned JSON."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from classifiers.features import DENSE_NAMES, Features, Token, extract
from classifiers.tiers import threshold_for_fraction

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MODEL_FILE",
    "DifficultyModel",
    "ModelLoadError",
    "blend_with_length",
    "load_model",
]

FORMAT = "triage-difficulty"
FORMAT_VERSION = 2  # 2: word weights only (no bigrams), byte-level words
MODEL_FILE = "model.json"
_MCQ = DENSE_NAMES.index("mcq_options")
_LENGTH = DENSE_NAMES.index("log_chars")  # the prompt-length baseline router's score


class ModelLoadError(ValueError):
    """A model directory that is missing, corrupted, or of another format version."""


@dataclass(frozen=True, slots=True)
class DifficultyModel:
    """Scores a request: P(the cheap tier's answer is clearly worse than the large tier's).

    raw = intercept + dense·w(block) + Σ token weights / √(distinct tokens), where the dense
    block is the multiple-choice one or the open-ended one (features are standardised with
    `mean`/`scale`, and each block's weights are the shared weights plus its own);
    score = sigmoid(calibration[0] · raw + calibration[1]).
    """

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    shared: tuple[float, ...]
    mcq: tuple[float, ...]
    open: tuple[float, ...]
    tokens: Mapping[str, float]
    intercept: float
    calibration: tuple[float, float]
    reference: tuple[float, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    # Weights folded with the standardisation, so scoring is one dot product per request.
    _folded: tuple[tuple[tuple[float, ...], float], tuple[tuple[float, ...], float]] = field(
        init=False, repr=False, compare=False
    )
    # Word weights keyed as the features produce words (ASCII bytes).
    _weights: Mapping[Token, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(DENSE_NAMES)
        for name in ("mean", "scale", "shared", "mcq", "open"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name}: expected {n} values, got {len(getattr(self, name))}")
        if any(value <= 0 for value in self.scale):
            raise ValueError("scale: every value must be positive")
        folded = []
        for block in (self.open, self.mcq):
            weights = tuple(
                (s + b) / sc for s, b, sc in zip(self.shared, block, self.scale, strict=True)
            )
            offset = -sum(map(operator.mul, weights, self.mean))
            folded.append((weights, offset))
        object.__setattr__(self, "_folded", (folded[0], folded[1]))
        object.__setattr__(
            self,
            "_weights",
            {name.encode("ascii", "replace"): weight for name, weight in self.tokens.items()},
        )

    def raw(self, features: Features) -> float:
        """The uncalibrated linear score (log-odds scale before calibration)."""
        weights, offset = self._folded[features.dense[_MCQ] > 0.5]
        dense: float = sum(map(operator.mul, weights, features.dense))
        tokens = features.tokens
        text = 0.0
        if tokens:
            text = sum(filter(None, map(self._weights.get, tokens))) / math.sqrt(len(tokens))
        return self.intercept + offset + dense + text

    def calibrate(self, raw: float) -> float:
        """Map a raw score to [0, 1]."""
        z = self.calibration[0] * raw + self.calibration[1]
        if z < -30.0:
            return 0.0
        return 1.0 / (1.0 + math.exp(-z))

    def score(self, request: Mapping[str, Any]) -> float:
        """P(cheap tier clearly worse) for a raw OpenAI chat or completions request body."""
        return self.calibrate(self.raw(extract(request)))

    def score_features(self, features: Features) -> float:
        """Same as `score`, for features already extracted."""
        return self.calibrate(self.raw(features))

    def explain(self, request: Mapping[str, Any], top: int = 5) -> list[tuple[str, float]]:
        """The `top` features that moved the raw score most, with signed contributions."""
        features = extract(request)
        mcq = features.dense[_MCQ] > 0.5
        block_name = "mcq" if mcq else "open"
        block = self.mcq if mcq else self.open
        parts: list[tuple[str, float]] = []
        for index, name in enumerate(DENSE_NAMES):
            z = (features.dense[index] - self.mean[index]) / self.scale[index]
            parts.append((name, z * self.shared[index]))
            parts.append((f"{name} ({block_name})", z * block[index]))
        tokens = features.tokens
        norm = math.sqrt(len(tokens)) if tokens else 1.0
        for token in tokens:
            weight = self._weights.get(token)
            if weight:
                parts.append((f"word '{token.decode('ascii')}'", weight / norm))
        parts.sort(key=lambda item: abs(item[1]), reverse=True)
        return [(name, value) for name, value in parts[:top] if value != 0.0]

    def threshold_for_strong_fraction(self, fraction: float) -> float:
        """Threshold so that `fraction` of the stored reference prompts score >= it."""
        return threshold_for_fraction(self.reference, fraction)

    def to_json(self) -> dict[str, Any]:
        """The stored form: plain numbers and strings only."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dense_names": list(DENSE_NAMES),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "weights": {
                "shared": list(self.shared),
                "mcq": list(self.mcq),
                "open": list(self.open),
            },
            "intercept": self.intercept,
            "calibration": list(self.calibration),
            "tokens": dict(sorted(self.tokens.items())),
            "reference_scores": list(self.reference),
            "metadata": dict(self.metadata),
        }

    def save(self, path: str | Path) -> Path:
        """Write `model.json` into directory `path` (created if needed); returns the file."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / MODEL_FILE
        target.write_bytes(orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2))
        return target


def blend_with_length(
    model: DifficultyModel,
    weight: float,
    raw_center: float,
    raw_scale: float,
    length_center: float,
    length_scale: float,
) -> DifficultyModel:
    """The model whose raw score is (1 - weight)·z(raw) + weight·z(log_chars).

    z(raw) = (raw - raw_center) / raw_scale and z(log_chars) likewise: both standardised, so
    `weight` is the share of the ranking that comes from prompt length (0: the model as is,
    1: the length baseline). The blend is linear in the features, so it is folded into the
    weights: scoring costs the same, and the file format does not change. Calibration and
    reference scores are left as they are (`training.fit` recomputes them after blending).
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"length blend weight must be between 0 and 1, got {weight!r}")
    if raw_scale <= 0 or length_scale <= 0:
        raise ValueError("raw_scale and length_scale must be positive")
    factor = (1.0 - weight) / raw_scale
    slope = weight / length_scale  # per unit of log_chars
    shared = list(map((factor).__mul__, model.shared))
    # A weight on `shared` is per standard deviation of the feature: slope · scale per unit.
    shared[_LENGTH] += slope * model.scale[_LENGTH]
    # Folding adds -slope · mean to the offset; the intercept takes it back, then centres.
    intercept = (
        factor * model.intercept
        + slope * model.mean[_LENGTH]
        - factor * raw_center
        - slope * length_center
    )
    tokens = {name: factor * value for name, value in model.tokens.items() if factor * value}
    return DifficultyModel(
        mean=model.mean,
        scale=model.scale,
        shared=tuple(shared),
        mcq=tuple(factor * value for value in model.mcq),
        open=tuple(factor * value for value in model.open),
        tokens=tokens,
        intercept=intercept,
        calibration=model.calibration,
        reference=model.reference,
        metadata=model.metadata,
    )


@contextmanager
def _field(where: str) -> Iterator[None]:
    """Turn a malformed field into a ModelLoadError that names it."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: malformed model ({type(exc).__name__}: {exc})") from exc


def _floats(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int | float) for v in value):
        raise TypeError("expected a list of numbers")
    return tuple(float(v) for v in value)


def load_model(path: str | Path) -> DifficultyModel:
    """Load a model directory (or its model.json); raises ModelLoadError with the reason."""
    location = Path(path)
    file = location / MODEL_FILE if location.is_dir() else location
    if not file.is_file():
        raise ModelLoadError(f"{path}: no difficulty model here (expected {MODEL_FILE})")
    try:
        data = orjson.loads(file.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ModelLoadError(f"{file}: corrupted model file, not valid JSON ({exc})") from exc
    except OSError as exc:
        raise ModelLoadError(f"{file}: cannot read ({exc.strerror})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelLoadError(f"{file}: not a {FORMAT} model file")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelLoadError(
            f"{file}: model format version {version!r}, this code reads version "
            f"{FORMAT_VERSION}; retrain with `triage classifier train`"
        )
    if data.get("dense_names") != list(DENSE_NAMES):
        raise ModelLoadError(
            f"{file}: the model was trained on other features than this code extracts; "
            "retrain with `triage classifier train`"
        )
    with _field(str(file)):
        weights = data["weights"]
        tokens = data["tokens"]
        if not isinstance(tokens, dict) or not all(
            isinstance(v, int | float) for v in tokens.values()
        ):
            raise TypeError("tokens: expected an object of numbers")
        calibration = _floats(data["calibration"])
        if len(calibration) != 2:
            raise ValueError("calibration: expected two numbers")
        metadata = data.get("metadata", {})
        return DifficultyModel(
            mean=_floats(data["mean"]),
            scale=_floats(data["scale"]),
            shared=_floats(weights["shared"]),
            mcq=_floats(weights["mcq"]),
            open=_floats(weights["open"]),
            tokens={str(k): float(v) for k, v in tokens.items()},
            intercept=float(data["intercept"]),
            calibration=(calibration[0], calibration[1]),
            reference=_floats(data["reference_scores"]),
            metadata=metadata if isinstance(metadata, dict) else {},
        )
    raise AssertionError("unreachable")  # pragma: no cover - the with block returns or raises

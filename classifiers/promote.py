"""Promotion: a candidate model replaces the current one only when it routes held-out traffic
better, by a paired bootstrap over the labelled rows; then it is installed atomically.

The held-out slice is fixed by a rule on each row's key (`held_out`), not by a list: `train
--traffic` never trains on those rows, so every candidate and every current model trained
that way is compared on rows neither has seen, and the model file stays small.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from classifiers.features import Features
from classifiers.metrics import pgr_curve
from classifiers.model import MODEL_FILE, DifficultyModel

__all__ = [
    "CARD_FILE",
    "Comparison",
    "Figure",
    "card_section",
    "compare",
    "held_out",
    "install",
]

CARD_FILE = "MODEL_CARD.md"


def held_out(key: str, share: float) -> bool:
    """Whether a traffic row belongs to the promotion slice: a stable share of row keys."""
    if share <= 0.0:
        return False
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10_000
    return bucket < round(share * 10_000)


@dataclass(frozen=True, slots=True)
class Figure:
    """A point estimate with its bootstrap interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class Comparison:
    """Candidate against current on the same held-out rows."""

    rows: int
    candidate_apgr: Figure
    current_apgr: Figure
    length_apgr: float
    apgr_gain: Figure  # candidate - current, paired
    candidate_cpt50: Figure
    current_cpt50: Figure
    cpt50_saving: Figure  # current - candidate: positive is fewer strong calls
    confidence: float
    resamples: int
    seed: int

    @property
    def better(self) -> bool:
        """The rule: the lower end of the paired APGR gain's interval is above zero."""
        return self.apgr_gain.low > 0.0


def _figures(curve: NDArray[np.float64]) -> tuple[float, float]:
    apgr = float(((curve[:-1] + curve[1:]) / 2.0).mean())
    reached = np.flatnonzero(curve >= 0.5 - 1e-12)
    return apgr, float(reached[0]) / (len(curve) - 1)


def _interval(values: NDArray[np.float64], point: float, confidence: float) -> Figure:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(values), [tail, 1.0 - tail])
    return Figure(point, float(low), float(high))


def compare(
    candidate: DifficultyModel,
    current: DifficultyModel,
    features: Sequence[Features],
    weak: Sequence[float],
    strong: Sequence[float],
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Comparison:
    """APGR and CPT(50%) of both models on the rows, with paired bootstrap intervals.

    Each resample draws the rows with replacement (seeded) and scores both models on the same
    draw, so the interval of the difference is much narrower than either model's own.
    """
    if not 0.0 < confidence < 1.0 or resamples < 1:
        raise ValueError("confidence must be in (0, 1) and resamples >= 1")
    a = np.array([candidate.raw(item) for item in features])
    b = np.array([current.raw(item) for item in features])
    length = np.array([item.dense[0] for item in features])
    w = np.asarray(weak, dtype=np.float64)
    s = np.asarray(strong, dtype=np.float64)
    if len(a) < 2 or float((s - w).sum()) == 0.0:
        raise ValueError(
            f"{len(a)} held-out rows whose strong and weak outcomes differ on average are needed"
        )
    points = [_figures(pgr_curve(x, w, s)) for x in (a, b)]
    length_apgr = _figures(pgr_curve(length, w, s))[0]
    rng = np.random.default_rng(seed)
    draws: list[tuple[float, float, float, float]] = []
    for _ in range(resamples):
        pick = rng.integers(0, len(a), len(a))
        if float((s[pick] - w[pick]).sum()) == 0.0:
            continue
        ca, cc = _figures(pgr_curve(a[pick], w[pick], s[pick]))
        ua, uc = _figures(pgr_curve(b[pick], w[pick], s[pick]))
        draws.append((ca, ua, cc, uc))
    if not draws:
        raise ValueError("no bootstrap resample had a gain to recover")
    t = np.array(draws)
    return Comparison(
        rows=len(a),
        candidate_apgr=_interval(t[:, 0], points[0][0], confidence),
        current_apgr=_interval(t[:, 1], points[1][0], confidence),
        length_apgr=length_apgr,
        apgr_gain=_interval(t[:, 0] - t[:, 1], points[0][0] - points[1][0], confidence),
        candidate_cpt50=_interval(t[:, 2], points[0][1], confidence),
        current_cpt50=_interval(t[:, 3], points[1][1], confidence),
        cpt50_saving=_interval(t[:, 3] - t[:, 2], points[1][1] - points[0][1], confidence),
        confidence=confidence,
        resamples=len(draws),
        seed=seed,
    )


def _write_atomic(path: Path, data: bytes) -> None:
    """Write next to `path`, flush to disk, then rename over it: readers see old or new."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _model_file(path: Path) -> Path:
    return path / MODEL_FILE if path.is_dir() else path


def install(candidate: Path, current: Path, comparison: Comparison, card: str) -> Path:
    """Put the candidate's model file in place of the current one; returns the file written.

    The old file is kept as `model.previous.json` (to roll back: rename it back). The
    candidate's metadata gains a `promotion` record; `card` is appended to the current
    directory's model card. Each file is replaced by an atomic rename.
    """
    source = _model_file(candidate)
    target = _model_file(current)
    data: dict[str, Any] = orjson.loads(source.read_bytes())
    metadata = data.setdefault("metadata", {})
    metadata["promotion"] = {
        "promoted_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "held_out_rows": comparison.rows,
        "apgr": comparison.candidate_apgr.value,
        "apgr_replaced": comparison.current_apgr.value,
        "apgr_gain_interval": [comparison.apgr_gain.low, comparison.apgr_gain.high],
        "cpt50": comparison.candidate_cpt50.value,
        "cpt50_replaced": comparison.current_cpt50.value,
        "confidence": comparison.confidence,
        "resamples": comparison.resamples,
        "replaced_sha256": hashlib.sha256(target.read_bytes()).hexdigest()
        if target.is_file()
        else None,
    }
    if target.is_file():
        _write_atomic(target.with_name("model.previous.json"), target.read_bytes())
    _write_atomic(target, orjson.dumps(data, option=orjson.OPT_INDENT_2))
    card_path = target.with_name(CARD_FILE)
    existing = card_path.read_text() if card_path.is_file() else "# Model card\n"
    _write_atomic(card_path, (existing.rstrip("\n") + "\n\n" + card).encode())
    return target


def _span(figure: Figure, percent: bool = False, signed: bool = False) -> str:
    form = ("+" if signed else "") + (".1%" if percent else ".3f")
    return f"{figure.value:{form}} ({figure.low:{form}} to {figure.high:{form}})"


def card_section(comparison: Comparison, candidate: str, labels: Sequence[str]) -> str:
    """The model card section a promotion appends: the figures it was decided on."""
    c = comparison
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    level = f"{c.confidence:.0%}"
    return "\n".join(
        [
            f"## Promotion {when}",
            "",
            f"Candidate `{candidate}` replaced the previous model after `triage classifier "
            f"promote` on {c.rows} held-out traffic rows ({', '.join(labels)}); intervals: "
            f"{level} paired bootstrap, {c.resamples} resamples, seed {c.seed}. Rule: the "
            "lower end of the APGR gain's interval is above 0.",
            "",
            "| router | APGR | CPT(50%) |",
            "|---|---|---|",
            f"| candidate (installed) | {_span(c.candidate_apgr)} | "
            f"{_span(c.candidate_cpt50, True)} |",
            f"| previous | {_span(c.current_apgr)} | {_span(c.current_cpt50, True)} |",
            f"| prompt length | {c.length_apgr:.3f} | |",
            f"| candidate minus previous | {_span(c.apgr_gain, signed=True)} | "
            f"{_span(c.cpt50_saving, True, True)} fewer strong calls |",
            "",
        ]
    )

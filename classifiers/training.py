"""Fit a DifficultyModel from labelled rows: a prior over structural features plus ridge residuals.

Why a prior: grouped cross-validation by subject showed that structural weights learned freely
from the training subjects transfer badly to unseen subjects (they pick up what makes *those*
subjects hard), while a few cross-domain cues — prompt length, and for open-ended prompts math,
code and reasoning versus writing and role-play — transfer. So the dense weights start from
the documented `PRIOR` below and the data only fits a heavily shrunk residual on top of it
(ridge towards the prior), together with word weights.

Target: the per-row gain d = strong - weak. Sources scored 0/1, or on a 0-1 scale, use d as
is; judge-scored sources (any value outside [0, 1]) use clip(d / JUDGE_SCALE, -1, 1). Each
source's target is standardised on its own, because only the order within a data set matters
for APGR, and a source's average gain must not leak into features that happen to tell sources
apart (the traffic pass, classifiers/adapt.py, is where kinds of prompt are compared). The
expected gain is the ranking that maximises APGR; a final logistic calibration then maps it to
P(strong clearly better): strong > weak for 0/1 sources, strong ≥ weak + CLEAR_MARGIN for
judge scores.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray

from classifiers.features import DENSE_NAMES, Features, Token, extract
from classifiers.model import DifficultyModel, blend_with_length

__all__ = [
    "CLEAR_MARGIN",
    "JUDGE_SCALE",
    "MIN_CALIBRATION_SLOPE",
    "PRIOR",
    "UNIT_CLEAR_MARGIN",
    "LabelledRequest",
    "TrainConfig",
    "blend_stats",
    "design_blocks",
    "finish",
    "fit",
    "fit_linear",
    "gain_targets",
    "raw_scores",
    "token_matrix",
]

_LENGTH = DENSE_NAMES.index("log_chars")
JUDGE_SCALE = 3.0
# The smallest calibration slope: scores must rise with the raw score (see `finish`).
MIN_CALIBRATION_SLOPE = 0.1
CLEAR_MARGIN = 2.0
# "Clearly better" on a 0-1 outcome scale: half the scale.
UNIT_CLEAR_MARGIN = 0.5

# Prior weights per block, in units of one standard deviation of the feature. "shared" applies
# to every prompt, "mcq" adds to it for multiple-choice prompts, "open" for all others.
PRIOR: Mapping[str, Mapping[str, float]] = {
    "shared": {"log_chars": 0.3},
    "mcq": {"log_chars": 0.7, "lex_negation": 0.3},
    "open": {
        "log_numbers": 0.3,
        "log_sentences": 0.3,
        "lex_math": 0.5,
        "log_math_symbols": 0.3,
        "phrase_count_question": 0.3,
        "lex_reason": 0.3,
        "lex_code": 0.7,
        "log_code_symbols": 0.3,
        "code_fence": 0.3,
        "lex_write": -0.5,
        "lex_roleplay": -0.3,
        "lex_knowledge": -0.2,
    },
}


@dataclass(frozen=True, slots=True)
class LabelledRequest:
    """One training example: the request, both outcomes and the source it came from."""

    request: Mapping[str, Any]
    weak: float
    strong: float
    source: str = "unknown"
    subject: str = ""  # the row's subject or task group; "" means the source as a whole


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Hyper-parameters; the defaults are the ones grouped cross-validation picked."""

    alpha: float = 300.0  # ridge strength on word weights
    dense_alpha: float = 30000.0  # ridge strength on the residual of the structural prior
    min_count: int = 3  # a word must occur in this many training prompts
    min_subjects: int = 1  # ... and in this many subjects (a word of one subject names it)
    max_tokens: int = 30000  # keep the largest-magnitude word weights only
    min_source_share: float = 0.1  # small sources are up-weighted to this share of the data
    reference_per_source: int = 500  # strong_fraction reference: score quantiles per source
    within_subject: bool = False  # fit the structural residual on within-subject differences
    # Share of the ranking taken from prompt length (0: the model alone, 1: the length baseline);
    # `crossval.choose_length_weight` picks it by leaving training sources out.
    length_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.alpha <= 0 or self.dense_alpha <= 0:
            raise ValueError("alpha and dense_alpha must be positive")
        if self.reference_per_source < 1:
            raise ValueError("reference_per_source must be >= 1")
        if not 0.0 <= self.length_weight <= 1.0:
            raise ValueError("length_weight must be between 0 and 1")
        if self.min_count < 1 or self.max_tokens < 0:
            raise ValueError("min_count must be >= 1 and max_tokens >= 0")


def _prior_vector() -> NDArray[np.float64]:
    n = len(DENSE_NAMES)
    vector = np.zeros(3 * n)
    for offset, block in enumerate(("shared", "mcq", "open")):
        for name, weight in PRIOR[block].items():
            vector[offset * n + DENSE_NAMES.index(name)] = weight
    return vector


def gain_targets(
    rows: Sequence[LabelledRequest],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Standardised regression target and the 0/1 'strong clearly better' label."""
    sources = np.array([row.source for row in rows])
    weak = np.array([row.weak for row in rows], dtype=np.float64)
    strong = np.array([row.strong for row in rows], dtype=np.float64)
    gain = strong - weak
    target = np.zeros(len(rows))
    label = np.zeros(len(rows))
    for source in np.unique(sources):
        mask = sources == source
        outcomes = np.r_[weak[mask], strong[mask]]
        binary = bool(np.isin(outcomes, (0.0, 1.0)).all())
        if binary:
            part = gain[mask]
            label[mask] = gain[mask] > 0
        elif outcomes.min() >= 0.0 and outcomes.max() <= 1.0:
            # A 0-1 scale (a judge's preference share, e.g. traffic labels): the gain as is.
            part = gain[mask]
            label[mask] = gain[mask] >= UNIT_CLEAR_MARGIN
        else:
            part = np.clip(gain[mask] / JUDGE_SCALE, -1.0, 1.0)
            label[mask] = gain[mask] >= CLEAR_MARGIN
        spread = float(part.std())
        target[mask] = (part - part.mean()) / (spread if spread > 0 else 1.0)
    return target, label


def _row_weights(rows: Sequence[LabelledRequest], share: float) -> NDArray[np.float64]:
    counts = Counter(row.source for row in rows)
    total = len(rows)
    factor = {s: max(1.0, share * total / c) for s, c in counts.items()}
    return np.array([factor[row.source] for row in rows])


def token_matrix(
    features: Sequence[Features], vocabulary: Mapping[Token, int]
) -> Any:  # scipy.sparse.csr_matrix; scipy ships no type stubs
    """Word columns as the model scores them: 1 / √(distinct words) for each word present."""
    from scipy import sparse

    indices: list[int] = []
    pointers = [0]
    values: list[float] = []
    for item in features:
        distinct = item.tokens
        columns = sorted({vocabulary[t] for t in distinct if t in vocabulary})
        weight = 1.0 / math.sqrt(len(distinct)) if distinct else 0.0
        indices.extend(columns)
        values.extend([weight] * len(columns))
        pointers.append(len(indices))
    return sparse.csr_matrix(
        (np.array(values), np.array(indices, dtype=np.int64), np.array(pointers)),
        shape=(len(features), len(vocabulary)),
    )


def design_blocks(
    dense: NDArray[np.float64], mean: NDArray[np.float64], scale: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Standardised dense features as the three weight blocks: shared, multiple-choice, open."""
    z = (dense - mean) / scale
    mcq = dense[:, DENSE_NAMES.index("mcq_options")][:, None] > 0.5
    return np.hstack([z, z * mcq, z * ~mcq])


def _demean(values: NDArray[np.float64], groups: NDArray[np.str_]) -> NDArray[np.float64]:
    """`values` minus the mean of each row's group."""
    _, index = np.unique(groups, return_inverse=True)
    sums = np.zeros((index.max() + 1, values.shape[1]))
    np.add.at(sums, index, values)
    counts = np.bincount(index)[:, None]
    result: NDArray[np.float64] = values - (sums / counts)[index]
    return result


def raw_scores(model: DifficultyModel, features: Sequence[Features]) -> NDArray[np.float64]:
    """Raw (uncalibrated) scores of many requests."""
    return np.array([model.raw(item) for item in features], dtype=np.float64)


def fit(
    rows: Sequence[LabelledRequest],
    config: TrainConfig | None = None,
    metadata: Mapping[str, Any] | None = None,
    features: Sequence[Features] | None = None,
) -> DifficultyModel:
    """Train on labelled requests; `features` may hold their already extracted features."""
    config = config or TrainConfig()
    if features is None:
        features = [extract(row.request) for row in rows]
    linear = fit_linear(rows, config, features)
    return finish(rows, features, linear, config, metadata)


def fit_linear(
    rows: Sequence[LabelledRequest], config: TrainConfig, features: Sequence[Features]
) -> DifficultyModel:
    """The linear model alone: prior + ridge residuals, no length blend, not calibrated."""
    from scipy import sparse
    from sklearn.linear_model import Ridge

    if len(rows) < 2:
        raise ValueError(f"need at least 2 labelled rows to train, got {len(rows)}")
    if len(features) != len(rows):
        raise ValueError(f"got {len(features)} feature rows for {len(rows)} labelled rows")
    dense = np.array([item.dense for item in features], dtype=np.float64)
    target, label = gain_targets(rows)
    if label.min() == label.max():
        raise ValueError("every row has the same label: the data cannot teach a difficulty order")
    weights = _row_weights(rows, config.min_source_share)

    mean = dense.mean(axis=0)
    spread = dense.std(axis=0)
    scale = np.where(spread > 1e-9, spread, 1.0)
    blocks = design_blocks(dense, mean, scale)
    prior = _prior_vector()
    offset = blocks @ prior

    counts: Counter[Token] = Counter()
    subjects_of: dict[Token, set[str]] = {}
    for row, item in zip(rows, features, strict=True):
        counts.update(item.tokens)
        subject = f"{row.source}/{row.subject}"
        for token in item.tokens:
            subjects_of.setdefault(token, set()).add(subject)
    kept = sorted(
        (
            t
            for t, c in counts.items()
            if c >= config.min_count and len(subjects_of[t]) >= config.min_subjects
        ),
    )
    vocabulary = {token: index for index, token in enumerate(kept)}
    # Ridge with one alpha: scaling the dense columns by √(alpha / dense_alpha) gives them the
    # stronger shrinkage towards the prior.
    dense_factor = math.sqrt(config.alpha / config.dense_alpha)
    residual = target - offset
    fit_blocks = blocks
    if config.within_subject:
        # Fixed effects: structural weights learned from differences between prompts of one
        # subject cannot encode which training subjects happen to be hard, which is what
        # failed to transfer to unseen subjects.
        groups = np.array([f"{row.source}/{row.subject}" for row in rows])
        fit_blocks = _demean(blocks, groups)
        residual = _demean(residual[:, None], groups)[:, 0]
    design = sparse.hstack(
        [sparse.csr_matrix(fit_blocks * dense_factor), token_matrix(features, vocabulary)]
    ).tocsr()
    ridge = Ridge(alpha=config.alpha, solver="sparse_cg", max_iter=2000, tol=1e-5)
    ridge.fit(design, residual, sample_weight=weights)
    coef = np.asarray(ridge.coef_, dtype=np.float64)
    n_blocks = blocks.shape[1]
    dense_weights = prior + coef[:n_blocks] * dense_factor
    token_coef = coef[n_blocks:]
    order = np.argsort(-np.abs(token_coef))[: config.max_tokens]
    tokens = {kept[i].decode("ascii"): float(token_coef[i]) for i in order if token_coef[i] != 0.0}

    n = len(DENSE_NAMES)
    return DifficultyModel(
        mean=tuple(mean.tolist()),
        scale=tuple(scale.tolist()),
        shared=tuple(dense_weights[:n].tolist()),
        mcq=tuple(dense_weights[n : 2 * n].tolist()),
        open=tuple(dense_weights[2 * n :].tolist()),
        tokens=tokens,
        intercept=float(ridge.intercept_),
        calibration=(1.0, 0.0),
        reference=(),
        metadata={"vocabulary": len(vocabulary)},
    )


def blend_stats(
    rows: Sequence[LabelledRequest], raw: NDArray[np.float64], lengths: NDArray[np.float64]
) -> tuple[float, float, float, float]:
    """Centre and spread of the raw score and of log_chars for the length blend.

    The spreads are pooled *within* sources (routing ranks prompts of one kind against each
    other), so the blend weight means the same whatever the sources' average levels.
    """
    sources = np.array([row.source for row in rows])
    stats: list[float] = []
    for values in (raw, lengths):
        variance = [float(values[sources == s].var()) for s in np.unique(sources)]
        spread = math.sqrt(float(np.mean(variance)))
        stats += [float(values.mean()), spread if spread > 1e-9 else 1.0]
    return stats[0], stats[1], stats[2], stats[3]


def finish(
    rows: Sequence[LabelledRequest],
    features: Sequence[Features],
    linear: DifficultyModel,
    config: TrainConfig,
    metadata: Mapping[str, Any] | None = None,
    stats: tuple[float, float, float, float] | None = None,
) -> DifficultyModel:
    """Blend a `fit_linear` model with prompt length, calibrate it and add the reference set.

    `stats` (centres and spreads of the blend) default to `blend_stats` over all rows; the
    traffic fit passes the ones its blend weight was chosen with.
    """
    from sklearn.linear_model import LogisticRegression

    _, label = gain_targets(rows)
    weights = _row_weights(rows, config.min_source_share)
    raw = raw_scores(linear, features)
    lengths = np.array([item.dense[_LENGTH] for item in features], dtype=np.float64)
    if stats is None:
        stats = blend_stats(rows, raw, lengths)
    blended = blend_with_length(linear, config.length_weight, *stats)
    raw = raw_scores(blended, features)
    # The slope is fitted within sources (one intercept per source): the target was
    # standardised per source, so the raw score says nothing about a source's base rate, and
    # pooling sources whose base rates differ can even give a negative slope, which would turn
    # the router, length included, upside down. The intercept is then fitted on all rows.
    sources = np.array([row.source for row in rows])
    dummies = (sources[:, None] == np.unique(sources)[None, :]).astype(np.float64)
    platt = LogisticRegression(C=100.0, max_iter=1000, fit_intercept=len(dummies[0]) == 1)
    platt.fit(np.hstack([raw[:, None], dummies]), label.astype(int), sample_weight=weights)
    slope = max(float(platt.coef_[0, 0]), MIN_CALIBRATION_SLOPE)
    calibration = (slope, _intercept(raw * slope, label, weights))
    reference = _reference(rows, [_sigmoid(r, calibration) for r in raw], config)
    info: dict[str, Any] = {
        "trained_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rows": len(rows),
        "rows_by_source": dict(Counter(row.source for row in rows)),
        "vocabulary": linear.metadata.get("vocabulary"),
        "tokens_kept": len(blended.tokens),
        "length_blend": {
            "weight": config.length_weight,
            "raw_center": stats[0],
            "raw_scale": stats[1],
            "length_center": stats[2],
            "length_scale": stats[3],
        },
        "config": {
            "alpha": config.alpha,
            "dense_alpha": config.dense_alpha,
            "min_count": config.min_count,
            "min_subjects": config.min_subjects,
            "max_tokens": config.max_tokens,
            "min_source_share": config.min_source_share,
            "within_subject": config.within_subject,
            "reference_per_source": config.reference_per_source,
            "length_weight": config.length_weight,
            "judge_scale": JUDGE_SCALE,
            "clear_margin": CLEAR_MARGIN,
        },
        **(metadata or {}),
    }
    return DifficultyModel(
        mean=blended.mean,
        scale=blended.scale,
        shared=blended.shared,
        mcq=blended.mcq,
        open=blended.open,
        tokens=blended.tokens,
        intercept=blended.intercept,
        calibration=calibration,
        reference=reference,
        metadata=info,
    )


def _reference(
    rows: Sequence[LabelledRequest], scores: Sequence[float], config: TrainConfig
) -> tuple[float, ...]:
    """The strong_fraction reference set: the same number of score quantiles from each source.

    Taking every training prompt would make the reference as lopsided as the data (97% exam
    questions in the shipped set), so a `strong_fraction` would be calibrated for exams and
    send a different share of chat traffic. Equal quantiles per source weigh each kind of
    prompt the same, whatever its row count.
    """
    sources = np.array([row.source for row in rows])
    values = np.asarray(scores, dtype=np.float64)
    points = np.linspace(0.0, 1.0, config.reference_per_source)
    parts = [np.quantile(values[sources == source], points) for source in np.unique(sources)]
    return tuple(sorted(round(float(v), 6) for v in np.concatenate(parts)))


def _intercept(
    offset: NDArray[np.float64], label: NDArray[np.float64], weights: NDArray[np.float64]
) -> float:
    """The logistic intercept b that fits label ~ sigmoid(offset + b) (Newton steps)."""
    rate = float(np.clip(np.average(label, weights=weights), 1e-6, 1 - 1e-6))
    b = math.log(rate / (1 - rate)) - float(np.average(offset, weights=weights))
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(offset + b, -30.0, 30.0)))
        step = float(np.sum(weights * (p - label)) / max(np.sum(weights * p * (1 - p)), 1e-12))
        step = max(-1.0, min(1.0, step))  # damped: near-separable data has a flat curvature
        b -= step
        if abs(step) < 1e-10:
            break
    return b


def _sigmoid(raw: float, calibration: tuple[float, float]) -> float:
    """sigmoid(a · raw + b), as DifficultyModel.calibrate computes it."""
    z = calibration[0] * raw + calibration[1]
    return 0.0 if z < -30.0 else 1.0 / (1.0 + math.exp(-z))

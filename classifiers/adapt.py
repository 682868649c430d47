"""Learning from traffic labels: a ridge pass over the operator's labelled traffic, shrunk
towards a model trained on the base data, and a length blend chosen on that traffic.

Why a second pass over the traffic alone, rather than one fit over base + traffic: the base
fit standardises each source's gain on its own, so that it learns an order *within* a kind of
prompt and nothing about which kinds are hard (that does not transfer to unseen kinds). On an
operator's traffic, which kind of request it is — and so its mean gain — is most of what
there is to learn, and the labels are of exactly the traffic to be routed. So the traffic is
one group whose kinds are compared with each other, fitted on top of the base model: the base
score is one column (lightly shrunk), and the dense and word weights move from the base's
values only as far as the traffic shows. `weight` is how many base rows one traffic row counts
for: the ridge strengths are the base's divided by it. The pass costs milliseconds (the base
fit is not repeated), so the length blend can be chosen by cross-validation on the traffic.

Never worse than length: the blend weight w is chosen on out-of-fold traffic scores, by the
lower bound of its margin over length; w = 1 (prompt length alone) has margin 0 and is kept
unless some w < 1 beats length there with the configured confidence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from classifiers.crossval import LENGTH_WEIGHTS
from classifiers.data import Row, StoredFeatures, word_hash
from classifiers.features import DENSE_NAMES, Features, Token, extract
from classifiers.metrics import apgr
from classifiers.model import DifficultyModel, blend_with_length
from classifiers.training import (
    LabelledRequest,
    blend_stats,
    design_blocks,
    gain_targets,
    raw_scores,
    token_matrix,
)

__all__ = [
    "TRAFFIC_SOURCE",
    "TrafficConfig",
    "TrafficFit",
    "TrafficRows",
    "adapt",
    "blended_model",
    "fit_residual",
    "margin_bounds",
    "resampled_apgr",
    "traffic_rows",
]

TRAFFIC_SOURCE = "traffic"
_LENGTH = DENSE_NAMES.index("log_chars")
# The base score's column is multiplied by this before the ridge, so its coefficient is hardly
# shrunk: the base's order is kept unless the traffic contradicts it.
_BASE_FACTOR = 10.0
# Marks a word known only by its hash: it counts towards a prompt's distinct words (the
# scoring normalisation) but never gets a weight, since the model file stores words.
_OPAQUE = b"\x00"


@dataclass(frozen=True, slots=True)
class TrafficConfig:
    """Settings of the traffic pass; defaults measured with `bench/adapt.py`."""

    weight: float = 10.0  # one traffic row counts as this many base rows
    alpha: float = 300.0  # base ridge strength on word weights (divided by `weight`)
    dense_alpha: float = 3000.0  # ... on the dense weights' move from the base (divided too)
    min_count: int = 2  # a word must occur in this many traffic prompts to get a weight
    folds: int = 5  # cross-validation folds for the length blend weight
    min_rows: int = 30  # fewer labelled traffic rows: no traffic pass, the base as is
    grid: tuple[float, ...] = LENGTH_WEIGHTS
    # The blend weight is the one whose out-of-fold margin over length has the best lower
    # bound at this one-sided confidence (`resamples` bootstrap resamples of the traffic rows).
    confidence: float = 0.95
    resamples: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weight <= 0 or self.alpha <= 0 or self.dense_alpha <= 0:
            raise ValueError("traffic weight, alpha and dense_alpha must be positive")
        if not 0.0 <= self.confidence < 1.0 or self.resamples < 1:
            raise ValueError("confidence must be in [0, 1) and resamples >= 1")
        if self.folds < 2:
            raise ValueError("traffic folds must be >= 2")
        if 1.0 not in self.grid:
            raise ValueError("the blend grid must hold 1 (length alone): it is the fallback")


@dataclass(frozen=True, slots=True)
class TrafficRows:
    """Labelled traffic: the rows (all of source TRAFFIC_SOURCE) and their features."""

    rows: list[LabelledRequest]
    features: list[Features]
    keys: list[str]
    skipped: int = 0  # rows with no outcomes, or neither prompt text nor features


@dataclass(frozen=True, slots=True)
class TrafficFit:
    """The adapted linear model, its length blend and what chose it."""

    linear: DifficultyModel  # unblended, uncalibrated
    length_weight: float
    stats: tuple[float, float, float, float]  # blend centres and spreads, over the traffic
    rows: int
    cv_apgr: Mapping[float, float] = field(default_factory=dict)  # out-of-fold, per weight
    cv_bound: Mapping[float, float] = field(default_factory=dict)  # margin over length, low end
    length_apgr: float = 0.5  # prompt length on the same traffic


def _features_of(stored: StoredFeatures, words: Mapping[str, Token]) -> Features:
    tokens = {words.get(h, _OPAQUE + h.encode()) for h in stored.word_hashes}
    return Features(dense=stored.dense, tokens=frozenset(tokens))


def traffic_rows(rows: Sequence[Row], known: Sequence[Features] = ()) -> TrafficRows:
    """Labelled traffic rows, with features from the prompt text or from stored `features`.

    Stored word hashes are mapped back to words seen in `known` (the base data) or in the
    text-bearing traffic rows; others stay opaque (see `data.word_hash`). Every row becomes
    source TRAFFIC_SOURCE: its kinds of request are compared with each other.
    """
    vocabulary: set[Token] = set()
    for item in known:
        vocabulary.update(item.tokens)
    kept: list[tuple[Row, Features | None]] = []
    for row in rows:
        if row.weak is None or row.strong is None:
            continue
        if row.request is not None:
            features = extract(row.request)
            vocabulary.update(features.tokens)
            kept.append((row, features))
        elif row.features is not None:
            kept.append((row, None))
    hashed = any(item is None for _, item in kept)
    words = {word_hash(word): word for word in vocabulary} if hashed else {}
    result = TrafficRows(rows=[], features=[], keys=[], skipped=len(rows) - len(kept))
    for row, extracted in kept:
        assert row.weak is not None and row.strong is not None
        if extracted is not None:
            result.features.append(extracted)
        else:
            assert row.features is not None
            result.features.append(_features_of(row.features, words))
        result.rows.append(
            LabelledRequest(row.request or {}, row.weak, row.strong, TRAFFIC_SOURCE, row.subject)
        )
        result.keys.append(row.key)
    return result


def fit_residual(
    base: DifficultyModel,
    rows: Sequence[LabelledRequest],
    features: Sequence[Features],
    config: TrafficConfig,
) -> DifficultyModel:
    """The base model refitted on traffic rows: c·z(base) + dense and word moves, folded."""
    from scipy import sparse
    from sklearn.linear_model import Ridge

    target, _ = gain_targets([_as_traffic(row) for row in rows])
    base_raw = raw_scores(base, features)
    centre = float(base_raw.mean())
    spread = float(base_raw.std()) or 1.0
    dense = np.array([item.dense for item in features], dtype=np.float64)
    blocks = design_blocks(dense, np.asarray(base.mean), np.asarray(base.scale))
    counts: dict[Token, int] = {}
    for item in features:
        for token in item.tokens:
            if not token.startswith(_OPAQUE):
                counts[token] = counts.get(token, 0) + 1
    kept = sorted(t for t, c in counts.items() if c >= config.min_count)
    vocabulary = {token: index for index, token in enumerate(kept)}
    alpha = config.alpha / config.weight
    dense_factor = math.sqrt(config.alpha / config.dense_alpha)
    design = sparse.hstack(
        [
            sparse.csr_matrix(((base_raw - centre) / spread * _BASE_FACTOR)[:, None]),
            sparse.csr_matrix(blocks * dense_factor),
            token_matrix(features, vocabulary),
        ]
    ).tocsr()
    ridge = Ridge(alpha=alpha, solver="sparse_cg", max_iter=2000, tol=1e-6)
    ridge.fit(design, target)
    coef = np.asarray(ridge.coef_, dtype=np.float64)
    keep = float(coef[0]) * _BASE_FACTOR / spread  # the base's weights, scaled
    n = len(DENSE_NAMES)
    moves = (coef[1 : 1 + 3 * n] * dense_factor).tolist()
    tokens = {name: keep * value for name, value in base.tokens.items()}
    for token, index in vocabulary.items():
        value = float(coef[1 + 3 * n + index])
        if value:
            name = token.decode("ascii")
            tokens[name] = tokens.get(name, 0.0) + value
    return DifficultyModel(
        mean=base.mean,
        scale=base.scale,
        shared=tuple(keep * w + m for w, m in zip(base.shared, moves[:n], strict=True)),
        mcq=tuple(keep * w + m for w, m in zip(base.mcq, moves[n : 2 * n], strict=True)),
        open=tuple(keep * w + m for w, m in zip(base.open, moves[2 * n :], strict=True)),
        tokens={k: v for k, v in tokens.items() if v},
        intercept=float(ridge.intercept_) + keep * (base.intercept - centre),
        calibration=(1.0, 0.0),
        reference=(),
        metadata={"traffic_vocabulary": len(vocabulary), "base_coefficient": keep},
    )


def _as_traffic(row: LabelledRequest) -> LabelledRequest:
    if row.source == TRAFFIC_SOURCE:
        return row
    return LabelledRequest(row.request, row.weak, row.strong, TRAFFIC_SOURCE, row.subject)


def _lengths(features: Sequence[Features]) -> NDArray[np.float64]:
    return np.array([item.dense[_LENGTH] for item in features], dtype=np.float64)


def _stats(
    rows: Sequence[LabelledRequest], model: DifficultyModel, features: Sequence[Features]
) -> tuple[float, float, float, float]:
    return blend_stats(
        [_as_traffic(row) for row in rows], raw_scores(model, features), _lengths(features)
    )


def _blended(
    raw: NDArray[np.float64], lengths: NDArray[np.float64], stats: tuple[float, ...], w: float
) -> NDArray[np.float64]:
    result: NDArray[np.float64] = (1.0 - w) * (raw - stats[0]) / stats[1] + w * (
        lengths - stats[2]
    ) / stats[3]
    return result


def adapt(
    base: DifficultyModel,
    rows: Sequence[LabelledRequest],
    features: Sequence[Features],
    config: TrafficConfig | None = None,
) -> TrafficFit | None:
    """Fit on the traffic and choose the length blend by cross-validation on it.

    Each blend weight's margin over length is measured on pooled out-of-fold scores, and the
    weight whose margin has the highest lower bound (one-sided `confidence`, paired bootstrap
    over the rows) wins; w = 1 is length itself, bound 0, so a weight below 1 is taken only
    when the traffic shows it beats length with that confidence (ties: the larger weight).
    None when the traffic cannot teach anything yet (fewer than `min_rows`, or one gain
    throughout).
    """
    config = config or TrafficConfig()
    if len(rows) != len(features):
        raise ValueError(f"got {len(features)} feature rows for {len(rows)} traffic rows")
    weak = np.array([row.weak for row in rows], dtype=np.float64)
    strong = np.array([row.strong for row in rows], dtype=np.float64)
    lengths = _lengths(features)
    gain = strong - weak
    if len(rows) < config.min_rows or gain.sum() == 0 or len(set(gain.tolist())) < 2:
        return None
    folds = min(config.folds, len(rows))
    order = np.random.default_rng(config.seed).permutation(len(rows))
    pooled = np.zeros((len(config.grid), len(rows)))
    for fold in range(folds):
        held = order[fold::folds]
        train = np.setdiff1d(order, held)
        train_rows = [rows[i] for i in train]
        train_features = [features[i] for i in train]
        try:
            model = fit_residual(base, train_rows, train_features, config)
        except ValueError:
            continue
        stats = _stats(train_rows, model, train_features)
        raw = raw_scores(model, [features[i] for i in held])
        for g, w in enumerate(config.grid):
            pooled[g, held] = _blended(raw, lengths[held], stats, w)
    scores = {w: apgr(pooled[g], weak, strong) for g, w in enumerate(config.grid)}
    bounds = margin_bounds(
        pooled, lengths, gain, config.confidence, config.resamples, seed=config.seed
    )
    bound = {w: 0.0 if w == 1.0 else float(b) for w, b in zip(config.grid, bounds, strict=True)}
    weight = max(config.grid, key=lambda w: (round(bound[w], 9), w))
    linear = fit_residual(base, rows, features, config)
    return TrafficFit(
        linear=linear,
        length_weight=weight,
        stats=_stats(rows, linear, features),
        rows=len(rows),
        cv_apgr=scores,
        cv_bound=bound,
        length_apgr=apgr(lengths, weak, strong),
    )


def resampled_apgr(
    scores: NDArray[np.float64], gains: NDArray[np.float64], counts: NDArray[np.int64]
) -> NDArray[np.float64]:
    """APGR of one router under many resamples at once (`counts`: resamples x rows).

    A resample weighs each row by how often it was drawn; tied scores are one straight step,
    as in `metrics.apgr`. NaN where a resample's gains sum to 0.
    """
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    ends = np.flatnonzero(np.r_[np.diff(ranked) != 0, True])
    drawn = counts[:, order].astype(np.float64)
    shares = np.cumsum(drawn, axis=1)[:, ends]
    recovered = np.cumsum(drawn * gains[order], axis=1)[:, ends]
    zero = np.zeros((len(counts), 1))
    x = np.hstack([zero, shares]) / shares[:, -1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.hstack([zero, recovered]) / recovered[:, -1:]
        area = np.sum((x[:, 1:] - x[:, :-1]) * (y[:, 1:] + y[:, :-1]) / 2, axis=1)
    return np.where(recovered[:, -1] == 0.0, np.nan, area)


def margin_bounds(
    candidates: NDArray[np.float64],
    baseline: NDArray[np.float64],
    gains: NDArray[np.float64],
    confidence: float,
    resamples: int,
    seed: int = 0,
) -> NDArray[np.float64]:
    """Per row of `candidates` (routers x rows): the lower `confidence` bound of its APGR
    minus the baseline's, paired bootstrap over the rows (the same draws for every router)."""
    rng = np.random.default_rng(seed)
    n = len(gains)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)
    base = resampled_apgr(baseline, gains, counts)
    keep = ~np.isnan(base)
    if not keep.any():
        return np.zeros(len(candidates))
    diffs = np.array([resampled_apgr(c, gains, counts)[keep] - base[keep] for c in candidates])
    result: NDArray[np.float64] = np.quantile(diffs, 1.0 - confidence, axis=1)
    return result


def blended_model(fit: TrafficFit) -> DifficultyModel:
    """The adapted model with its length blend folded in (not calibrated)."""
    return blend_with_length(fit.linear, fit.length_weight, *fit.stats)

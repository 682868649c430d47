"""Cross-validated routing quality: subjects held out, per source, against two baselines.

A source with several subjects (MMLU) is split by subject into `folds` groups, `repeats`
times with different random assignments; each held-out group is scored by a model trained on
everything else (all other sources included), and APGR/CPT are computed within the held-out
group — the situation of a router meeting a handful of unseen subjects — then averaged.
A source with one subject (Arena) is split into 10 random folds and its out-of-fold scores
are pooled, since a prompt set from one distribution is what it stands for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from classifiers.features import Features, extract
from classifiers.metrics import RoutingReport, apgr, report
from classifiers.training import (
    LabelledRequest,
    TrainConfig,
    blend_stats,
    finish,
    fit,
    fit_linear,
    raw_scores,
)

__all__ = [
    "LENGTH_WEIGHTS",
    "HeldOutSource",
    "Mixture",
    "SourceResult",
    "choose_length_weight",
    "cross_validate",
    "leave_one_source_out",
    "length_scores",
    "mixture_apgr",
]


@dataclass(frozen=True, slots=True)
class SourceResult:
    """Cross-validated figures of one source for the model and the two baselines."""

    source: str
    rows: int
    subjects: int
    scheme: str
    model: RoutingReport
    random: RoutingReport
    length: RoutingReport
    fold_apgr_sd: float | None = None  # spread of the model APGR between held-out groups


def length_scores(rows: Sequence[LabelledRequest]) -> list[float]:
    """The prompt-length baseline router: longer prompts go to the strong model first."""
    return [float(extract(row.request).dense[0]) for row in rows]


def _mean(name: str, reports: Sequence[RoutingReport]) -> RoutingReport:
    return RoutingReport(
        name=name,
        apgr=float(np.mean([r.apgr for r in reports])),
        cpt50=float(np.mean([r.cpt50 for r in reports])),
        cpt80=float(np.mean([r.cpt80 for r in reports])),
    )


def _evaluate(name: str, scores: Sequence[float], rows: Sequence[LabelledRequest]) -> RoutingReport:
    return report(name, scores, [r.weak for r in rows], [r.strong for r in rows])


def _three(
    scores: Sequence[float], rows: Sequence[LabelledRequest]
) -> tuple[RoutingReport, RoutingReport, RoutingReport]:
    return (
        _evaluate("model", scores, rows),
        _evaluate("random", [0.0] * len(rows), rows),
        _evaluate("length", length_scores(rows), rows),
    )


def _has_gain(rows: Sequence[LabelledRequest]) -> bool:
    return sum(r.strong - r.weak for r in rows) != 0


def cross_validate(
    rows: Sequence[LabelledRequest],
    subjects: Sequence[str],
    config: TrainConfig | None = None,
    folds: int = 5,
    repeats: int = 3,
    seed: int = 0,
) -> list[SourceResult]:
    """Held-out figures for every source in `rows` (see the module docstring)."""
    all_index = np.arange(len(rows))
    # Features depend on one row only, so they are extracted once, not once per fold.
    features = [extract(row.request) for row in rows]
    sources = np.array([row.source for row in rows])
    subject_of = np.array(subjects)
    results: list[SourceResult] = []
    for source in sorted(set(sources.tolist())):
        members = all_index[sources == source]
        names = sorted(set(subject_of[members].tolist()))
        spread: float | None = None
        if len(names) >= folds:
            per_fold: list[tuple[RoutingReport, RoutingReport, RoutingReport]] = []
            for repeat in range(repeats):
                order = np.random.default_rng(seed + repeat).permutation(len(names))
                fold_of = {names[j]: i % folds for i, j in enumerate(order)}
                assigned = np.array([fold_of[s] for s in subject_of[members]])
                for fold in range(folds):
                    held = members[assigned == fold]
                    test = [rows[i] for i in held]
                    if not _has_gain(test):
                        continue
                    train = np.setdiff1d(all_index, held)
                    model = fit(
                        [rows[i] for i in train], config, features=[features[i] for i in train]
                    )
                    scores = raw_scores(model, [features[i] for i in held]).tolist()
                    per_fold.append(_three(scores, test))
            figures = tuple(
                _mean(name, [f[i] for f in per_fold])
                for i, name in enumerate(("model", "random", "length"))
            )
            scheme = f"{folds}-fold by subject x{repeats}, mean of folds"
            spread = float(np.std([f[0].apgr for f in per_fold]))
        else:
            out_of_fold = np.zeros(len(members))
            order = np.random.default_rng(seed).permutation(len(members))
            for fold in range(10):
                held_positions = order[fold::10]
                held = members[held_positions]
                train = np.setdiff1d(all_index, held)
                model = fit([rows[i] for i in train], config, features=[features[i] for i in train])
                out_of_fold[held_positions] = raw_scores(model, [features[i] for i in held])
            figures = _three(out_of_fold.tolist(), [rows[i] for i in members])
            scheme = "10-fold random, pooled out-of-fold"
        results.append(
            SourceResult(
                source=source,
                rows=len(members),
                subjects=len(names),
                scheme=scheme,
                model=figures[0],
                random=figures[1],
                length=figures[2],
                fold_apgr_sd=spread,
            )
        )
    return results


# Leave one source out: the router meets a whole kind of prompt it was never trained on.

LENGTH_WEIGHTS: tuple[float, ...] = tuple(i / 10 for i in range(11))


@dataclass(frozen=True, slots=True)
class HeldOutSource:
    """APGR on one source held out whole, by a model trained on the other sources only."""

    source: str
    rows: int
    length_weight: float  # chosen by leaving out each of the *other* sources in turn
    model: float  # the shipped pipeline: linear model blended with length at that weight
    unblended: float  # the linear model alone (weight 0)
    length: float
    random: float
    inner_margins: dict[str, float]  # chosen weight's margin over length per training source


@dataclass(frozen=True, slots=True)
class Mixture:
    """APGR on all held-out sources pooled in equal parts (each ranked by its own model)."""

    sources: int
    model: float
    unblended: float
    length: float
    random: float
    oracle: float  # a router that knows each source's mean gain and nothing else


def _normalised_gain(rows: Sequence[LabelledRequest]) -> NDArray[np.float64]:
    """strong - weak over the source's outcome range (1 for 0/1 data, 9 for a 1-10 judge)."""
    outcomes = np.array([[r.weak, r.strong] for r in rows], dtype=np.float64)
    span = float(outcomes.max() - outcomes.min()) or 1.0
    result: NDArray[np.float64] = (outcomes[:, 1] - outcomes[:, 0]) / span
    return result


def mixture_apgr(
    scores: Sequence[float] | NDArray[np.float64],
    gains: Sequence[float] | NDArray[np.float64],
    weights: Sequence[float] | NDArray[np.float64],
) -> float:
    """APGR where each prompt counts `weights` of the traffic; tied scores are one straight step.

    x is the weighted share of prompts sent strong, y the weighted gain recovered.
    """
    score = np.asarray(scores, dtype=np.float64)
    weight = np.asarray(weights, dtype=np.float64)
    gain = np.asarray(gains, dtype=np.float64) * weight
    values, inverse = np.unique(-score, return_inverse=True)  # highest score first
    share = np.bincount(inverse, weights=weight, minlength=len(values))
    recovered = np.bincount(inverse, weights=gain, minlength=len(values))
    x = np.concatenate(([0.0], np.cumsum(share))) / weight.sum()
    y = np.concatenate(([0.0], np.cumsum(recovered))) / gain.sum()
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def _source_margins(
    rows: Sequence[LabelledRequest],
    features: Sequence[Features],
    config: TrainConfig,
    grid: Sequence[float],
) -> dict[str, NDArray[np.float64]]:
    """For each source: APGR(blend at each weight) - APGR(length), trained on the others."""
    sources = np.array([row.source for row in rows])
    lengths = np.array([item.dense[0] for item in features], dtype=np.float64)
    margins: dict[str, NDArray[np.float64]] = {}
    for source in sorted(set(sources.tolist())):
        held = np.flatnonzero(sources == source).tolist()
        train = np.flatnonzero(sources != source).tolist()
        test = [rows[i] for i in held]
        if not train or not _has_gain(test):
            continue
        train_rows = [rows[i] for i in train]
        train_features = [features[i] for i in train]
        try:
            linear = fit_linear(train_rows, config, train_features)
        except ValueError:
            continue  # e.g. every remaining row has the same label
        stats = blend_stats(train_rows, raw_scores(linear, train_features), lengths[train])
        raw = raw_scores(linear, [features[i] for i in held])
        weak = [r.weak for r in test]
        strong = [r.strong for r in test]
        base = apgr(lengths[held], weak, strong)
        margins[source] = np.array(
            [apgr(_blend(raw, lengths[held], stats, w), weak, strong) - base for w in grid]
        )
    return margins


def _blend(
    raw: NDArray[np.float64],
    lengths: NDArray[np.float64],
    stats: tuple[float, float, float, float],
    weight: float,
) -> NDArray[np.float64]:
    """The blended raw score, as `model.blend_with_length` folds it into the weights."""
    result: NDArray[np.float64] = (1.0 - weight) * (raw - stats[0]) / stats[1] + weight * (
        lengths - stats[2]
    ) / stats[3]
    return result


def choose_length_weight(
    rows: Sequence[LabelledRequest],
    features: Sequence[Features],
    config: TrainConfig | None = None,
    grid: Sequence[float] = LENGTH_WEIGHTS,
) -> tuple[float | None, dict[str, float]]:
    """The blend weight with the best worst-case margin over length, each source left out.

    Maximin, because the promise is "never worse than length" on a kind of prompt never seen,
    not the best average; ties go to the best mean margin. Weight 1 is the length router
    itself (margin 0 everywhere), so the choice is never worse than length on these sources.
    Returns (None, {}) with fewer than two sources: there is nothing to leave out.
    """
    margins = _source_margins(rows, features, config or TrainConfig(), grid)
    if len(margins) < 2:
        return None, {}
    table = np.vstack(list(margins.values()))
    worst = table.min(axis=0)
    mean = table.mean(axis=0)
    best = max(range(len(grid)), key=lambda i: (round(float(worst[i]), 9), float(mean[i])))
    return grid[best], {source: float(m[best]) for source, m in margins.items()}


def leave_one_source_out(
    rows: Sequence[LabelledRequest],
    config: TrainConfig | None = None,
    grid: Sequence[float] = LENGTH_WEIGHTS,
) -> tuple[list[HeldOutSource], Mixture]:
    """Nested leave-one-source-out: the blend weight is chosen without the held-out source."""
    config = config or TrainConfig()
    features = [extract(row.request) for row in rows]
    sources = np.array([row.source for row in rows])
    lengths = np.array([item.dense[0] for item in features], dtype=np.float64)
    results: list[HeldOutSource] = []
    pooled: dict[str, list[NDArray[np.float64]]] = {
        k: [] for k in ("model", "unblended", "length", "gain", "weight", "oracle")
    }
    for source in sorted(set(sources.tolist())):
        held = np.flatnonzero(sources == source).tolist()
        train = np.flatnonzero(sources != source).tolist()
        test = [rows[i] for i in held]
        if not _has_gain(test):
            continue
        train_rows = [rows[i] for i in train]
        train_features = [features[i] for i in train]
        held_features = [features[i] for i in held]
        weight, margins = choose_length_weight(train_rows, train_features, config, grid)
        weight = 0.0 if weight is None else weight
        linear = fit_linear(train_rows, config, train_features)
        scores = {}
        for name, w in (("model", weight), ("unblended", 0.0)):
            blended = finish(train_rows, train_features, linear, replace(config, length_weight=w))
            scores[name] = np.array([blended.score_features(f) for f in held_features])
        weak = [r.weak for r in test]
        strong = [r.strong for r in test]
        results.append(
            HeldOutSource(
                source=source,
                rows=len(test),
                length_weight=weight,
                model=apgr(scores["model"], weak, strong),
                unblended=apgr(scores["unblended"], weak, strong),
                length=apgr(lengths[held], weak, strong),
                random=apgr(np.zeros(len(test)), weak, strong),
                inner_margins=margins,
            )
        )
        gain = _normalised_gain(test)
        pooled["model"].append(scores["model"])
        pooled["unblended"].append(scores["unblended"])
        pooled["length"].append(lengths[held])
        pooled["gain"].append(gain)
        pooled["weight"].append(np.full(len(test), 1.0 / len(test)))
        pooled["oracle"].append(np.full(len(test), float(gain.mean())))
    flat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in pooled.items()}

    def mix(name: str) -> float:
        return mixture_apgr(flat[name], flat["gain"], flat["weight"])

    mixture = Mixture(
        sources=len(results),
        model=mix("model"),
        unblended=mix("unblended"),
        length=mix("length"),
        random=mixture_apgr(np.zeros(len(flat["gain"])), flat["gain"], flat["weight"]),
        oracle=mix("oracle"),
    )
    return results, mixture

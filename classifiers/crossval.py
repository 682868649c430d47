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
from dataclasses import dataclass

import numpy as np

from classifiers.features import extract
from classifiers.metrics import RoutingReport, report
from classifiers.training import LabelledRequest, TrainConfig, fit, raw_scores

__all__ = ["SourceResult", "cross_validate", "length_scores"]


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

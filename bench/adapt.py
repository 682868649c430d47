"""Routing that learns from traffic: `python bench/adapt.py [--seeds 5] [--weight W]`.

The shared routing data is replayed as traffic, each row's known outcomes standing in for the
judge. A stream is shuffled (seeded); the first K rows are the labels the router has seen, and
APGR is measured on the stream's tail, the rows after the largest K of the run, so every K is
scored on the same unseen rows and no row is both trained on and scored.

- One source as the traffic: the base model is trained on the *other* sources (the operator's
  traffic is a kind the shipped data does not hold); the stream is that source (at most 2,000
  rows); K stops where fewer than 150 rows would remain to score.
- The equal mixture: 600 rows of each source (Arena has 293: all of them) shuffled together;
  the base model is trained on every row not in the stream; scored rows weigh each source the
  same, gains over each source's outcome range (as in `triage classifier cv --by source`).

K = 0 is the base pipeline (`train`: length blend chosen by leaving base sources out). K > 0 is
`train --traffic`: the traffic pass of `classifiers/adapt.py` on the K labels. Beside it:
prompt length, random (0.5) and, on the mixture, a router that knows each source's mean gain
on the scored rows. Base data is capped at 3,000 rows per source (seeded) to keep a run short.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifiers.adapt import TrafficConfig, adapt, blended_model, margin_bounds  # noqa: E402
from classifiers.crossval import choose_length_weight, mixture_apgr  # noqa: E402
from classifiers.data import read_rows  # noqa: E402
from classifiers.features import Features, extract  # noqa: E402
from classifiers.metrics import apgr  # noqa: E402
from classifiers.model import blend_with_length  # noqa: E402
from classifiers.training import (  # noqa: E402
    LabelledRequest,
    TrainConfig,
    blend_stats,
    fit_linear,
    raw_scores,
)

DATA = ROOT.parent / "shared" / "data" / "routing"
KS = (0, 100, 300, 1000)
STREAM_CAP = 2000
MIXTURE_PER_SOURCE = 600
BASE_CAP = 3000
MIN_SCORED = 150


@dataclass(frozen=True, slots=True)
class Split:
    """One replay: base rows, the traffic stream in order, and where scoring starts."""

    name: str
    base: list[int]
    stream: list[int]
    ks: tuple[int, ...]

    @property
    def scored(self) -> list[int]:
        """The stream's tail after the largest K: never among the labels of any K."""
        return self.stream[max(self.ks) :]

    def labels(self, k: int) -> list[int]:
        """The first K rows of the stream: the labels seen after K requests."""
        if k > max(self.ks):
            raise ValueError(f"K={k} is past this split's largest K {max(self.ks)}")
        return self.stream[:k]


def normalised(rows: Sequence[LabelledRequest]) -> list[LabelledRequest]:
    """Outcomes rescaled to 0-1 over each source's range (a judge's 1-10 becomes 0-1)."""
    result = []
    for source in sorted({r.source for r in rows}):
        values = [v for r in rows if r.source == source for v in (r.weak, r.strong)]
        low, span = min(values), (max(values) - min(values)) or 1.0
        for r in rows:
            if r.source == source:
                weak, strong = (r.weak - low) / span, (r.strong - low) / span
                result.append(LabelledRequest(r.request, weak, strong, r.source, r.subject))
    return result


def _cap(indices: list[int], cap: int, rng: np.random.Generator) -> list[int]:
    if len(indices) <= cap:
        return indices
    return sorted(rng.choice(indices, size=cap, replace=False).tolist())


def splits(rows: Sequence[LabelledRequest], seed: int) -> list[Split]:
    """The per-source replays and the mixture replay for one seed."""
    rng = np.random.default_rng(seed)
    sources = sorted({r.source for r in rows})
    by_source = {s: [i for i, r in enumerate(rows) if r.source == s] for s in sources}
    result = []
    for source in sources:
        stream = rng.permutation(by_source[source])[:STREAM_CAP].tolist()
        ks = tuple(k for k in KS if len(stream) - k >= MIN_SCORED)
        base = [i for s in sources if s != source for i in _cap(by_source[s], BASE_CAP, rng)]
        result.append(Split(source, base, stream, ks))
    picked = [
        i for s in sources for i in rng.permutation(by_source[s])[:MIXTURE_PER_SOURCE].tolist()
    ]
    stream = rng.permutation(picked).tolist()
    taken = set(picked)
    base = [
        i for s in sources for i in _cap([i for i in by_source[s] if i not in taken], BASE_CAP, rng)
    ]
    result.append(Split(f"mixture of {len(sources)}", base, stream, KS))
    return result


def _apgr(scores: NDArray[np.float64], rows: Sequence[LabelledRequest], mixture: bool) -> float:
    gains = np.array([r.strong - r.weak for r in rows])
    if not mixture:
        return apgr(scores, [r.weak for r in rows], [r.strong for r in rows])
    sources = [r.source for r in rows]
    counts = {s: sources.count(s) for s in set(sources)}
    return mixture_apgr(scores, gains, [1.0 / counts[s] for s in sources])


@dataclass(frozen=True, slots=True)
class ClusterPrior:
    """Experiment (off by default): a per-cluster mean-gain term added to the score.

    k-means over the standardised dense features of the base rows and the labels (no
    outcome is used to cluster); each cluster's mean gain on the K labels, shrunk towards
    the labels' mean by `shrink` pseudo-rows; added to the model's standardised score with
    weight `weight` (both standardised on the labels).
    """

    clusters: int = 0
    weight: float = 1.0
    shrink: float = 20.0
    guard: bool = True


def _cluster_scores(
    prior: ClusterPrior,
    dense: NDArray[np.float64],
    fit_rows: list[int],
    labels: list[int],
    gains: NDArray[np.float64],
    seed: int,
) -> NDArray[np.float64]:
    """Every row's cluster mean gain (shrunk)."""
    from sklearn.cluster import KMeans

    means = KMeans(prior.clusters, n_init=3, random_state=seed).fit(dense[fit_rows])
    assigned = means.predict(dense)

    def cluster_means(known: list[int]) -> NDArray[np.float64]:
        overall = float(gains[known].mean())
        per = np.full(prior.clusters, overall)
        for c in range(prior.clusters):
            members = [i for i in known if assigned[i] == c]
            per[c] = (gains[members].sum() + prior.shrink * overall) / (len(members) + prior.shrink)
        return per

    # The same guard as the length blend: out-of-fold on the labels, the cluster term alone
    # must beat prompt length at 95 % one-sided confidence, else it is left out (zeros).
    order = np.random.default_rng(seed).permutation(len(labels))
    oof = np.zeros(len(labels))
    for fold in range(5):
        held = order[fold::5]
        known = [labels[i] for i in np.setdiff1d(order, held)]
        oof[held] = cluster_means(known)[assigned[[labels[i] for i in held]]]
    lengths = dense[labels, 0]
    bound = margin_bounds(oof[None, :], lengths, gains[labels], 0.95, 500, seed=seed)[0]
    if prior.guard and not bound > 0:
        return np.zeros(len(dense))
    result: NDArray[np.float64] = cluster_means(labels)[assigned]
    return result


def _z(values: NDArray[np.float64], reference: NDArray[np.float64]) -> NDArray[np.float64]:
    result: NDArray[np.float64] = (values - reference.mean()) / (reference.std() or 1.0)
    return result


def run_split(
    split: Split,
    rows: Sequence[LabelledRequest],
    features: Sequence[Features],
    config: TrafficConfig,
    prior: ClusterPrior | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """APGR of every router on the split's scored rows: model at each K and the baselines."""
    mixture = split.name.startswith("mixture")
    base_rows = [rows[i] for i in split.base]
    base_features = [features[i] for i in split.base]
    train = TrainConfig()
    weight, _ = choose_length_weight(base_rows, base_features, train)
    linear = fit_linear(base_rows, train, base_features)
    stats = blend_stats(
        base_rows,
        raw_scores(linear, base_features),
        np.array([f.dense[0] for f in base_features]),
    )
    base = blend_with_length(linear, weight or 0.0, *stats)
    scored = split.scored
    scored_rows = [rows[i] for i in scored]
    scored_features = [features[i] for i in scored]
    result: dict[str, float] = {}
    if prior is not None and prior.clusters:
        dense = (np.array([f.dense for f in features]) - np.asarray(linear.mean)) / np.asarray(
            linear.scale
        )
        gains = np.array([r.strong - r.weak for r in rows])
    for k in split.ks:
        labels = split.labels(k)
        assert not set(labels) & set(scored), "a scored row was trained on"
        fit = None
        if k:
            fit = adapt(linear, [rows[i] for i in labels], [features[i] for i in labels], config)
        model = base if fit is None else blended_model(fit)
        scores = raw_scores(model, scored_features)
        if fit is not None and prior is not None and prior.clusters:
            cluster = _cluster_scores(prior, dense, split.base + labels, labels, gains, seed)
            on_labels = raw_scores(model, [features[i] for i in labels])
            scores = _z(scores, on_labels) + prior.weight * _z(cluster[scored], cluster[labels])
        result[f"K={k}"] = _apgr(scores, scored_rows, mixture)
        if fit is not None:
            result[f"w@K={k}"] = fit.length_weight
    lengths = np.array([f.dense[0] for f in scored_features])
    result["length"] = _apgr(lengths, scored_rows, mixture)
    result["random"] = _apgr(np.zeros(len(scored)), scored_rows, mixture)
    if mixture:
        gains: dict[str, list[float]] = {}
        for r in scored_rows:
            gains.setdefault(r.source, []).append(r.strong - r.weak)
        oracle = np.array([float(np.mean(gains[r.source])) for r in scored_rows])
        result["oracle"] = _apgr(oracle, scored_rows, mixture)
    result["scored"] = len(scored)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=sorted(str(p) for p in DATA.glob("*.jsonl")))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--weight", type=float, default=TrafficConfig().weight)
    parser.add_argument("--dense-alpha", type=float, default=TrafficConfig().dense_alpha)
    parser.add_argument("--alpha", type=float, default=TrafficConfig().alpha)
    parser.add_argument("--confidence", type=float, default=TrafficConfig().confidence)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--only", default="", help="run only splits whose name starts so")
    parser.add_argument("--clusters", type=int, default=0, help="experiment: ClusterPrior")
    parser.add_argument("--cluster-weight", type=float, default=1.0)
    parser.add_argument("--cluster-shrink", type=float, default=20.0)
    parser.add_argument("--no-cluster-guard", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    raw = [
        LabelledRequest(r.request, r.weak, r.strong, r.source, r.subject)
        for r in read_rows(args.data)
        if r.request is not None and r.weak is not None and r.strong is not None
    ]
    rows = normalised(raw)
    features = [extract(r.request) for r in rows]
    config = replace(
        TrafficConfig(),
        weight=args.weight,
        alpha=args.alpha,
        dense_alpha=args.dense_alpha,
        confidence=args.confidence,
    )
    table: dict[str, list[dict[str, float]]] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for split in splits(rows, seed):
            if not split.name.startswith(args.only):
                continue
            prior = ClusterPrior(
                args.clusters, args.cluster_weight, args.cluster_shrink, not args.no_cluster_guard
            )
            result = run_split(split, rows, features, config, prior, seed)
            table.setdefault(split.name, []).append(result)
    columns = [*(f"K={k}" for k in KS), "length", "random", "oracle"]
    print(
        f"traffic weight {config.weight:g}, alpha {config.alpha:g}, dense_alpha "
        f"{config.dense_alpha:g}, confidence {config.confidence:g}; mean of {args.seeds} seeds "
        f"from {args.first_seed}"
    )
    print(
        "| traffic | scored rows | "
        + " | ".join(columns)
        + " | worst seed's model minus length at each K | w chosen (K=100/300/1000) |"
    )
    print("|---" * (len(columns) + 4) + "|")
    for name, runs in table.items():
        cells = []
        for column in columns:
            values = [run[column] for run in runs if column in run]
            cells.append(f"{np.mean(values):.3f}" if values else "")
        weights = "/".join(
            "-"
            if not any(f"w@K={k}" in r for r in runs)
            else ",".join(f"{r[f'w@K={k}']:g}" for r in runs if f"w@K={k}" in r)
            for k in KS[1:]
        )
        scored = int(np.mean([run["scored"] for run in runs]))
        worst = [
            min(run[f"K={k}"] - run["length"] for run in runs if f"K={k}" in run)
            for k in KS
            if any(f"K={k}" in run for run in runs)
        ]
        margins = " / ".join(f"{m:+.3f}" for m in worst)
        print(f"| {name} | {scored} | " + " | ".join(cells) + f" | {margins} | {weights} |")
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

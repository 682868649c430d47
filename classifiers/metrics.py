"""RouteLLM routing metrics (PGR curve, APGR, CPT) on the exact curve, and baseline routers.

Prompts are sorted by score, highest first, and the top i of N go to the strong model, for
every i from 0 to N, so the curve has N + 1 exact points at k = i / N. Ties in score are
resolved in expectation: a block of tied prompts is sent in random order, so the curve is a
straight line across it. APGR is the trapezoid area under the curve over k in [0, 1]; CPT(x)
is the smallest k = i / N whose PGR is at least x. A router that scores every prompt the
same is therefore exactly the random router (APGR 0.5, CPT(x) = x rounded up to a step).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["RoutingReport", "apgr", "cpt", "pgr_curve", "report"]


def pgr_curve(scores: ArrayLike, weak: ArrayLike, strong: ArrayLike) -> NDArray[np.float64]:
    """PGR at k = i / N for i = 0..N (N + 1 points), sending the top-scored prompts to strong."""
    score = np.asarray(scores, dtype=np.float64)
    gain = np.asarray(strong, dtype=np.float64) - np.asarray(weak, dtype=np.float64)
    if score.ndim != 1 or score.shape != gain.shape:
        raise ValueError(f"scores, weak and strong must be 1-D of one length, got {score.shape}")
    if len(score) == 0:
        raise ValueError("cannot compute a routing curve on zero prompts")
    total = float(gain.sum())
    if total == 0.0:
        raise ValueError("strong and weak have the same mean quality: PGR is undefined")
    order = np.argsort(-score, kind="stable")
    ranked = score[order]
    cumulative = np.concatenate(([0.0], np.cumsum(gain[order])))
    # Indices where a new score value starts; between two of them every order is equally likely.
    edges = np.concatenate(([0], np.flatnonzero(np.diff(ranked) != 0) + 1, [len(ranked)]))
    for start, end in itertools.pairwise(edges):
        if end - start > 1:
            cumulative[start : end + 1] = np.linspace(
                cumulative[start], cumulative[end], end - start + 1
            )
    result: NDArray[np.float64] = cumulative / total
    return result


def apgr(scores: ArrayLike, weak: ArrayLike, strong: ArrayLike) -> float:
    """Area under the PGR curve over the share of strong calls in [0, 1] (trapezoid rule)."""
    curve = pgr_curve(scores, weak, strong)
    return float(((curve[:-1] + curve[1:]) / 2.0).mean())


def cpt(scores: ArrayLike, weak: ArrayLike, strong: ArrayLike, target: float) -> float:
    """Smallest share of strong calls (a step i / N) whose PGR reaches `target`."""
    curve = pgr_curve(scores, weak, strong)
    reached = np.flatnonzero(curve >= target - 1e-12)
    # PGR(1) is 1 by construction, so any target up to 1 is reached somewhere.
    return float(reached[0]) / (len(curve) - 1) if len(reached) else float("nan")


@dataclass(frozen=True, slots=True)
class RoutingReport:
    """APGR and CPT(50%), CPT(80%) of one router on one data set."""

    name: str
    apgr: float
    cpt50: float
    cpt80: float


def report(
    name: str, scores: Sequence[float] | ArrayLike, weak: ArrayLike, strong: ArrayLike
) -> RoutingReport:
    """The three RouteLLM figures for one router's scores."""
    return RoutingReport(
        name=name,
        apgr=apgr(scores, weak, strong),
        cpt50=cpt(scores, weak, strong, 0.5),
        cpt80=cpt(scores, weak, strong, 0.8),
    )

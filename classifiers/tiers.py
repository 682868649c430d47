"""Scores to tiers: explicit thresholds, or a target share of strong calls via quantiles."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["threshold_for_fraction", "tier_for_score"]


def threshold_for_fraction(reference: Sequence[float], fraction: float) -> float:
    """Threshold t such that `fraction` of the reference scores are >= t (as RouteLLM calibrates).

    A fraction of 0 gives a threshold above every reference score, 1 gives the lowest score.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"strong_fraction must be between 0 and 1, got {fraction!r}")
    ordered = np.sort(np.asarray(reference, dtype=np.float64))[::-1]
    if len(ordered) == 0:
        raise ValueError("no reference scores to calibrate a strong_fraction against")
    count = round(fraction * len(ordered))
    if count == 0:
        return float(np.nextafter(ordered[0], np.inf))
    return float(ordered[count - 1])


def tier_for_score(score: float, thresholds: Mapping[str, float], default: str) -> str:
    """The tier with the highest threshold that `score` reaches, else `default`.

    `thresholds` maps tier → minimum score, e.g. {"large": 0.62, "medium": 0.3}.
    """
    best: tuple[float, str] | None = None
    for tier, threshold in thresholds.items():
        if score >= threshold and (best is None or threshold > best[0]):
            best = (threshold, tier)
    return default if best is None else best[1]

"""APGR / CPT against hand-computed curves, and the tier mapping helpers."""

from __future__ import annotations

import pytest

from classifiers.metrics import apgr, cpt, pgr_curve, report
from classifiers.tiers import threshold_for_fraction, tier_for_score


def test_curve_by_hand() -> None:
    # gains (strong - weak) in score order: +1, 0, +1, -1 -> cumsum 1, 1, 2, 1 of total 1
    scores = [0.9, 0.7, 0.5, 0.1]
    weak = [0, 1, 0, 1]
    strong = [1, 1, 1, 0]
    assert pgr_curve(scores, weak, strong).tolist() == [0.0, 1.0, 1.0, 2.0, 1.0]
    # trapezoids: (0+1)/2, (1+1)/2, (1+2)/2, (2+1)/2 -> 0.5, 1, 1.5, 1.5 -> mean 1.125
    assert apgr(scores, weak, strong) == pytest.approx(1.125)
    assert cpt(scores, weak, strong, 0.5) == pytest.approx(0.25)
    assert cpt(scores, weak, strong, 1.5) == pytest.approx(0.75)


def test_order_matters_not_scale() -> None:
    weak = [0, 0, 1, 0]
    strong = [1, 0, 1, 1]
    assert apgr([4, 3, 2, 1], weak, strong) == apgr([0.4, 0.3, 0.2, 0.1], weak, strong)
    # worst order: the two gains last -> curve 0, 0, 0, 0.5, 1 -> APGR 0.25
    assert apgr([1, 4, 3, 2], weak, strong) == pytest.approx((0 + 0 + 0.25 + 0.75) / 4)


def test_ties_are_random_in_expectation() -> None:
    weak = [0, 1, 0, 0, 1]
    strong = [1, 1, 1, 0, 0]
    assert apgr([0.3] * 5, weak, strong) == pytest.approx(0.5)
    result = report("random", [0.0] * 5, weak, strong)
    assert result.cpt50 == pytest.approx(0.6)  # the line k reaches 0.5 first at step 3/5
    assert result.cpt80 == pytest.approx(0.8)


def test_judge_scores() -> None:
    # gains 3, 1 -> total 4; best order curve 0, .75, 1 -> APGR (0.375 + 0.875) / 2
    assert apgr([2, 1], [5, 8], [8, 9]) == pytest.approx(0.625)


def test_undefined_pgr_is_refused() -> None:
    with pytest.raises(ValueError, match="same mean quality"):
        apgr([1, 2], [1, 0], [0, 1])
    with pytest.raises(ValueError, match="one length"):
        apgr([1, 2, 3], [1, 0], [0, 1])


def test_strong_fraction_threshold() -> None:
    reference = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    threshold = threshold_for_fraction(reference, 0.3)
    assert threshold == pytest.approx(0.8)
    assert sum(score >= threshold for score in reference) == 3
    assert sum(score >= threshold_for_fraction(reference, 0.0) for score in reference) == 0
    assert threshold_for_fraction(reference, 1.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        threshold_for_fraction(reference, 1.5)


def test_thresholds_pick_the_highest_reached_tier() -> None:
    thresholds = {"large": 0.62, "medium": 0.3}
    assert tier_for_score(0.9, thresholds, "small") == "large"
    assert tier_for_score(0.62, thresholds, "small") == "large"
    assert tier_for_score(0.5, thresholds, "small") == "medium"
    assert tier_for_score(0.1, thresholds, "small") == "small"

"""The latency estimates the balancer learns from: EWMAs, the load curve, the window."""

from __future__ import annotations

import math

import pytest

from gateway.estimators import Ewma, LatencyWindow, LoadCurve, PeakEwma


def test_peak_ewma_takes_peaks_at_once_and_decays_back() -> None:
    e = PeakEwma(decay_s=10.0)
    e.observe(0.1, 0.0)
    e.observe(1.0, 1.0)
    assert e.value(1.0) == pytest.approx(1.0)
    # Ten seconds idle (one decay constant) faded the peak to 1/e; the faster sample then
    # counts 1 - 1/e.
    e.observe(0.1, 11.0)
    fade = math.exp(-1)
    assert e.value(11.0) == pytest.approx(fade * fade + 0.1 * (1 - fade))


def test_ewma_weighs_each_sample_at_least_a_tenth_and_fades_when_idle() -> None:
    e = Ewma(decay_s=10.0, idle_s=10.0)
    assert e.value(0.0) is None
    e.observe(1.0, 0.0)
    e.observe(2.0, 0.0)
    assert e.value(0.0) == pytest.approx(1.1)
    assert e.spread(0.0) == pytest.approx(0.09)  # |2 - 1.1| x 0.1
    assert e.value(10.0) == pytest.approx(1.1)  # unless asked to, it does not fade
    assert e.value(10.0, fade_after_s=0.0) == pytest.approx(1.1 * math.exp(-1))
    assert e.value(15.0, fade_after_s=5.0) == pytest.approx(1.1 * math.exp(-1))
    assert e.value(4.0, fade_after_s=5.0) == pytest.approx(1.1)
    # The deviation fades with the estimate: an old outlier must not keep it high for good.
    assert e.spread(10.0) == pytest.approx(0.09)
    assert e.spread(15.0, fade_after_s=5.0) == pytest.approx(0.09 * math.exp(-1))
    e.reset()
    assert e.value(10.0) is None and e.spread(10.0) == 0.0


def test_ewma_after_a_long_gap_follows_the_new_level() -> None:
    e = Ewma(decay_s=10.0)
    e.observe(1.0, 0.0)
    e.observe(0.0, 30.0)  # a level that moved while nothing was measured
    fade = math.exp(-3)
    assert e.value(30.0) == pytest.approx(fade)
    # Measured from the estimate the sample moved: a level shift is not taken for noise.
    assert e.spread(30.0) == pytest.approx(fade * (1 - fade))
    assert e.value(30.0) + e.spread(30.0) < 0.1  # type: ignore[operator]


def test_itl_grows_with_the_batch() -> None:
    curve = LoadCurve(decay_s=100.0)
    assert curve.value(1, 0.0) is None
    for batch in (1, 2, 4, 8, 1, 8):
        curve.observe(batch, 0.010 + 0.001 * batch, 0.0)
    assert curve.value(8, 0.0) == pytest.approx(0.018)
    assert curve.value(2, 0.0) == pytest.approx(0.012)
    assert curve.value(8, 300.0, fade_after_s=0.0) == pytest.approx(0.018 * math.exp(-1))
    flat = LoadCurve(decay_s=100.0)
    flat.observe(4, 0.02, 0.0)
    flat.observe(4, 0.04, 0.0)
    # One batch size: no slope to fit, the (weighted) mean it is.
    assert flat.value(8, 0.0) == pytest.approx((0.02 * 0.97 + 0.04) / 1.97)
    flat.reset()
    assert flat.value(8, 0.0) is None


def test_window_percentiles_are_nearest_rank() -> None:
    window = LatencyWindow(100)
    assert window.percentiles(0.5) == (None,)
    for value in range(1, 101):
        window.add(float(value))
    assert window.percentiles(0.5, 0.95, 0.99, 1.0) == (50.0, 95.0, 99.0, 100.0)
    window.add(1000.0)  # the oldest sample leaves
    assert len(window) == 100 and window.percentiles(0.0) == (2.0,)

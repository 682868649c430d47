"""Per-request targets and priorities, deadlines, latency tracking, budgets, the waiting room."""

from __future__ import annotations

import asyncio
import math

import pytest

from gateway.errors import InvalidRequest
from gateway.slo import (
    Deadline,
    Ewma,
    LatencyTracker,
    LatencyWindow,
    LoadCurve,
    PeakEwma,
    RatioBudget,
    SloTarget,
    WaitingRoom,
    request_priority,
    request_target,
)

TIER = SloTarget(ttft_s=0.5, e2e_s=5.0, percentile=99)


# --- priorities and targets ------------------------------------------------------------


def test_priority_defaults_to_the_tenants() -> None:
    assert request_priority({}, "critical") == "critical"


@pytest.mark.parametrize(
    ("tenant", "header", "expected"),
    [
        ("critical", "sheddable", "sheddable"),
        ("critical", "Standard ", "standard"),
        ("standard", "critical", "standard"),  # a header cannot raise it
        ("sheddable", "standard", "sheddable"),
    ],
)
def test_the_header_may_lower_priority_never_raise_it(
    tenant: str, header: str, expected: str
) -> None:
    assert request_priority({"x-triage-priority": header}, tenant) == expected  # type: ignore[arg-type]


def test_unknown_priority() -> None:
    with pytest.raises(InvalidRequest) as caught:
        request_priority({"x-triage-priority": "urgent"}, "standard")
    assert caught.value.message == (
        "x-triage-priority must be one of critical, standard, sheddable; got 'urgent'."
    )
    assert caught.value.param == "x-triage-priority"


def test_headers_only_tighten_the_tiers_target() -> None:
    assert request_target(TIER, {}) is TIER
    tighter = request_target(TIER, {"x-slo-ttft-ms": "200", "x-slo-e2e-ms": "9000"})
    assert tighter == SloTarget(0.2, 5.0, 99)
    assert request_target(None, {"x-slo-e2e-ms": "1500"}) == SloTarget(math.inf, 1.5)
    assert request_target(None, {}) is None


@pytest.mark.parametrize("value", ["0", "-5", "soon", "inf", "nan"])
def test_bad_slo_headers(value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        request_target(TIER, {"x-slo-ttft-ms": value})
    assert caught.value.message == (
        f"x-slo-ttft-ms must be a positive number of milliseconds; got {value!r}."
    )


def test_target_met() -> None:
    assert TIER.met(0.4, 4.0) == (True, True)
    assert TIER.met(0.6, 6.0) == (False, False)
    assert TIER.met(None, 4.0) == (True, True)  # not streamed: only e2e is judged


def test_deadline() -> None:
    deadline = Deadline(100.0, TIER, timeout_factor=2.0)
    assert (deadline.ttft_at, deadline.e2e_at) == (100.5, 105.0)
    assert (deadline.ttft_timeout_at, deadline.e2e_timeout_at) == (101.0, 110.0)
    # A non-streamed answer's first byte comes with its last: only the e2e timeout bounds it.
    assert deadline.first_byte_timeout_at(stream=True) == 101.0
    assert deadline.first_byte_timeout_at(stream=False) == 110.0
    assert deadline.budget(100.1) == pytest.approx((0.4, 4.9))
    assert deadline.budget(100.0, 0.8) == pytest.approx((0.4, 4.0))
    open_ended = Deadline(100.0, None)
    assert open_ended.ttft_at == open_ended.e2e_timeout_at == math.inf
    assert Deadline(0.0, TIER, math.inf).ttft_timeout_at == math.inf


# --- estimators ----------------------------------------------------------------------


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


# --- tracking --------------------------------------------------------------------------


def test_window_percentiles_are_nearest_rank() -> None:
    window = LatencyWindow(100)
    assert window.percentiles(0.5) == (None,)
    for value in range(1, 101):
        window.add(float(value))
    assert window.percentiles(0.5, 0.95, 0.99, 1.0) == (50.0, 95.0, 99.0, 100.0)
    window.add(1000.0)  # the oldest sample leaves
    assert len(window) == 100 and window.percentiles(0.0) == (2.0,)


def test_tracker_attainment_and_percentiles() -> None:
    tracker = LatencyTracker({"cheap": TIER, "large": None})
    tracker.answered("cheap", target=TIER, ttft_s=0.1, e2e_s=1.0)
    tracker.answered("cheap", target=TIER, ttft_s=0.9, e2e_s=1.0, hedged=True)
    tracker.answered("cheap", target=TIER, ttft_s=None, e2e_s=6.0, retries=2, fell_back=True)
    tracker.refused("cheap", "shed")
    tracker.refused("cheap", "expired")
    tracker.refused("cheap", "failed", retries=1)
    cheap = tracker.snapshot()["cheap"]
    assert (cheap.requests, cheap.met, cheap.ttft_met, cheap.e2e_met) == (6, 1, 2, 2)
    assert (cheap.shed, cheap.expired, cheap.failed) == (1, 1, 1)
    assert (cheap.hedged, cheap.retried, cheap.fell_back) == (1, 3, 1)
    assert cheap.attainment == pytest.approx(1 / 6)
    assert cheap.target == 0.99
    assert (cheap.ttft_p50_s, cheap.ttft_p99_s) == (0.1, 0.9)
    assert (cheap.e2e_p50_s, cheap.e2e_p95_s) == (1.0, 6.0)
    large = tracker.snapshot()["large"]
    assert large.requests == 0 and large.attainment is None and large.target is None


def test_tracker_without_a_target_counts_every_answer_as_met() -> None:
    tracker = LatencyTracker({})
    tracker.answered("new", target=None, ttft_s=10.0, e2e_s=100.0)
    assert tracker.snapshot()["new"].attainment == 1.0


def test_retarget_keeps_the_counters_of_tiers_that_stay() -> None:
    tracker = LatencyTracker({"cheap": TIER, "large": None})
    tracker.answered("cheap", target=TIER, ttft_s=0.1, e2e_s=1.0)
    tracker.retarget({"cheap": SloTarget(0.1, 1.0, 90), "new": None})
    snapshot = tracker.snapshot()
    assert set(snapshot) == {"cheap", "new"}
    assert (snapshot["cheap"].requests, snapshot["cheap"].target) == (1, 0.9)


def test_hedge_delay_needs_enough_samples() -> None:
    tracker = LatencyTracker({})
    for i in range(19):
        tracker.first_byte("cheap", True, 0.01 * (i + 1))
    assert tracker.hedge_delay("cheap", True) is None
    tracker.first_byte("cheap", True, 0.2)
    assert tracker.hedge_delay("cheap", True) == pytest.approx(0.19)
    assert tracker.hedge_delay("cheap", False) is None


# --- budgets ---------------------------------------------------------------------------


def test_ratio_budget() -> None:
    budget = RatioBudget(0.1, floor_per_s=0.0, window_s=10.0)
    assert not budget.try_spend(0.0)
    for _ in range(20):
        budget.deposit(0.0)
    assert [budget.try_spend(1.0) for _ in range(3)] == [True, True, False]
    # Ten seconds on, those requests have left the window.
    assert not budget.try_spend(10.5)


def test_ratio_budget_floor_lets_a_quiet_pool_retry() -> None:
    budget = RatioBudget(0.1, floor_per_s=0.2, window_s=10.0)
    assert [budget.try_spend(0.0) for _ in range(3)] == [True, True, False]


# --- waiting room ----------------------------------------------------------------------


async def test_waiters_wake_in_priority_order() -> None:
    room = WaitingRoom()
    order: list[str] = []

    async def wait(name: str, priority: str) -> None:
        waiter = room.enter(priority, ["pool"])  # type: ignore[arg-type]
        await room.wait(waiter, 5.0)
        order.append(name)
        room.leave(waiter)

    tasks = [
        asyncio.ensure_future(wait("shed-1", "sheddable")),
        asyncio.ensure_future(wait("std-1", "standard")),
        asyncio.ensure_future(wait("crit-1", "critical")),
        asyncio.ensure_future(wait("std-2", "standard")),
    ]
    await asyncio.sleep(0)
    assert len(room) == 4
    room.wake("other pool")
    await asyncio.sleep(0)
    assert order == []
    room.wake("pool")
    await asyncio.gather(*tasks)
    assert order == ["crit-1", "std-1", "std-2", "shed-1"]
    assert len(room) == 0


async def test_may_go_only_without_more_important_waiters_for_the_same_pools() -> None:
    room = WaitingRoom(max_waiting=3)
    low = room.enter("sheddable", ["a", "b"])
    assert room.may_go(low)
    high = room.enter("standard", ["b"])
    elsewhere = room.enter("critical", ["c"])
    assert not room.may_go(low) and room.may_go(high) and room.may_go(elsewhere)
    assert room.full()
    room.leave(high)
    room.leave(high)  # leaving twice is harmless
    assert room.may_go(low) and not room.full()


async def test_wait_times_out() -> None:
    room = WaitingRoom()
    waiter = room.enter("standard", ["a"])
    await room.wait(waiter, 0.01)
    room.wake("a")
    await room.wait(waiter, 0.01)  # a used wake-up does not end the next wait early

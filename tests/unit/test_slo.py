"""Per-request targets and priorities, deadlines, hedge delays, budgets, the waiting room."""

from __future__ import annotations

import asyncio
import math

import pytest

from gateway.slo import (
    Deadline,
    FirstByteTracker,
    Priority,
    RatioBudget,
    SloTarget,
    WaitingRoom,
    request_priority,
    request_target,
)

TIER = SloTarget(ttft_s=0.5, e2e_s=5.0, percentile=99)


# --- priorities and targets ------------------------------------------------------------


def test_priority_defaults_to_the_tenants() -> None:
    assert request_priority("critical", None) == "critical"


@pytest.mark.parametrize(
    ("tenant", "hint", "expected"),
    [
        ("critical", "sheddable", "sheddable"),
        ("critical", "standard", "standard"),
        ("standard", "critical", "standard"),  # a header cannot raise it
        ("sheddable", "standard", "sheddable"),
    ],
)
def test_the_header_may_lower_priority_never_raise_it(
    tenant: Priority, hint: Priority, expected: Priority
) -> None:
    assert request_priority(tenant, hint) == expected


def test_headers_only_tighten_the_tiers_target() -> None:
    assert request_target(TIER, None, None) is TIER
    assert request_target(TIER, 0.2, 9.0) == SloTarget(0.2, 5.0, 99)
    assert request_target(None, None, 1.5) == SloTarget(math.inf, 1.5)
    assert request_target(None, None, None) is None


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


# --- hedge delays ----------------------------------------------------------------------


def test_hedge_delay_needs_enough_samples() -> None:
    tracker = FirstByteTracker()
    for i in range(19):
        tracker.first_byte("cheap", True, 0.01 * (i + 1))
    assert tracker.hedge_delay("cheap", True) is None
    tracker.first_byte("cheap", True, 0.2)
    assert tracker.hedge_delay("cheap", True) == pytest.approx(0.19)
    assert tracker.hedge_delay("cheap", False) is None


def test_hedge_delay_follows_new_samples_a_few_at_a_time() -> None:
    tracker = FirstByteTracker()
    for _ in range(20):
        tracker.first_byte("cheap", True, 0.1)
    assert tracker.hedge_delay("cheap", True) == pytest.approx(0.1)
    for _ in range(7):
        tracker.first_byte("cheap", True, 1.0)
    assert tracker.hedge_delay("cheap", True) == pytest.approx(0.1)  # cached: 7 new samples
    tracker.first_byte("cheap", True, 1.0)
    assert tracker.hedge_delay("cheap", True) == pytest.approx(1.0)  # recomputed at 8


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
    loop = asyncio.get_running_loop()
    room = WaitingRoom()
    waiter = room.enter("standard", ["a"])
    started = loop.time()
    await room.wait(waiter, 0.05)
    # It timed out (nobody woke it) and it is still in the room, waiting its turn.
    assert loop.time() - started >= 0.04 and not waiter.woken.done()
    assert len(room) == 1 and room.may_go(waiter)
    room.wake("a")
    assert waiter.woken.done()
    started = loop.time()
    await room.wait(waiter, 0.05)  # a used wake-up does not end the next wait early
    assert loop.time() - started >= 0.04 and not waiter.woken.done()
    # A wake-up during a wait ends it at once, long before its timeout.
    waiting = asyncio.ensure_future(room.wait(waiter, 60.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    room.wake("a")
    await asyncio.wait_for(waiting, 5.0)
    assert waiter.woken.done()

from __future__ import annotations

import asyncio
import calendar
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.auth import Caller
from gateway.budgets.backends import EmbeddedBackend
from gateway.budgets.errors import (
    BudgetExceeded,
    BudgetStoreUnavailable,
    QuotaExceeded,
    RateLimitExceeded,
)
from gateway.budgets.ledger import Ledger, Reservation
from gateway.budgets.plan import downgrade_order
from gateway.budgets.report import duration
from gateway.errors import NotFound
from gateway.policy import Policy, Price, StoreSettings, parse_policy
from gateway.store import EmbeddedStore, RedisStore, StoreUnavailable

# $1 / $2 per million tokens: 100 prompt + 400 completion tokens cost 900 nano-USD x 1000.
PRICE = Price(input_per_mtok=1.0, output_per_mtok=2.0)
WORST = 900_000  # nano-USD for prompt_tokens=100, max_tokens=400
START = calendar.timegm((2026, 11, 27, 12, 0, 0)) + 10.0  # 10 s into a minute


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def policy_with(
    tenant: dict[str, Any] | None = None, *, name: str = "acme", **sections: Any
) -> Policy:
    """Two tiers (cheap, large) and one tenant (`acme`) with the given settings."""
    raw: dict[str, Any] = {
        "version": 1,
        "models": {
            "small": {"replicas": ["http://s:1/v1"], "price": PRICE.model_dump()},
            "big": {
                "replicas": ["http://l:1/v1"],
                "price": {"input_per_mtok": 10.0, "output_per_mtok": 20.0},
            },
        },
        "tiers": {"cheap": {"models": ["small"]}, "large": {"models": ["big"]}},
        "tenants": {name: tenant or {}},
        # Short reservation TTLs in these tests need a shorter upstream timeout.
        "server": {"upstream_timeout_s": 0.5},
    }
    raw.update(sections)
    return parse_policy(raw)


def caller(policy: Policy, name: str = "acme") -> Caller:
    return Caller(name, policy.tenants[name])


def ledger_for(policy: Policy, clock: Clock | None = None) -> Ledger:
    return Ledger(EmbeddedStore(StoreSettings()), policy, clock=clock or Clock())


async def reserve(
    ledger: Ledger,
    request_id: str,
    *,
    tier: str = "cheap",
    prompt_tokens: int = 100,
    max_tokens: int | None = 400,
    name: str = "acme",
) -> Reservation:
    return await ledger.reserve(
        request_id=request_id,
        caller=caller(ledger.policy, name),
        tier=tier,
        price=PRICE,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
    )


async def row(ledger: Ledger, scope: str, window: str = "day") -> dict[str, Any]:
    usage = await ledger.usage("acme")
    rows = usage["budgets"] + usage["rate_limits"]
    return next(r for r in rows if r["scope"] == scope and r["window"] == window)


def day_budget(count: float, **extra: Any) -> dict[str, Any]:
    """A daily budget that fits `count` worst-case requests (and half of one more)."""
    return {"budget": {"usd_per_day": (count * WORST + WORST // 2) / 1e9, **extra}}


async def test_a_tenant_without_limits_never_touches_the_store() -> None:
    dead = RedisStore(StoreSettings(redis_url="redis://127.0.0.1:1/0"))  # nothing listens
    ledger = Ledger(dead, policy_with())
    reservation = await reserve(ledger, "r1")
    assert reservation.holds == () and reservation.headers() == {}
    assert reservation.usd_nano == WORST and reservation.tokens == 500
    await ledger.settle(reservation, prompt_tokens=100, completion_tokens=50)
    await ledger.release(reservation)
    assert ledger.pending == 0
    await dead.close()


async def test_budget_admits_exactly_what_fits_then_rejects() -> None:
    ledger = ledger_for(policy_with(day_budget(3)))
    for i in range(3):
        await reserve(ledger, f"r{i}")
    with pytest.raises(BudgetExceeded) as caught:
        await reserve(ledger, "r3")
    error = caught.value
    assert (error.status_code, error.error_type, error.code) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
    )
    assert (error.scope, error.tier, error.window, error.on_exhausted) == (
        "tenant",
        "cheap",
        "day",
        "reject",
    )
    assert error.retry_after == pytest.approx(12 * 3600 - 10)
    assert "usd_per_day is $0.003150" in error.message and "resets in 11h59m50s" in error.message
    spent = await row(ledger, "tenant")
    assert spent["reserved_usd"] == pytest.approx(3 * WORST / 1e9) and spent["spent_usd"] == 0


async def test_settle_swaps_the_hold_for_the_real_cost() -> None:
    ledger = ledger_for(policy_with(day_budget(3)))
    held = [await reserve(ledger, f"r{i}") for i in range(3)]
    await ledger.settle(held[0], prompt_tokens=100, completion_tokens=50)  # 200_000 nano
    spent = await row(ledger, "tenant")
    assert spent["spent_usd"] == pytest.approx(0.0002)
    assert spent["reserved_usd"] == pytest.approx(2 * WORST / 1e9)
    await reserve(ledger, "r3")  # the freed headroom admits one more
    with pytest.raises(BudgetExceeded):
        await reserve(ledger, "r4")


async def test_settling_twice_counts_once() -> None:
    ledger = ledger_for(policy_with(day_budget(3)))
    reservation = await reserve(ledger, "r1")
    for _ in range(3):
        await ledger.settle(reservation, prompt_tokens=100, completion_tokens=400)
    await ledger.release(reservation)
    spent = await row(ledger, "tenant")
    assert (spent["spent_usd"], spent["reserved_usd"]) == (WORST / 1e9, 0)


async def test_release_costs_nothing_but_the_request_still_counts() -> None:
    ledger = ledger_for(policy_with({"limits": {"rpm": 2}, **day_budget(5)}))
    await ledger.release(await reserve(ledger, "r1"))
    spent = await row(ledger, "tenant")
    assert (spent["spent_usd"], spent["reserved_usd"]) == (0, 0)
    assert (await row(ledger, "rpm", "minute"))["used"] == 1
    await reserve(ledger, "r2")
    with pytest.raises(RateLimitExceeded):
        await reserve(ledger, "r3")


async def test_an_abandoned_reservation_expires_and_a_late_settle_counts_once() -> None:
    clock = Clock()
    policy = policy_with(day_budget(1), budgets={"reservation_ttl_s": 30})
    ledger = ledger_for(policy, clock)
    first = await reserve(ledger, "r1")
    with pytest.raises(BudgetExceeded):
        await reserve(ledger, "r2")
    clock.now += 30  # the gateway that held r1 died: its hold lapses with no sweeper
    assert (await row(ledger, "tenant"))["reserved_usd"] == 0
    second = await reserve(ledger, "r2")
    # r1's gateway was only slow: its spend is still recorded, exactly once.
    for _ in range(2):
        await ledger.settle(first, prompt_tokens=100, completion_tokens=0)
    await ledger.settle(second, prompt_tokens=100, completion_tokens=0)
    spent = await row(ledger, "tenant")
    assert (spent["spent_usd"], spent["reserved_usd"]) == (0.0002, 0)


async def test_requests_per_minute_reset_with_the_calendar_minute() -> None:
    clock = Clock()
    ledger = ledger_for(policy_with({"limits": {"rpm": 2}}), clock)
    await reserve(ledger, "r1")
    second = await reserve(ledger, "r2")
    assert second.headers() == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "50s",
    }
    with pytest.raises(RateLimitExceeded) as caught:
        await reserve(ledger, "r3")
    error = caught.value
    assert (error.error_type, error.code, error.scope, error.retry_after) == (
        "requests",
        "rate_limit_exceeded",
        "rpm",
        50.0,
    )
    assert error.message == (
        "Rate limit reached for tenant 'acme' on requests per min (RPM): "
        "Limit 2, Used 2, Requested 1. Please try again in 50s."
    )
    clock.now += 50
    await reserve(ledger, "r3")


async def test_tokens_per_minute_hold_the_worst_case_until_settled() -> None:
    ledger = ledger_for(policy_with({"limits": {"tpm": 1200}}))
    first = await reserve(ledger, "r1")  # holds 500 tokens
    second = await reserve(ledger, "r2")
    assert second.headers()["x-ratelimit-remaining-tokens"] == "200"
    with pytest.raises(RateLimitExceeded) as caught:
        await reserve(ledger, "r3")
    assert caught.value.error_type == "tokens" and caught.value.scope == "tpm"
    await ledger.settle(first, prompt_tokens=100, completion_tokens=20)  # 120 real tokens
    await reserve(ledger, "r3")
    tpm = await row(ledger, "tpm", "minute")
    assert (tpm["used"], tpm["reserved"], tpm["remaining"]) == (120, 1000, 80)


async def test_default_max_tokens_is_reserved_when_the_request_sets_none() -> None:
    policy = policy_with({"limits": {"tpm": 10_000}}, budgets={"default_max_tokens": 1000})
    reservation = await reserve(ledger_for(policy), "r1", max_tokens=None)
    assert reservation.tokens == 1100
    assert reservation.headers()["x-ratelimit-remaining-tokens"] == "8900"


async def test_a_tier_budget_asks_for_a_downgrade_and_the_cheaper_tier_serves() -> None:
    policy = policy_with(
        {"budget": {"tiers": {"large": {"usd_per_hour": 0.001, "on_exhausted": "downgrade"}}}}
    )
    ledger = ledger_for(policy)
    served: list[str] = []
    for request in range(3):
        for tier in downgrade_order(policy, "large", "chat"):
            try:
                reservation = await reserve(ledger, f"r{request}", tier=tier)
            except QuotaExceeded as error:
                assert (error.scope, error.on_exhausted) == ("tenant_tier", "downgrade")
                continue
            served.append(reservation.tier)
            break
    assert served == ["large", "cheap", "cheap"]


async def test_reject_wins_when_several_limits_are_hit() -> None:
    tenant = {
        "budget": {
            "usd_per_day": WORST / 1e9,
            "on_exhausted": "downgrade",
            "tiers": {"cheap": {"usd_per_minute": WORST / 1e9, "on_exhausted": "reject"}},
        }
    }
    ledger = ledger_for(policy_with(tenant))
    await reserve(ledger, "r1")
    with pytest.raises(BudgetExceeded) as caught:
        await reserve(ledger, "r2")
    # Both windows are full; the later reset is reported, and reject beats downgrade.
    assert (caught.value.window, caught.value.on_exhausted) == ("day", "reject")
    assert caught.value.retry_after == pytest.approx(12 * 3600 - 10)


async def test_a_refused_global_tier_budget_undoes_the_tenant_hold() -> None:
    policy = policy_with(
        {"limits": {"rpm": 100}, **day_budget(10)},
        budgets={"tiers": {"cheap": {"usd_per_day": WORST / 1e9}}},
    )
    ledger = ledger_for(policy)
    await reserve(ledger, "r1")
    with pytest.raises(BudgetExceeded) as caught:
        await reserve(ledger, "r2")
    assert (caught.value.scope, caught.value.tier) == ("global_tier", "cheap")
    assert "tier 'cheap', shared by all tenants" in caught.value.message
    assert "spent" not in caught.value.message  # the others' spend is not the caller's business
    assert (await row(ledger, "rpm", "minute"))["used"] == 1
    assert (await row(ledger, "tenant"))["reserved_usd"] == WORST / 1e9
    shared = [r for r in (await ledger.usage("acme"))["budgets"] if r["scope"] == "global_tier"]
    assert shared[0]["reserved_usd"] == WORST / 1e9


async def test_headers_show_the_tightest_own_budget() -> None:
    tenant = {
        "budget": {
            "usd_per_day": 1.0,
            "usd_per_month": 0.5,
            "tiers": {"cheap": {"usd_per_hour": 2}},
        }
    }
    ledger = ledger_for(policy_with(tenant, budgets={"tiers": {"cheap": {"usd_per_day": 0.1}}}))
    reservation = await reserve(ledger, "r1")
    assert reservation.headers() == {"x-triage-budget-remaining-usd": "0.499100"}


def test_durations_read_like_openai() -> None:
    assert [duration(s) for s in (0.02, 0.9996, 1, 59.2, 60, 360, 7384)] == [
        "20ms",
        "1s",
        "1s",
        "1m0s",
        "1m0s",
        "6m0s",
        "2h3m4s",
    ]


async def test_usage_reports_every_window_and_tier() -> None:
    tenant = {
        "limits": {"rpm": 5, "tpm": 1000},
        **day_budget(3, tiers={"large": {"usd_per_month": 1}}),
    }
    ledger = ledger_for(policy_with(tenant))
    await ledger.settle(await reserve(ledger, "r1"), prompt_tokens=100, completion_tokens=0)
    usage = await ledger.usage("acme")
    assert usage["tenant"] == "acme" and usage["failure_mode"] == "fail_closed"
    assert [(r["scope"], r["tier"], r["window"]) for r in usage["budgets"]] == [
        ("tenant", None, "day"),
        ("tenant_tier", "large", "month"),
    ]
    day = usage["budgets"][0]
    assert day == {
        "scope": "tenant",
        "tier": None,
        "window": "day",
        "window_start": "2026-11-27T00:00:00Z",
        "resets_at": "2026-11-28T00:00:00Z",
        "reset_in_s": 12 * 3600 - 10,
        "limit_usd": 0.00315,
        "spent_usd": 0.0001,
        "reserved_usd": 0.0,
        "remaining_usd": 0.00305,
    }
    rpm = usage["rate_limits"][0]
    assert (rpm["limit"], rpm["used"], rpm["remaining"], rpm["resets_at"]) == (
        5,
        1,
        4,
        "2026-11-27T12:01:00Z",
    )


async def test_usage_of_unknown_and_anonymous_tenants() -> None:
    policy = policy_with(auth={"anonymous": {"limits": {"rpm": 3}}})
    ledger = ledger_for(policy)
    with pytest.raises(NotFound) as caught:
        await ledger.usage("nobody")
    assert caught.value.message == "Unknown tenant 'nobody' (tenants: acme)."
    assert caught.value.code == "tenant_not_found"
    anonymous = await ledger.usage("anonymous")
    assert anonymous["rate_limits"][0]["limit"] == 3 and anonymous["budgets"] == []


class FlakyBackend(EmbeddedBackend):
    """The embedded ledger behind a switch that makes every call fail like Redis would."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.breaker_open = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.breaker_open:
            raise StoreUnavailable("redis EVALSHA: circuit breaker is open")
        if self.down:
            raise StoreUnavailable("redis EVALSHA: ConnectionError") from ConnectionError()

    async def reserve(self, *args: Any) -> tuple[int, list[int]]:
        self._check()
        return await super().reserve(*args)

    async def settle(self, *args: Any) -> int:
        self._check()
        return await super().settle(*args)

    async def cancel(self, *args: Any) -> int:
        self._check()
        return await super().cancel(*args)

    async def read(self, key: str, now_ms: int, names: Sequence[str]) -> list[tuple[int, int]]:
        self._check()
        return await super().read(key, now_ms, names)


def flaky_ledger(policy: Policy, clock: Clock | None = None) -> tuple[Ledger, FlakyBackend]:
    ledger = ledger_for(policy, clock)
    backend = FlakyBackend()
    ledger._backend = backend  # the seam the store type normally picks
    return ledger, backend


async def replayed(ledger: Ledger) -> None:
    """Until the ledger's own background task has emptied its queue (no `flush` here)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while ledger.pending and loop.time() < deadline:
        await asyncio.sleep(0.001)
    assert ledger.pending == 0


async def test_fail_closed_rejects_with_a_503_while_the_store_is_down() -> None:
    ledger, backend = flaky_ledger(policy_with({"limits": {"rpm": 10}, **day_budget(5)}))
    backend.down = True
    with pytest.raises(BudgetStoreUnavailable) as caught:
        await reserve(ledger, "r1")
    error = caught.value
    assert (error.status_code, error.code) == (503, "budget_store_unavailable")
    # The call may have reached Redis before failing: its undo waits in the queue.
    assert ledger.pending == 1
    backend.breaker_open = True
    with pytest.raises(BudgetStoreUnavailable):
        await reserve(ledger, "r2")
    assert ledger.pending == 1  # the breaker refused before sending: nothing to undo
    backend.down = backend.breaker_open = False
    await reserve(ledger, "r3")
    await replayed(ledger)  # the replay runs in the background once the store answers
    assert (await row(ledger, "rpm", "minute"))["used"] == 1


async def test_fail_open_serves_counts_locally_and_reconciles() -> None:
    policy = policy_with(
        {"limits": {"rpm": 10, "tpm": 10_000}, **day_budget(5)},
        budgets={"failure_mode": "fail_open", "tiers": {"cheap": {"usd_per_day": 1}}},
    )
    ledger, backend = flaky_ledger(policy)
    backend.down = True
    reservation = await reserve(ledger, "r1")
    assert reservation.unchecked and reservation.headers() == {}
    await ledger.settle(reservation, prompt_tokens=100, completion_tokens=100)
    assert ledger.pending == 2  # tenant ledger and global tier ledger
    with pytest.raises(BudgetStoreUnavailable):
        await ledger.usage("acme")
    backend.down = False
    assert await ledger.flush() == 0
    assert (await row(ledger, "rpm", "minute"))["used"] == 1
    assert (await row(ledger, "tpm", "minute"))["used"] == 200
    assert (await row(ledger, "tenant"))["spent_usd"] == 0.0003
    shared = [r for r in (await ledger.usage("acme"))["budgets"] if r["scope"] == "global_tier"]
    assert shared[0]["spent_usd"] == 0.0003
    await ledger.flush()  # replaying again changes nothing
    assert (await row(ledger, "tenant"))["spent_usd"] == 0.0003


async def test_a_settle_that_fails_is_replayed_when_the_store_is_back() -> None:
    ledger, backend = flaky_ledger(policy_with(day_budget(2)))
    held = await reserve(ledger, "r1")
    backend.down = True
    await ledger.settle(held, prompt_tokens=100, completion_tokens=0)  # does not raise
    assert ledger.pending == 1
    backend.down = False
    await reserve(ledger, "r2")  # the store answers again: the queue is replayed
    await replayed(ledger)
    spent = await row(ledger, "tenant")
    assert (spent["spent_usd"], spent["reserved_usd"]) == (0.0001, WORST / 1e9)


async def test_settle_never_raises_into_the_request_path(caplog: pytest.LogCaptureFixture) -> None:
    ledger, backend = flaky_ledger(policy_with(day_budget(2)))
    held = await reserve(ledger, "r1")

    async def broken(*args: Any) -> int:
        raise RuntimeError("bug")

    backend.settle = broken  # type: ignore[method-assign]
    await ledger.settle(held, prompt_tokens=1, completion_tokens=1)
    assert "settle failed" in caplog.text and ledger.pending == 0


async def test_settle_survives_the_caller_being_cancelled() -> None:
    ledger = ledger_for(policy_with(day_budget(2)))
    held = await reserve(ledger, "r1")
    task = asyncio.create_task(ledger.settle(held, prompt_tokens=100, completion_tokens=0))
    await asyncio.sleep(0)
    task.cancel()
    await ledger.close()
    assert (await row(ledger, "tenant"))["spent_usd"] == 0.0001


async def test_a_cancelled_reserve_queues_its_undo() -> None:
    ledger, backend = flaky_ledger(policy_with(day_budget(2)))
    gate = asyncio.Event()
    original = backend.reserve

    async def slow(*args: Any) -> tuple[int, list[int]]:
        result = await original(*args)
        await gate.wait()  # Redis applied it; the reply has not arrived yet
        return result

    backend.reserve = slow  # type: ignore[method-assign]
    task = asyncio.create_task(reserve(ledger, "r1"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ledger.pending == 1 and (await row(ledger, "tenant"))["reserved_usd"] > 0
    assert await ledger.flush() == 0
    assert (await row(ledger, "tenant"))["reserved_usd"] == 0


async def test_a_reload_keeps_embedded_counts_and_queued_settlements() -> None:
    clock = Clock()
    old, backend = flaky_ledger(policy_with(day_budget(2)), clock)
    held = await reserve(old, "r1")
    backend.down = True
    await old.settle(held, prompt_tokens=100, completion_tokens=0)
    backend.down = False
    new = Ledger(
        EmbeddedStore(StoreSettings()), policy_with(day_budget(3)), clock=clock, carry_over=old
    )
    assert new.pending == 1 and await new.flush() == 0
    assert (await row(new, "tenant"))["spent_usd"] == 0.0001
    await reserve(new, "r2")


async def test_reserving_the_same_request_twice_holds_once() -> None:
    ledger = ledger_for(policy_with(day_budget(1)))
    await reserve(ledger, "r1")
    await reserve(ledger, "r1")
    assert (await row(ledger, "tenant"))["reserved_usd"] == WORST / 1e9


async def test_a_settle_after_the_window_turned_counts_in_the_reserved_window() -> None:
    clock = Clock(START + 49)  # 12:00:59
    ledger = ledger_for(policy_with({"limits": {"tpm": 1000}}), clock)
    reservation = await reserve(ledger, "r1")
    clock.now += 6  # 12:01:05: a new minute
    fresh = await row(ledger, "tpm", "minute")
    assert (fresh["window_start"], fresh["used"], fresh["reserved"]) == (
        "2026-11-27T12:01:00Z",
        0,
        0,
    )
    await ledger.settle(reservation, prompt_tokens=100, completion_tokens=300)
    clock.now -= 6
    earlier = await row(ledger, "tpm", "minute")
    assert (earlier["used"], earlier["reserved"]) == (400, 0)

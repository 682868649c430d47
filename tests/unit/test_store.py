from __future__ import annotations

import asyncio
import time

import pytest

from gateway.policy import StoreSettings
from gateway.store import CircuitBreaker, EmbeddedStore, RedisStore, open_store
from gateway.store.guard import LoopLag


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the circuit breaker -------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_only() -> None:
    clock = Clock()
    breaker = CircuitBreaker(3, 2.0, clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.allow()
    breaker.success()  # a success in between resets the count
    for _ in range(2):
        breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open"
    assert not breaker.allow()


def test_breaker_half_open_lets_one_probe_through_and_closes_on_success() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 2.0, clock)
    breaker.failure()
    clock.now += 1.999
    assert not breaker.allow()
    clock.now += 0.001
    assert breaker.allow()  # the probe
    assert breaker.state == "half_open"
    assert not breaker.allow()  # everyone else waits for the probe's verdict
    breaker.success()
    assert breaker.state == "closed"
    assert breaker.allow() and breaker.allow()


def test_breaker_failed_probe_reopens_for_a_full_period() -> None:
    clock = Clock()
    breaker = CircuitBreaker(5, 2.0, clock)
    for _ in range(5):
        breaker.failure()
    clock.now += 2
    assert breaker.allow()
    breaker.failure()  # one failure is enough while half-open
    assert breaker.state == "open"
    clock.now += 1.5
    assert not breaker.allow()
    clock.now += 0.5
    assert breaker.allow()


def test_breaker_cancelled_probe_frees_the_probe_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 2.0, clock)
    breaker.failure()
    clock.now += 2
    assert breaker.allow()
    breaker.cancel()
    assert breaker.allow()


def test_breaker_lost_probe_is_given_up_after_reset_period() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 2.0, clock)
    breaker.failure()
    clock.now += 2
    assert breaker.allow()  # this probe never reports back
    clock.now += 1
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


def test_breaker_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="failures >= 1"):
        CircuitBreaker(0, 1.0)


# --- loop lag ------------------------------------------------------------------------


async def test_loop_lag_counts_a_blocked_loop_and_ticks_only_while_calls_wait() -> None:
    loop = asyncio.get_running_loop()
    lag = LoopLag(0.01)
    mark = lag.enter(loop)
    blocked = loop.create_future()

    def block() -> None:
        time.sleep(0.1)  # a deliberate loop block
        loop.call_soon(blocked.set_result, None)

    loop.call_soon(block)
    await blocked
    await asyncio.sleep(0.03)  # a few ticks on time: not counted
    stalled = lag.stalled_s - mark
    assert 0.1 - lag.interval_s <= stalled < 0.1 + lag.interval_s, stalled
    lag.leave()
    assert lag._tick is None  # idle: no timer left behind


def test_loop_lag_counts_overlapping_late_callbacks_once() -> None:
    lag = LoopLag(0.01)
    lag.late(1.0, 1.2)
    lag.late(1.1, 1.2)  # the same stall, seen by a second timer
    lag.late(1.15, 1.25)
    assert lag.stalled_s == pytest.approx(0.25)


# --- the embedded store --------------------------------------------------------------


def embedded(max_bytes: int = 10_000, clock: Clock | None = None) -> EmbeddedStore:
    settings = StoreSettings(embedded_max_bytes=max_bytes, key_prefix="t:")
    return EmbeddedStore(settings, clock or Clock())


async def test_embedded_evicts_least_recently_used_by_bytes() -> None:
    store = embedded(max_bytes=3 * (96 + 3 + 100))  # room for exactly three 100-byte values
    for key in ("a", "b", "c"):
        await store.set(key, b"x" * 100, 60)
    assert await store.get("a") is not None  # a is now the most recently used
    await store.set("d", b"x" * 100, 60)
    assert await store.get("b") is None
    assert [await store.get(k) is not None for k in ("a", "c", "d")] == [True, True, True]
    assert store.size_bytes <= store.max_bytes


async def test_embedded_one_big_value_evicts_several_small_ones() -> None:
    store = embedded(max_bytes=1000)
    for key in ("a", "b", "c", "d"):
        await store.set(key, b"x" * 100, 60)
    await store.set("big", b"y" * 700, 60)
    assert await store.get("big") == b"y" * 700
    assert store.size_bytes <= 1000
    assert await store.get("a") is None


async def test_embedded_refuses_a_value_larger_than_the_store() -> None:
    store = embedded(max_bytes=500)
    await store.set("a", b"x", 60)
    await store.set("huge", b"y" * 1000, 60)
    assert await store.get("huge") is None
    assert await store.get("a") == b"x"  # nothing was evicted for it
    assert not await store.set_if_absent("huge", b"y" * 1000, 60)


async def test_embedded_overwrite_accounts_bytes_once() -> None:
    store = embedded()
    await store.set("a", b"x" * 100, 60)
    size = store.size_bytes
    await store.set("a", b"y" * 100, 60)
    assert store.size_bytes == size
    await store.delete("a")
    assert store.size_bytes == 0


async def test_embedded_ttl_is_honoured() -> None:
    clock = Clock()
    store = embedded(clock=clock)
    await store.set("a", b"1", 1.0)
    assert await store.set_if_absent("lock", b"me", 0.5) is True
    assert await store.set_if_absent("lock", b"you", 0.5) is False
    clock.now += 0.5
    assert await store.set_if_absent("lock", b"you", 0.5) is True
    assert await store.get("a") == b"1"
    clock.now += 0.5
    assert await store.get("a") is None
    assert await store.delete("a") == 0
    assert store.size_bytes == len("t:lock") + len(b"you") + 96


async def test_embedded_expired_key_does_not_count_as_deleted() -> None:
    clock = Clock()
    store = embedded(clock=clock)
    await store.set("a:1", b"1", 1.0)
    await store.set("a:2", b"2", 10.0)
    clock.now += 2
    assert await store.delete_matching("a:*") == 1
    assert not await store.delete_if_equals("a:1", b"1")


def test_open_store_picks_the_backend() -> None:
    assert isinstance(open_store(StoreSettings()), EmbeddedStore)
    redis_store = open_store(StoreSettings(redis_url="redis://127.0.0.1:1/0"))
    assert isinstance(redis_store, RedisStore)


@pytest.mark.parametrize("prefix", ["a{b:", "x}", "{}"])
def test_a_prefix_with_braces_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="must not contain"):
        open_store(StoreSettings(key_prefix=prefix))

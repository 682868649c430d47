"""The store contract on every backend (embedded, Redis, Redis Cluster), and Redis failures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from redis.crc import key_slot

from gateway.policy import StoreSettings
from gateway.store import (
    EmbeddedStore,
    RedisStore,
    Store,
    StoreCommandError,
    StoreUnavailable,
    open_store,
)
from gateway.store.guard import LAG_ALLOWANCE_S
from tests.support.redis import RedisCluster, RedisServer

pytestmark = pytest.mark.integration

BACKENDS = ["embedded", "redis", "cluster"]


def settings_for(
    backend: str, request: pytest.FixtureRequest, timeout_ms: float = 500
) -> StoreSettings:
    """Settings for one test: its own key prefix, so tests never see each other's keys."""
    settings = StoreSettings(key_prefix=f"test-{uuid.uuid4().hex[:8]}:", timeout_ms=timeout_ms)
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return settings.model_copy(update={"redis_url": server.url})
    if backend == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        return settings.model_copy(update={"redis_url": cluster.url, "cluster": True})
    return settings


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    opened = open_store(settings_for(request.param, request))
    try:
        yield opened
    finally:
        await opened.delete_matching("*")  # every test has its own prefix: clean it up
        await opened.close()


async def test_get_set_and_expiry(store: Store) -> None:
    assert await store.get("missing") is None
    await store.set("k", b"\x00value\xff", 60)
    assert await store.get("k") == b"\x00value\xff"
    await store.set("short", b"1", 0.05)
    await asyncio.sleep(0.12)
    assert await store.get("short") is None


async def test_set_if_absent_is_a_lock(store: Store) -> None:
    assert await store.set_if_absent("lock", b"a", 0.1) is True
    assert await store.set_if_absent("lock", b"b", 0.1) is False
    assert await store.get("lock") == b"a"
    await asyncio.sleep(0.15)
    assert await store.set_if_absent("lock", b"b", 10) is True


async def test_delete_counts_existing_keys_across_slots(store: Store) -> None:
    keys = [f"k{i}" for i in range(20)]  # spread over many slots on a cluster
    for key in keys:
        await store.set(key, b"1", 60)
    assert await store.delete(*keys, "nope") == 20
    assert await store.delete() == 0
    assert await store.get("k3") is None


async def test_delete_if_equals_only_by_owner(store: Store) -> None:
    await store.set("lock", b"owner", 60)
    assert await store.delete_if_equals("lock", b"thief") is False
    assert await store.get("lock") == b"owner"
    assert await store.delete_if_equals("lock", b"owner") is True
    assert await store.get("lock") is None
    assert await store.delete_if_equals("lock", b"owner") is False


async def test_delete_matching_follows_redis_glob(store: Store) -> None:
    names = ["a:b", "a:c", "a:d", "a:*", "a:bb", "b:b", "a:{x}:1", "a:{y}:2"]
    for name in names:
        await store.set(name, b"1", 60)
    assert await store.delete_matching("a:[bc]") == 2
    assert await store.delete_matching("a:\\*") == 1
    assert await store.delete_matching("a:?") == 1  # a:d
    assert await store.delete_matching("a:{*}:*") == 2
    assert await store.delete_matching("a:[^x]b") == 1  # a:bb
    assert await store.delete_matching("nothing*") == 0
    assert await store.get("b:b") == b"1"


async def test_delete_matching_many_keys(store: Store) -> None:
    for i in range(1200):
        await store.set(f"many:{{{i}}}", b"1", 60)
    await store.set("other", b"1", 60)
    assert await store.delete_matching("many:*") == 1200
    assert await store.get("other") == b"1"


async def test_ping(store: Store) -> None:
    assert await store.ping() is True


@pytest.mark.parametrize("backend", BACKENDS)
async def test_prefix_glob_characters_do_not_leak_into_other_prefixes(
    backend: str, request: pytest.FixtureRequest
) -> None:
    base = settings_for(backend, request)
    star = base.model_copy(update={"key_prefix": base.key_prefix + "*:"})
    plain = base.model_copy(update={"key_prefix": base.key_prefix + "x:"})
    a: Store
    b: Store
    if backend == "embedded":
        a, b = EmbeddedStore(star), EmbeddedStore(plain)
        b._items = a._items  # one dict, as two prefixes share one Redis
    else:
        a, b = open_store(star), open_store(plain)
    try:
        await b.set("k", b"1", 60)
        await a.set("k", b"1", 60)
        assert await a.delete_matching("*") == 1
        assert await b.get("k") == b"1"
    finally:
        await b.delete_matching("*")
        await a.close()
        await b.close()


# --- Redis only: Lua, hash tags, clusters ---------------------------------------------

REDIS_BACKENDS = ["redis", "cluster"]

_SUM = "return redis.call('incrby', KEYS[1], ARGV[1]) + redis.call('incrby', KEYS[2], ARGV[2])"


@pytest.fixture(params=REDIS_BACKENDS)
async def redis_store(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    opened = RedisStore(settings_for(request.param, request))
    try:
        yield opened
    finally:
        await opened.delete_matching("*")
        await opened.close()


async def test_eval_with_hash_tagged_keys(redis_store: RedisStore) -> None:
    keys = ["budget:{team-a}:day", "budget:{team-a}:minute"]
    assert await redis_store.eval(_SUM, keys, [2, 3]) == 5
    assert await redis_store.eval(_SUM, keys, ["1", 1]) == 7
    assert key_slot((redis_store.prefix + keys[0]).encode()) == key_slot(
        (redis_store.prefix + keys[1]).encode()
    )


async def test_eval_falls_back_to_eval_after_script_flush(redis_store: RedisStore) -> None:
    keys = ["flush:{t}:a", "flush:{t}:b"]
    assert await redis_store.eval(_SUM, keys, [1, 1]) == 2
    await redis_store._client.script_flush()
    assert await redis_store.eval(_SUM, keys, [1, 1]) == 4


async def test_script_error_is_a_command_error_and_leaves_the_breaker_closed(
    redis_store: RedisStore,
) -> None:
    for _ in range(redis_store.breaker.failures + 1):
        with pytest.raises(StoreCommandError, match="boom"):
            await redis_store.eval("return redis.error_reply('boom')", ["x"], [])
    assert redis_store.breaker.state == "closed"
    assert await redis_store.ping()


async def test_cluster_spreads_keys_over_every_master(
    redis_cluster: RedisCluster, request: pytest.FixtureRequest
) -> None:
    store = RedisStore(settings_for("cluster", request, timeout_ms=500))
    try:
        for i in range(60):
            await store.set(f"spread:{{{i}}}", b"1", 60)
        per_node = [n.client().dbsize() for n in redis_cluster.nodes]
        assert all(count > 0 for count in per_node), per_node
        assert await store.delete_matching("spread:*") == 60
        assert sum(n.client().dbsize() for n in redis_cluster.nodes) == sum(per_node) - 60
    finally:
        await store.close()


# --- Redis failures: never a hang, the breaker, recovery ------------------------------

TIMEOUT_MS = 50
_T = TypeVar("_T")


def failing_store(server: RedisServer, reset_s: float = 0.3) -> RedisStore:
    settings = StoreSettings(
        redis_url=server.url, timeout_ms=TIMEOUT_MS, breaker_failures=3, breaker_reset_s=reset_s
    )
    return RedisStore(settings)


async def answered_again(call: Callable[[], Awaitable[_T]]) -> _T:
    """`call`'s first answer in 10 s that is not a failure (`StoreUnavailable`, or False
    from `ping`): the breaker lets a probe through after its reset, and on a loaded machine
    that probe may miss its 50 ms, opening it again for another reset."""
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(StoreUnavailable):
            answer = await call()
            if answer is not False:
                return answer
        assert time.monotonic() < deadline, "the store never answered again"
        await asyncio.sleep(0.05)


async def timed_failure(store: RedisStore) -> float:
    started = time.perf_counter()
    with pytest.raises(StoreUnavailable):
        await store.get("k")
    return time.perf_counter() - started


async def test_killed_redis_fails_fast_then_the_breaker_opens(fresh_redis: RedisServer) -> None:
    store = failing_store(fresh_redis)
    try:
        await store.set("k", b"1", 60)
        fresh_redis.kill()
        for _ in range(3):
            assert await timed_failure(store) < TIMEOUT_MS / 1000 + 0.3
        assert store.breaker.state == "open"
        times = [await timed_failure(store) for _ in range(100)]
        # The median call: a loaded machine's preemption (a few ms) may land in any one.
        assert sorted(times)[50] < 0.001
        assert await store.ping() is False
    finally:
        await store.close()


async def test_paused_redis_costs_each_call_the_timeout_not_the_pause(
    fresh_redis: RedisServer,
) -> None:
    store = failing_store(fresh_redis)
    try:
        await store.set("k", b"1", 60)
        with fresh_redis.frozen():
            times = [await timed_failure(store) for _ in range(5)]
        assert all(t < TIMEOUT_MS / 1000 + 0.3 for t in times[:3]), times
        assert store.breaker.state == "open"  # after three timeouts
        assert min(times[3:]) < 0.001, times  # one preempted call may take a few ms
        assert await answered_again(lambda: store.get("k")) == b"1"  # a probe after 0.3 s
        assert store.breaker.state == "closed"
    finally:
        await store.close()


async def test_concurrent_calls_on_a_paused_redis_are_each_bounded(
    fresh_redis: RedisServer,
) -> None:
    store = failing_store(fresh_redis)
    try:
        await store.set("k", b"1", 60)
        with fresh_redis.frozen():
            started = time.perf_counter()
            calls = (store.get("k") for _ in range(50))
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert time.perf_counter() - started < TIMEOUT_MS / 1000 + 0.5  # bounded, not hung
        assert all(isinstance(r, StoreUnavailable) for r in results)
    finally:
        await store.close()


async def test_restarted_redis_works_again_by_itself(fresh_redis: RedisServer) -> None:
    store = failing_store(fresh_redis, reset_s=0.2)
    try:
        await store.set("k", b"1", 60)
        fresh_redis.kill()
        for _ in range(3):
            await timed_failure(store)
        assert store.breaker.state == "open"
        fresh_redis.restart()
        # A fresh server: the data is gone, the store works (a probe after 0.2 s).
        assert await answered_again(lambda: store.get("k")) is None
        await store.set("k", b"2", 60)
        assert await store.get("k") == b"2"
        assert store.breaker.state == "closed"
    finally:
        await store.close()


async def test_pooled_connections_survive_a_quick_restart(fresh_redis: RedisServer) -> None:
    store = failing_store(fresh_redis)
    try:
        await asyncio.gather(*(store.set(f"k{i}", b"1", 60) for i in range(10)))  # fill the pool
        fresh_redis.restart()
        # Every pooled connection is dead; each is replaced when taken, without a failure.
        await asyncio.gather(*(store.set(f"k{i}", b"2", 60) for i in range(10)))
        assert await store.get("k1") == b"2"
        assert store.breaker.state == "closed"
    finally:
        await store.close()


async def test_cluster_layout_is_read_outside_the_call_deadline(
    redis_cluster: RedisCluster, request: pytest.FixtureRequest
) -> None:
    # Reading the layout takes longer than 50 ms here. Calls made meanwhile fail within
    # their deadline, without opening the breaker, and work as soon as it is read.
    store = RedisStore(settings_for("cluster", request, timeout_ms=TIMEOUT_MS))
    try:
        deadline = time.monotonic() + 3
        while True:
            started = time.perf_counter()
            try:
                await store.set("k", b"1", 60)
                break
            except StoreUnavailable:
                # Loose: without hiredis, parsing the COMMAND table blocks the event loop
                # for 40-150 ms (load-dependent), and no timer fires meanwhile.
                assert time.perf_counter() - started < 0.3
                assert time.monotonic() < deadline
        assert store.breaker.state == "closed"
        assert await store.get("k") == b"1"
        await store.delete_matching("*")
    finally:
        await store.close()


async def test_cluster_ping_waits_for_the_layout(
    redis_cluster: RedisCluster, request: pytest.FixtureRequest
) -> None:
    store = RedisStore(settings_for("cluster", request, timeout_ms=TIMEOUT_MS))
    try:
        assert await store.ping() is True  # what the lifespan calls at start-up
        await store.set("k", b"1", 60)
        await store.delete_matching("*")
    finally:
        await store.close()


async def test_redis_down_at_start_then_up(fresh_redis: RedisServer) -> None:
    fresh_redis.kill()
    store = failing_store(fresh_redis, reset_s=0.1)
    try:
        with pytest.raises(StoreUnavailable):
            await store.get("k")
        fresh_redis.start()
        assert await answered_again(store.ping) is True  # a probe after 0.1 s
    finally:
        await store.close()


# --- a busy event loop is not a Redis failure ------------------------------------------

_COUNT = "return redis.call('incr', KEYS[1])"
LOOP_BLOCK_S = 0.2  # four times the call's timeout


def waiting_for_reply(call: asyncio.Future[Any]) -> bool:
    """Whether the call has sent its request and now waits for the reply."""
    assert isinstance(call, asyncio.Task)
    awaited: Any = call.get_coro()
    while awaited is not None:
        if getattr(awaited, "cr_code", None) and awaited.cr_code.co_name == "read_response":
            return True
        awaited = getattr(awaited, "cr_await", None)
    return False


def hold_loop_once(
    until: Callable[[], bool], then: Callable[[], None], block_s: float = LOOP_BLOCK_S
) -> None:
    """As soon as `until()` holds (checked once per loop iteration, without blocking),
    run `then()` and block the event loop for `block_s`: a deliberate loop block."""
    if not until():
        asyncio.get_running_loop().call_soon(hold_loop_once, until, then, block_s)
        return
    then()
    time.sleep(block_s)


def applied(server: RedisServer, key: str, value: int) -> Callable[[], None]:
    """Waits (blocking the loop) until Redis has run our command: its reply is on its way."""
    client = server.client()

    def wait() -> None:
        deadline = time.monotonic() + 5
        while client.get(key) != str(value).encode():
            assert time.monotonic() < deadline, f"{key} never reached {value}"

    return wait


async def replies_while_blocked(
    server: RedisServer,
    calls: list[asyncio.Future[Any]],
    then: Callable[[], None],
    block_s: float = LOOP_BLOCK_S,
) -> list[Any]:
    """The calls' replies arrive while this process's event loop is blocked, as they do
    when the gateway's own work keeps the loop busy: Redis is paused until every call has
    sent its request, then resumed (and has answered: `then`) inside the loop block."""

    def resume() -> None:
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGCONT)
        then()

    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        hold_loop_once(lambda: all(waiting_for_reply(c) for c in calls), resume, block_s)
        return await asyncio.gather(*calls, return_exceptions=True)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


async def until_value(server: RedisServer, key: str, value: bytes) -> None:
    client, deadline = server.client(), time.monotonic() + 5
    while client.get(key) != value:
        assert time.monotonic() < deadline, f"{key} never became {value!r}"
        await asyncio.sleep(0.01)


async def test_a_busy_event_loop_is_not_a_redis_failure(fresh_redis: RedisServer) -> None:
    store = failing_store(fresh_redis)
    try:
        await asyncio.gather(*(store.eval(_COUNT, ["warm"], []) for _ in range(50)))  # 50 conns
        for expected in range(1, 1 + store.breaker.failures + 1):
            started = time.perf_counter()
            calls = [asyncio.ensure_future(store.eval(_COUNT, ["n"], []))]
            then = applied(fresh_redis, store.prefix + "n", expected)
            assert await replies_while_blocked(fresh_redis, calls, then) == [expected]
            assert time.perf_counter() - started >= LOOP_BLOCK_S  # the block was real
            assert store.breaker.state == "closed"
            assert store.breaker._consecutive == 0
        # Many calls waiting at once behind one block fare the same.
        calls = [asyncio.ensure_future(store.eval(_COUNT, ["m"], [])) for _ in range(50)]
        then = applied(fresh_redis, store.prefix + "m", 50)
        results = await replies_while_blocked(fresh_redis, calls, then)
        assert sorted(results) == list(range(1, 51))  # each applied once, reported once
        assert store.breaker.state == "closed"
    finally:
        await store.close()


async def test_a_paused_redis_still_times_out_while_the_loop_is_busy(
    fresh_redis: RedisServer,
) -> None:
    store = failing_store(fresh_redis)
    try:
        await store.eval(_COUNT, ["n"], [])
        with fresh_redis.frozen():
            for _ in range(3):
                started = time.perf_counter()
                call = asyncio.ensure_future(store.eval(_COUNT, ["n"], []))
                hold_loop_once(lambda c=call: waiting_for_reply(c), lambda: None)
                with pytest.raises(StoreUnavailable, match="timed out"):
                    await call
                took = time.perf_counter() - started
                # Timed by the time the loop was free to read a reply: not cut at the block's
                # end, nor much later than the timeout after it.
                assert took > LOOP_BLOCK_S + TIMEOUT_MS / 1000 * 0.5, took
                assert took < LOOP_BLOCK_S + TIMEOUT_MS / 1000 + 0.3, took
            assert store.breaker.state == "open"
    finally:
        await store.close()


async def test_a_loop_blocked_past_the_allowance_is_not_a_redis_failure_either(
    fresh_redis: RedisServer,
) -> None:
    block_s = LAG_ALLOWANCE_S + 0.2
    store = failing_store(fresh_redis)
    try:
        await store.eval(_COUNT, ["n"], [])
        # The reply came in during the block: it is read, not thrown away.
        calls = [asyncio.ensure_future(store.eval(_COUNT, ["n"], []))]
        then = applied(fresh_redis, store.prefix + "n", 2)
        assert await replies_while_blocked(fresh_redis, calls, then, block_s) == [2]
        # No reply, and no time to wait for one: the call fails, but says why, and the
        # breaker does not count it.
        with fresh_redis.frozen():
            call = asyncio.ensure_future(store.eval(_COUNT, ["n"], []))
            hold_loop_once(lambda: waiting_for_reply(call), lambda: None, block_s)
            with pytest.raises(StoreUnavailable, match="this process was too busy") as busy:
                await call
        assert busy.value.__cause__ is not None  # it was sent: it may have been applied
        assert store.breaker.state == "closed"
        assert store.breaker._consecutive == 0
        await until_value(fresh_redis, store.prefix + "n", b"3")  # the given-up call ran
        assert await store.eval(_COUNT, ["n"], []) == 4
    finally:
        await store.close()


async def test_a_timed_out_call_may_have_been_applied(fresh_redis: RedisServer) -> None:
    # Redis runs a request it has read even if the client gave up on it: a timeout means
    # "unknown", and the error says the call was sent (the ledger then queues an undo).
    store = failing_store(fresh_redis)
    try:
        await store.eval(_COUNT, ["n"], [])
        with fresh_redis.frozen(), pytest.raises(StoreUnavailable, match="timed out") as timed_out:
            await store.eval(_COUNT, ["n"], [])
        assert timed_out.value.__cause__ is not None
        await until_value(fresh_redis, store.prefix + "n", b"2")
    finally:
        await store.close()

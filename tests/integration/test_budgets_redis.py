"""The budget ledger against real Redis: exact limits with many ledger instances (and processes)
sharing one Redis or a three-master cluster, expiry of abandoned holds, fail modes."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis, RedisCluster

from gateway.auth import Caller
from gateway.budgets.backends import Backend, Counter, EmbeddedBackend, RedisBackend
from gateway.budgets.errors import (
    BudgetExceeded,
    BudgetStoreUnavailable,
    QuotaExceeded,
    RateLimitExceeded,
)
from gateway.budgets.ledger import Ledger, Reservation
from gateway.budgets.plan import build_plan, cost_nano
from gateway.budgets.windows import window_at
from gateway.policy import Policy, StoreSettings
from gateway.store import RedisStore
from tests.support.redis import RedisCluster as ClusterProcess
from tests.support.redis import RedisServer, running_cluster
from tests.unit.test_budgets_ledger import PRICE, WORST, Clock, policy_with

pytestmark = pytest.mark.integration

CONCURRENT = 300
ADMITTED = 37


@dataclass(frozen=True)
class Target:
    url: str
    cluster: bool

    def store(self, **settings: Any) -> RedisStore:
        # Generous timeouts: 300 calls at once on a small CI box must not look like an outage.
        options = {"timeout_ms": 3000.0, "breaker_reset_s": 0.2, **settings}
        return RedisStore(StoreSettings(redis_url=self.url, cluster=self.cluster, **options))

    def client(self) -> Redis | RedisCluster:
        if self.cluster:
            return RedisCluster.from_url(self.url)
        return Redis.from_url(self.url)


@pytest.fixture(scope="module")
def budget_cluster() -> Iterator[ClusterProcess]:
    """Three masters on loopback, slots split evenly: a cluster of the module's own."""
    yield from running_cluster()


@pytest.fixture(params=["single", "cluster"])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "cluster":
        cluster: ClusterProcess = request.getfixturevalue("budget_cluster")
        return Target(cluster.url, True)
    server: RedisServer = request.getfixturevalue("redis_server")
    return Target(server.url, False)


@pytest.fixture
def single(redis_server: RedisServer) -> Target:
    return Target(redis_server.url, False)


def tenant_policy(name: str, tenant: dict[str, Any], **sections: Any) -> Policy:
    return policy_with(tenant, name=name, **sections)


async def reserve(ledger: Ledger, rid: str, tenant: str, tier: str = "cheap") -> Reservation:
    return await ledger.reserve(
        request_id=rid,
        caller=Caller(tenant, ledger.policy.tenants[tenant]),
        tier=tier,
        price=PRICE,
        prompt_tokens=100,
        max_tokens=400,
    )


@pytest.fixture
async def ledgers(target: Target) -> AsyncIterator[Callable[[Policy, int], list[Ledger]]]:
    """`make(policy, n)`: n ledgers, each on its own store (its own connections), one clock."""
    stores: list[RedisStore] = []
    clock = Clock(time.time())

    def make(policy: Policy, count: int) -> list[Ledger]:
        fresh = [target.store() for _ in range(count)]
        stores.extend(fresh)
        return [Ledger(store, policy, clock=clock) for store in fresh]

    yield make
    for store in stores:
        await store.close()


class Watch:
    """Samples one ledger's counters while a test runs: the highest settled+held seen.

    Stopped with a flag, not `cancel()`: on Python 3.11 redis-py's `asyncio.wait_for` can
    swallow a cancellation that lands as a reply arrives (CPython gh-86296), and the loop
    would then never end.
    """

    def __init__(self, target: Target, key: str, counters: list[str]) -> None:
        self.client, self.key, self.counters = target.client(), "triage:" + key, counters
        self.fields = [f"{c}#{part}" for c in counters for part in ("s", "h")]
        self.highest = dict.fromkeys(counters, 0)
        self.samples = 0
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    async def read(self) -> dict[str, tuple[int, int]]:
        numbers = [int(v or 0) for v in await self.client.hmget(self.key, self.fields)]
        return {c: (numbers[2 * i], numbers[2 * i + 1]) for i, c in enumerate(self.counters)}

    async def _sample(self) -> None:
        for counter, (settled, held) in (await self.read()).items():  # one atomic HMGET
            self.highest[counter] = max(self.highest[counter], settled + held)
        self.samples += 1

    async def _run(self) -> None:
        while not self._stop:
            await self._sample()
            await asyncio.sleep(0)

    async def __aenter__(self) -> Watch:
        await self._sample()  # connected (a cluster client has mapped its slots) before we go
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        assert self._task is not None
        await asyncio.wait_for(self._task, 10)
        await self.client.aclose()


def counter_names(policy: Policy, tenant: str, tier: str, now: float) -> list[list[str]]:
    plan = build_plan(policy, tenant, policy.tenants[tenant], tier)
    return [[c.counter(window_at(c.window, now)) for c in ledger.checks] for ledger in plan.ledgers]


async def admit_all(
    ledgers: list[Ledger], tenant: str, count: int = CONCURRENT
) -> tuple[list[Reservation], list[QuotaExceeded]]:
    async def one(i: int) -> Reservation | QuotaExceeded:
        try:
            return await reserve(ledgers[i % len(ledgers)], f"req-{i}", tenant)
        except QuotaExceeded as error:
            return error

    results = await asyncio.gather(*(one(i) for i in range(count)))
    return (
        [r for r in results if isinstance(r, Reservation)],
        [r for r in results if isinstance(r, QuotaExceeded)],
    )


@pytest.mark.parametrize(
    ("limit", "error"),
    [
        ({"budget": {"usd_per_day": (ADMITTED * WORST + WORST // 2) / 1e9}}, BudgetExceeded),
        ({"limits": {"tpm": ADMITTED * 500 + 250}}, RateLimitExceeded),
        ({"limits": {"rpm": ADMITTED}}, RateLimitExceeded),
    ],
    ids=["usd", "tpm", "rpm"],
)
async def test_concurrent_reservations_admit_exactly_what_fits(
    target: Target,
    ledgers: Callable[[Policy, int], list[Ledger]],
    limit: dict[str, Any],
    error: type[QuotaExceeded],
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    policy = tenant_policy(tenant, limit)
    fleet = ledgers(policy, 3)  # three "gateways", each with its own connections
    (names,) = counter_names(policy, tenant, "cheap", fleet[0]._clock())
    limit_value = build_plan(policy, tenant, policy.tenants[tenant], "cheap").ledgers[0].checks[0]
    key = build_plan(policy, tenant, policy.tenants[tenant], "cheap").ledgers[0].key
    async with Watch(target, key, names) as watch:
        admitted, refused = await admit_all(fleet, tenant)
        assert len(admitted) == ADMITTED and len(refused) == CONCURRENT - ADMITTED
        assert all(isinstance(e, error) for e in refused)
        rng = random.Random(7)
        real = [(100, rng.randint(0, 400)) for _ in admitted]
        await asyncio.gather(
            *(
                fleet[i % 3].settle(r, prompt_tokens=p, completion_tokens=c)
                for i, (r, (p, c)) in enumerate(zip(admitted, real, strict=True))
            )
        )
        final = await watch.read()
    assert watch.samples > 1
    assert watch.highest[names[0]] <= limit_value.limit
    settled, held = final[names[0]]
    assert held == 0
    expected = {
        "u": sum(cost_nano(PRICE, p, c) for p, c in real),
        "t": sum(p + c for p, c in real),
        "r": ADMITTED,
    }[limit_value.kind]
    assert settled == expected


async def test_a_global_tier_budget_is_exact_across_tenants(
    target: Target, ledgers: Callable[[Policy, int], list[Ledger]]
) -> None:
    tiers = {"cheap": {"usd_per_hour": (ADMITTED * WORST + WORST // 2) / 1e9}}
    tenants = [f"t-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    policy = policy_with(
        {},
        budgets={"tiers": tiers},
        tenants={name: {"limits": {"rpm": 1000}} for name in tenants},
    )
    fleet = ledgers(policy, 3)

    async def one(i: int) -> Reservation | QuotaExceeded:
        try:
            return await reserve(fleet[i % 3], f"req-{i}", tenants[(i // 3) % 3])
        except QuotaExceeded as error:
            return error

    results = await asyncio.gather(*(one(i) for i in range(CONCURRENT)))
    admitted = [r for r in results if isinstance(r, Reservation)]
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    assert len(admitted) == ADMITTED
    assert {(e.scope, e.code) for e in refused} == {("global_tier", "insufficient_quota")}
    # Refused requests gave their tenant holds back, request counts included.
    counted = 0
    for name in tenants:
        usage = await fleet[0].usage(name)
        counted += usage["rate_limits"][0]["used"]
    assert counted == ADMITTED
    for i, reservation in enumerate(admitted):
        await fleet[i % 3].settle(reservation, prompt_tokens=100, completion_tokens=100)
    shared = (await fleet[1].usage(tenants[0]))["budgets"]
    assert [(r["scope"], r["reserved_usd"]) for r in shared] == [("global_tier", 0.0)]
    assert shared[0]["spent_usd"] == pytest.approx(ADMITTED * 300_000 / 1e9)


# --- separate processes -------------------------------------------------------------------


def _gateway_process(
    url: str, tenant: str, limit_usd: float, barrier: Any, count: int, first: int
) -> tuple[int, int]:
    """One gateway process: `count` concurrent reservations, then (all processes done) settles.

    Settling frees headroom (real cost < worst case), so the phases are kept apart to make
    "exactly K admitted" a property of the reservations alone."""

    async def main() -> tuple[int, int]:
        policy = tenant_policy(tenant, {"budget": {"usd_per_day": limit_usd}})
        store = Target(url, False).store()
        ledger = Ledger(store, policy)
        await asyncio.to_thread(barrier.wait, 60)
        admitted, _ = await admit_all_from(ledger, tenant, first, count)
        await asyncio.to_thread(barrier.wait, 60)
        rng = random.Random(first)
        spent = 0
        for reservation in admitted:
            completion = rng.randint(0, 400)
            await ledger.settle(reservation, prompt_tokens=100, completion_tokens=completion)
            spent += cost_nano(PRICE, 100, completion)
        await ledger.close()
        await store.close()
        return len(admitted), spent

    return asyncio.run(main())


async def admit_all_from(
    ledger: Ledger, tenant: str, first: int, count: int
) -> tuple[list[Reservation], int]:
    async def one(i: int) -> Reservation | None:
        try:
            return await reserve(ledger, f"req-{i}", tenant)
        except QuotaExceeded:
            return None

    results = await asyncio.gather(*(one(first + i) for i in range(count)))
    admitted = [r for r in results if r is not None]
    return admitted, count - len(admitted)


def test_three_gateway_processes_share_one_budget_exactly(single: Target) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    limit_usd = (ADMITTED * WORST + WORST // 2) / 1e9
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(3, mp_context=context) as pool:
        barrier = manager.Barrier(3)
        futures = [
            pool.submit(_gateway_process, single.url, tenant, limit_usd, barrier, 100, 100 * i)
            for i in range(3)
        ]
        results = [f.result(timeout=120) for f in futures]
    assert sum(n for n, _ in results) == ADMITTED
    policy = tenant_policy(tenant, {"budget": {"usd_per_day": limit_usd}})
    (names,) = counter_names(policy, tenant, "cheap", time.time())
    client = redis.Redis.from_url(single.url)
    fields = [names[0] + "#s", names[0] + "#h"]
    settled, held = (int(v or 0) for v in client.hmget(f"triage:bud:{{t:{tenant}}}", fields))
    client.close()
    assert (settled, held) == (sum(s for _, s in results), 0)


def _hold_and_hang(url: str, tenant: str, limit_usd: float, held: Any) -> None:
    async def main() -> None:
        policy = tenant_policy(
            tenant, {"budget": {"usd_per_day": limit_usd}}, budgets={"reservation_ttl_s": 1.0}
        )
        ledger = Ledger(Target(url, False).store(), policy)
        await reserve(ledger, "doomed", tenant)
        held.set()
        await asyncio.sleep(3600)  # killed here, never settles

    asyncio.run(main())


async def test_a_killed_gateways_hold_expires_after_its_ttl(single: Target) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    limit_usd = WORST / 1e9  # room for exactly one request
    context = multiprocessing.get_context("spawn")
    held = context.Event()
    process = context.Process(target=_hold_and_hang, args=(single.url, tenant, limit_usd, held))
    process.start()
    try:
        assert await asyncio.to_thread(held.wait, 30)
    finally:
        process.kill()
        process.join()
    store = single.store()
    policy = tenant_policy(
        tenant, {"budget": {"usd_per_day": limit_usd}}, budgets={"reservation_ttl_s": 1.0}
    )
    ledger = Ledger(store, policy)
    with pytest.raises(BudgetExceeded):
        await reserve(ledger, "next", tenant)
    await asyncio.sleep(1.1)
    reservation = await reserve(ledger, "next", tenant)  # the dead hold stopped counting
    await ledger.settle(reservation, prompt_tokens=100, completion_tokens=400)
    day = (await ledger.usage(tenant))["budgets"][0]
    assert (day["spent_usd"], day["reserved_usd"]) == (WORST / 1e9, 0.0)
    await store.close()


# --- Redis trouble ------------------------------------------------------------------------


def fresh_target(server: RedisServer) -> Target:
    return Target(server.url, False)


async def test_fail_closed_answers_503_fast_while_redis_is_down(fresh_redis: RedisServer) -> None:
    store = fresh_target(fresh_redis).store(timeout_ms=50.0, breaker_reset_s=0.2)
    policy = tenant_policy("acme", {"limits": {"rpm": 100}})
    ledger = Ledger(store, policy)
    await reserve(ledger, "before", "acme")
    fresh_redis.kill()
    for i in range(5):
        started = time.perf_counter()
        with pytest.raises(BudgetStoreUnavailable) as caught:
            await reserve(ledger, f"down-{i}", "acme")
        assert time.perf_counter() - started < 0.5
        assert (caught.value.status_code, caught.value.code) == (503, "budget_store_unavailable")
    fresh_redis.start()
    # The breaker lets a probe through after 0.2 s; on a loaded machine the restarted
    # server may miss the 50 ms timeout once or twice, so requests keep coming a while.
    deadline = time.monotonic() + 10.0
    while True:
        try:
            await reserve(ledger, f"after-{uuid.uuid4().hex[:6]}", "acme")
            break
        except BudgetStoreUnavailable:
            assert time.monotonic() < deadline, "Redis did not answer again"
            await asyncio.sleep(0.05)
    await store.close()


async def test_a_paused_redis_never_hangs_a_request(fresh_redis: RedisServer) -> None:
    store = fresh_target(fresh_redis).store(timeout_ms=50.0)
    ledger = Ledger(store, tenant_policy("acme", {"limits": {"rpm": 100}}))
    await reserve(ledger, "warm", "acme")
    with fresh_redis.frozen():
        started = time.perf_counter()
        with pytest.raises(BudgetStoreUnavailable):
            await reserve(ledger, "paused", "acme")
        assert time.perf_counter() - started < 0.3
    await store.close()


async def test_fail_open_serves_through_a_restart_and_reconciles(
    fresh_redis: RedisServer,
) -> None:
    store = fresh_target(fresh_redis).store(timeout_ms=50.0, breaker_reset_s=0.2)
    policy = tenant_policy(
        "acme",
        {"limits": {"rpm": 100}, "budget": {"usd_per_day": 1.0}},
        budgets={"failure_mode": "fail_open"},
    )
    ledger = Ledger(store, policy)
    before = await reserve(ledger, "before", "acme")  # held in Redis
    fresh_redis.kill()
    during = await reserve(ledger, "during", "acme")  # served unchecked, counted locally
    assert during.unchecked and not before.unchecked
    await ledger.settle(before, prompt_tokens=100, completion_tokens=100)
    await ledger.settle(during, prompt_tokens=100, completion_tokens=200)
    assert ledger.pending == 2
    fresh_redis.start()  # an empty Redis: whatever it held is gone
    # The breaker lets calls through again after 0.2 s; on a loaded machine the restarted
    # server may take longer to answer, so the flush is retried for a while.
    deadline = asyncio.get_running_loop().time() + 10.0
    while (left := await ledger.flush()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    assert left == 0
    usage = await ledger.usage("acme")
    assert usage["budgets"][0]["spent_usd"] == pytest.approx(
        (cost_nano(PRICE, 100, 100) + cost_nano(PRICE, 100, 200)) / 1e9
    )
    assert usage["budgets"][0]["reserved_usd"] == 0
    # "during" is counted now; "before" was counted in the Redis that was lost.
    assert usage["rate_limits"][0]["used"] == 1
    await store.close()


async def test_a_settle_queued_while_redis_was_down_is_replayed_in_the_background(
    fresh_redis: RedisServer,
) -> None:
    """Nobody calls `flush`: the first store call that succeeds again starts the replay."""
    loop = asyncio.get_running_loop()
    store = fresh_target(fresh_redis).store(timeout_ms=50.0, breaker_reset_s=0.2)
    policy = tenant_policy("acme", {"limits": {"rpm": 100}, "budget": {"usd_per_day": 1.0}})
    ledger = Ledger(store, policy)
    held = await reserve(ledger, "held", "acme")
    fresh_redis.kill()
    await ledger.settle(held, prompt_tokens=100, completion_tokens=100)  # never raises
    assert ledger.pending == 1
    fresh_redis.start()  # an empty Redis: the settle records the cost in the held window
    deadline = loop.time() + 10.0
    while True:  # a request comes in; the breaker lets one through after 0.2 s
        try:
            await reserve(ledger, f"after-{uuid.uuid4().hex[:6]}", "acme")
            break
        except BudgetStoreUnavailable:
            assert loop.time() < deadline, "Redis did not answer again"
            await asyncio.sleep(0.05)
    while ledger.pending and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert ledger.pending == 0
    usage = await ledger.usage("acme")
    assert usage["budgets"][0]["spent_usd"] == pytest.approx(cost_nano(PRICE, 100, 100) / 1e9)
    assert usage["pending_settlements"] == 0
    await store.close()


# --- Lua and Python agree -----------------------------------------------------------------


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 5), st.integers(0, 900), st.integers(0, 90)),
        st.tuples(
            st.just("settle"),
            st.integers(0, 5),
            st.integers(0, 900),
            st.integers(0, 90),
            st.booleans(),
        ),
        st.tuples(st.just("cancel"), st.integers(0, 5)),
        st.tuples(st.just("wait"), st.integers(1, 1500)),
    ),
    max_size=30,
)


@settings(
    max_examples=300,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=_OPS)
def test_lua_and_python_ledgers_agree(
    redis_server: RedisServer, ops: list[tuple[Any, ...]]
) -> None:
    asyncio.run(_compare(redis_server.url, ops))


async def _compare(url: str, ops: list[tuple[Any, ...]]) -> None:
    store = Target(url, False).store()
    backends: list[Backend] = [RedisBackend(store), EmbeddedBackend()]
    key = f"bud:{{t:diff-{uuid.uuid4().hex}}}"
    now = int(time.time() * 1000)
    counters = (
        Counter("u:minute:a:*", "u", 2000, now + 2000),  # this window ends during the run
        Counter("t:minute:a:*", "t", 200, now + 60_000),
        Counter("r:minute:a:*", "r", 4, now + 60_000),
    )
    try:
        for op in ops:
            answers: list[object] = []
            for backend in backends:
                if op[0] == "reserve":
                    answers.append(
                        await backend.reserve(
                            key, now, f"q{op[1]}", now + 1000, op[2], op[3], counters
                        )
                    )
                elif op[0] == "settle":
                    answers.append(
                        await backend.settle(
                            key, now, f"q{op[1]}", now + 1000, op[2], op[3], op[4], counters
                        )
                    )
                elif op[0] == "cancel":
                    answers.append(await backend.cancel(key, now, f"q{op[1]}"))
            if op[0] == "wait":
                now += op[1]
            else:
                assert answers[0] == answers[1], op
            names = [c.name for c in counters]
            assert await backends[0].read(key, now, names) == await backends[1].read(
                key, now, names
            )
    finally:
        await store.close()

"""The response cache over real Redis and a Redis Cluster: across gateways, and Redis failing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from redis.crc import key_slot

from gateway.cache.plan import CachePlan, CacheStatus
from gateway.cache.replay import render_json
from gateway.cache.response_cache import ResponseCache
from gateway.policy import CacheSettings, StoreSettings
from gateway.store import RedisStore
from tests.support.redis import RedisCluster, RedisServer

pytestmark = pytest.mark.integration

BODY = {"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def stream_events(text: str) -> list[bytes]:
    def sse(payload: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**HEAD, "choices": [choice]})

    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    return [
        chunk({"role": "assistant", "content": text}),
        chunk({}, "stop"),
        sse({**HEAD, "choices": [], "usage": usage}),
        b"data: [DONE]\n\n",
    ]


def plan_for(cache: ResponseCache, scope: str = "team-a", model: str = "llama-8b") -> CachePlan:
    return cache.plan(scope=scope, tier="cheap", model=model, kind="chat", body=BODY, headers={})


def store_settings(backend: str, request: pytest.FixtureRequest, prefix: str) -> StoreSettings:
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return StoreSettings(redis_url=server.url, key_prefix=prefix, timeout_ms=500)
    cluster: RedisCluster = request.getfixturevalue("redis_cluster")
    return StoreSettings(redis_url=cluster.url, cluster=True, key_prefix=prefix, timeout_ms=500)


@pytest.fixture(params=["redis", "cluster"])
async def gateways(request: pytest.FixtureRequest) -> AsyncIterator[list[ResponseCache]]:
    """Two gateway processes' caches: one Redis, separate clients and connections."""
    settings = store_settings(request.param, request, f"test-{uuid.uuid4().hex[:8]}:")
    stores = [RedisStore(settings), RedisStore(settings)]
    try:
        yield [ResponseCache(store, CacheSettings()) for store in stores]
    finally:
        await stores[0].delete_matching("*")
        for store in stores:
            await store.close()


class Upstream:
    def __init__(self) -> None:
        self.calls = 0

    async def answer(self, cache: ResponseCache, plan: CachePlan) -> str:
        found = await cache.lookup(plan)
        if found.entry is not None:
            response = orjson.loads(render_json(found.entry))
            return "hit:" + str(response["choices"][0]["message"]["content"])
        try:
            self.calls += 1
            await asyncio.sleep(0.05)
            for event in stream_events(f"answer {self.calls}"):
                found.recorder.feed_event(event)
            await found.recorder.commit()
            return "upstream"
        finally:
            await found.recorder.abandon()


async def test_one_leader_across_two_gateways(gateways: list[ResponseCache]) -> None:
    upstream = Upstream()
    calls = [upstream.answer(gateways[i % 2], plan_for(gateways[i % 2])) for i in range(20)]
    results = await asyncio.gather(*calls)
    assert upstream.calls == 1
    assert sorted(results) == ["hit:answer 1"] * 19 + ["upstream"]


async def test_entry_written_by_one_gateway_is_a_hit_on_the_other(
    gateways: list[ResponseCache],
) -> None:
    first, second = gateways
    found = await first.lookup(plan_for(first))
    for event in stream_events("shared"):
        found.recorder.feed_event(event)
    assert await found.recorder.commit()
    hit = await second.lookup(plan_for(second))
    assert hit.status is CacheStatus.HIT and hit.entry is not None
    assert hit.entry.usage is not None and hit.entry.usage.prompt_tokens == 3


async def test_failed_leader_on_one_gateway_frees_the_other(
    gateways: list[ResponseCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = gateways
    leader = await first.lookup(plan_for(first))
    assert leader.recorder.leader
    # The second gateway found the lock taken: from then on it is waiting, not leading.
    refused = asyncio.Event()
    take_lock = second.store.set_if_absent

    async def watched_take_lock(key: str, value: bytes, ttl_s: float) -> bool:
        taken = await take_lock(key, value, ttl_s)
        if not taken:
            refused.set()
        return taken

    monkeypatch.setattr(second.store, "set_if_absent", watched_take_lock)
    waiter = asyncio.ensure_future(second.lookup(plan_for(second)))
    await asyncio.wait_for(refused.wait(), 5.0)
    assert not waiter.done()
    started = time.perf_counter()
    await leader.recorder.abandon()
    took_over = await waiter
    assert took_over.recorder.leader and time.perf_counter() - started < 0.1
    await took_over.recorder.abandon()


async def test_invalidate_by_tenant_across_every_master(gateways: list[ResponseCache]) -> None:
    cache = gateways[0]
    for i in range(30):  # thirty models: the digests spread over every slot range
        for scope in ("team-a", "team-b"):
            found = await cache.lookup(plan_for(cache, scope=scope, model=f"model-{i}"))
            for event in stream_events("x"):
                found.recorder.feed_event(event)
            assert await found.recorder.commit()
    assert await cache.invalidate("team-a", None) == 30
    assert (await cache.lookup(plan_for(cache, "team-b", "model-7"))).status is CacheStatus.HIT
    assert await cache.invalidate(None, "model-7") == 1
    assert await cache.invalidate(None, None) == 29


def test_entry_and_lock_share_a_cluster_slot() -> None:
    cache = ResponseCache(None, CacheSettings())  # type: ignore[arg-type]
    for i in range(50):
        plan = plan_for(cache, scope=f"tenant-{i}", model="org/model:v1")
        prefixed = ["triage:" + plan.key, "triage:" + plan.lock_key]
        assert key_slot(prefixed[0].encode()) == key_slot(prefixed[1].encode())


# --- Redis failing: the cache fails open, and comes back by itself ----------------------

TIMEOUT_MS = 50


@pytest.fixture
async def fragile_cache(fresh_redis: RedisServer) -> AsyncIterator[ResponseCache]:
    settings = StoreSettings(
        redis_url=fresh_redis.url,
        timeout_ms=TIMEOUT_MS,
        breaker_failures=3,
        breaker_reset_s=0.3,
    )
    store = RedisStore(settings)
    try:
        yield ResponseCache(store, CacheSettings())
    finally:
        await store.close()


async def timed_request(cache: ResponseCache) -> tuple[float, CacheStatus, bool]:
    """One request's cache work (lookup, then commit or abandon); never raises."""
    started = time.perf_counter()
    found = await cache.lookup(plan_for(cache))
    stored = False
    if found.entry is None:
        for event in stream_events("fresh"):
            found.recorder.feed_event(event)
        stored = await found.recorder.commit()
        await found.recorder.abandon()
    return time.perf_counter() - started, found.status, stored


def breaker_open(cache: ResponseCache) -> bool:
    store = cache.store
    return isinstance(store, RedisStore) and store.breaker.state == "open"


def typical(results: list[tuple[float, CacheStatus, bool]]) -> float:
    """The median request's seconds: a loaded machine's preemption (a few ms) may land in
    any one request; the breaker's effect shows in the typical one."""
    return sorted(seconds for seconds, _, _ in results)[len(results) // 2]


async def eventually_cached(
    cache: ResponseCache, done: Callable[[tuple[float, CacheStatus, bool]], bool]
) -> bool:
    """Requests until one's cache work is `done`, for up to 10 s. The breaker lets one
    through 0.3 s after it opened; on a loaded machine that probe may miss its 50 ms."""
    deadline = time.monotonic() + 10
    while not done(await timed_request(cache)):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_killed_redis_costs_little_and_caching_resumes_by_itself(
    fresh_redis: RedisServer, fragile_cache: ResponseCache
) -> None:
    assert (await timed_request(fragile_cache))[2] is True
    assert (await timed_request(fragile_cache))[1] is CacheStatus.HIT
    fresh_redis.kill()
    results = [await timed_request(fragile_cache) for _ in range(20)]
    assert all(status is CacheStatus.MISS and not stored for _, status, stored in results)
    assert all(seconds < 2 * TIMEOUT_MS / 1000 for seconds, _, _ in results)
    assert breaker_open(fragile_cache)
    assert typical(results[3:]) < 0.002  # the breaker is open: nothing waits on Redis
    fresh_redis.start()
    assert await eventually_cached(fragile_cache, lambda r: r[2])  # written again by itself
    assert (await timed_request(fragile_cache))[1] is CacheStatus.HIT


async def test_paused_redis_costs_each_request_at_most_the_timeouts(
    fresh_redis: RedisServer, fragile_cache: ResponseCache
) -> None:
    await timed_request(fragile_cache)
    with fresh_redis.frozen():
        results = [await timed_request(fragile_cache) for _ in range(5)]
    # a lookup GET times out, then (breaker still closed) the write SET does too
    assert all(seconds < 2 * TIMEOUT_MS / 1000 + 0.3 for seconds, _, _ in results), results
    assert all(status is CacheStatus.MISS for _, status, _ in results)
    assert breaker_open(fragile_cache)
    assert typical(results[2:]) < 0.002, results
    assert await eventually_cached(fragile_cache, lambda r: r[1] is CacheStatus.HIT)

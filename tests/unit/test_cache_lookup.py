"""The cache on the request path, over the embedded store: hits, recording, single-flight."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from gateway.api.errors import sse_error_event
from gateway.cache.plan import CachePlan, CacheStatus
from gateway.cache.replay import render_events, render_json
from gateway.cache.response_cache import Lookup, ResponseCache
from gateway.errors import UpstreamError
from gateway.policy import CacheSettings, StoreSettings
from gateway.store import EmbeddedStore, StoreUnavailable
from tests.support.fakes import REPLICA, FakeResponse

BODY = {"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def stream_events(text: str = "Hello") -> list[bytes]:
    """What the answer's relay yields for a client that asked for usage."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**HEAD, "choices": [choice], "usage": None})

    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": text}),
        chunk({}, "stop"),
        sse({**HEAD, "choices": [], "usage": USAGE}),
        b"data: [DONE]\n\n",
    ]


def json_body(text: str = "Hello") -> bytes:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    body = {**HEAD, "object": "chat.completion", "choices": [choice], "usage": USAGE}
    return orjson.dumps(body)


def new_cache(**settings: Any) -> ResponseCache:
    store = EmbeddedStore(StoreSettings())
    return ResponseCache(store, CacheSettings(**settings))


def plan_for(
    cache: ResponseCache,
    headers: dict[str, str] | None = None,
    scope: str = "team-a",
    body: dict[str, Any] | None = None,
) -> CachePlan:
    return cache.plan(
        scope=scope,
        tier="cheap",
        model="llama-8b",
        kind="chat",
        body=body or BODY,
        headers=headers or {},
    )


async def fill(cache: ResponseCache, plan: CachePlan, events: list[bytes] | None = None) -> None:
    found = await cache.lookup(plan)
    assert found.status is CacheStatus.MISS and found.recorder.leader
    for event in events or stream_events():
        found.recorder.feed_event(event)
    assert await found.recorder.commit()


def content_of(found: Lookup) -> str:
    assert found.entry is not None
    text: str = orjson.loads(render_json(found.entry))["choices"][0]["message"]["content"]
    return text


# --- hits and misses ----------------------------------------------------------------


async def test_stream_then_hit() -> None:
    cache = new_cache()
    plan = plan_for(cache)
    await fill(cache, plan)
    found = await cache.lookup(plan)
    assert found.status is CacheStatus.HIT and content_of(found) == "Hello"
    assert found.entry is not None and found.entry.usage is not None
    assert found.entry.usage.total_tokens == 5
    assert len(render_events(found.entry, include_usage=True)) == 5
    assert not found.recorder.leader


async def test_json_body_then_hit() -> None:
    cache = new_cache()
    plan = plan_for(cache)
    found = await cache.lookup(plan)
    found.recorder.feed_body(json_body("Hey"))
    assert await found.recorder.commit()
    assert content_of(await cache.lookup(plan)) == "Hey"


async def test_tenants_do_not_share_entries() -> None:
    cache = new_cache()
    await fill(cache, plan_for(cache, scope="team-a"))
    other = await cache.lookup(plan_for(cache, scope="team-b"))
    assert other.status is CacheStatus.MISS
    await other.recorder.abandon()


async def test_interrupted_stream_is_never_stored_and_frees_the_lock() -> None:
    cache = new_cache()
    plan = plan_for(cache)
    found = await cache.lookup(plan)
    for event in stream_events()[:3]:  # no [DONE]: the client left, or the backend died
        found.recorder.feed_event(event)
    assert await found.recorder.commit() is False
    again = await cache.lookup(plan)
    assert again.status is CacheStatus.MISS and again.recorder.leader  # not left waiting


async def test_stream_that_failed_midway_is_never_stored() -> None:
    cache = new_cache()
    plan = plan_for(cache)
    found = await cache.lookup(plan)
    for event in stream_events()[:2]:
        found.recorder.feed_event(event)
    # how a failed stream ends for the client: an error event, then [DONE]
    found.recorder.feed_event(sse_error_event(UpstreamError("backend died")))
    assert await found.recorder.commit() is False
    assert (await cache.lookup(plan)).status is CacheStatus.MISS


async def test_events_without_blank_lines_and_comments_are_fine() -> None:
    cache = new_cache()
    plan = plan_for(cache)
    found = await cache.lookup(plan)
    found.recorder.feed_event(b": keep-alive\n\n")
    for event in stream_events():
        found.recorder.feed_event(event.rstrip(b"\n"))
    assert await found.recorder.commit()
    assert content_of(await cache.lookup(plan)) == "Hello"


async def test_commit_and_abandon_are_idempotent() -> None:
    cache = new_cache()
    plan = plan_for(cache)
    found = await cache.lookup(plan)
    for event in stream_events():
        found.recorder.feed_event(event)
    assert await found.recorder.commit()
    assert await found.recorder.commit() is False
    await found.recorder.abandon()
    await found.recorder.abandon()
    assert (await cache.lookup(plan)).status is CacheStatus.HIT


async def test_abandon_stores_nothing() -> None:
    cache = new_cache()
    plan = plan_for(cache)
    found = await cache.lookup(plan)
    for event in stream_events():
        found.recorder.feed_event(event)
    await found.recorder.abandon()
    assert await found.recorder.commit() is False
    assert (await cache.lookup(plan)).status is CacheStatus.MISS


async def test_entries_over_the_size_limit_are_not_stored() -> None:
    cache = new_cache(max_entry_bytes=2000)
    plan = plan_for(cache)
    found = await cache.lookup(plan)
    for event in stream_events("x" * 3000):
        found.recorder.feed_event(event)
    assert await found.recorder.commit() is False
    found = await cache.lookup(plan)
    found.recorder.feed_body(json_body("y" * 3000))
    assert await found.recorder.commit() is False
    assert (await cache.lookup(plan)).status is CacheStatus.MISS


async def test_a_huge_stream_stops_buffering() -> None:
    cache = new_cache(max_entry_bytes=1000)
    found = await cache.lookup(plan_for(cache))
    for _ in range(1000):
        found.recorder.feed_event(stream_events("z" * 100)[1])
    assert found.recorder._events == []  # gave up long ago; memory stays bounded
    await found.recorder.abandon()


async def test_no_store_looks_up_but_never_writes_or_locks() -> None:
    cache = new_cache()
    plan = plan_for(cache, {"cache-control": "no-store"})
    found = await cache.lookup(plan)
    assert found.status is CacheStatus.MISS and not found.recorder.leader
    other = await asyncio.wait_for(cache.lookup(plan_for(cache)), 0.1)  # nobody waits on it
    assert other.recorder.leader
    await other.recorder.abandon()
    for event in stream_events():
        found.recorder.feed_event(event)
    assert await found.recorder.commit() is False
    await fill(cache, plan_for(cache))
    assert (await cache.lookup(plan)).status is CacheStatus.HIT


async def test_no_cache_skips_the_lookup_but_refreshes_the_entry() -> None:
    cache = new_cache()
    await fill(cache, plan_for(cache), stream_events("old"))
    plan = plan_for(cache, {"cache-control": "no-cache"})
    found = await cache.lookup(plan)
    assert found.status is CacheStatus.BYPASS and found.entry is None
    for event in stream_events("new"):
        found.recorder.feed_event(event)
    assert await found.recorder.commit()
    assert content_of(await cache.lookup(plan_for(cache))) == "new"


async def test_uncacheable_request_never_touches_the_store() -> None:
    class NoStore:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"store.{name} used")

    cache = ResponseCache(NoStore(), CacheSettings())
    plan = plan_for(cache, body={**BODY, "temperature": 1})
    found = await cache.lookup(plan)
    assert found.status is CacheStatus.BYPASS
    found.recorder.feed_event(stream_events()[0])
    assert await found.recorder.commit() is False
    await found.recorder.abandon()


async def test_invalidate_by_scope_model_or_all() -> None:
    cache = new_cache()
    for scope in ("team-a", "team-b"):
        for model in ("m1", "m2"):
            plan = cache.plan(
                scope=scope, tier="cheap", model=model, kind="chat", body=BODY, headers={}
            )
            await fill(cache, plan)
    assert await cache.invalidate("team-a", "m1") == 1
    assert await cache.invalidate("team-a", None) == 1
    assert await cache.invalidate(None, "m2") == 1
    assert await cache.invalidate() == 1
    assert await cache.invalidate() == 0


# --- single-flight -----------------------------------------------------------------


class Upstream:
    """Counts requests; each takes `delay` seconds and streams `text`."""

    def __init__(self, delay: float = 0.05) -> None:
        self.calls = 0
        self.delay = delay

    async def answer(self, cache: ResponseCache, plan: CachePlan, fail: bool = False) -> str:
        found = await cache.lookup(plan)
        if found.entry is not None:
            return "hit:" + content_of(found)
        recorder = found.recorder
        try:
            self.calls += 1
            await asyncio.sleep(self.delay)
            if fail:
                return "failed"
            for event in stream_events(f"answer {self.calls}"):
                recorder.feed_event(event)
            await recorder.commit()
            return "upstream"
        finally:
            await recorder.abandon()


async def test_concurrent_misses_send_one_request_upstream() -> None:
    cache = new_cache()
    upstream = Upstream()
    plan = plan_for(cache)
    started = time.perf_counter()
    results = await asyncio.gather(*(upstream.answer(cache, plan) for _ in range(20)))
    elapsed = time.perf_counter() - started
    assert upstream.calls == 1
    assert sorted(results) == ["hit:answer 1"] * 19 + ["upstream"]
    assert elapsed < upstream.delay + 0.1  # followers notice the entry within a poll or two


async def test_failed_leader_releases_followers_quickly() -> None:
    cache = new_cache()
    upstream = Upstream(delay=0.05)
    plan = plan_for(cache)
    leader = asyncio.ensure_future(upstream.answer(cache, plan, fail=True))
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    followers = await asyncio.gather(*(upstream.answer(cache, plan) for _ in range(10)))
    assert await leader == "failed"
    # one follower took over as soon as the lock was freed; the rest got its answer
    assert upstream.calls == 2
    assert sorted(followers) == ["hit:answer 2"] * 9 + ["upstream"]
    assert time.perf_counter() - started < 2 * upstream.delay + 0.15


async def test_crashed_leader_holds_followers_at_most_the_wait() -> None:
    cache = new_cache(single_flight_wait_s=0.2)
    plan = plan_for(cache)
    crashed = await cache.lookup(plan)  # takes the lock, then never commits nor abandons
    assert crashed.recorder.leader
    started = time.perf_counter()
    follower = await cache.lookup(plan)
    waited = time.perf_counter() - started
    assert follower.status is CacheStatus.MISS and follower.recorder.leader
    assert 0.15 < waited < 0.35
    await follower.recorder.abandon()


async def test_single_flight_off_sends_everyone_upstream() -> None:
    cache = new_cache(single_flight=False)
    upstream = Upstream(delay=0.02)
    plan = plan_for(cache)
    results = await asyncio.gather(*(upstream.answer(cache, plan) for _ in range(5)))
    assert upstream.calls == 5 and results == ["upstream"] * 5


async def test_waiting_follower_can_be_cancelled() -> None:
    cache = new_cache()
    plan = plan_for(cache)
    leader = await cache.lookup(plan)
    waiter = asyncio.ensure_future(cache.lookup(plan))
    await asyncio.sleep(0.02)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await leader.recorder.abandon()


# --- the store failing: fail open --------------------------------------------------


class BrokenStore:
    """Every call fails the way `RedisStore` fails when Redis is down."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        async def fail(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            raise StoreUnavailable(f"{name}: redis is down")

        return fail


async def test_a_broken_store_is_a_miss_and_a_skipped_write() -> None:
    store = BrokenStore()
    cache = ResponseCache(store, CacheSettings())
    found = await cache.lookup(plan_for(cache))
    assert found.status is CacheStatus.MISS and found.entry is None
    for event in stream_events():
        found.recorder.feed_event(event)
    assert await found.recorder.commit() is False
    await found.recorder.abandon()
    assert store.calls == 2  # one GET, one SET: no waiting on a lock it could not take


async def test_store_failing_after_the_lock_still_releases_followers() -> None:
    cache = new_cache()
    plan = plan_for(cache)
    found = await cache.lookup(plan)
    assert found.recorder.leader

    async def broken_set(key: str, value: bytes, ttl_s: float) -> None:
        raise StoreUnavailable("redis went away")

    cache.store.set = broken_set  # type: ignore[method-assign]
    for event in stream_events():
        found.recorder.feed_event(event)
    assert await found.recorder.commit() is False
    assert (await cache.lookup(plan)).recorder.leader  # the lock was released anyway


async def test_invalidate_reports_a_broken_store() -> None:
    cache = ResponseCache(BrokenStore(), CacheSettings())
    with pytest.raises(StoreUnavailable):
        await cache.invalidate("team-a", None)


# --- wired to the real relay, as `app.py` does ----------------------------------------


async def relay_into(recorder: Any, body: bytes, strip_usage_chunk: bool) -> list[bytes]:
    from collections.abc import AsyncIterator

    from gateway.dispatch.answer import relay_events
    from gateway.upstream import Outcome, UpstreamResponse
    from tests.support.relay import client_sees

    outcome = Outcome()
    response: Any = FakeResponse(body)
    batches = UpstreamResponse(response, REPLICA).events()

    async def recorded() -> AsyncIterator[bytes]:
        async for event in relay_events(batches, outcome, strip_usage_chunk):
            recorder.feed_event(event)
            yield event

    relayed = await client_sees(recorded())
    if outcome.completed and outcome.error is None:
        await recorder.commit(usage=outcome.usage)
    await recorder.abandon()
    return relayed


@pytest.mark.parametrize("client_wants_usage", [True, False])
async def test_recording_what_the_relay_yields(client_wants_usage: bool) -> None:
    cache = new_cache()
    plan = plan_for(cache)
    found = await cache.lookup(plan)
    relayed = await relay_into(
        found.recorder, b"".join(stream_events("relayed")), not client_wants_usage
    )
    assert relayed[-1] == b"data: [DONE]\n\n"
    hit = await cache.lookup(plan)
    assert hit.entry is not None and content_of(hit) == "relayed"
    assert hit.entry.usage is not None and hit.entry.usage.total_tokens == 5  # even if stripped
    replayed = render_events(hit.entry, include_usage=client_wants_usage)
    assert [orjson.loads(e[6:]) for e in replayed[:-1]] == [
        orjson.loads(e[6:]) for e in relayed[:-1]
    ]


async def test_a_stream_the_relay_saw_break_is_not_recorded() -> None:
    cache = new_cache()
    plan = plan_for(cache)
    found = await cache.lookup(plan)
    cut = b"".join(stream_events("cut")[:2])  # the backend closed the stream early
    relayed = await relay_into(found.recorder, cut, strip_usage_chunk=True)
    assert b'"error"' in relayed[-1]
    assert (await cache.lookup(plan)).status is CacheStatus.MISS

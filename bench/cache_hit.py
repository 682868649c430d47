"""Cache-hit cost inside the gateway process: lookup + decode + render, no HTTP.

    python bench/cache_hit.py                      # embedded store
    python bench/cache_hit.py redis://127.0.0.1:6379/0

Stores one streamed answer (`--tokens` chunks) and one JSON answer, then times hits
replayed as JSON and as SSE. End-to-end hit latency through the gateway is measured
separately (HTTP, auth and routing included).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import orjson

from gateway.cache.replay import render_events, render_json
from gateway.cache.response_cache import ResponseCache
from gateway.policy import CacheSettings, StoreSettings
from gateway.store import open_store

HEAD = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def stream_events(tokens: int) -> list[bytes]:
    def event(delta: dict[str, object], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps({**HEAD, "choices": [choice], "usage": None}) + b"\n\n"

    usage = {"prompt_tokens": 50, "completion_tokens": tokens, "total_tokens": 50 + tokens}
    return [
        event({"role": "assistant", "content": ""}),
        *(event({"content": f" word{i}"}) for i in range(tokens)),
        event({}, "stop"),
        b"data: " + orjson.dumps({**HEAD, "choices": [], "usage": usage}) + b"\n\n",
        b"data: [DONE]\n\n",
    ]


async def timed(label: str, runs: int, call: Callable[[], Awaitable[object]]) -> None:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1e6)
    samples.sort()
    p50, p99 = statistics.median(samples), samples[int(len(samples) * 0.99) - 1]
    print(f"{label:<40} p50 {p50:8.1f} us   p99 {p99:8.1f} us")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("redis_url", nargs="?", default=None)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    store = open_store(StoreSettings(redis_url=args.redis_url, key_prefix="bench:"))
    cache = ResponseCache(store, CacheSettings())
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    plan = cache.plan(scope="bench", tier="t", model="m", kind="chat", body=body, headers={})
    try:
        found = await cache.lookup(plan)
        for event in stream_events(args.tokens):
            found.recorder.feed_event(event)
        assert await found.recorder.commit(), "the entry was not stored"

        async def hit_json() -> bytes:
            entry = (await cache.lookup(plan)).entry
            assert entry is not None
            return render_json(entry)

        async def hit_stream() -> list[bytes]:
            entry = (await cache.lookup(plan)).entry
            assert entry is not None
            return render_events(entry, include_usage=True)

        print(f"store: {args.redis_url or 'embedded'}; streamed entry of {args.tokens} chunks")
        await timed("hit, replayed as JSON", args.runs, hit_json)
        await timed("hit, replayed as SSE", args.runs, hit_stream)
    finally:
        await cache.invalidate("bench", None)
        await store.close()


if __name__ == "__main__":
    asyncio.run(main())

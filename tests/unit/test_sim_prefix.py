"""Unit tests for the sim's prefix cache: gateway.sim.kvcache and how the engine uses it."""

from __future__ import annotations

import asyncio

import pytest

from gateway.sim.engine import SimEngine
from gateway.sim.kvcache import KVCache, block_hashes
from gateway.sim.metrics import SimMetrics
from gateway.sim.profile import SimProfile
from gateway.sim.protocol import chat_prompt

MODEL = "sim-model"


def _engine(kv_blocks: int = 64, block_size: int = 16) -> SimEngine:
    profile = SimProfile(
        model=MODEL,
        ttft_ms=10.0,
        prefill_ms_per_token=1.0,
        itl_ms=0.0,
        max_num_seqs=8,
        max_model_len=kv_blocks * block_size,
        kv_blocks=kv_blocks,
        block_size=block_size,
    )
    return SimEngine(profile)


def _prompt(start: int, tokens: int) -> list[int]:
    return list(range(start, start + tokens))


# -- block hashes --------------------------------------------------------------------------


def test_each_full_block_gets_a_hash_chained_over_the_blocks_before_it() -> None:
    hashes = block_hashes(_prompt(0, 40), 16)
    assert len(hashes) == 2  # the 8 tokens of the third block make no full block
    assert block_hashes(_prompt(0, 32), 16) == hashes
    # The second block alone, without the first before it, is another block.
    assert block_hashes(_prompt(16, 16), 16)[0] != hashes[1]


def test_a_changed_early_token_changes_every_later_hash() -> None:
    prompt = _prompt(0, 64)
    changed = [*prompt[:5], 9999, *prompt[6:]]
    assert not set(block_hashes(prompt, 16)) & set(block_hashes(changed, 16))


# -- prefill of a shared prefix ------------------------------------------------------------


async def test_a_request_sharing_a_long_prefix_prefills_only_the_rest() -> None:
    engine = _engine()
    system = _prompt(0, 500)
    first = await engine.acquire([*system, *_prompt(10_000, 20)], output_tokens=10)
    assert first.cached_tokens == 0
    assert engine.ttft_s(first.prompt_tokens, first.cached_tokens) == pytest.approx(0.530)
    engine.release(first)
    second = await engine.acquire([*system, *_prompt(20_000, 30)], output_tokens=10)
    # 31 full blocks of the system prompt (496 tokens) were cached; the rest is prefilled.
    assert second.cached_tokens == 496
    assert second.uncached_tokens == 34
    assert engine.ttft_s(second.prompt_tokens, second.cached_tokens) == pytest.approx(0.044)
    assert (engine.kv.queries, engine.kv.hits) == (520 + 530, 496)


async def test_the_last_prompt_token_is_always_prefilled() -> None:
    engine = _engine()
    prompt = _prompt(0, 64)
    engine.release(await engine.acquire(prompt))
    again = await engine.acquire(prompt)
    # As in vLLM, a hit stops at prompt_tokens - 1: the last whole block is computed again.
    assert again.cached_tokens == 48


async def test_a_changed_early_token_leaves_no_hit_after_it() -> None:
    engine = _engine()
    prompt = _prompt(0, 200)
    engine.release(await engine.acquire(prompt))
    changed = await engine.acquire([*prompt[:20], 9999, *prompt[21:]])
    # Only the first block, before the change, hits: every block after it hashes differently.
    assert changed.cached_tokens == 16


async def test_the_hit_counters_are_on_the_vllm_metrics() -> None:
    engine = _engine()
    metrics = SimMetrics(engine)
    engine.release(await engine.acquire(_prompt(0, 100)))
    engine.release(await engine.acquire(_prompt(0, 100)))
    text = metrics.render().decode()
    label = f'model_name="{MODEL}"'
    assert f"vllm:prefix_cache_queries_total{{{label}}} 200.0" in text
    assert f"vllm:prefix_cache_hits_total{{{label}}} 96.0" in text
    assert "# TYPE vllm:prefix_cache_hits_total counter" in text


# -- KV usage and eviction -----------------------------------------------------------------


async def test_usage_counts_the_blocks_running_requests_hold_not_the_cached_ones() -> None:
    engine = _engine(kv_blocks=10, block_size=4)
    lease = await engine.acquire(_prompt(0, 10), output_tokens=6)
    assert engine.kv.blocks_in_use == 4  # 16 tokens: 2 hashed prompt blocks, 2 of its own
    assert engine.kv_cache_usage == pytest.approx(0.4)
    engine.release(lease)
    assert engine.kv_cache_usage == 0.0
    assert engine.kv.cached_blocks == 2  # the prompt's full blocks stay cached


def test_lru_eviction_takes_the_oldest_unused_blocks_first() -> None:
    cache = KVCache(capacity=6, block_size=4)
    prompts = [block_hashes(_prompt(start, 8), 4) for start in (0, 100, 200)]
    for hashes in prompts:  # three prompts of two blocks each fill the cache, then end
        lease = cache.allocate(hashes, prompt_tokens=8, total_tokens=8)
        assert lease is not None
        cache.free(lease)
    assert cache.cached_blocks == 6
    newcomer = block_hashes(_prompt(300, 4), 4)
    assert cache.allocate(newcomer, prompt_tokens=4, total_tokens=4) is not None
    # The oldest prompt loses a block, and its tail before its head.
    assert [cache.cached_prefix_blocks(hashes) for hashes in prompts] == [1, 2, 2]
    assert cache.allocate(block_hashes(_prompt(400, 4), 4), 4, 4) is not None
    assert [cache.cached_prefix_blocks(hashes) for hashes in prompts] == [0, 2, 2]


def test_a_hit_makes_its_blocks_the_most_recently_used() -> None:
    cache = KVCache(capacity=4, block_size=4)
    first, second = (block_hashes(_prompt(start, 8), 4) for start in (0, 100))
    for hashes in (first, second, first):
        lease = cache.allocate(hashes, prompt_tokens=8, total_tokens=8)
        assert lease is not None
        cache.free(lease)
    assert cache.allocate(block_hashes(_prompt(200, 8), 4), 8, 8) is not None
    assert (cache.cached_prefix_blocks(first), cache.cached_prefix_blocks(second)) == (2, 0)


async def test_blocks_of_a_running_request_are_never_evicted() -> None:
    engine = _engine(kv_blocks=6, block_size=4)
    running = await engine.acquire(_prompt(0, 12))  # 3 blocks, held
    for start in (100, 200, 300):  # each needs 3 blocks: evicts the last one's, never `running`'s
        engine.release(await engine.acquire(_prompt(start, 12)))
    assert engine.kv.cached_prefix_blocks(running.hashes) == 3
    assert engine.kv.blocks_in_use == 3


async def test_a_request_that_does_not_fit_waits_until_blocks_are_freed() -> None:
    engine = _engine(kv_blocks=6, block_size=4)
    holder = await engine.acquire(_prompt(0, 16))  # 4 of the 6 blocks
    waiter = asyncio.create_task(engine.acquire(_prompt(100, 12)))  # needs 3
    await asyncio.sleep(0)
    assert (engine.running, engine.waiting) == (1, 1)
    engine.release(holder)
    lease = await waiter
    assert (engine.running, engine.waiting) == (1, 0)
    # Room was made from the released prompt's blocks, its tail first.
    assert engine.kv.cached_prefix_blocks(holder.hashes) == 3
    engine.release(lease)


async def test_a_cancelled_head_of_line_lets_the_next_waiter_in() -> None:
    engine = _engine(kv_blocks=6, block_size=4)
    holder = await engine.acquire(_prompt(0, 12))  # 3 of the 6 blocks
    big = asyncio.create_task(engine.acquire(_prompt(100, 24)))  # 6: must wait
    small = asyncio.create_task(engine.acquire(_prompt(200, 8)))  # 2: waits behind `big`
    await asyncio.sleep(0)
    assert engine.waiting == 2
    big.cancel()
    with pytest.raises(asyncio.CancelledError):
        await big
    lease = await small
    assert (engine.running, engine.waiting) == (2, 0)
    engine.release(lease)
    engine.release(holder)


# -- what is hashed, and the profile -------------------------------------------------------


def test_tools_are_rendered_after_the_system_prompt_and_before_the_conversation() -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
    ]
    text, tokens = chat_prompt(messages, tools)
    system, tool_line, user = text.split("\n")
    assert (system, user) == ("system: You are terse.", "user: hi")
    assert tool_line.startswith('tools: [{"type":"function"')
    assert tokens > chat_prompt(messages)[1]


async def test_a_sequence_longer_than_the_cache_gets_the_whole_cache() -> None:
    profile = SimProfile(
        model=MODEL,
        ttft_ms=0.0,
        prefill_ms_per_token=0.0,
        itl_ms=0.0,
        max_num_seqs=2,
        max_model_len=1000,
        kv_blocks=4,
        block_size=16,
    )
    engine = SimEngine(profile)
    lease = await engine.acquire(_prompt(0, 200), output_tokens=100)
    assert engine.kv_cache_usage == 1.0
    waiter = asyncio.create_task(engine.acquire(_prompt(1000, 10)))
    await asyncio.sleep(0)
    assert engine.waiting == 1
    engine.release(lease)
    engine.release(await waiter)
    assert engine.kv_cache_usage == 0.0

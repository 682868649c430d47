"""Unit tests for gateway.sim.engine: latency model, admission queue and planned output."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gateway.sim.engine import SimEngine
from gateway.sim.profile import SimProfile
from gateway.sim.tokens import count_tokens


def _profile(**changes: object) -> SimProfile:
    base = SimProfile(
        model="sim-model",
        ttft_ms=0.0,
        prefill_ms_per_token=0.0,
        itl_ms=0.0,
        max_num_seqs=4,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# -- latency model -------------------------------------------------------------------------


def test_ttft_is_overhead_plus_prefill_per_prompt_token() -> None:
    engine = SimEngine(_profile(ttft_ms=50.0, prefill_ms_per_token=0.5))
    assert engine.ttft_s(0) == pytest.approx(0.050)
    assert engine.ttft_s(100) == pytest.approx(0.100)


def test_step_time_grows_linearly_with_batch_fill() -> None:
    engine = SimEngine(_profile(itl_ms=10.0, batch_slowdown=3.0, max_num_seqs=4))
    assert engine.step_s(0) == pytest.approx(0.010)
    assert engine.step_s(1) == pytest.approx(0.015)
    assert engine.step_s(2) == pytest.approx(0.020)
    assert engine.step_s(4) == pytest.approx(0.030)
    # A batch cannot be fuller than full.
    assert engine.step_s(9) == pytest.approx(0.030)


async def test_step_time_defaults_to_current_batch() -> None:
    engine = SimEngine(_profile(itl_ms=10.0, batch_slowdown=2.0, max_num_seqs=2))
    await engine.acquire()
    assert engine.step_s() == pytest.approx(0.015)
    await engine.acquire()
    assert engine.step_s() == pytest.approx(0.020)


def test_jitter_stays_within_bounds_and_is_seeded() -> None:
    first = SimEngine(_profile(jitter=0.2, seed=7))
    second = SimEngine(_profile(jitter=0.2, seed=7))
    draws = [first.jittered(1.0) for _ in range(500)]
    assert draws == [second.jittered(1.0) for _ in range(500)]
    assert all(0.8 <= value <= 1.2 for value in draws)
    assert len(set(draws)) > 400


def test_no_jitter_means_exact_delays() -> None:
    engine = SimEngine(_profile(jitter=0.0))
    assert engine.jittered(0.25) == 0.25


# -- output ------------------------------------------------------------------------------------


def test_plan_is_deterministic_for_seed_model_and_prompt() -> None:
    engine = SimEngine(_profile())
    plan = engine.plan(prompt="hello world", prompt_tokens=2)
    assert plan == SimEngine(_profile()).plan(prompt="hello world", prompt_tokens=2)
    assert plan.tokens != engine.plan(prompt="hello there", prompt_tokens=2).tokens
    assert plan.tokens != engine.plan(prompt="hello world", prompt_tokens=2, request_seed=1).tokens
    assert (
        plan.tokens
        != SimEngine(_profile(seed=1)).plan(prompt="hello world", prompt_tokens=2).tokens
    )
    assert (
        plan.tokens
        != SimEngine(_profile(model="other")).plan(prompt="hello world", prompt_tokens=2).tokens
    )


def test_default_length_is_within_the_profile_range() -> None:
    engine = SimEngine(_profile(output_tokens_min=20, output_tokens_max=120))
    lengths = {engine.plan(prompt=f"p{i}", prompt_tokens=1).completion_tokens for i in range(200)}
    assert min(lengths) >= 20
    assert max(lengths) <= 120
    assert len(lengths) > 20
    assert all(
        engine.plan(prompt=f"p{i}", prompt_tokens=1).finish_reason == "stop" for i in range(20)
    )


def test_tokens_are_words_with_leading_spaces_after_the_first() -> None:
    plan = SimEngine(_profile()).plan(prompt="x", prompt_tokens=1)
    first, *rest = plan.tokens
    assert not first.startswith(" ")
    assert all(token.startswith(" ") and token.strip().isalpha() for token in rest)
    assert count_tokens(plan.text) == plan.completion_tokens


def test_max_tokens_cuts_the_output_to_a_prefix_and_reports_length() -> None:
    engine = SimEngine(_profile())
    full = engine.plan(prompt="q", prompt_tokens=1)
    cut = engine.plan(prompt="q", prompt_tokens=1, max_tokens=5)
    assert cut.completion_tokens == 5
    assert cut.finish_reason == "length"
    assert cut.tokens == full.tokens[:5]


def test_max_tokens_above_the_natural_length_stops_naturally() -> None:
    engine = SimEngine(_profile())
    full = engine.plan(prompt="q", prompt_tokens=1)
    roomy = engine.plan(prompt="q", prompt_tokens=1, max_tokens=full.completion_tokens)
    assert roomy == full
    assert roomy.finish_reason == "stop"


def test_ignore_eos_generates_exactly_max_tokens() -> None:
    plan = SimEngine(_profile()).plan(prompt="q", prompt_tokens=1, max_tokens=500, ignore_eos=True)
    assert plan.completion_tokens == 500
    assert plan.finish_reason == "length"


def test_min_tokens_lengthens_the_natural_output() -> None:
    plan = SimEngine(_profile(output_tokens_max=30)).plan(
        prompt="q", prompt_tokens=1, min_tokens=50
    )
    assert plan.completion_tokens == 50
    assert plan.finish_reason == "stop"


def test_without_max_tokens_the_context_window_is_the_limit() -> None:
    engine = SimEngine(_profile(max_model_len=100))
    plan = engine.plan(prompt="q", prompt_tokens=90)
    assert plan.completion_tokens == 10
    assert plan.finish_reason == "length"


# -- admission queue -----------------------------------------------------------------------


async def test_at_most_max_num_seqs_run_and_the_rest_queue_fifo() -> None:
    engine = SimEngine(_profile(max_num_seqs=2))
    order: list[int] = []
    gate = asyncio.Event()

    async def request(number: int) -> None:
        async with engine.slot():
            order.append(number)
            await gate.wait()

    tasks = [asyncio.create_task(request(number)) for number in range(5)]
    await asyncio.sleep(0.01)
    assert (engine.running, engine.waiting) == (2, 3)
    assert order == [0, 1]
    gate.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert (engine.running, engine.waiting) == (0, 0)


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    engine = SimEngine(_profile(max_num_seqs=1))
    await engine.acquire()
    waiter = asyncio.create_task(engine.acquire())
    await asyncio.sleep(0)
    assert engine.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (engine.running, engine.waiting) == (1, 0)
    engine.release()
    assert engine.running == 0


async def test_a_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    engine = SimEngine(_profile(max_num_seqs=1))
    await engine.acquire()
    doomed = asyncio.create_task(engine.acquire())
    next_in_line = asyncio.create_task(engine.acquire())
    await asyncio.sleep(0)
    engine.release()  # hands the slot to `doomed`...
    doomed.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await asyncio.wait_for(next_in_line, timeout=1.0)
    assert (engine.running, engine.waiting) == (1, 0)


# -- pacing --------------------------------------------------------------------------------


async def test_stream_paces_tokens_by_ttft_then_itl() -> None:
    engine = SimEngine(_profile(ttft_ms=40.0, itl_ms=10.0))
    plan = engine.plan(prompt="q", prompt_tokens=1, max_tokens=5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    stamps: list[float] = []
    async with engine.slot():
        async for _ in engine.stream(plan):
            stamps.append(loop.time() - started)
    assert stamps[0] >= 0.038
    # Step at a batch of one: 10 ms * (1 + 0 * 1/4), with batch_slowdown 1.
    assert stamps[-1] >= 0.040 + 4 * 0.010 - 0.002
    assert stamps[-1] < 0.5


async def test_run_takes_as_long_as_the_stream_and_reports_the_first_token() -> None:
    engine = SimEngine(_profile(ttft_ms=30.0, itl_ms=5.0))
    plan = engine.plan(prompt="q", prompt_tokens=1, max_tokens=21)
    loop = asyncio.get_running_loop()
    firsts: list[float] = []
    started = loop.time()
    async with engine.slot():
        await engine.run(plan, lambda: firsts.append(loop.time() - started))
    elapsed = loop.time() - started
    assert len(firsts) == 1
    assert firsts[0] >= 0.028
    assert elapsed >= 0.030 + 20 * 0.005 - 0.002
    assert elapsed < 0.6


async def test_instant_profile_streams_without_sleeping() -> None:
    engine = SimEngine(_profile())
    plan = engine.plan(prompt="q", prompt_tokens=1, max_tokens=5000, ignore_eos=True)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with engine.slot():
        tokens = [token async for token in engine.stream(plan)]
        firsts: list[bool] = []
        await engine.run(plan, lambda: firsts.append(True))
    assert len(tokens) == 5000
    assert firsts == [True]
    assert loop.time() - started < 0.5

"""The simulated GPU: latency model, FIFO admission queue, KV cache and deterministic output."""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from gateway.sim.kvcache import KVCache, KVLease, block_hashes
from gateway.sim.profile import SimProfile
from gateway.sim.tokens import output_rng, sample_words

__all__ = ["CompletionPlan", "FinishReason", "SimEngine"]

FinishReason = Literal["stop", "length"]

# With zero delays a stream would never give the event loop back; yield now and then so one long
# instant stream cannot starve the other connections.
_YIELD_EVERY_TOKENS = 64
# A non-streamed answer needs no wake-up per token: it sleeps this many decode steps at a time,
# which still lets the batch size (and so the step time) change during the answer.
_NON_STREAM_STEP_TOKENS = 16


@dataclass(frozen=True, slots=True)
class CompletionPlan:
    """What one request will produce: its output tokens and why the output ends."""

    tokens: tuple[str, ...]
    prompt_tokens: int
    finish_reason: FinishReason

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass(frozen=True, slots=True)
class _Sequence:
    hashes: tuple[int, ...]
    prompt_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class _Waiter:
    future: asyncio.Future[KVLease]
    sequence: _Sequence


class SimEngine:
    """One simulated vLLM engine: a sequence runs when one of `max_num_seqs` slots is free and
    the KV cache has room for its blocks; the rest queue FIFO (the head waits for both).

    The caller holds a slot (`async with engine.slot(prompt_ids, output_tokens) as lease:`)
    while it prefills and decodes with `stream` or `run`, which pace tokens by the profile's
    latency model; only the prompt tokens the cache did not hold (`lease.uncached_tokens`) take
    prefill time.
    """

    def __init__(self, profile: SimProfile) -> None:
        self.profile = profile
        self.kv = KVCache(profile.kv_blocks, profile.block_size)
        self._rng = random.Random(profile.seed)
        self._running = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def kv_cache_usage(self) -> float:
        """vLLM's KV-cache usage: the share of blocks running requests hold (0..1)."""
        return self.kv.usage

    # -- output -----------------------------------------------------------------------------

    def plan(
        self,
        *,
        prompt: str,
        prompt_tokens: int,
        max_tokens: int | None = None,
        min_tokens: int = 0,
        ignore_eos: bool = False,
        request_seed: int | None = None,
    ) -> CompletionPlan:
        """Decide the output for a prompt: the same arguments always give the same plan.

        The natural length is drawn first, so an output cut by `max_tokens` is a prefix of the
        uncut one. Without `max_tokens` the context window left over is the limit, as in vLLM.
        """
        profile = self.profile
        limit = max_tokens if max_tokens is not None else profile.max_model_len - prompt_tokens
        limit = max(limit, 0)
        rng = output_rng(
            seed=profile.seed, model=profile.model, prompt=prompt, request_seed=request_seed
        )
        natural = rng.randint(profile.output_tokens_min, profile.output_tokens_max)
        natural = max(natural, min_tokens)
        if ignore_eos or natural > limit:
            return CompletionPlan(sample_words(rng, limit), prompt_tokens, "length")
        return CompletionPlan(sample_words(rng, natural), prompt_tokens, "stop")

    # -- latency model ----------------------------------------------------------------------

    def ttft_s(self, prompt_tokens: int, cached_tokens: int = 0) -> float:
        """Prefill time for a prompt whose first `cached_tokens` are in the KV cache, before
        jitter and excluding time spent queued."""
        profile = self.profile
        uncached = max(prompt_tokens - cached_tokens, 0)
        return (profile.ttft_ms + uncached * profile.prefill_ms_per_token) / 1000.0

    def step_s(self, running: int | None = None) -> float:
        """Decode step time (inter-token latency) at a batch of `running` sequences."""
        profile = self.profile
        batch = self._running if running is None else running
        fill = min(batch, profile.max_num_seqs) / profile.max_num_seqs
        return profile.itl_ms / 1000.0 * (1.0 + (profile.batch_slowdown - 1.0) * fill)

    def jittered(self, seconds: float) -> float:
        """`seconds` times a factor drawn within 1 ± jitter from the engine's seeded RNG."""
        jitter = self.profile.jitter
        if jitter == 0.0 or seconds == 0.0:
            return seconds
        return seconds * (1.0 + self._rng.uniform(-jitter, jitter))

    # -- admission --------------------------------------------------------------------------

    async def acquire(self, prompt_ids: Sequence[int] = (), output_tokens: int = 0) -> KVLease:
        """Take a sequence slot and the KV blocks of the prompt `prompt_ids` and its output,
        queueing FIFO behind earlier requests while either is short."""
        prompt_tokens = len(prompt_ids)
        sequence = _Sequence(
            block_hashes(prompt_ids, self.kv.block_size),
            prompt_tokens,
            prompt_tokens + output_tokens,
        )
        if self._running < self.profile.max_num_seqs and not self._waiters:
            lease = self._allocate(sequence)
            if lease is not None:
                self._running += 1
                return lease
        waiter = _Waiter(asyncio.get_running_loop().create_future(), sequence)
        self._waiters.append(waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled():
                # The slot was handed over just as we were cancelled: pass it on.
                self.release(future.result())
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
                self._admit_waiters()  # the head may have been what held the others back
            raise

    def release(self, lease: KVLease | None = None) -> None:
        """Give a slot and its blocks back, admitting the oldest waiters that now fit."""
        if lease is not None:
            self.kv.free(lease)
        self._running -= 1
        self._admit_waiters()

    def slot(self, prompt_ids: Sequence[int] = (), output_tokens: int = 0) -> _Slot:
        """Async context manager holding one sequence slot and its KV blocks; it gives the
        lease, whose `cached_tokens` say how much of the prompt needs no prefill."""
        return _Slot(self, prompt_ids, output_tokens)

    def _allocate(self, sequence: _Sequence) -> KVLease | None:
        return self.kv.allocate(sequence.hashes, sequence.prompt_tokens, sequence.total_tokens)

    def _admit_waiters(self) -> None:
        # Strictly first come, first served: a head that does not fit holds the others back,
        # as vLLM's scheduler stops at the first waiting request it cannot allocate.
        while self._waiters and self._running < self.profile.max_num_seqs:
            head = self._waiters[0]
            if head.future.done():
                self._waiters.popleft()
                continue
            lease = self._allocate(head.sequence)
            if lease is None:
                return
            self._waiters.popleft()
            self._running += 1
            head.future.set_result(lease)

    # -- generation -------------------------------------------------------------------------

    async def stream(
        self, plan: CompletionPlan, cached_tokens: int = 0
    ) -> AsyncGenerator[str, None]:
        """Yield the plan's tokens, each when the simulated GPU would have produced it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.jittered(self.ttft_s(plan.prompt_tokens, cached_tokens))
        for index, token in enumerate(plan.tokens):
            if index:
                deadline += self.jittered(self.step_s())
            delay = deadline - loop.time()
            if delay > 0.0:
                await asyncio.sleep(delay)
            elif index and index % _YIELD_EVERY_TOKENS == 0:
                await asyncio.sleep(0)
            yield token

    async def run(
        self, plan: CompletionPlan, on_first_token: Callable[[], None], cached_tokens: int = 0
    ) -> None:
        """Take as long as streaming the plan would, without a wake-up per token."""
        if self.profile.is_instant:
            if plan.tokens:
                on_first_token()
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.jittered(self.ttft_s(plan.prompt_tokens, cached_tokens))
        await _sleep_until(loop, deadline)
        if not plan.tokens:
            return
        on_first_token()
        remaining = plan.completion_tokens - 1
        while remaining > 0:
            steps = min(remaining, _NON_STREAM_STEP_TOKENS)
            deadline += self.jittered(self.step_s() * steps)
            await _sleep_until(loop, deadline)
            remaining -= steps


class _Slot:
    __slots__ = ("_engine", "_lease", "_output_tokens", "_prompt_ids")

    def __init__(self, engine: SimEngine, prompt_ids: Sequence[int], output_tokens: int) -> None:
        self._engine = engine
        self._prompt_ids = prompt_ids
        self._output_tokens = output_tokens
        self._lease: KVLease | None = None

    async def __aenter__(self) -> KVLease:
        self._lease = await self._engine.acquire(self._prompt_ids, self._output_tokens)
        return self._lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._engine.release(self._lease)


async def _sleep_until(loop: asyncio.AbstractEventLoop, deadline: float) -> None:
    delay = deadline - loop.time()
    if delay > 0.0:
        await asyncio.sleep(delay)

"""The simulated GPU: latency model, FIFO admission queue and deterministic output."""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

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


class SimEngine:
    """One simulated vLLM engine: at most `max_num_seqs` sequences run, the rest queue FIFO.

    The caller holds a slot (`async with engine.slot():`) while it prefills and decodes with
    `stream` or `run`; both pace tokens by the profile's latency model.
    """

    def __init__(self, profile: SimProfile) -> None:
        self.profile = profile
        self._rng = random.Random(profile.seed)
        self._running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of sequence slots in use, standing in for vLLM's KV-cache usage (0..1)."""
        return self._running / self.profile.max_num_seqs

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

    def ttft_s(self, prompt_tokens: int) -> float:
        """Prefill time for a prompt, before jitter and excluding time spent queued."""
        profile = self.profile
        return (profile.ttft_ms + prompt_tokens * profile.prefill_ms_per_token) / 1000.0

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

    async def acquire(self) -> None:
        """Take a sequence slot, queueing FIFO behind earlier requests when all are busy."""
        if self._running < self.profile.max_num_seqs and not self._waiters:
            self._running += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as we were cancelled: pass it on.
                self.release()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back, handing it straight to the oldest waiter if there is one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._running -= 1

    def slot(self) -> _Slot:
        """Async context manager holding one sequence slot."""
        return _Slot(self)

    # -- generation -------------------------------------------------------------------------

    async def stream(self, plan: CompletionPlan) -> AsyncGenerator[str, None]:
        """Yield the plan's tokens, each when the simulated GPU would have produced it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.jittered(self.ttft_s(plan.prompt_tokens))
        for index, token in enumerate(plan.tokens):
            if index:
                deadline += self.jittered(self.step_s())
            delay = deadline - loop.time()
            if delay > 0.0:
                await asyncio.sleep(delay)
            elif index and index % _YIELD_EVERY_TOKENS == 0:
                await asyncio.sleep(0)
            yield token

    async def run(self, plan: CompletionPlan, on_first_token: Callable[[], None]) -> None:
        """Take as long as streaming the plan would, without a wake-up per token."""
        if self.profile.is_instant:
            if plan.tokens:
                on_first_token()
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.jittered(self.ttft_s(plan.prompt_tokens))
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
    __slots__ = ("_engine",)

    def __init__(self, engine: SimEngine) -> None:
        self._engine = engine

    async def __aenter__(self) -> None:
        await self._engine.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._engine.release()


async def _sleep_until(loop: asyncio.AbstractEventLoop, deadline: float) -> None:
    delay = deadline - loop.time()
    if delay > 0.0:
        await asyncio.sleep(delay)

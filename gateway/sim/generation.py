"""The request cycle every generating endpoint of the sim shares (chat, text, Messages,
Responses): faults, admission to the engine, token pacing, streaming, metrics and counters.

Endpoints differ only in how they parse a body and shape the answer, so a request costs the
same time, batch slot and KV blocks whatever dialect it came in, and /metrics counts them all:
what a gateway passes through natively is measured like what it translates to chat.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from starlette.types import Receive, Scope, Send

from gateway.sim.asgi import wait_forever
from gateway.sim.engine import CompletionPlan
from gateway.sim.protocol import SimRequestError
from gateway.sim.service import SimService

__all__ = ["ErrorShape", "GenerationEndpoint", "StreamShape"]

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]

# Builds the error body of an endpoint whose errors are not OpenAI's shape: (status, error).
ErrorShape = Callable[[int, SimRequestError], bytes]


class _Request(Protocol):
    @property
    def model(self) -> str | None: ...

    @property
    def stream(self) -> bool: ...


_RequestT = TypeVar("_RequestT", bound=_Request)


class StreamShape(Protocol):
    """The SSE bytes of one streamed answer, step by step."""

    def opening(self) -> bytes:
        """What goes out with the first token (a role chunk, `message_start`...)."""
        ...

    def step(self, position: int) -> bytes:
        """The events of decode step `position` (one output token of each choice)."""
        ...

    def closing(self, cached_tokens: int) -> bytes:
        """The events after the last token: finish, usage, end of stream."""
        ...


class GenerationEndpoint(Generic[_RequestT]):
    """ASGI app for one generating endpoint; subclasses parse and shape, this runs the rest."""

    # Set by endpoints that answer errors in another API's shape (Anthropic's).
    error_shape: ErrorShape | None = None

    def __init__(self, service: SimService) -> None:
        self._service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = self._service
        started = time.perf_counter()
        service.note_trace(scope)
        request = await service.accept(receive, send, self.parse, error_shape=self.error_shape)
        if request is None:
            return
        fault = service.draw_fault()
        if fault is not None and await service.inject_fault(
            fault, scope, receive, send, can_stall=request.stream
        ):
            return
        stall_after = service.faults.stall_after_tokens if fault == "stall" else None
        job = self.respond(send, request, started, stall_after)
        if fault is None and service.profile.is_instant:
            # Nothing in the job waits, so there is no disconnect to watch for: skip the cost.
            await job
            return
        await service.run_watched(job, scope, receive)

    def parse(self, body: dict[str, object]) -> _RequestT:
        """Validate a request body; SimRequestError for one the server would refuse."""
        raise NotImplementedError

    async def respond(
        self, send: Send, request: _RequestT, started: float, stall_after: int | None
    ) -> None:
        """Generate and send the answer (`stall_after`: steps before a stall fault stops it)."""
        raise NotImplementedError

    # -- the engine, for subclasses -----------------------------------------------------------

    async def complete(
        self, plans: Sequence[CompletionPlan], prompt_ids: Sequence[int], started: float
    ) -> int:
        """Hold a slot while the plans decode side by side; the prompt tokens found cached."""
        service = self._service
        metrics = service.metrics
        # The choices decode side by side: the answer is ready when the longest one is.
        longest = max(plans, key=lambda plan: plan.completion_tokens)
        async with service.engine.slot(prompt_ids, _output_tokens(plans)) as lease:
            await service.engine.run(
                longest,
                lambda: metrics.observe_ttft(time.perf_counter() - started),
                lease.cached_tokens,
            )
        return lease.cached_tokens

    async def stream(
        self,
        send: Send,
        shape: StreamShape,
        plans: Sequence[CompletionPlan],
        prompt_ids: Sequence[int],
        started: float,
        stall_after: int | None,
    ) -> None:
        """Stream the plans' tokens as the engine produces them, shaped by `shape`."""
        service = self._service
        output = _Output(send, at_first_token=service.quirks.stream_headers_at_first_token)
        # vLLM's headers go out at once; llama.cpp and Ollama send them with the first token.
        await output.open()
        steps = max(plan.completion_tokens for plan in plans)
        async with service.engine.slot(prompt_ids, _output_tokens(plans)) as lease:
            if service.profile.is_instant and stall_after is None:
                # No time passes between tokens, so one write can carry them all: the same bytes
                # at a fraction of the per-send cost, which is what the overhead benchmark needs.
                service.metrics.observe_ttft(time.perf_counter() - started)
                unsent = shape.opening() + b"".join(shape.step(p) for p in range(steps))
            else:
                sent = await self._send_tokens(
                    output, shape, plans, lease.cached_tokens, started, stall_after
                )
                unsent = b"" if sent else shape.opening()
        await output.write(unsent + shape.closing(lease.cached_tokens), more=False)

    def finished(self, plans: Sequence[CompletionPlan], started: float) -> None:
        """Count a request answered in full, in the stats and the metrics."""
        service = self._service
        service.stats.requests_completed += 1
        service.metrics.observe_finished(
            time.perf_counter() - started,
            plans[0].prompt_tokens,
            sum(plan.completion_tokens for plan in plans),
        )

    async def _send_tokens(
        self,
        output: _Output,
        shape: StreamShape,
        plans: Sequence[CompletionPlan],
        cached_tokens: int,
        started: float,
        stall_after: int | None,
    ) -> int:
        """Send each step's tokens as the engine produces them; return how many steps were sent."""
        sent = 0
        longest = max(plans, key=lambda plan: plan.completion_tokens)
        stream = self._service.engine.stream(longest, cached_tokens)
        async with contextlib.aclosing(stream) as tokens:
            async for _ in tokens:
                if sent == stall_after:
                    break
                opening = b""
                if not sent:
                    self._service.metrics.observe_ttft(time.perf_counter() - started)
                    # Before the first step's events: shapes number their events in order.
                    opening = shape.opening()
                await output.write(opening + shape.step(sent), more=True)
                sent += 1
        if stall_after is not None:
            # A stuck replica keeps its batch slot and its connection until the client leaves.
            await wait_forever()
        return sent


class _Output:
    """The response of a stream, whose headers go out at once or with the first data."""

    def __init__(self, send: Send, *, at_first_token: bool) -> None:
        self._send = send
        self._deferred = at_first_token
        self._started = False

    async def open(self) -> None:
        if not self._deferred:
            await self._start()

    async def write(self, body: bytes, *, more: bool) -> None:
        if not self._started:
            await self._start()
        await self._send({"type": "http.response.body", "body": body, "more_body": more})

    async def _start(self) -> None:
        self._started = True
        await self._send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})


def _output_tokens(plans: Sequence[CompletionPlan]) -> int:
    # Every choice decodes into KV blocks of its own; they share the prompt's.
    return sum(plan.completion_tokens for plan in plans)

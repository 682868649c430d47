"""The request cycle every generating endpoint of the sim shares (chat, text, Messages,
Responses): faults, admission to the engine, token pacing, streaming, metrics and counters.

Endpoints differ only in how they parse a body and shape the answer, so a request costs the
same time, batch slot and KV blocks whatever dialect it came in, and /metrics counts them all:
what a gateway passes through natively is measured like what it translates to chat. The
context window is checked and the output capped here for the same reason: a too-long request
is refused (or cut) alike in every dialect.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

import orjson
from starlette.types import Receive, Scope, Send

from gateway.sim.agent import AgentAnswer, AgentAsk, agent_answer
from gateway.sim.asgi import send_json, wait_forever
from gateway.sim.engine import CompletionPlan
from gateway.sim.protocol import SimRequestError
from gateway.sim.quirks import ContextCheck
from gateway.sim.service import SimService
from gateway.sim.tokens import token_ids

__all__ = [
    "AgentEndpoint",
    "AnswerShape",
    "ErrorShape",
    "GenerationEndpoint",
    "StreamShape",
    "check_context",
    "output_limit",
]

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


class _AgentRequest(_Request, Protocol):
    @property
    def prompt(self) -> str: ...

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def max_tokens(self) -> int | None: ...

    @property
    def agent(self) -> AgentAsk: ...


_AgentRequestT = TypeVar("_AgentRequestT", bound=_AgentRequest)


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


class AnswerShape(StreamShape, Protocol):
    """One answer in an API's shape: streamed step by step, or whole."""

    def whole(self, cached_tokens: int) -> dict[str, object]:
        """The body of the answer sent at once."""
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


class AgentEndpoint(GenerationEndpoint[_AgentRequestT]):
    """An endpoint that gives one answer, with tools and reasoning (Messages, Responses): this
    checks the context and plans the answer; subclasses read the body and shape the answer."""

    # The body field a request too long for the context window is blamed on.
    context_param: str

    def read(self, body: dict[str, object]) -> _AgentRequestT:
        """Validate a request body; SimRequestError for one the server would refuse."""
        raise NotImplementedError

    def shape(self, request: _AgentRequestT, answer: AgentAnswer, model: str) -> AnswerShape:
        """The answer in this API's shape; `model` is the name the answer carries."""
        raise NotImplementedError

    def parse(self, body: dict[str, object]) -> _AgentRequestT:
        request = self.read(body)
        service = self._service
        check_context(
            request.prompt_tokens,
            request.max_tokens,
            service.profile.max_model_len,
            service.quirks.context_check,
            self.context_param,
        )
        return request

    async def respond(
        self, send: Send, request: _AgentRequestT, started: float, stall_after: int | None
    ) -> None:
        service = self._service
        limit = output_limit(service, request.prompt_tokens, request.max_tokens)
        plan = service.engine.plan(
            prompt=request.prompt, prompt_tokens=request.prompt_tokens, max_tokens=limit
        )
        answer = agent_answer(plan, request.agent, request.prompt, limit)
        model = service.profile.model
        if service.quirks.echo_model and request.model:
            model = request.model
        shape = self.shape(request, answer, model)
        plans = [answer.plan]
        prompt_ids = token_ids(request.prompt, request.prompt_tokens)
        if request.stream:
            await self.stream(send, shape, plans, prompt_ids, started, stall_after)
        else:
            cached = await self.complete(plans, prompt_ids, started)
            await send_json(send, 200, orjson.dumps(shape.whole(cached)))
        self.finished(plans, started)


def output_limit(service: SimService, prompt_tokens: int, max_tokens: int | None) -> int | None:
    """The output budget of a request: its max_tokens, cut to the context window by servers that
    do not refuse an answer too long for it."""
    if service.quirks.context_check == "prompt_and_output":
        return max_tokens
    room = max(service.profile.max_model_len - prompt_tokens, 0)
    return room if max_tokens is None else min(max_tokens, room)


def check_context(
    prompt_tokens: int, max_tokens: int | None, max_model_len: int, check: ContextCheck, param: str
) -> None:
    """Refuse a request too long for the context window, as the server kind `check` would."""
    if check == "none":
        return  # Ollama truncates the prompt to its context window instead of refusing it
    if check == "prompt_only":
        # llama.cpp and llama-cpp-python refuse only a prompt that fills the context; the
        # answer is cut at the window's end.
        if prompt_tokens >= max_model_len:
            raise SimRequestError(
                f"Requested tokens ({prompt_tokens}) exceed context window of {max_model_len}",
                param=param,
                code="context_length_exceeded",
                validation=False,
            )
        return
    # vLLM refuses a request that cannot fit its context window rather than truncating it.
    wanted = prompt_tokens + (max_tokens or 1)
    if wanted > max_model_len:
        raise SimRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {wanted} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens or 1} in the completion). Please reduce the length of the "
            "messages or completion.",
            param=param,
            validation=False,
        )


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

"""The chat and text completion endpoints of the sim, streamed (SSE) or not."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from typing import Literal

from starlette.types import Receive, Scope, Send

from gateway.sim.asgi import send_json, wait_forever
from gateway.sim.engine import CompletionPlan
from gateway.sim.protocol import (
    SimRequest,
    SimRequestError,
    parse_chat_request,
    parse_completion_request,
)
from gateway.sim.quirks import ContextCheck
from gateway.sim.service import SimService
from gateway.sim.shapes import ChunkFormatter, completion_body
from gateway.sim.tokens import token_ids

__all__ = ["CompletionEndpoint"]

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]


class CompletionEndpoint:
    """ASGI app for POST /v1/chat/completions (`endpoint="chat"`) or /v1/completions."""

    def __init__(self, service: SimService, endpoint: Literal["chat", "completion"]) -> None:
        self._service = service
        self._endpoint: Literal["chat", "completion"] = endpoint
        self._id_prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = self._service
        started = time.perf_counter()
        service.note_trace(scope)
        request = await service.accept(receive, send, self._parse)
        if request is None:
            return
        fault = service.draw_fault()
        if fault is not None and await service.inject_fault(
            fault, scope, receive, send, can_stall=request.stream
        ):
            return
        stall_after = service.faults.stall_after_tokens if fault == "stall" else None
        job = self._respond(send, request, started, stall_after)
        if fault is None and service.profile.is_instant:
            # Nothing in the job waits, so there is no disconnect to watch for: skip the cost.
            await job
            return
        await service.run_watched(job, scope, receive)

    def _parse(self, body: dict[str, object]) -> SimRequest:
        quirks = self._service.quirks
        if self._endpoint == "chat":
            request = parse_chat_request(body, quirks)
        else:
            request = parse_completion_request(body, quirks)
        _check_context(request, self._service.profile.max_model_len, quirks.context_check)
        return request

    async def _respond(
        self, send: Send, request: SimRequest, started: float, stall_after: int | None
    ) -> None:
        service = self._service
        max_tokens = request.max_tokens
        if service.quirks.context_check != "prompt_and_output":
            # Servers that do not refuse an answer too long for the context cut it there.
            room = max(service.profile.max_model_len - request.prompt_tokens, 0)
            max_tokens = room if max_tokens is None else min(max_tokens, room)
        plans = [
            service.engine.plan(
                # Each choice samples its own output from the same prompt.
                prompt=request.prompt if index == 0 else f"{request.prompt}\x00{index}",
                prompt_tokens=request.prompt_tokens,
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                ignore_eos=request.ignore_eos,
                request_seed=request.seed,
            )
            for index in range(request.n)
        ]
        request_id = self._id_prefix + os.urandom(12).hex()
        model = service.profile.model
        if service.quirks.echo_model and request.model:
            model = request.model
        # The ids the KV cache hashes: the prompt as rendered (system, tools, messages).
        prompt_ids = token_ids(request.prompt, request.prompt_tokens)
        if request.stream:
            await self._stream(
                send, request, plans, prompt_ids, request_id, model, started, stall_after
            )
        else:
            await self._complete(send, plans, prompt_ids, request_id, model, started)

    async def _complete(
        self,
        send: Send,
        plans: Sequence[CompletionPlan],
        prompt_ids: Sequence[int],
        request_id: str,
        model: str,
        started: float,
    ) -> None:
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
        body = completion_body(
            endpoint=self._endpoint,
            request_id=request_id,
            created=int(time.time()),
            model=model,
            plan=plans[0],
            more=plans[1:],
        )
        # Headers and body together, once the answer is whole: as every real server does.
        await send_json(send, 200, body)
        self._finished(plans, started)

    async def _stream(
        self,
        send: Send,
        request: SimRequest,
        plans: Sequence[CompletionPlan],
        prompt_ids: Sequence[int],
        request_id: str,
        model: str,
        started: float,
        stall_after: int | None,
    ) -> None:
        service = self._service
        events = ChunkFormatter(
            endpoint=self._endpoint,
            request_id=request_id,
            created=int(time.time()),
            model=model,
            include_usage=request.include_usage,
            null_usage=service.quirks.null_usage_in_chunks,
        )
        output = _Output(send, at_first_token=service.quirks.stream_headers_at_first_token)
        # vLLM's headers go out at once; llama.cpp and Ollama send them with the first token.
        await output.open()
        async with service.engine.slot(prompt_ids, _output_tokens(plans)) as lease:
            if service.profile.is_instant and stall_after is None:
                # No time passes between tokens, so one write can carry them all: the same bytes
                # at a fraction of the per-send cost, which is what the overhead benchmark needs.
                service.metrics.observe_ttft(time.perf_counter() - started)
                unsent = events.first(len(plans)) + b"".join(
                    _step(events, plans, position) for position in range(_longest(plans))
                )
            else:
                sent = await self._send_tokens(
                    output, events, plans, lease.cached_tokens, started, stall_after
                )
                unsent = b"" if sent else events.first(len(plans))
        await output.write(unsent + events.finish(plans[0], plans[1:]), more=False)
        self._finished(plans, started)

    async def _send_tokens(
        self,
        output: _Output,
        events: ChunkFormatter,
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
                event = _step(events, plans, sent)
                if not sent:
                    self._service.metrics.observe_ttft(time.perf_counter() - started)
                    event = events.first(len(plans)) + event
                await output.write(event, more=True)
                sent += 1
        if stall_after is not None:
            # A stuck replica keeps its batch slot and its connection until the client leaves.
            await wait_forever()
        return sent

    def _finished(self, plans: Sequence[CompletionPlan], started: float) -> None:
        service = self._service
        service.stats.requests_completed += 1
        service.metrics.observe_finished(
            time.perf_counter() - started,
            plans[0].prompt_tokens,
            sum(plan.completion_tokens for plan in plans),
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


def _longest(plans: Sequence[CompletionPlan]) -> int:
    return max(plan.completion_tokens for plan in plans)


def _step(events: ChunkFormatter, plans: Sequence[CompletionPlan], position: int) -> bytes:
    """The events of decode step `position`: one token of each choice still generating."""
    return b"".join(
        events.token(plan.tokens[position], index)
        for index, plan in enumerate(plans)
        if position < plan.completion_tokens
    )


def _check_context(request: SimRequest, max_model_len: int, check: ContextCheck) -> None:
    if check == "none":
        return  # Ollama truncates the prompt to its context window instead of refusing it
    if check == "prompt_only":
        # llama.cpp and llama-cpp-python refuse only a prompt that fills the context; the
        # answer is cut at the window's end.
        if request.prompt_tokens >= max_model_len:
            raise SimRequestError(
                f"Requested tokens ({request.prompt_tokens}) exceed context window of "
                f"{max_model_len}",
                param="messages" if request.endpoint == "chat" else "prompt",
                code="context_length_exceeded",
                validation=False,
            )
        return
    # vLLM refuses a request that cannot fit its context window rather than truncating it.
    wanted = request.prompt_tokens + (request.max_tokens or 1)
    if wanted > max_model_len:
        raise SimRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {wanted} tokens ({request.prompt_tokens} in the messages, "
            f"{request.max_tokens or 1} in the completion). Please reduce the length of the "
            "messages or completion.",
            param="messages" if request.endpoint == "chat" else "prompt",
            validation=False,
        )

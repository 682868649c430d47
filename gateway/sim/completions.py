"""The chat and text completion endpoints of the sim, streamed (SSE) or not."""

from __future__ import annotations

import contextlib
import os
import time
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
from gateway.sim.service import SimService
from gateway.sim.shapes import ChunkFormatter, completion_body

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
        if self._endpoint == "chat":
            request = parse_chat_request(body)
        else:
            request = parse_completion_request(body)
        _check_context(request, self._service.profile.max_model_len)
        return request

    async def _respond(
        self, send: Send, request: SimRequest, started: float, stall_after: int | None
    ) -> None:
        plan = self._service.engine.plan(
            prompt=request.prompt,
            prompt_tokens=request.prompt_tokens,
            max_tokens=request.max_tokens,
            min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos,
            request_seed=request.seed,
        )
        request_id = self._id_prefix + os.urandom(12).hex()
        if request.stream:
            await self._stream(send, request, plan, request_id, started, stall_after)
        else:
            await self._complete(send, plan, request_id, started)

    async def _complete(
        self, send: Send, plan: CompletionPlan, request_id: str, started: float
    ) -> None:
        service = self._service
        metrics = service.metrics
        async with service.engine.slot():
            await service.engine.run(
                plan, lambda: metrics.observe_ttft(time.perf_counter() - started)
            )
        body = completion_body(
            endpoint=self._endpoint,
            request_id=request_id,
            created=int(time.time()),
            model=service.profile.model,
            plan=plan,
        )
        await send_json(send, 200, body)
        self._finished(plan, started)

    async def _stream(
        self,
        send: Send,
        request: SimRequest,
        plan: CompletionPlan,
        request_id: str,
        started: float,
        stall_after: int | None,
    ) -> None:
        service = self._service
        events = ChunkFormatter(
            endpoint=self._endpoint,
            request_id=request_id,
            created=int(time.time()),
            model=service.profile.model,
            include_usage=request.include_usage,
        )
        # Headers go out at once, as vLLM's do; the first data waits for prefill.
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        async with service.engine.slot():
            if service.profile.is_instant and stall_after is None:
                # No time passes between tokens, so one write can carry them all: the same bytes
                # at a fraction of the per-send cost, which is what the overhead benchmark needs.
                service.metrics.observe_ttft(time.perf_counter() - started)
                unsent = b"".join([events.first(), *map(events.token, plan.tokens)])
            else:
                sent = await self._send_tokens(send, events, plan, started, stall_after)
                unsent = b"" if sent else events.first()
        await send(
            {
                "type": "http.response.body",
                "body": unsent + events.finish(plan),
                "more_body": False,
            }
        )
        self._finished(plan, started)

    async def _send_tokens(
        self,
        send: Send,
        events: ChunkFormatter,
        plan: CompletionPlan,
        started: float,
        stall_after: int | None,
    ) -> int:
        """Send each token as the engine produces it; return how many were sent."""
        sent = 0
        async with contextlib.aclosing(self._service.engine.stream(plan)) as tokens:
            async for token in tokens:
                if sent == stall_after:
                    break
                event = events.token(token)
                if not sent:
                    self._service.metrics.observe_ttft(time.perf_counter() - started)
                    event = events.first() + event
                await send({"type": "http.response.body", "body": event, "more_body": True})
                sent += 1
        if stall_after is not None:
            # A stuck replica keeps its batch slot and its connection until the client leaves.
            await wait_forever()
        return sent

    def _finished(self, plan: CompletionPlan, started: float) -> None:
        service = self._service
        service.stats.requests_completed += 1
        service.metrics.observe_finished(
            time.perf_counter() - started, plan.prompt_tokens, plan.completion_tokens
        )


def _check_context(request: SimRequest, max_model_len: int) -> None:
    # vLLM refuses a request that cannot fit its context window rather than truncating it.
    wanted = request.prompt_tokens + (request.max_tokens or 1)
    if wanted > max_model_len:
        raise SimRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {wanted} tokens ({request.prompt_tokens} in the messages, "
            f"{request.max_tokens or 1} in the completion). Please reduce the length of the "
            "messages or completion.",
            param="messages" if request.endpoint == "chat" else "prompt",
        )

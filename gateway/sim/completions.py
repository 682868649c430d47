"""The chat and text completion endpoints of the sim, streamed (SSE) or not."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Literal

from starlette.types import Send

from gateway.sim.agent import AgentAnswer, agent_answer
from gateway.sim.asgi import send_json
from gateway.sim.generation import GenerationEndpoint, check_context, output_limit
from gateway.sim.judge import answer_plans
from gateway.sim.protocol import (
    SimRequest,
    parse_chat_request,
    parse_completion_request,
)
from gateway.sim.quirks import ContextCheck
from gateway.sim.service import SimService
from gateway.sim.shapes import ChunkFormatter, completion_body
from gateway.sim.tokens import token_ids

__all__ = ["CompletionEndpoint"]


class CompletionEndpoint(GenerationEndpoint[SimRequest]):
    """ASGI app for POST /v1/chat/completions (`endpoint="chat"`) or /v1/completions."""

    def __init__(self, service: SimService, endpoint: Literal["chat", "completion"]) -> None:
        super().__init__(service)
        self._endpoint: Literal["chat", "completion"] = endpoint
        self._id_prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"

    def parse(self, body: dict[str, object]) -> SimRequest:
        quirks = self._service.quirks
        if self._endpoint == "chat":
            request = parse_chat_request(body, quirks)
        else:
            request = parse_completion_request(body, quirks)
        _check_context(request, self._service.profile.max_model_len, quirks.context_check)
        return request

    async def respond(
        self, send: Send, request: SimRequest, started: float, stall_after: int | None
    ) -> None:
        service = self._service
        max_tokens = output_limit(service, request.prompt_tokens, request.max_tokens)
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
        # Right or wrong by the hidden truth, or a judge's verdict (gateway/sim/judge.py).
        plans = answer_plans(request, plans, service.profile.model)
        # Tool calls and reasoning, when asked for, reshape each choice's output.
        answers = [agent_answer(plan, request.agent, request.prompt, max_tokens) for plan in plans]
        plans = [answer.plan for answer in answers]
        request_id = self._id_prefix + os.urandom(12).hex()
        model = service.profile.model
        if service.quirks.echo_model and request.model:
            model = request.model
        # The ids the KV cache hashes: the prompt as rendered (system, tools, messages).
        prompt_ids = token_ids(request.prompt, request.prompt_tokens)
        if request.stream:
            shape = ChunkFormatter(
                endpoint=self._endpoint,
                request_id=request_id,
                created=int(time.time()),
                model=model,
                answers=answers,
                include_usage=request.include_usage,
                null_usage=service.quirks.null_usage_in_chunks,
                reasoning_field=service.quirks.reasoning_field,
            )
            await self.stream(send, shape, plans, prompt_ids, started, stall_after)
        else:
            await self.complete(plans, prompt_ids, started)
            await self._send_whole(send, answers, request_id, model)
        self.finished(plans, started)

    async def _send_whole(
        self, send: Send, answers: Sequence[AgentAnswer], request_id: str, model: str
    ) -> None:
        body = completion_body(
            endpoint=self._endpoint,
            request_id=request_id,
            created=int(time.time()),
            model=model,
            answers=answers,
            reasoning_field=self._service.quirks.reasoning_field,
        )
        # Headers and body together, once the answer is whole: as every real server does.
        await send_json(send, 200, body)


def _check_context(request: SimRequest, max_model_len: int, check: ContextCheck) -> None:
    param = "messages" if request.endpoint == "chat" else "prompt"
    check_context(request.prompt_tokens, request.max_tokens, max_model_len, check, param)

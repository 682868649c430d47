"""OpenAI/vLLM response bodies and SSE events, serialised with orjson."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import orjson

from gateway.sim.agent import AgentAnswer
from gateway.sim.engine import CompletionPlan

__all__ = [
    "DONE_EVENT",
    "ChunkFormatter",
    "chat_usage",
    "completion_body",
    "embeddings_body",
    "error_body",
    "models_body",
    "usage",
]

DONE_EVENT = b"data: [DONE]\n\n"


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    """OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def usage(plan: CompletionPlan, *more: CompletionPlan) -> dict[str, int]:
    """Usage of one request: the prompt once, the completion tokens of every choice."""
    completion = plan.completion_tokens + sum(other.completion_tokens for other in more)
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": plan.prompt_tokens + completion,
    }


def chat_usage(answers: Sequence[AgentAnswer]) -> dict[str, object]:
    """Usage of a chat answer; reasoning tokens (counted in completion_tokens) as vLLM details
    them (`completion_tokens_details.reasoning_tokens`) when there were any."""
    body: dict[str, object] = dict(usage(*(answer.plan for answer in answers)))
    reasoning = sum(answer.reasoning_tokens for answer in answers)
    if reasoning:
        body["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return body


def completion_body(
    *,
    endpoint: Literal["chat", "completion"],
    request_id: str,
    created: int,
    model: str,
    answers: Sequence[AgentAnswer],
    reasoning_field: str | None = "reasoning",
) -> bytes:
    """A whole (non-streamed) chat or text completion, one choice per answer."""
    choices: list[dict[str, object]] = []
    for index, answer in enumerate(answers):
        if endpoint == "chat":
            choices.append(
                {
                    "index": index,
                    "message": _chat_message(answer, reasoning_field),
                    "finish_reason": answer.finish_reason,
                    "logprobs": None,
                }
            )
        else:
            choices.append(
                {
                    "index": index,
                    "text": answer.plan.text,
                    "finish_reason": answer.finish_reason,
                    "logprobs": None,
                }
            )
    return orjson.dumps(
        {
            "id": request_id,
            "object": "chat.completion" if endpoint == "chat" else "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": chat_usage(answers),
        }
    )


def _chat_message(answer: AgentAnswer, reasoning_field: str | None) -> dict[str, object]:
    message: dict[str, object] = {"role": "assistant", "content": answer.message_content}
    reasoning = answer.reasoning
    if reasoning is not None and reasoning_field is not None:
        message[reasoning_field] = reasoning
    call = answer.tool_call
    if call is not None:
        message["tool_calls"] = [
            {
                "id": call.call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
        ]
    return message


class ChunkFormatter:
    """Builds the SSE events of one streamed chat or text completion (its `StreamShape`).

    Every chunk shares the response's id and `created`. Reasoning tokens go out as
    `delta.<reasoning_field>`, then text as `delta.content`, or a tool call as vLLM's tool
    parsers stream it: a delta with the call's id, type and name, then the arguments in pieces.
    With `include_usage`, the closing events add a last chunk with no choices and the usage, as
    OpenAI does; with `null_usage` too, every other chunk carries `"usage": null` (OpenAI and
    vLLM do, llama.cpp and Ollama leave the key out).
    """

    def __init__(
        self,
        *,
        endpoint: Literal["chat", "completion"],
        request_id: str,
        created: int,
        model: str,
        answers: Sequence[AgentAnswer],
        include_usage: bool,
        null_usage: bool = True,
        reasoning_field: str | None = "reasoning",
    ) -> None:
        self._chat = endpoint == "chat"
        self._answers = answers
        self._include_usage = include_usage
        self._null_usage = include_usage and null_usage
        self._reasoning_field = reasoning_field
        # One chat choice of text alone: its tokens, for the per-token fast path.
        single = answers[0] if len(answers) == 1 else None
        self._plain = (
            single.plan.tokens
            if self._chat and single and not single.reasoning_tokens and not single.tool_call
            else None
        )
        self._head: dict[str, object] = {
            "id": request_id,
            "object": "chat.completion.chunk" if self._chat else "text_completion",
            "created": created,
            "model": model,
        }

    def opening(self) -> bytes:
        """The events that open the answer: the assistant role for chat, nothing otherwise."""
        if not self._chat:
            return b""
        opening: dict[str, object] = {"role": "assistant", "content": ""}
        return b"".join(
            self._event(self._choice(opening, None, i)) for i in range(len(self._answers))
        )

    def step(self, position: int) -> bytes:
        """One token of each choice still generating."""
        plain = self._plain
        if plain is not None:  # the common case, at the cost of the plain chunk alone
            if position >= len(plain):
                return b""
            delta = {"content": plain[position]}
            return self._event(
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            )
        answers = self._answers
        return b"".join(
            self._token(answer, position, index)
            for index, answer in enumerate(answers)
            if position < answer.plan.completion_tokens
        )

    def closing(self, cached_tokens: int = 0) -> bytes:
        """The closing events: finish reasons, then the usage chunk if asked, then [DONE]."""
        events = [
            self._event(self._choice({}, answer.finish_reason, index, text=""))
            for index, answer in enumerate(self._answers)
        ]
        if self._include_usage:
            events.append(_sse({**self._head, "choices": [], "usage": chat_usage(self._answers)}))
        events.append(DONE_EVENT)
        return b"".join(events)

    def _token(self, answer: AgentAnswer, position: int, index: int) -> bytes:
        text = answer.plan.tokens[position]
        if not self._chat:
            return self._event(self._choice({}, None, index, text=text))
        if position >= answer.reasoning_tokens and answer.tool_call is None:
            return self._event(self._choice({"content": text}, None, index))
        if position < answer.reasoning_tokens:
            if answer.reasoning is None or self._reasoning_field is None:
                return b""  # spent but not shown, as vLLM with include_reasoning false
            return self._event(self._choice({self._reasoning_field: text}, None, index))
        call = answer.tool_call
        assert call is not None
        arguments = {"index": 0, "function": {"arguments": text}}
        if position > answer.reasoning_tokens:
            return self._event(self._choice({"tool_calls": [arguments]}, None, index))
        header = {
            "index": 0,
            "id": call.call_id,
            "type": "function",
            "function": {"name": call.name},
        }
        return self._event(self._choice({"tool_calls": [header]}, None, index)) + self._event(
            self._choice({"tool_calls": [arguments]}, None, index)
        )

    def _choice(
        self, delta: dict[str, object], finish_reason: str | None, index: int, *, text: str = ""
    ) -> dict[str, object]:
        if self._chat:
            return {
                "index": index,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _event(self, choice: dict[str, object]) -> bytes:
        chunk: dict[str, object] = {**self._head, "choices": [choice]}
        if self._null_usage:
            chunk["usage"] = None
        return _sse(chunk)


def _sse(payload: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def models_body(*, model: str, created: int, max_model_len: int) -> bytes:
    """The /v1/models list, holding the one served model as vLLM describes it."""
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": model,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": model,
                    "parent": None,
                    "max_model_len": max_model_len,
                }
            ],
        }
    )


def embeddings_body(*, model: str, vectors: Sequence[Sequence[float]], prompt_tokens: int) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": list(vector)}
                for index, vector in enumerate(vectors)
            ],
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )

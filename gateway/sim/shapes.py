"""OpenAI/vLLM response bodies and SSE events, serialised with orjson."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import orjson

from gateway.sim.engine import CompletionPlan

__all__ = [
    "DONE_EVENT",
    "ChunkFormatter",
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


def completion_body(
    *,
    endpoint: Literal["chat", "completion"],
    request_id: str,
    created: int,
    model: str,
    plan: CompletionPlan,
    more: Sequence[CompletionPlan] = (),
) -> bytes:
    """A whole (non-streamed) chat or text completion; `more` are the choices after the first."""
    choices: list[dict[str, object]] = []
    for index, each in enumerate((plan, *more)):
        if endpoint == "chat":
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": each.text},
                    "finish_reason": each.finish_reason,
                    "logprobs": None,
                }
            )
        else:
            choices.append(
                {
                    "index": index,
                    "text": each.text,
                    "finish_reason": each.finish_reason,
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
            "usage": usage(plan, *more),
        }
    )


class ChunkFormatter:
    """Builds the SSE events of one streamed response; all share its id and `created`.

    With `include_usage`, `finish` adds a last chunk with no choices and the usage, as OpenAI
    does; with `null_usage` too, every other chunk carries `"usage": null` (OpenAI and vLLM do,
    llama.cpp and Ollama leave the key out).
    """

    def __init__(
        self,
        *,
        endpoint: Literal["chat", "completion"],
        request_id: str,
        created: int,
        model: str,
        include_usage: bool,
        null_usage: bool = True,
    ) -> None:
        self._chat = endpoint == "chat"
        self._include_usage = include_usage
        self._null_usage = include_usage and null_usage
        self._head: dict[str, object] = {
            "id": request_id,
            "object": "chat.completion.chunk" if self._chat else "text_completion",
            "created": created,
            "model": model,
        }

    def first(self, choices: int = 1) -> bytes:
        """The events that open the answer: the assistant role for chat, nothing otherwise."""
        if not self._chat:
            return b""
        opening: dict[str, object] = {"role": "assistant", "content": ""}
        return b"".join(self._event(self._choice(opening, None, i)) for i in range(choices))

    def token(self, text: str, index: int = 0) -> bytes:
        content: dict[str, object] = {"content": text}
        return self._event(self._choice(content, None, index, text=text))

    def finish(self, plan: CompletionPlan, more: Sequence[CompletionPlan] = ()) -> bytes:
        """The closing events: finish reasons, then the usage chunk if asked, then [DONE]."""
        events = [
            self._event(self._choice({}, each.finish_reason, index, text=""))
            for index, each in enumerate((plan, *more))
        ]
        if self._include_usage:
            events.append(_sse({**self._head, "choices": [], "usage": usage(plan, *more)}))
        events.append(DONE_EVENT)
        return b"".join(events)

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

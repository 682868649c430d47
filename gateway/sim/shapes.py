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


def usage(plan: CompletionPlan) -> dict[str, int]:
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.completion_tokens,
        "total_tokens": plan.prompt_tokens + plan.completion_tokens,
    }


def completion_body(
    *,
    endpoint: Literal["chat", "completion"],
    request_id: str,
    created: int,
    model: str,
    plan: CompletionPlan,
) -> bytes:
    """A whole (non-streamed) chat or text completion."""
    if endpoint == "chat":
        choice: dict[str, object] = {
            "index": 0,
            "message": {"role": "assistant", "content": plan.text},
            "finish_reason": plan.finish_reason,
            "logprobs": None,
        }
        kind = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": plan.text,
            "finish_reason": plan.finish_reason,
            "logprobs": None,
        }
        kind = "text_completion"
    return orjson.dumps(
        {
            "id": request_id,
            "object": kind,
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage(plan),
        }
    )


class ChunkFormatter:
    """Builds the SSE events of one streamed response; all share its id and `created`.

    With `include_usage`, every chunk carries `"usage": null` and `finish` adds a last chunk
    with no choices and the usage, as OpenAI does.
    """

    def __init__(
        self,
        *,
        endpoint: Literal["chat", "completion"],
        request_id: str,
        created: int,
        model: str,
        include_usage: bool,
    ) -> None:
        self._chat = endpoint == "chat"
        self._include_usage = include_usage
        self._head: dict[str, object] = {
            "id": request_id,
            "object": "chat.completion.chunk" if self._chat else "text_completion",
            "created": created,
            "model": model,
        }

    def first(self) -> bytes:
        """The event that opens the answer: the assistant role for chat, nothing otherwise."""
        if not self._chat:
            return b""
        return self._event(self._choice({"role": "assistant", "content": ""}, None))

    def token(self, text: str) -> bytes:
        content: dict[str, object] = {"content": text}
        return self._event(self._choice(content, None, text=text))

    def finish(self, plan: CompletionPlan) -> bytes:
        """The closing events: finish reason, then the usage chunk if asked, then [DONE]."""
        events = [self._event(self._choice({}, plan.finish_reason, text=""))]
        if self._include_usage:
            events.append(_sse({**self._head, "choices": [], "usage": usage(plan)}))
        events.append(DONE_EVENT)
        return b"".join(events)

    def _choice(
        self, delta: dict[str, object], finish_reason: str | None, *, text: str = ""
    ) -> dict[str, object]:
        if self._chat:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _event(self, choice: dict[str, object]) -> bytes:
        chunk: dict[str, object] = {**self._head, "choices": [choice]}
        if self._include_usage:
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

"""OpenAI request shapes the gateway checks before anything is spent on a request.

Declared: the fields the gateway reads, and OpenAI's sampling fields, held to their
documented types and ranges. Everything else, vendor extensions (`top_k`, `min_tokens`)
included, passes through to the backend unchecked (`extra="allow"`). Strict mode:
`"stream": "yes"` is an error, as it is for OpenAI, not a silent `True`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MAX_MESSAGES",
    "SCHEMAS",
    "UPSTREAM_PATHS",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContentPart",
    "EmbeddingRequest",
    "RequestKind",
    "StreamOptions",
    "describe_location",
]

MAX_MESSAGES = 4096


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(_Open):
    type: str
    text: str | None = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Open):
    include_usage: bool | None = None


_Penalty = Annotated[float, Field(ge=-2, le=2)]
_Bias = Annotated[float, Field(ge=-100, le=100)]
_StopList = Annotated[list[str], Field(max_length=4)]


class _Generation(_Open):
    """OpenAI's documented types and ranges: a backend may answer a value outside them
    with a 500 (llama-cpp-python does), so it is the client's 400 here."""

    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=10_000_000)
    # Chat's newer name; checked on completions too, where backends may honour it (the
    # gateway does, see `ParsedRequest.max_tokens`).
    max_completion_tokens: int | None = Field(None, ge=1, le=10_000_000)
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    frequency_penalty: _Penalty | None = None
    presence_penalty: _Penalty | None = None
    stop: _StopList | str | None = None  # a list first: its errors are the telling ones
    logit_bias: dict[str, _Bias] | None = None
    user: str | None = None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(None, ge=0, le=20)
    logprobs: int | None = Field(None, ge=0, le=5)  # here a count, not a flag
    echo: bool | None = None


class EmbeddingRequest(_Open):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]]


RequestKind = Literal["chat", "completions", "embeddings"]

SCHEMAS: dict[RequestKind, type[_Open]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
}
UPSTREAM_PATHS: dict[RequestKind, str] = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none"})


def describe_location(loc: tuple[Any, ...]) -> str:
    """`('messages', 0, 'content', 'str')` -> `messages.0.content`: drop pydantic's union tags."""
    parts = [
        str(part)
        for part in loc
        if not (isinstance(part, str) and ("[" in part or part in _UNION_TAGS))
    ]
    return ".".join(parts)

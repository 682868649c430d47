"""OpenAI request shapes the gateway checks before anything is spent on a request.

Only the fields the gateway reads are declared; everything else passes through to the
backend untouched (`extra="allow"`). Strict mode: `"stream": "yes"` is an error, as it
is for OpenAI, not a silent `True`.
"""

from __future__ import annotations

from typing import Any, Literal

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


class _Generation(_Open):
    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=10_000_000)
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=10_000_000)


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]


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

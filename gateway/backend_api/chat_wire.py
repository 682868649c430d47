"""The chat side of a backend translation: the chat chunks and usage a translated answer
is made of, the SSE reading both backend streams share, and the error for a chat field
a backend's API has no place for."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.errors import UpstreamStatus
from gateway.upstream import DONE_EVENT

__all__ = [
    "ChatChunks",
    "SseReader",
    "chat_usage",
    "completion",
    "count",
    "text_of",
    "unsupported",
]


def unsupported(api: str, field: str, why: str = "") -> UpstreamStatus:
    """A chat field the backend's API cannot carry: the client's 400, naming the field.
    An `UpstreamStatus` below 500, so no replica is blamed and no other is tried with it."""
    detail = f": {why}" if why else ""
    return UpstreamStatus(
        400,
        f"Unsupported field '{field}' for this model: its backend speaks the {api} API{detail}.",
        error_type="invalid_request_error",
        param=field,
    )


def count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def chat_usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    """Usage in chat's shape, which the budgets, the request log and the cache read."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def text_of(content: object) -> str:
    """The text of a chat message's content: a string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


class SseReader:
    """A backend's event batches as whole `(event name, JSON payload)` pairs; a batch
    that ends mid-event keeps its tail for the next."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, batch: bytes) -> list[dict[str, Any]]:
        data = self._pending + batch
        *complete, self._pending = data.split(b"\n\n")
        payloads: list[dict[str, Any]] = []
        for event in complete:
            lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
            if not lines or lines == [b"[DONE]"]:
                continue
            payload = orjson.loads(b"\n".join(lines))
            if isinstance(payload, dict):
                payloads.append(payload)
        return payloads


class ChatChunks:
    """The chat completion chunks of one translated stream (`chat.completion.chunk`)."""

    __slots__ = ("created", "id", "model")

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.created = int(time.time())

    def delta(self, delta: Mapping[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._chunk({"choices": [choice]})

    def usage(self, usage: Mapping[str, Any]) -> bytes:
        return self._chunk({"choices": [], "usage": usage})

    def done(self) -> bytes:
        return DONE_EVENT

    def _chunk(self, fields: dict[str, Any]) -> bytes:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            **fields,
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


def completion(
    response_id: str,
    model: str,
    message: dict[str, Any],
    finish_reason: str,
    usage: Mapping[str, Any] | None,
) -> bytes:
    """A whole chat completion (`chat.completion`) of one choice."""
    body: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return orjson.dumps(body)

"""The chat side of a backend translation: the chat chunks and usage a translated answer
is made of, the stream reading both backend APIs share, and which chat fields a
backend's API has no place for (and the error that names one)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import orjson

from gateway.errors import UpstreamError, UpstreamStatus
from gateway.upstream import DONE_EVENT

__all__ = [
    "ChatChunks",
    "SseReader",
    "TranslatedStream",
    "chat_usage",
    "completion",
    "count",
    "refuse_unanswerable",
    "refuse_unknown",
    "text_of",
    "unsupported",
]

# Chat fields that change the answer and that neither backend API has a place for.
_REFUSED = (
    "logprobs",
    "top_logprobs",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "logit_bias",
)
# Chat fields that say nothing to a backend: the gateway's own, or prefill hints neither
# API needs (a last assistant turn is continued as it is).
_IGNORED = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "continue_final_message",
        "add_generation_prompt",
        "store",
        "metadata",
    }
)
# Chat fields a translation reads, each its own way (or refuses, as Responses `stop`).
_TRANSLATED = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "chat_template_kwargs",
        "n",
        "stop",
        "user",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "reasoning_effort",
        "response_format",
    }
)
_KNOWN = _IGNORED | _TRANSLATED | frozenset(_REFUSED)
# A field set to one of these asks for nothing (`stop: []` stops nothing).
_UNSET: tuple[object, ...] = (None, False, [], "")


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


def refuse_unanswerable(chat: Mapping[str, Any], api: str, also: tuple[str, ...] = ()) -> None:
    """Refuse, before anything is built, a chat field that would change the answer and
    that `api` has no place for (`also`: those only this API lacks), or `n` > 1: dropped,
    the client would get an answer to another question."""
    for name in (*also, *_REFUSED):
        if chat.get(name) not in _UNSET:
            raise unsupported(api, name)
    n = chat.get("n")
    if isinstance(n, int) and n > 1:
        raise unsupported(api, "n", "one answer per request")


def refuse_unknown(chat: Mapping[str, Any], api: str) -> None:
    """Refuse a chat field no translation knows: a vendor extension the chat backend
    would have read has nowhere to go, and is not silently dropped either."""
    for name in chat:
        if name not in _KNOWN:
            raise unsupported(api, name)


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


class TranslatedStream(ABC):
    """A backend's event stream as chat chunks, batch by batch (one instance per stream).
    Each API says how its events read (`_event`); the reading around them is shared, so
    both treat a stream cut short alike: as an `UpstreamError`, never a whole answer."""

    _LAST_EVENT: ClassVar[str]  # the event a whole stream ends with

    def __init__(self) -> None:
        self._reader = SseReader()
        self._chunks = ChatChunks()
        self.ended = False

    async def translate(self, batches: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The chat stream of `batches`, ending with `[DONE]` once the last event came."""
        async for batch in batches:
            out = self.feed(batch)
            if out:
                yield out
            if self.ended:
                return
        raise UpstreamError(f"The backend replica ended the stream before {self._LAST_EVENT}.")

    def feed(self, batch: bytes) -> bytes:
        out: list[bytes] = []
        for event in self._reader.feed(batch):
            if not self.ended:
                self._event(event, out)
        return b"".join(out)

    @abstractmethod
    def _event(self, event: dict[str, Any], out: list[bytes]) -> None:
        """Add the chat chunks `event` makes to `out`; call `_end` at the last event."""

    def _begin(self, answer_id: str, model: str, out: list[bytes]) -> None:
        self._chunks.id = answer_id
        self._chunks.model = model
        out.append(self._chunks.delta({"role": "assistant", "content": ""}))

    def _end(self, finish: str, usage: Mapping[str, Any] | None, out: list[bytes]) -> None:
        self.ended = True
        out.append(self._chunks.delta({}, finish))
        if usage is not None:
            out.append(self._chunks.usage(usage))
        out.append(self._chunks.done())


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

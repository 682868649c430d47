"""An Anthropic Messages answer, whole or streamed, as a chat completion: what a chat
(or Responses) client's request to an `api: messages` backend gets back into the
request path as.

Blocks: `text` is the content, `thinking` the `reasoning` (vLLM's chat field; a
`redacted_thinking` block has no text to give), `tool_use` a tool call with its input
as JSON arguments. Stop reasons: `end_turn`, `stop_sequence` and `pause_turn` are
`stop`, `max_tokens` is `length`, `tool_use` is `tool_calls`, `refusal` is
`content_filter`. Usage: Anthropic's `input_tokens` leaves out the cached prompt, so the
prompt is it plus `cache_read_input_tokens` and `cache_creation_input_tokens`, the
cached part chat's `cached_tokens`. A stream's `error` event, or a stream that ends
without `message_stop`, is an `UpstreamError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.backend_api.chat_wire import TranslatedStream, chat_usage, completion, count
from gateway.errors import UpstreamError

__all__ = ["MessagesStream", "chat_from_message", "finish_reason", "usage_from_messages"]

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def finish_reason(stop_reason: object) -> str:
    return _FINISH.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def usage_from_messages(usage: object) -> dict[str, Any] | None:
    """Messages usage in chat's shape; None when there is none."""
    if not isinstance(usage, Mapping):
        return None
    cached = count(usage.get("cache_read_input_tokens"))
    prompt = count(usage.get("input_tokens")) + cached
    prompt += count(usage.get("cache_creation_input_tokens"))
    return chat_usage(prompt, count(usage.get("output_tokens")), cached)


def chat_from_message(payload: bytes) -> bytes:
    """A whole Messages answer as a chat completion."""
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError("The backend replica sent a response that is not JSON.") from exc
    if not isinstance(message, dict) or message.get("type") == "error":
        raise UpstreamError(_error_message(message))
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "thinking":
            thinking.append(block.get("thinking") or "")
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            function = {"name": block.get("name") or "", "arguments": arguments}
            calls.append({"id": block.get("id") or "", "type": "function", "function": function})
    chat_message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
    }
    if thinking:
        chat_message["reasoning"] = "".join(thinking)
    if calls:
        chat_message["tool_calls"] = calls
    return completion(
        str(message.get("id") or ""),
        str(message.get("model") or ""),
        chat_message,
        finish_reason(message.get("stop_reason")),
        usage_from_messages(message.get("usage")),
    )


class MessagesStream(TranslatedStream):
    """A Messages event stream as chat chunks, batch by batch (one instance per stream)."""

    _LAST_EVENT = "message_stop"

    def __init__(self) -> None:
        super().__init__()
        self._usage: dict[str, Any] = {}
        self._tools: dict[int, int] = {}  # block index -> tool call index
        self._finish: str | None = None

    def _event(self, event: dict[str, Any], out: list[bytes]) -> None:
        kind = event.get("type")
        chunks = self._chunks
        if kind == "message_start":
            message = event.get("message") or {}
            self._note_usage(message.get("usage"))
            self._begin(str(message.get("id") or ""), str(message.get("model") or ""), out)
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                position = self._tools[event.get("index", 0)] = len(self._tools)
                call = {
                    "index": position,
                    "id": block.get("id") or "",
                    "type": "function",
                    "function": {"name": block.get("name") or "", "arguments": ""},
                }
                out.append(chunks.delta({"tool_calls": [call]}))
            elif block.get("type") == "text" and block.get("text"):
                out.append(chunks.delta({"content": block["text"]}))
        elif kind == "content_block_delta":
            self._delta(event.get("index", 0), event.get("delta") or {}, out)
        elif kind == "message_delta":
            delta = event.get("delta") or {}
            self._finish = finish_reason(delta.get("stop_reason"))
            self._note_usage(event.get("usage"))
        elif kind == "message_stop":
            self._end(self._finish or "stop", usage_from_messages(self._usage), out)
        elif kind == "error":
            raise UpstreamError(_error_message(event))
        # ping, content_block_stop: nothing to say in chat.

    def _delta(self, index: int, delta: Mapping[str, Any], out: list[bytes]) -> None:
        kind = delta.get("type")
        if kind == "text_delta":
            out.append(self._chunks.delta({"content": delta.get("text") or ""}))
        elif kind == "thinking_delta":
            out.append(self._chunks.delta({"reasoning": delta.get("thinking") or ""}))
        elif kind == "input_json_delta" and index in self._tools:
            call = {
                "index": self._tools[index],
                "function": {"arguments": delta.get("partial_json") or ""},
            }
            out.append(self._chunks.delta({"tool_calls": [call]}))
        # signature_delta, citations_delta: nothing chat can carry.

    def _note_usage(self, usage: object) -> None:
        # message_delta's counts are cumulative and may repeat message_start's input.
        if isinstance(usage, Mapping):
            self._usage.update({k: v for k, v in usage.items() if v is not None})


def _error_message(body: object) -> str:
    error = body.get("error") if isinstance(body, Mapping) else None
    message = error.get("message") if isinstance(error, Mapping) else None
    if isinstance(message, str) and message:
        return f"The backend replica failed: {message}"
    return "The backend replica failed."

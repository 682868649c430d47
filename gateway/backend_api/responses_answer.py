"""An OpenAI Responses answer, whole or streamed, as a chat completion: what a chat (or
Messages) client's request to an `api: responses` backend gets back into the request
path as.

Items: a `message`'s `output_text` parts are the content (a `refusal` part chat's
`refusal`), a `reasoning` item's text (its `reasoning_text` content, else its summary)
the `reasoning`, a `function_call` a tool call (`call_id` its id). Status: `completed`
is `stop`, or `tool_calls` when it called a function; `incomplete` for
`max_output_tokens` is `length`, for `content_filter` `content_filter`; `failed` (or an
`error` event) is an `UpstreamError`. Usage maps one to one (`cached_tokens`,
`reasoning_tokens`). A stream ends with `response.completed` or `response.incomplete`;
one that ends before is cut short.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.backend_api.chat_wire import TranslatedStream, chat_usage, completion, count
from gateway.errors import UpstreamError

__all__ = [
    "END_EVENTS",
    "ResponsesStream",
    "chat_from_response",
    "finish_reason",
    "usage_from_responses",
]

END_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}


def finish_reason(response: Mapping[str, Any], called: bool) -> str:
    if response.get("status") == "incomplete":
        details = response.get("incomplete_details") or {}
        return _INCOMPLETE.get(str(details.get("reason")), "length")
    return "tool_calls" if called else "stop"


def usage_from_responses(usage: object) -> dict[str, Any] | None:
    """Responses usage in chat's shape; None when there is none."""
    if not isinstance(usage, Mapping):
        return None
    cached = count((usage.get("input_tokens_details") or {}).get("cached_tokens"))
    reasoning = count((usage.get("output_tokens_details") or {}).get("reasoning_tokens"))
    return chat_usage(
        count(usage.get("input_tokens")), count(usage.get("output_tokens")), cached, reasoning
    )


def chat_from_response(payload: bytes) -> bytes:
    """A whole Response object as a chat completion."""
    try:
        response = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError("The backend replica sent a response that is not JSON.") from exc
    if not isinstance(response, dict) or response.get("status") == "failed":
        raise UpstreamError(_failure(response))
    texts: list[str] = []
    refusals: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in response.get("output") or ():
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "message":
            for part in item.get("content") or ():
                if part.get("type") == "output_text":
                    texts.append(part.get("text") or "")
                elif part.get("type") == "refusal":
                    refusals.append(part.get("refusal") or "")
        elif kind == "reasoning":
            reasoning.append(_reasoning_text(item))
        elif kind == "function_call":
            function = {"name": item.get("name") or "", "arguments": item.get("arguments") or ""}
            call_id = item.get("call_id") or item.get("id") or ""
            calls.append({"id": call_id, "type": "function", "function": function})
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
    }
    if refusals:
        message["refusal"] = "".join(refusals)
    if any(reasoning):
        message["reasoning"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return completion(
        str(response.get("id") or ""),
        str(response.get("model") or ""),
        message,
        finish_reason(response, bool(calls)),
        usage_from_responses(response.get("usage")),
    )


def _reasoning_text(item: Mapping[str, Any]) -> str:
    parts = item.get("content") or item.get("summary") or ()
    return "".join(p.get("text") or "" for p in parts if isinstance(p, Mapping))


class ResponsesStream(TranslatedStream):
    """A Responses event stream as chat chunks, batch by batch (one instance per stream)."""

    _LAST_EVENT = "response.completed"

    def __init__(self) -> None:
        super().__init__()
        self._calls: dict[str, int] = {}  # function_call item id -> tool call index
        self._started = False

    def _event(self, event: dict[str, Any], out: list[bytes]) -> None:
        kind = event.get("type")
        chunks = self._chunks
        if kind in ("response.created", "response.in_progress"):
            self._start(event.get("response") or {}, out)
        elif kind == "response.output_item.added":
            item = event.get("item") or {}
            if item.get("type") == "function_call":
                position = self._calls[item.get("id") or ""] = len(self._calls)
                call = {
                    "index": position,
                    "id": item.get("call_id") or item.get("id") or "",
                    "type": "function",
                    "function": {"name": item.get("name") or "", "arguments": ""},
                }
                out.append(chunks.delta({"tool_calls": [call]}))
        elif kind == "response.output_text.delta":
            out.append(chunks.delta({"content": event.get("delta") or ""}))
        elif kind == "response.refusal.delta":
            out.append(chunks.delta({"refusal": event.get("delta") or ""}))
        elif kind in ("response.reasoning_text.delta", "response.reasoning_summary_text.delta"):
            out.append(chunks.delta({"reasoning": event.get("delta") or ""}))
        elif kind == "response.function_call_arguments.delta":
            found = self._calls.get(event.get("item_id") or "")
            if found is not None:
                call = {"index": found, "function": {"arguments": event.get("delta") or ""}}
                out.append(chunks.delta({"tool_calls": [call]}))
        elif kind in ("response.completed", "response.incomplete"):
            response = event.get("response") or {}
            self._start(response, out)
            finish = finish_reason(response, bool(self._calls))
            self._end(finish, usage_from_responses(response.get("usage")), out)
        elif kind in ("response.failed", "error"):
            raise UpstreamError(_failure(event.get("response") or event))
        # Parts added and done, items done, `.done` events: nothing new for chat.

    def _start(self, response: Mapping[str, Any], out: list[bytes]) -> None:
        if self._started:
            return
        self._started = True
        self._begin(str(response.get("id") or ""), str(response.get("model") or ""), out)


def _failure(body: object) -> str:
    error = body.get("error") if isinstance(body, Mapping) else None
    if error is None and isinstance(body, Mapping):
        error = body  # an `error` event carries its message at the top
    message = error.get("message") if isinstance(error, Mapping) else None
    if isinstance(message, str) and message:
        return f"The backend replica failed: {message}"
    return "The backend replica failed."

"""The pieces of an OpenAI Responses answer built from a chat completion: the Response
object's frame (what it echoes of the request), its output items and its usage.

Shared by the JSON answer and the stream, so that both say the same thing: an item's id
is its kind's prefix, the request id and its place in `output`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "failure_code",
    "finish_state",
    "function_call_item",
    "item_id",
    "message_item",
    "output_items",
    "output_text_part",
    "reasoning_item",
    "reasoning_text",
    "response_frame",
    "usage",
]

# What `Response.error.code` may be (the SDK's `ResponseError` is a closed Literal).
_RATE_LIMITED = "rate_limit_exceeded"
_BAD_PROMPT = "invalid_prompt"
_SERVER_ERROR = "server_error"


def item_id(prefix: str, request_id: str, index: int) -> str:
    return f"{prefix}_{request_id}_{index}"


def response_frame(body: Mapping[str, Any], response_id: str, created_at: int) -> dict[str, Any]:
    """The Response object less status, output and usage: the request's settings echoed
    as OpenAI echoes them (a setting the client left out is its default, or null)."""
    reasoning = body.get("reasoning") or {}
    text = body.get("text") or {}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "model": body.get("model"),
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "safety_identifier": body.get("safety_identifier"),
        "store": body.get("store", True),
        "temperature": body.get("temperature"),
        "text": {"format": text.get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p"),
        "truncation": "disabled",
        "usage": None,
        "user": body.get("user"),
    }


def finish_state(finish_reason: str | None) -> tuple[str, dict[str, str] | None]:
    """The Response's `status` and `incomplete_details` for a chat finish reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def failure_code(code: object, error_type: object) -> str:
    """A gateway or backend error's code as one `Response.error.code` allows."""
    if code == _RATE_LIMITED or error_type == "rate_limit_error":
        return _RATE_LIMITED
    if error_type == "invalid_request_error":
        return _BAD_PROMPT
    return _SERVER_ERROR


def reasoning_item(id_: str, text: str, status: str) -> dict[str, Any]:
    # The reasoning as `content`, as vLLM's own Responses server returns it; a chat backend
    # gives no summary.
    return {
        "id": id_,
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def message_item(id_: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": id_,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [output_text_part(text)],
    }


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(
    id_: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "id": id_,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def reasoning_text(message: Mapping[str, Any]) -> str:
    """A chat message's or delta's reasoning: vLLM's older field name, then its newer."""
    text = message.get("reasoning_content") or message.get("reasoning")
    return text if isinstance(text, str) else ""


def output_items(
    message: Mapping[str, Any], finish_reason: str | None, request_id: str
) -> list[dict[str, Any]]:
    """A chat message as output items: its reasoning, its text (also when empty and there
    is nothing else to say), then its tool calls. When the answer was cut short, the
    last item is the one it cut."""
    items: list[dict[str, Any]] = []
    reasoning = reasoning_text(message)
    if reasoning:
        items.append(reasoning_item(item_id("rs", request_id, len(items)), reasoning, ""))
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    calls = message.get("tool_calls") or []
    if text or not calls:
        items.append(message_item(item_id("msg", request_id, len(items)), text, ""))
    for call in calls:
        function = call.get("function") or {}
        index = len(items)
        items.append(
            function_call_item(
                item_id("fc", request_id, index),
                call.get("id") or item_id("call", request_id, index),
                function.get("name") or "",
                function.get("arguments") or "",
                "",
            )
        )
    status, _ = finish_state(finish_reason)
    for item in items:
        item["status"] = "completed"
    items[-1]["status"] = status
    return items


def usage(chat_usage: object) -> dict[str, Any] | None:
    """Chat usage as Responses usage; None when the backend sent none."""
    if not isinstance(chat_usage, Mapping):
        return None
    prompt = chat_usage.get("prompt_tokens") or 0
    completion = chat_usage.get("completion_tokens") or 0
    prompt_details = chat_usage.get("prompt_tokens_details") or {}
    completion_details = chat_usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": prompt_details.get("cached_tokens") or 0,
            # A chat backend reports no cache writes; the SDK requires the field.
            "cache_write_tokens": 0,
        },
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": completion_details.get("reasoning_tokens") or 0
        },
        "total_tokens": chat_usage.get("total_tokens") or prompt + completion,
    }

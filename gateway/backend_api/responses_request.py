"""A chat completions body as an OpenAI Responses request, for a backend of `api:
responses` that a chat or Messages client's request goes to.

The mapping, per the `openai` SDK's `ResponseCreateParams`:

- leading system and developer messages become `instructions`; later ones `system`
  message items;
- user turns become `message` items (`input_text`, `input_image` parts), an assistant
  turn's text an `output_text` message item, its tool calls `function_call` items,
  `tool` messages `function_call_output` items; an assistant turn's reasoning is left
  out, as vLLM's templates drop earlier turns' reasoning anyway;
- `max_tokens` is `max_output_tokens`, tools are flat (`name`, `parameters`),
  `tool_choice` maps one to one, `reasoning_effort` is `reasoning.effort`, a
  `json_schema` or `json_object` response format is `text.format`;
- `store` is false: the backend's store is not the gateway's, which keeps what its
  clients asked to keep; `top_k` and `chat_template_kwargs` pass as vLLM extensions.

A chat field Responses has no place for (`stop`, `n` > 1, penalties, `seed`,
`logit_bias`, logprobs) is the client's 400 naming it, never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.backend_api.chat_wire import (
    refuse_unanswerable,
    refuse_unknown,
    text_of,
    unsupported,
)

__all__ = ["responses_request"]

_API = "Responses"
_PASSED = ("temperature", "top_p", "top_k", "chat_template_kwargs", "parallel_tool_calls", "user")


def responses_request(chat: Mapping[str, Any], model: str, max_tokens: int | None) -> bytes:
    """The Responses body for `chat`, sent as `model` with at most `max_tokens` output."""
    refuse_unanswerable(chat, _API, also=("stop",))
    instructions, items = _input(chat["messages"])
    body: dict[str, Any] = {"model": model, "input": items, "store": False}
    if instructions:
        body["instructions"] = instructions
    if max_tokens is not None:
        body["max_output_tokens"] = max_tokens
    for name in _PASSED:
        if chat.get(name) is not None:
            body[name] = chat[name]
    if chat.get("stream") is True:
        body["stream"] = True
    effort = chat.get("reasoning_effort")
    if isinstance(effort, str):
        body["reasoning"] = {"effort": effort}
    _add_tools(body, chat)
    _add_format(body, chat)
    refuse_unknown(chat, _API)
    return orjson.dumps(body)


def _input(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    instructions: list[str] = []
    items: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            if not items:
                instructions.append(text_of(content))
            else:
                items.append({"type": "message", "role": "system", "content": text_of(content)})
        elif role == "assistant":
            text = text_of(content)
            if text:
                part = {"type": "output_text", "text": text, "annotations": []}
                items.append({"type": "message", "role": "assistant", "content": [part]})
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                items.append(
                    {
                        "type": "function_call",
                        "call_id": call.get("id") or "",
                        "name": function.get("name") or "",
                        "arguments": function.get("arguments") or "",
                    }
                )
        elif role in ("tool", "function"):
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": message.get("tool_call_id") or message.get("name") or "",
                    "output": text_of(content),
                }
            )
        else:
            items.append({"type": "message", "role": "user", "content": _user_parts(content)})
    return "\n\n".join(t for t in instructions if t), items


def _user_parts(content: object) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, Mapping):
            continue
        if isinstance(part.get("text"), str):
            parts.append({"type": "input_text", "text": part["text"]})
        elif part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, Mapping) else image
            entry: dict[str, Any] = {"type": "input_image", "image_url": url, "detail": "auto"}
            if isinstance(image, Mapping) and isinstance(image.get("detail"), str):
                entry["detail"] = image["detail"]
            parts.append(entry)
    return parts


def _add_tools(body: dict[str, Any], chat: Mapping[str, Any]) -> None:
    tools = chat.get("tools")
    if tools:
        converted = []
        for tool in tools:
            function = tool.get("function") or {}
            entry: dict[str, Any] = {
                "type": "function",
                "name": function.get("name"),
                "parameters": function.get("parameters") or {"type": "object"},
            }
            for name in ("description", "strict"):
                if function.get(name) is not None:
                    entry[name] = function[name]
            converted.append(entry)
        body["tools"] = converted
    choice = chat.get("tool_choice")
    if isinstance(choice, str):
        body["tool_choice"] = choice
    elif isinstance(choice, Mapping):
        body["tool_choice"] = {
            "type": "function",
            "name": (choice.get("function") or {}).get("name"),
        }


def _add_format(body: dict[str, Any], chat: Mapping[str, Any]) -> None:
    fmt = chat.get("response_format")
    if not isinstance(fmt, Mapping) or fmt.get("type") in (None, "text"):
        return
    if fmt.get("type") == "json_object":
        body["text"] = {"format": {"type": "json_object"}}
        return
    spec = fmt.get("json_schema")
    if fmt.get("type") != "json_schema" or not isinstance(spec, Mapping):
        raise unsupported(_API, "response_format")
    out: dict[str, Any] = {"type": "json_schema", "name": spec.get("name") or "output"}
    for name in ("schema", "strict", "description"):
        if spec.get(name) is not None:
            out[name] = spec[name]
    body["text"] = {"format": out}

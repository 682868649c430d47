"""A chat completions body as an Anthropic Messages request, for a backend of `api:
messages` that a chat or Responses client's request goes to.

The mapping, per the `anthropic` SDK's `MessageCreateParams`:

- system and developer messages become `system` (their texts joined by blank lines);
- a user turn's text and `image_url` parts become `text` and `image` blocks (a data URL
  a base64 source, any other a URL source);
- an assistant turn's reasoning becomes a `thinking` block (signature "": nothing here
  signs thinking), its text a `text` block, its tool calls `tool_use` blocks;
- `tool` messages become `tool_result` blocks of the user turn that follows, as
  Messages wants them; consecutive turns of one role are merged (Messages alternates);
- `max_tokens` is required by Messages: the client's, else the budget's cap, else
  `DEFAULT_MAX_TOKENS`; `stop` is `stop_sequences`, `user` is `metadata.user_id`;
- tools and `tool_choice` map one to one (`required` is `any`, `parallel_tool_calls:
  false` is `disable_parallel_tool_use`); `reasoning_effort` is `output_config.effort`
  and a `json_schema` response format `output_config.format` (vLLM's reading of both);
  `top_k` and `chat_template_kwargs` pass as the vLLM extensions they are.

A chat field Messages has no place for (`n` > 1, logprobs, penalties, `seed`,
`logit_bias`, another response format) is the client's 400 naming it, never dropped.
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

__all__ = ["DEFAULT_MAX_TOKENS", "messages_request"]

DEFAULT_MAX_TOKENS = 4096
_API = "Messages"
_PASSED = ("temperature", "top_p", "top_k", "chat_template_kwargs")


def messages_request(chat: Mapping[str, Any], model: str, max_tokens: int | None) -> bytes:
    """The Messages body for `chat`, sent as `model`; `max_tokens`: the output limit
    (the client's, else the budget's cap)."""
    refuse_unanswerable(chat, _API)
    system, messages = _conversation(chat["messages"])
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens or DEFAULT_MAX_TOKENS,
        "messages": messages,
    }
    if system:
        body["system"] = system
    for name in _PASSED:
        if chat.get(name) is not None:
            body[name] = chat[name]
    stop = chat.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if chat.get("stream") is True:
        body["stream"] = True
    user = chat.get("user")
    if isinstance(user, str):
        body["metadata"] = {"user_id": user}
    _add_tools(body, chat)
    _add_output_config(body, chat)
    refuse_unknown(chat, _API)
    return orjson.dumps(body)


def _conversation(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    system: list[str] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            text = text_of(content)
            if text:
                system.append(text)
        elif role == "assistant":
            add("assistant", _assistant_blocks(message))
        elif role in ("tool", "function"):
            block = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id") or message.get("name") or "",
                "content": text_of(content),
            }
            add("user", [block])
        else:
            add("user", _user_blocks(content))
    for turn in turns:
        if not turn["content"]:
            turn["content"] = [{"type": "text", "text": ""}]
    return "\n\n".join(system), turns


def _user_blocks(content: object) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, Mapping):
            continue
        if isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            if isinstance(url, str):
                blocks.append({"type": "image", "source": _image_source(url)})
    return blocks


def _image_source(url: str) -> dict[str, Any]:
    if url.startswith("data:") and ";base64," in url:
        head, data = url[5:].split(";base64,", 1)
        return {"type": "base64", "media_type": head, "data": data}
    return {"type": "url", "url": url}


def _assistant_blocks(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    reasoning = message.get("reasoning") or message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = text_of(message.get("content"))
    if text:
        blocks.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id") or "",
                "name": function.get("name") or "",
                "input": _arguments(function.get("arguments")),
            }
        )
    return blocks


def _arguments(arguments: object) -> dict[str, Any]:
    if isinstance(arguments, str) and arguments.strip():
        try:
            value = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}
    return {}


def _add_tools(body: dict[str, Any], chat: Mapping[str, Any]) -> None:
    tools = chat.get("tools")
    if tools:
        converted = []
        for tool in tools:
            function = tool.get("function") or {}
            entry: dict[str, Any] = {
                "name": function.get("name"),
                "input_schema": function.get("parameters") or {"type": "object"},
            }
            if function.get("description") is not None:
                entry["description"] = function["description"]
            converted.append(entry)
        body["tools"] = converted
    choice = chat.get("tool_choice")
    mapped: dict[str, Any] | None = None
    if isinstance(choice, str):
        mapped = {"type": {"auto": "auto", "required": "any", "none": "none"}.get(choice, "auto")}
    elif isinstance(choice, Mapping):
        name = (choice.get("function") or {}).get("name")
        mapped = {"type": "tool", "name": name}
    if chat.get("parallel_tool_calls") is False and tools:
        mapped = mapped or {"type": "auto"}
        mapped["disable_parallel_tool_use"] = True
    if mapped is not None and (tools or mapped["type"] == "none"):
        body["tool_choice"] = mapped


def _add_output_config(body: dict[str, Any], chat: Mapping[str, Any]) -> None:
    config: dict[str, Any] = {}
    effort = chat.get("reasoning_effort")
    if isinstance(effort, str):
        config["effort"] = effort
    fmt = chat.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type") not in (None, "text"):
        schema = (fmt.get("json_schema") or {}).get("schema")
        if fmt.get("type") != "json_schema" or not isinstance(schema, Mapping):
            raise unsupported(_API, "response_format", "only a json_schema format maps")
        config["format"] = {"type": "json_schema", "schema": schema}
    if config:
        body["output_config"] = config

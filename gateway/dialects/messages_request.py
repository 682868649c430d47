"""An Anthropic Messages request, checked, as a chat completions body.

Checked in two steps: the top level with one strict model, then each content block, tool
and option with the model its `type` names, so an error names the exact field
(`messages.2.content.0.source.type`) whatever nesting it sits in. Every field is either
honoured, accepted as a hint with nothing to honour (`cache_control`), or a 400 naming it:
none is dropped in silence.

Thinking: `{"type": "enabled"}` and `{"type": "adaptive"}` become
`chat_template_kwargs: {"enable_thinking": true}`, the switch Qwen3-style hybrid templates
read on vLLM and SGLang alike (a template without it ignores it); `enabled` also sets
`reasoning_effort` from `budget_tokens` (<= 4096 low, <= 16384 medium, else high), the
knob gpt-oss-style models read instead, since neither server takes a token budget for
thinking. `{"type": "disabled"}` sends `enable_thinking: false`, so a hybrid model that
thinks by default does not. Thinking tokens count toward `max_tokens` on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.api.schemas import MAX_MESSAGES, describe_location
from gateway.errors import InvalidRequest

__all__ = ["checked", "to_chat"]

_M = TypeVar("_M", bound=BaseModel)

# Documented by Anthropic, meaningless without Anthropic's own services behind them.
_UNSUPPORTED = {
    "container": "code-execution containers",
    "diagnostics": "prompt-cache diagnostics",
    "inference_geo": "inference regions",
    "mcp_servers": "remote MCP servers",
    "user_profile_id": "user profiles",
    "workspace_id": "workspaces",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _CacheControl(_Strict):
    # Prompt-caching hints: vLLM and SGLang cache prefixes on their own, so there is
    # nothing to mark; accepted so that clients which always send them work.
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class _Metadata(_Strict):
    user_id: str | None = Field(None, max_length=256)


class _Request(_Strict):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=10_000_000)
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool | None = None
    metadata: _Metadata | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    cache_control: _CacheControl | None = None
    # The gateway has one tier of capacity: "standard_only" is what it always gives.
    service_tier: Literal["auto", "standard_only"] | None = None
    speed: Literal["standard"] | None = None


class _Text(_Strict):
    type: Literal["text"]
    text: str
    cache_control: _CacheControl | None = None
    citations: list[Any] | None = Field(None, max_length=0)  # none to cite from here


class _Base64Source(_Strict):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(min_length=1)


class _UrlSource(_Strict):
    type: Literal["url"]
    url: str = Field(min_length=1)


class _Image(_Strict):
    type: Literal["image"]
    source: dict[str, Any]
    cache_control: _CacheControl | None = None


class _ToolUse(_Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]
    cache_control: _CacheControl | None = None


class _ToolResult(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None
    cache_control: _CacheControl | None = None


class _Thinking(_Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str  # ours are empty; nothing here can verify one, so none is checked


class _RedactedThinking(_Strict):
    type: Literal["redacted_thinking"]
    data: str


class _Tool(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    strict: bool | None = None
    cache_control: _CacheControl | None = None
    eager_input_streaming: bool | None = None  # arguments stream as they come anyway
    defer_loading: Literal[False] | None = None
    allowed_callers: list[Literal["direct"]] | None = None
    # Example inputs (Anthropic's tool-use examples): chat tools have no field for them,
    # so they join the description, where a model reads them all the same.
    input_examples: list[dict[str, Any]] | None = Field(None, max_length=20)


class _ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class _ThinkingConfig(_Strict):
    type: Literal["enabled", "adaptive", "disabled"]
    budget_tokens: int | None = Field(None, ge=1024)
    display: Literal["summarized"] | None = None


class _OutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class _OutputConfig(_Strict):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: dict[str, Any] | None = None


def checked(model: type[_M], value: object, path: str) -> _M:
    """`value` as `model`, or `InvalidRequest` naming the field at `path` that is wrong."""
    if not isinstance(value, dict):
        raise InvalidRequest(f"Invalid value for '{path}': expected an object.", param=path)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = ".".join(p for p in (path, describe_location(first["loc"])) if p)
        if first["type"] == "extra_forbidden":
            message = f"Unknown field '{param}': the gateway cannot honour it."
        else:
            message = f"Invalid value for '{param}': {first['msg']}"
        raise InvalidRequest(message, param=param) from exc


def _block(value: object, path: str, allowed: Mapping[str, type[_M]]) -> _M:
    kind = value.get("type") if isinstance(value, dict) else None
    model = allowed.get(kind) if isinstance(kind, str) else None
    if model is None:
        names = ", ".join(sorted(allowed))
        raise InvalidRequest(
            f"Invalid value for '{path}.type': {kind!r} is not supported here (expected {names}).",
            param=f"{path}.type",
        )
    return checked(model, value, path)


_USER_BLOCKS: dict[str, type[_Strict]] = {
    "text": _Text,
    "image": _Image,
    "tool_result": _ToolResult,
}
_ASSISTANT_BLOCKS: dict[str, type[_Strict]] = {
    "text": _Text,
    "tool_use": _ToolUse,
    "thinking": _Thinking,
    "redacted_thinking": _RedactedThinking,
}
_SOURCES: dict[str, type[_Strict]] = {"base64": _Base64Source, "url": _UrlSource}
_RESULT_BLOCKS: dict[str, type[_Strict]] = {"text": _Text, "image": _Image}


def to_chat(body: Mapping[str, Any], *, require_max_tokens: bool = True) -> dict[str, Any]:
    """The Messages request `body` as a chat completions body; `InvalidRequest` naming
    the field for anything it cannot honour. `require_max_tokens=False` reads a
    `count_tokens` request, which has none."""
    for name, what in _UNSUPPORTED.items():
        if body.get(name) is not None:
            raise InvalidRequest(
                f"Unsupported field '{name}': this gateway has no {what}.", param=name
            )
    request = checked(_Request, {k: v for k, v in body.items() if k not in _UNSUPPORTED}, "")
    if require_max_tokens and request.max_tokens is None:
        raise InvalidRequest("Missing required field 'max_tokens'.", param="max_tokens")
    messages = _messages(request)
    chat: dict[str, Any] = {"model": request.model, "messages": messages}
    if messages[-1]["role"] == "assistant":
        # A final assistant turn is a prefill: the answer continues it. These are vLLM's
        # and SGLang's names for that; a server without them starts a new turn instead.
        chat["continue_final_message"] = True
        chat["add_generation_prompt"] = False
    if request.max_tokens is not None:
        chat["max_tokens"] = request.max_tokens
    for name in ("temperature", "top_p", "top_k"):  # top_k: a vLLM and SGLang extension
        if (value := getattr(request, name)) is not None:
            chat[name] = value
    if request.stop_sequences:
        chat["stop"] = request.stop_sequences
    if request.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    if request.metadata is not None and request.metadata.user_id is not None:
        chat["user"] = request.metadata.user_id
    _add_tools(chat, request)
    _add_thinking(chat, request)
    _add_output_config(chat, request)
    return chat


def _messages(request: _Request) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if request.system is not None:
        system = request.system
        if isinstance(system, list):
            # Separate blocks are separate paragraphs (Claude Code sends several).
            texts = (checked(_Text, b, f"system.{i}").text for i, b in enumerate(system))
            system = "\n\n".join(texts)
        out.append({"role": "system", "content": system})
    pending: tuple[int, set[str]] | None = None  # the tool_use ids the next turn answers
    for index, role, blocks in _turns(request.messages):
        if role == "assistant":
            message, ids = _assistant(blocks)
            out.append(message)
            pending = (index, ids) if ids else None
            continue
        answered = _user(blocks, pending[1] if pending else set(), out)
        if pending is not None and (missing := pending[1] - answered):
            raise InvalidRequest(
                f"Invalid value for 'messages.{pending[0]}': tool_use ids were found without"
                f" tool_result blocks immediately after: {', '.join(sorted(missing))}.",
                param=f"messages.{pending[0]}",
            )
        pending = None
    return out


def _turns(messages: list[dict[str, Any]]) -> list[tuple[int, str, list[tuple[str, Any]]]]:
    """Consecutive messages of one role joined into one turn, as Anthropic joins them;
    each block keeps the path it was sent at."""
    turns: list[tuple[int, str, list[tuple[str, Any]]]] = []
    for i, message in enumerate(messages):
        path = f"messages.{i}"
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise InvalidRequest(
                f"Invalid value for '{path}.role': {role!r} (expected 'user' or 'assistant';"
                " a system prompt goes in the top-level 'system').",
                param=f"{path}.role",
            )
        extra = set(message) - {"role", "content"}
        if extra:
            name = sorted(extra)[0]
            raise InvalidRequest(
                f"Unknown field '{path}.{name}': the gateway cannot honour it.",
                param=f"{path}.{name}",
            )
        content = message.get("content")
        if isinstance(content, str):
            blocks: list[tuple[str, Any]] = [(f"{path}.content", content)]
        elif isinstance(content, list):
            blocks = [(f"{path}.content.{j}", block) for j, block in enumerate(content)]
        else:
            raise InvalidRequest(
                f"Invalid value for '{path}.content': expected a string or a list of blocks.",
                param=f"{path}.content",
            )
        if not content and not (role == "assistant" and i == len(messages) - 1):
            # Anthropic's rule; a turn of nothing has no chat message to become.
            raise InvalidRequest(
                f"Invalid value for '{path}.content': all messages must have non-empty"
                " content except for the optional final assistant message.",
                param=f"{path}.content",
            )
        if turns and turns[-1][1] == role:
            turns[-1][2].extend(blocks)
        else:
            turns.append((i, role, blocks))
    return turns


def _assistant(blocks: list[tuple[str, Any]]) -> tuple[dict[str, Any], set[str]]:
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for path, value in blocks:
        if isinstance(value, str):
            texts.append(value)
            continue
        block = _block(value, path, _ASSISTANT_BLOCKS)
        if isinstance(block, _Text):
            texts.append(block.text)
        elif isinstance(block, _ToolUse):
            arguments = orjson.dumps(block.input).decode()
            calls.append(
                {
                    "id": block.id,
                    "type": "function",
                    "function": {"name": block.name, "arguments": arguments},
                }
            )
        elif isinstance(block, _Thinking):
            reasoning.append(block.thinking)
        # redacted_thinking: encrypted by Anthropic for its own models; no backend here
        # could read it, as Anthropic's API itself drops earlier turns' thinking.
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if reasoning:
        # vLLM hands an assistant message's `reasoning` to templates that keep thinking
        # across tool calls; other servers ignore it.
        message["reasoning"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message, {call["id"] for call in calls}


def _user(blocks: list[tuple[str, Any]], expected: set[str], out: list[dict[str, Any]]) -> set[str]:
    """Append the turn: its tool results first, as `tool` messages (chat puts them right
    after the assistant's calls), then the rest as one user message. The ids answered."""
    parts: list[dict[str, Any]] = []
    answered: set[str] = set()
    for path, value in blocks:
        if isinstance(value, str):
            parts.append({"type": "text", "text": value})
            continue
        block = _block(value, path, _USER_BLOCKS)
        if isinstance(block, _Text):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, _Image):
            parts.append(_image_part(block, path))
        elif isinstance(block, _ToolResult):
            if block.tool_use_id not in expected:
                raise InvalidRequest(
                    f"Invalid value for '{path}.tool_use_id': {block.tool_use_id!r} answers no"
                    " tool_use block of the previous assistant turn.",
                    param=f"{path}.tool_use_id",
                )
            answered.add(block.tool_use_id)
            text, images = _tool_result(block, path)
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": text})
            # Chat's tool messages hold text only: a result's images follow as the user's.
            parts.extend(images)
    if parts:
        if len(parts) == 1 and parts[0]["type"] == "text":
            out.append({"role": "user", "content": parts[0]["text"]})
        else:
            out.append({"role": "user", "content": parts})
    return answered


def _tool_result(block: _ToolResult, path: str) -> tuple[str, list[dict[str, Any]]]:
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    if isinstance(block.content, str):
        texts.append(block.content)
    elif block.content is not None:
        for j, value in enumerate(block.content):
            inner = _block(value, f"{path}.content.{j}", _RESULT_BLOCKS)
            if isinstance(inner, _Text):
                texts.append(inner.text)
            elif isinstance(inner, _Image):
                images.append(_image_part(inner, f"{path}.content.{j}"))
    text = "\n".join(texts)
    return (f"Error: {text}" if block.is_error else text), images


def _image_part(block: _Image, path: str) -> dict[str, Any]:
    source = _block(block.source, f"{path}.source", _SOURCES)
    if isinstance(source, _Base64Source):
        url = f"data:{source.media_type};base64,{source.data}"
    else:
        assert isinstance(source, _UrlSource)
        url = source.url
    return {"type": "image_url", "image_url": {"url": url}}


def _add_tools(chat: dict[str, Any], request: _Request) -> None:
    names: set[str] = set()
    if request.tools is not None:
        tools = []
        for i, value in enumerate(request.tools):
            kind = value.get("type") if isinstance(value, dict) else None
            if kind not in (None, "custom"):
                raise InvalidRequest(
                    f"Invalid value for 'tools.{i}.type': server tool {kind!r} is not"
                    " supported; only client tools (name, description, input_schema) are.",
                    param=f"tools.{i}.type",
                )
            tool = checked(_Tool, value, f"tools.{i}")
            function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
            description = _with_examples(tool.description, tool.input_examples)
            if description is not None:
                function["description"] = description
            if tool.strict is not None:
                function["strict"] = tool.strict
            tools.append({"type": "function", "function": function})
            names.add(tool.name)
        if tools:
            chat["tools"] = tools
    if request.tool_choice is None:
        return
    choice = checked(_ToolChoice, request.tool_choice, "tool_choice")
    if choice.type == "tool":
        if choice.name not in names:
            raise InvalidRequest(
                f"Invalid value for 'tool_choice.name': {choice.name!r} is not one of the tools.",
                param="tool_choice.name",
            )
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if choice.disable_parallel_tool_use:
        chat["parallel_tool_calls"] = False


def _with_examples(description: str | None, examples: list[dict[str, Any]] | None) -> str | None:
    if not examples:
        return description
    lines = [orjson.dumps(example).decode() for example in examples]
    shown = "Example inputs:\n" + "\n".join(lines)
    return shown if description is None else f"{description}\n\n{shown}"


def _effort(budget: int) -> str:
    return "low" if budget <= 4096 else "medium" if budget <= 16384 else "high"


def _add_thinking(chat: dict[str, Any], request: _Request) -> None:
    if request.thinking is None:
        return
    thinking = checked(_ThinkingConfig, request.thinking, "thinking")
    if thinking.type == "disabled":
        chat["chat_template_kwargs"] = {"enable_thinking": False}
        return
    chat["chat_template_kwargs"] = {"enable_thinking": True}
    if thinking.type == "adaptive":
        return
    budget = thinking.budget_tokens
    if budget is None:
        raise InvalidRequest(
            "Missing required field 'thinking.budget_tokens'.", param="thinking.budget_tokens"
        )
    if request.max_tokens is not None and budget >= request.max_tokens:
        raise InvalidRequest(
            "Invalid value for 'thinking.budget_tokens': it must be less than 'max_tokens'.",
            param="thinking.budget_tokens",
        )
    chat["reasoning_effort"] = _effort(budget)


def _add_output_config(chat: dict[str, Any], request: _Request) -> None:
    if request.output_config is None:
        return
    config = checked(_OutputConfig, request.output_config, "output_config")
    if config.effort is not None:
        # The backends know three levels; Anthropic's two above "high" are "high" there.
        chat["reasoning_effort"] = config.effort if config.effort in ("low", "medium") else "high"
    if config.format is not None:
        fmt = checked(_OutputFormat, config.format, "output_config.format")
        chat["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": fmt.schema_},
        }

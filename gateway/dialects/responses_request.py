"""An OpenAI Responses request, checked and rewritten as a chat completions body.

Every field is declared (`extra="forbid"`): one the gateway cannot honour is a 400 that
names it, never dropped on the way to the backend. A few accepted fields are hints that
change nothing a chat backend could do differently (`prompt_cache_key`, `include` of
encrypted reasoning, `text.verbosity` at its default); they are echoed, not forwarded.

Reasoning items in `input` are dropped from the chat conversation: chat completions has no
standard field for an earlier turn's reasoning, and the chat templates of open reasoning
models (Qwen3, DeepSeek-R1, gpt-oss) discard earlier turns' thinking themselves. They come
back because a client echoes the whole previous output, not because it asks for anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.api.schemas import describe_location
from gateway.errors import InvalidRequest

__all__ = ["ResponsesRequest", "chat_body", "check_request", "input_items"]

_Status = Literal["in_progress", "completed", "incomplete"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Reasoning(_Strict):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    # A summary cannot be asked of a chat backend; the reasoning text itself is returned.
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class _Text(_Strict):
    format: dict[str, Any] | None = None
    verbosity: Literal["medium"] | None = None  # the default only: nothing to ask a backend


class _StreamOptions(_Strict):
    include_obfuscation: bool | None = None


class ResponsesRequest(_Strict):
    """The request fields the gateway honours; `input` items and `tools` are checked one
    by one (`chat_body`), so an error names the item."""

    model: str = Field(min_length=1, max_length=256)
    input: str | list[Any]  # items are checked one by one, so an error names the item
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=10_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    text: _Text | None = None
    reasoning: _Reasoning | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    user: str | None = Field(None, max_length=512)
    safety_identifier: str | None = Field(None, max_length=512)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    store: bool | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=256)
    truncation: Literal["disabled"] | None = None
    background: Literal[False] | None = None
    include: list[Literal["reasoning.encrypted_content"]] | None = None
    prompt_cache_key: str | None = Field(None, max_length=1024)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    service_tier: Literal["auto", "default"] | None = None


class _FunctionTool(_Strict):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _ToolChoiceFunction(_Strict):
    type: Literal["function"]
    name: str = Field(min_length=1)


class _JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class _PlainFormat(_Strict):
    type: Literal["text", "json_object"]


class _Message(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]
    id: str | None = None
    status: _Status | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class _InputText(_Strict):
    type: Literal["input_text"]
    text: str


class _InputImage(_Strict):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["low", "high", "auto"] | None = None


class _OutputText(_Strict):
    type: Literal["output_text"]
    text: str
    # Citations of OpenAI's built-in tools; a chat backend has no use for them.
    annotations: list[dict[str, Any]] | None = None
    logprobs: list[dict[str, Any]] | None = None


class _Refusal(_Strict):
    type: Literal["refusal"]
    refusal: str


class _FunctionCall(_Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: _Status | None = None


class _FunctionCallOutput(_Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[dict[str, Any]]
    id: str | None = None
    status: _Status | None = None


class _ReasoningItem(_Strict):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]]
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None
    status: _Status | None = None


_M = TypeVar("_M", bound=BaseModel)


def _validated(model: type[_M], value: object, where: str) -> _M:
    """`value` as `model`, or `InvalidRequest` naming the dotted path under `where`."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        inner = describe_location(first["loc"])
        param = f"{where}.{inner}" if where and inner else where or inner
        if first["type"] == "extra_forbidden":
            message = f"Unsupported parameter: '{param}'."
        else:
            message = f"Invalid value for '{param}': {first['msg']}"
        raise InvalidRequest(message, param=param) from exc


def _unsupported(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"Unsupported value for '{param}': {what}.", param=param)


def check_request(body: Mapping[str, Any]) -> ResponsesRequest:
    """The request's top level, checked (items and tools are checked by `chat_body`)."""
    return _validated(ResponsesRequest, body, "")


def input_items(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The request's `input` as a list of items: a string is one user message."""
    value = body.get("input")
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value) if isinstance(value, list) else []


def chat_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The Responses request as a chat completions body; `InvalidRequest` naming the field
    for anything it cannot honour."""
    request = check_request(body)
    messages: list[dict[str, Any]] = []
    if request.instructions is not None:
        messages.append({"role": "system", "content": request.instructions})
    for index, item in enumerate(input_items(body)):
        _add_item(messages, item, f"input.{index}")
    if not messages:  # e.g. `input: []`, or reasoning items only: a backend refuses it too
        raise InvalidRequest(
            "Invalid value for 'input': it holds no message to answer.", param="input"
        )
    chat: dict[str, Any] = {"model": request.model, "messages": messages}
    tools = [_chat_tool(tool, f"tools.{i}") for i, tool in enumerate(request.tools or [])]
    if tools:
        chat["tools"] = tools
        if request.parallel_tool_calls is not None:
            chat["parallel_tool_calls"] = request.parallel_tool_calls
    choice = _tool_choice(request.tool_choice, {t["function"]["name"] for t in tools})
    if choice is not None:
        chat["tool_choice"] = choice
    if request.max_output_tokens is not None:
        chat["max_tokens"] = request.max_output_tokens
    for name in ("temperature", "top_p"):
        if (value := getattr(request, name)) is not None:
            chat[name] = value
    if request.text is not None and request.text.format is not None:
        response_format = _response_format(request.text.format)
        if response_format is not None:
            chat["response_format"] = response_format
    if request.reasoning is not None and request.reasoning.effort is not None:
        chat["reasoning_effort"] = request.reasoning.effort
    if request.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    user = request.safety_identifier or request.user
    if user is not None:
        chat["user"] = user
    return chat


def _chat_tool(tool: object, where: str) -> dict[str, Any]:
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        raise _unsupported(f"{where}.type", f"only function tools are supported, got {kind!r}")
    checked = _validated(_FunctionTool, tool, where)
    function: dict[str, Any] = {"name": checked.name}
    if checked.description is not None:
        function["description"] = checked.description
    if checked.parameters is not None:
        function["parameters"] = checked.parameters
    if checked.strict is not None:
        function["strict"] = checked.strict
    return {"type": "function", "function": function}


def _tool_choice(choice: str | dict[str, Any] | None, tools: set[str]) -> Any:
    if choice is None:
        return None
    if isinstance(choice, str):
        if not tools:
            if choice == "required":
                raise _unsupported("tool_choice", "'required' needs at least one tool")
            return None  # "auto" and "none" with no tools: what happens anyway
        return choice
    if choice.get("type") != "function":
        raise _unsupported(
            "tool_choice.type", f"only 'function' is supported, got {choice.get('type')!r}"
        )
    named = _validated(_ToolChoiceFunction, choice, "tool_choice")
    if named.name not in tools:
        raise InvalidRequest(
            f"Invalid value for 'tool_choice.name': no function tool named {named.name!r}.",
            param="tool_choice.name",
        )
    return {"type": "function", "function": {"name": named.name}}


def _response_format(value: dict[str, Any]) -> dict[str, Any] | None:
    if value.get("type") == "json_schema":
        checked = _validated(_JsonSchemaFormat, value, "text.format")
        schema: dict[str, Any] = {"name": checked.name, "schema": checked.schema_}
        if checked.description is not None:
            schema["description"] = checked.description
        if checked.strict is not None:
            schema["strict"] = checked.strict
        return {"type": "json_schema", "json_schema": schema}
    plain = _validated(_PlainFormat, value, "text.format")
    return {"type": "json_object"} if plain.type == "json_object" else None


def _add_item(messages: list[dict[str, Any]], item: object, where: str) -> None:
    """Append `item` to the chat conversation; a function call joins the assistant
    message just before it, so a turn's calls become one message with `tool_calls`."""
    kind = item.get("type", "message") if isinstance(item, dict) else None
    if kind == "message":
        message = _validated(_Message, item, where)
        messages.append(_chat_message(message, where))
    elif kind == "function_call":
        call = _validated(_FunctionCall, item, where)
        tool_call = {
            "id": call.call_id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(tool_call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [tool_call]})
    elif kind == "function_call_output":
        output = _validated(_FunctionCallOutput, item, where)
        content = output.output
        if not isinstance(content, str):
            content = "".join(_text_parts(content, f"{where}.output", _INPUT_TEXT))
        messages.append({"role": "tool", "tool_call_id": output.call_id, "content": content})
    elif kind == "reasoning":
        _validated(_ReasoningItem, item, where)  # checked, then dropped: see the docstring
    elif isinstance(item, dict):
        raise _unsupported(f"{where}.type", f"input items of type {kind!r} are not supported")
    else:
        raise InvalidRequest(
            f"Invalid value for '{where}': an item must be an object.", param=where
        )


def _chat_message(message: _Message, where: str) -> dict[str, Any]:
    # Open models' chat templates know system, user, assistant and tool only.
    role = "system" if message.role == "developer" else message.role
    content = message.content
    if isinstance(content, str):
        return {"role": role, "content": content}
    place = f"{where}.content"
    if role != "user":
        allowed = _ASSISTANT_PARTS if role == "assistant" else _INPUT_TEXT
        return {"role": role, "content": "".join(_text_parts(content, place, allowed))}
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        at = f"{place}.{index}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_image":
            parts.append(_image_part(_validated(_InputImage, part, at), at))
        elif kind == "input_text":
            parts.append({"type": "text", "text": _validated(_InputText, part, at).text})
        else:
            expected = "expected input_text or input_image"
            raise _unsupported(f"{at}.type", f"{expected}, got {kind!r}")
    if len(parts) == 1 and parts[0]["type"] == "text":
        return {"role": role, "content": parts[0]["text"]}
    return {"role": role, "content": parts}


_INPUT_TEXT: dict[str, type[_InputText | _OutputText | _Refusal]] = {"input_text": _InputText}
_ASSISTANT_PARTS = {**_INPUT_TEXT, "output_text": _OutputText, "refusal": _Refusal}


def _text_parts(
    parts: list[dict[str, Any]],
    where: str,
    allowed: Mapping[str, type[_InputText | _OutputText | _Refusal]],
    start: int = 0,
) -> list[str]:
    texts = []
    for index, part in enumerate(parts, start):
        place = f"{where}.{index}"
        kind = part.get("type") if isinstance(part, dict) else None
        model = allowed.get(kind) if isinstance(kind, str) else None
        if model is None:
            expected = ", ".join(sorted(allowed))
            raise _unsupported(f"{place}.type", f"expected one of {expected}, got {kind!r}")
        checked = _validated(model, part, place)
        texts.append(checked.refusal if isinstance(checked, _Refusal) else checked.text)
    return texts


def _image_part(image: _InputImage, place: str) -> dict[str, Any]:
    if image.file_id is not None:
        raise _unsupported(f"{place}.file_id", "uploaded files are not supported; send image_url")
    if image.image_url is None:
        raise InvalidRequest(
            f"Missing required parameter: '{place}.image_url'.", param=f"{place}.image_url"
        )
    url: dict[str, Any] = {"url": image.image_url}
    if image.detail is not None:
        url["detail"] = image.detail
    return {"type": "image_url", "image_url": url}

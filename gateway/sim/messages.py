"""The sim's Anthropic Messages API (POST /v1/messages and /v1/messages/count_tokens), as vLLM
serves it: the request becomes a chat conversation, answered by the same engine as chat.

Read from vllm-project/vllm `vllm/entrypoints/anthropic/` (`protocol.py`, `serving.py`,
`api_router.py`): system text and `system` messages join into one system message; a
`tool_result` block becomes a `tool` message before its user message; `tool_choice` `any` is
`required`, `tool` a named choice, and tools make the default `auto`; `output_config.effort`
becomes `reasoning_effort`, `chat_template_kwargs` passes through. The answer keeps the chat
id, maps finish reasons (`stop` -> `end_turn`, `length` -> `max_tokens`, `tool_calls` ->
`tool_use`), puts reasoning in a `thinking` block with a random signature, and leaves `None`
fields out. Streams are `event:`/`data:` pairs: `message_start`, then per block
`content_block_start`, deltas (`thinking_delta` and a closing `signature_delta`,
`text_delta`, `input_json_delta`) and `content_block_stop`, then `message_delta` (stop reason,
usage) and `message_stop`; vLLM sends no `ping`. Errors are `{"type": "error", "error":
{"type", "message"}}` with vLLM's type names.

Where the sim differs: it also honours `thinking` (`enabled`/`adaptive` think at medium
effort, `disabled` not at all), which vLLM ignored as of its open PR #53058 (2026-08), so a
pass-through request asks for reasoning the way the client said; and `message_start` carries
`type` and `role`, which vLLM's `exclude_unset` drops but the Anthropic SDK types require.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.sim.agent import AgentAnswer, AgentAsk, ReasoningEffort, ToolSpec, reasoning_effort
from gateway.sim.generation import AgentEndpoint, AnswerShape, ErrorShape
from gateway.sim.protocol import SimRequestError, chat_prompt, parse_json_object
from gateway.sim.service import SimService

__all__ = ["MessagesEndpoint", "MessagesRequest", "count_tokens_endpoint", "parse_messages"]

_JSON = "application/json"
_BLOCK_TYPES = frozenset(
    {"text", "image", "tool_use", "tool_result", "tool_reference", "thinking", "redacted_thinking"}
)
# Claude Code sends these roles; vLLM maps them to `user` (AnthropicMessage.normalize_role).
_ROLE_ALIASES = {"ctx": "user", "msg": "user"}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# vLLM's error type names (its ErrorResponse's), which its Messages errors carry over.
_VLLM_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}
# Anthropic's own, for the other server kinds that serve Messages.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    """The parts of a Messages request that shape the simulated answer."""

    model: str
    prompt: str
    prompt_tokens: int
    max_tokens: int | None
    stream: bool
    agent: AgentAsk


def parse_messages(body: dict[str, object], *, needs_max_tokens: bool = True) -> MessagesRequest:
    """Validate a Messages body as vLLM's `AnthropicMessagesRequest` does; render its prompt."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise SimRequestError("model: Field required (a non-empty string)", param="model")
    max_tokens = body.get("max_tokens")
    if max_tokens is None and needs_max_tokens:
        raise SimRequestError("max_tokens: Field required", param="max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0
    ):
        raise SimRequestError("max_tokens must be positive", param="max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise SimRequestError("stream must be a boolean", param="stream")
    tools = _tools(body.get("tools"))
    chat_messages = _chat_messages(body.get("system"), body.get("messages"))
    chat_tools = [
        {"type": "function", "function": {"name": tool.name, "parameters": tool.parameters}}
        for tool in tools
    ]
    prompt, prompt_tokens = chat_prompt(chat_messages, chat_tools)
    return MessagesRequest(
        model=model,
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        stream=stream,
        agent=AgentAsk(
            tools=tools,
            tool_choice=_tool_choice(body.get("tool_choice"), tools),
            after_tool_result=chat_messages[-1]["role"] == "tool",
            effort=_effort(body),
        ),
    )


class MessagesEndpoint(AgentEndpoint[MessagesRequest]):
    """ASGI app for POST /v1/messages."""

    context_param = "messages"

    def __init__(self, service: SimService) -> None:
        super().__init__(service)
        self.error_shape = _error_shape(service.quirks.name)

    def read(self, body: dict[str, object]) -> MessagesRequest:
        return parse_messages(body)

    def shape(self, request: MessagesRequest, answer: AgentAnswer, model: str) -> AnswerShape:
        # vLLM answers with the id of the chat completion it made.
        return _MessageEvents(answer, "chatcmpl-" + os.urandom(12).hex(), model)


async def count_tokens_endpoint(service: SimService, request: Request) -> Response:
    """POST /v1/messages/count_tokens: the prompt's tokens as the Messages endpoint counts them."""
    error_shape = _error_shape(service.quirks.name)
    try:
        body = parse_json_object(await request.body())
        parsed = parse_messages(body, needs_max_tokens=False)
        service.check_model(parsed.model)
    except SimRequestError as error:
        return Response(error_shape(error.status, error), error.status, media_type=_JSON)
    tokens = parsed.prompt_tokens
    reply = {"input_tokens": tokens, "context_management": {"original_input_tokens": tokens}}
    return Response(orjson.dumps(reply), media_type=_JSON)


def _message_body(answer: AgentAnswer, message_id: str, model: str) -> dict[str, object]:
    """A whole Messages answer, as vLLM's `messages_full_converter` builds it."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "content": _blocks(answer),
        "model": model,
        "stop_reason": _STOP_REASONS.get(answer.finish_reason, "end_turn"),
        "usage": _usage(answer),
    }


def _blocks(answer: AgentAnswer) -> list[dict[str, object]]:
    blocks: list[dict[str, object]] = []
    if answer.reasoning:
        blocks.append({"type": "thinking", "thinking": answer.reasoning, "signature": _signature()})
    if answer.content:
        blocks.append({"type": "text", "text": answer.content})
    call = answer.tool_call
    if call is not None:
        blocks.append(
            {
                "type": "tool_use",
                "id": call.call_id,
                "name": call.name,
                "input": orjson.loads(call.arguments),
            }
        )
    return blocks


def _usage(answer: AgentAnswer) -> dict[str, int]:
    return {
        "input_tokens": answer.plan.prompt_tokens,
        "output_tokens": answer.plan.completion_tokens,
    }


class _MessageEvents:
    """The Messages stream of one answer (a `StreamShape`), block by block."""

    def __init__(self, answer: AgentAnswer, message_id: str, model: str) -> None:
        self._answer = answer
        self._id = message_id
        self._model = model
        self._thinking = answer.reasoning is not None
        # The block after the thinking one: text, or the tool call.
        self._second = 1 if self._thinking else 0

    def opening(self) -> bytes:
        message: dict[str, object] = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self._model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self._answer.plan.prompt_tokens, "output_tokens": 0},
        }
        return _event("message_start", {"type": "message_start", "message": message})

    def step(self, position: int) -> bytes:
        answer = self._answer
        token = answer.plan.tokens[position]
        piece = answer.piece(position)
        if piece == "reasoning":
            if not self._thinking:
                return b""  # spent, not shown
            opening = _start(0, {"type": "thinking", "thinking": "", "signature": ""})
            delta = _delta(0, {"type": "thinking_delta", "thinking": token})
            return (opening if position == 0 else b"") + delta
        events = b""
        if position == answer.reasoning_tokens:
            if self._thinking:
                events += self._close_thinking()
            events += _start(self._second, self._second_block())
        if piece == "content":
            return events + _delta(self._second, {"type": "text_delta", "text": token})
        return events + _delta(self._second, {"type": "input_json_delta", "partial_json": token})

    def whole(self, cached_tokens: int = 0) -> dict[str, object]:
        return _message_body(self._answer, self._id, self._model)

    def closing(self, cached_tokens: int = 0) -> bytes:
        answer = self._answer
        events = b""
        if answer.plan.completion_tokens > answer.reasoning_tokens:
            events += _stop(self._second)
        elif self._thinking:
            events += self._close_thinking()
        stop_reason = _STOP_REASONS.get(answer.finish_reason, "end_turn")
        events += _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": _usage(answer),
            },
        )
        return events + _event("message_stop", {"type": "message_stop"})

    def _second_block(self) -> dict[str, object]:
        call = self._answer.tool_call
        if call is None:
            return {"type": "text", "text": ""}
        return {"type": "tool_use", "id": call.call_id, "name": call.name, "input": {}}

    def _close_thinking(self) -> bytes:
        signature = {"type": "signature_delta", "signature": _signature()}
        return _delta(0, signature) + _stop(0)


def _start(index: int, block: dict[str, object]) -> bytes:
    payload = {"type": "content_block_start", "index": index, "content_block": block}
    return _event("content_block_start", payload)


def _delta(index: int, delta: Mapping[str, object]) -> bytes:
    payload = {"type": "content_block_delta", "index": index, "delta": delta}
    return _event("content_block_delta", payload)


def _stop(index: int) -> bytes:
    return _event("content_block_stop", {"type": "content_block_stop", "index": index})


def _event(name: str, payload: dict[str, object]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _signature() -> str:
    # vLLM signs a thinking block with a random hex string: nothing a client can verify.
    return os.urandom(16).hex()


def _error_shape(kind: str) -> ErrorShape:
    types = _VLLM_TYPES if kind == "vllm" else _ANTHROPIC_TYPES

    def shape(status: int, error: SimRequestError) -> bytes:
        kind_name = types.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return orjson.dumps(
            {"type": "error", "error": {"type": kind_name, "message": error.message}}
        )

    return shape


def _effort(body: dict[str, object]) -> ReasoningEffort | None:
    thinking = body.get("thinking")
    config = body.get("output_config")
    effort = config.get("effort") if isinstance(config, dict) else None
    if isinstance(thinking, dict):
        kind = thinking.get("type")
        if kind == "disabled":
            return None
        if kind in ("enabled", "adaptive") and effort is None:
            effort = "medium"
    return reasoning_effort(effort, body.get("chat_template_kwargs"), default=None)


def _tools(tools: object) -> tuple[ToolSpec, ...]:
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise SimRequestError("tools must be a list", param="tools")
    specs: list[ToolSpec] = []
    for index, tool in enumerate(tools):
        name = tool.get("name") if isinstance(tool, dict) else None
        schema = tool.get("input_schema") if isinstance(tool, dict) else None
        if not isinstance(name, str) or not isinstance(schema, dict):
            raise SimRequestError(
                f"tools.{index}: a tool needs a string name and an input_schema object",
                param=f"tools.{index}",
            )
        specs.append(ToolSpec(name, schema))
    return tuple(specs)


def _tool_choice(choice: object, tools: tuple[ToolSpec, ...]) -> str:
    if choice is None:
        return "auto" if tools else "none"
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        name = choice.get("name") if isinstance(choice, dict) else None
        if not isinstance(name, str) or not name:
            raise SimRequestError(
                "tool_choice.name is required when type is 'tool'", param="tool_choice"
            )
        if all(tool.name != name for tool in tools):
            raise SimRequestError(
                f"Tool '{name}' has not been passed in `tools`.", param="tool_choice"
            )
        return name
    mapped = {"auto": "auto", "any": "required", "none": "none"}.get(str(kind))
    if mapped is None:
        raise SimRequestError(
            "tool_choice.type must be one of auto, any, tool, none", param="tool_choice"
        )
    if mapped == "required" and not tools:
        raise SimRequestError("tool_choice 'any' needs at least one tool", param="tool_choice")
    return mapped if tools else "none"


def _chat_messages(system: object, messages: object) -> list[dict[str, object]]:
    """The chat conversation vLLM makes of a Messages request (for the prompt and its tokens)."""
    if not isinstance(messages, list) or not messages:
        raise SimRequestError("messages must contain at least one item", param="messages")
    system_parts = _system_parts(system)
    converted: list[dict[str, object]] = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ("user", "assistant", "system") or not isinstance(message, dict):
            raise SimRequestError(
                f"messages.{index}.role must be user or assistant", param=f"messages.{index}"
            )
        content = message.get("content")
        if role == "system":
            system_parts.extend(_texts(content, index))
            continue
        converted.extend(_chat_turns(role, content, index))
    if not converted:
        raise SimRequestError("messages must contain a user or assistant turn", param="messages")
    if system_parts:
        converted.insert(0, {"role": "system", "content": "".join(system_parts)})
    return converted


def _chat_turns(role: str, content: object, index: int) -> list[dict[str, object]]:
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    blocks = _blocks_of(content, index)
    turns: list[dict[str, object]] = []
    texts: list[str] = []
    calls: list[dict[str, object]] = []
    for block in blocks:
        kind = block["type"]
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(str(block["text"]))
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            name = block.get("name") or ""
            function = {"name": name, "arguments": arguments}
            calls.append({"id": block.get("id"), "type": "function", "function": function})
        elif kind == "tool_result" and role == "user":
            result = _result_text(block.get("content"))
            turns.append(
                {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": result}
            )
        elif kind == "tool_result":
            texts.append(f"Tool result: {_result_text(block.get('content'))}")
        # Images cost nothing here (no vision tower); thinking is not re-read by the template.
    message: dict[str, object] = {"role": role, "content": "\n".join(texts)}
    if calls:
        message["tool_calls"] = calls
    if texts or calls or role == "assistant":
        turns.append(message)
    return turns


def _blocks_of(content: object, index: int) -> list[dict[str, object]]:
    if not isinstance(content, list) or not content:
        raise SimRequestError("message content must not be empty", param=f"messages.{index}")
    blocks: list[dict[str, object]] = []
    for block in content:
        if not isinstance(block, dict) or block.get("type") not in _BLOCK_TYPES:
            raise SimRequestError(
                f"messages.{index}.content: unknown content block {block!r:.60}",
                param=f"messages.{index}.content",
            )
        blocks.append(block)
    return blocks


def _texts(content: object, index: int) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [str(b["text"]) for b in _blocks_of(content, index) if isinstance(b.get("text"), str)]


def _system_parts(system: object) -> list[str]:
    if system is None:
        return []
    if isinstance(system, str):
        return [system] if system else []
    if isinstance(system, list):
        parts = []
        for block in system:
            if not isinstance(block, dict) or block.get("type") not in _BLOCK_TYPES:
                raise SimRequestError("system: unknown content block", param="system")
            text = block.get("text")
            # vLLM drops Claude Code's per-request billing header: it would defeat the cache.
            if isinstance(text, str) and text and not text.startswith("x-anthropic-billing"):
                parts.append(text)
        return parts
    raise SimRequestError("system must be a string or a list of text blocks", param="system")


def _result_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [item.get("text") for item in content if isinstance(item, dict)]
        return "\n".join(text for text in texts if isinstance(text, str))
    return ""

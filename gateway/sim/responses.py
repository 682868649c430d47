"""The sim's OpenAI Responses API (POST /v1/responses), as vLLM serves it for models without
the Harmony format: the input becomes a chat conversation, answered by the same engine as chat.

Read from vllm-project/vllm `vllm/entrypoints/openai/responses/` (`protocol.py`'s
`ResponsesRequest`, `serving.py`, `simple_streaming_events.py`): `instructions` is the system
message, a string `input` one user message, `function_call` / `function_call_output` items an
assistant tool call and a `tool` message; tools are flat `{"type": "function", "name",
"parameters"}` and `tool_choice` defaults to `auto`; `reasoning.effort` reaches the chat
template. The output is a `reasoning` item (`reasoning_text` content), then a `message`
(`output_text`) or a `function_call`; usage reports `input_tokens_details.cached_tokens` (the
prefix cache hit) and `output_tokens_details.reasoning_tokens`; an answer cut by
`max_output_tokens` is `incomplete`. Streams are `event:`/`data:` pairs numbered by
`sequence_number`: `response.created`, `response.in_progress`, per item
`response.output_item.added`, `response.content_part.added`, deltas
(`response.reasoning_text.delta`, `response.output_text.delta`,
`response.function_call_arguments.delta`), their `.done` events, `response.content_part.done`,
`response.output_item.done`, and last `response.completed` with the whole response.

vLLM keeps responses only when started with `VLLM_ENABLE_RESPONSES_API_STORE`, off by default:
so the sim stores nothing, and a `previous_response_id` is a 404 as vLLM answers an unknown id.
Item ids carry OpenAI's prefixes (`rs_`, `msg_`, `fc_`) where vLLM uses bare uuids.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from gateway.sim.agent import AgentAnswer, AgentAsk, ToolSpec, reasoning_effort
from gateway.sim.generation import AgentEndpoint, AnswerShape
from gateway.sim.protocol import SimRequestError, chat_prompt

__all__ = ["ResponsesEndpoint", "ResponsesRequest", "parse_responses"]

_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """The parts of a Responses request that shape the simulated answer, and those it echoes."""

    model: str | None
    prompt: str
    prompt_tokens: int
    max_tokens: int | None  # the body's `max_output_tokens`
    stream: bool
    agent: AgentAsk
    echo: Mapping[str, object]


def parse_responses(body: dict[str, object]) -> ResponsesRequest:
    """Validate a Responses body as vLLM's `ResponsesRequest` does; render its prompt."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise SimRequestError("model must be a string", param="model")
    max_output = body.get("max_output_tokens")
    if max_output is not None and (
        isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 1
    ):
        raise SimRequestError(
            "max_output_tokens must be an integer >= 1", param="max_output_tokens"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise SimRequestError("stream must be a boolean", param="stream")
    previous = body.get("previous_response_id")
    if previous is not None:
        raise SimRequestError(
            f"Response with id '{previous}' not found.",
            status=404,
            param="previous_response_id",
            validation=False,
        )
    tools = _tools(body.get("tools"))
    messages = _chat_messages(body.get("instructions"), body.get("input"))
    chat_tools = [
        {"type": "function", "function": {"name": tool.name, "parameters": tool.parameters}}
        for tool in tools
    ]
    prompt, prompt_tokens = chat_prompt(messages, chat_tools)
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    tool_choice = _tool_choice(body.get("tool_choice"), tools)
    echo = {
        "instructions": body.get("instructions")
        if isinstance(body.get("instructions"), str)
        else None,
        "max_output_tokens": max_output,
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else None,
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "reasoning": reasoning if isinstance(reasoning, dict) else None,
        "temperature": _number(body.get("temperature"), 1.0),
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") if isinstance(body.get("tools"), list) else [],
        "top_p": _number(body.get("top_p"), 1.0),
        "user": body.get("user") if isinstance(body.get("user"), str) else None,
    }
    return ResponsesRequest(
        model=model,
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        max_tokens=max_output,
        stream=bool(stream),
        agent=AgentAsk(
            tools=tools,
            tool_choice=tool_choice,
            after_tool_result=messages[-1]["role"] == "tool",
            effort=reasoning_effort(effort, body.get("chat_template_kwargs"), default=None),
        ),
        echo=echo,
    )


class ResponsesEndpoint(AgentEndpoint[ResponsesRequest]):
    """ASGI app for POST /v1/responses."""

    context_param = "input"

    def read(self, body: dict[str, object]) -> ResponsesRequest:
        return parse_responses(body)

    def shape(self, request: ResponsesRequest, answer: AgentAnswer, model: str) -> AnswerShape:
        return _ResponseEvents(answer, _Items(answer), _base(request, model))


class _Items:
    """The output items of one answer: their ids and positions in `output`."""

    def __init__(self, answer: AgentAnswer) -> None:
        self.answer = answer
        self.reasoning_id = "rs_" + os.urandom(12).hex()
        self.message_id = "msg_" + os.urandom(12).hex()
        self.call_id = "fc_" + os.urandom(12).hex()

    @property
    def has_reasoning(self) -> bool:
        return self.answer.reasoning is not None

    @property
    def has_second(self) -> bool:
        """Whether a message or function call follows the reasoning."""
        answer = self.answer
        return answer.tool_call is not None or bool(answer.content)

    @property
    def second_index(self) -> int:
        return 1 if self.has_reasoning else 0

    def reasoning_item(self, text: str, status: str) -> dict[str, object]:
        return {
            "id": self.reasoning_id,
            "type": "reasoning",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if text else [],
            "status": status,
        }

    def message_item(self, text: str | None, status: str) -> dict[str, object]:
        content = [] if text is None else [_output_text(text)]
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": content,
        }

    def call_item(self, arguments: str, status: str) -> dict[str, object]:
        call = self.answer.tool_call
        assert call is not None
        return {
            "id": self.call_id,
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": arguments,
            "status": status,
        }

    def output(self) -> list[dict[str, object]]:
        answer = self.answer
        items: list[dict[str, object]] = []
        if answer.reasoning is not None:
            items.append(self.reasoning_item(answer.reasoning, "completed"))
        if answer.tool_call is not None:
            items.append(self.call_item(answer.tool_call.arguments, "completed"))
        elif answer.content:
            items.append(self.message_item(answer.content, "completed"))
        return items


class _ResponseEvents:
    """The Responses stream of one answer (a `StreamShape`), item by item."""

    def __init__(self, answer: AgentAnswer, items: _Items, base: dict[str, object]) -> None:
        self._answer = answer
        self._items = items
        self._base = base
        self._sequence = 0

    def opening(self) -> bytes:
        response = {**self._base, "status": "in_progress", "output": [], "usage": None}
        return self._event("response.created", {"response": response}) + self._event(
            "response.in_progress", {"response": response}
        )

    def step(self, position: int) -> bytes:
        answer, items = self._answer, self._items
        token = answer.plan.tokens[position]
        piece = answer.piece(position)
        if piece == "reasoning":
            if not items.has_reasoning:
                return b""  # spent, not shown
            where = {"output_index": 0, "item_id": items.reasoning_id}
            events = b""
            if position == 0:
                events = self._event(
                    "response.output_item.added",
                    {"output_index": 0, "item": items.reasoning_item("", "in_progress")},
                ) + self._event(
                    "response.content_part.added",
                    {**where, "content_index": 0, "part": {"type": "reasoning_text", "text": ""}},
                )
            delta = {**where, "content_index": 0, "delta": token}
            return events + self._event("response.reasoning_text.delta", delta)
        events = b""
        index = items.second_index
        if position == answer.reasoning_tokens:
            if items.has_reasoning:
                events += self._reasoning_done()
            events += self._second_added()
        if piece == "content":
            where = {"output_index": index, "item_id": items.message_id, "content_index": 0}
            delta = {**where, "delta": token, "logprobs": []}
            return events + self._event("response.output_text.delta", delta)
        delta = {"output_index": index, "item_id": items.call_id, "delta": token}
        return events + self._event("response.function_call_arguments.delta", delta)

    def whole(self, cached_tokens: int = 0) -> dict[str, object]:
        return _finished(self._base, self._answer, self._items.output(), cached_tokens)

    def closing(self, cached_tokens: int = 0) -> bytes:
        items = self._items
        events = b""
        if items.has_second:
            events += self._second_done()
        elif items.has_reasoning:
            events += self._reasoning_done()
        body = self.whole(cached_tokens)
        kind = "response.completed" if body["status"] == "completed" else "response.incomplete"
        return events + self._event(kind, {"response": body})

    def _reasoning_done(self) -> bytes:
        items = self._items
        text = self._answer.reasoning or ""
        where = {"output_index": 0, "item_id": items.reasoning_id, "content_index": 0}
        part = {"type": "reasoning_text", "text": text}
        return (
            self._event("response.reasoning_text.done", {**where, "text": text})
            + self._event("response.content_part.done", {**where, "part": part})
            + self._event(
                "response.output_item.done",
                {"output_index": 0, "item": items.reasoning_item(text, "completed")},
            )
        )

    def _second_added(self) -> bytes:
        items = self._items
        index = items.second_index
        if self._answer.tool_call is not None:
            item = items.call_item("", "in_progress")
            return self._event("response.output_item.added", {"output_index": index, "item": item})
        where = {"output_index": index, "item_id": items.message_id, "content_index": 0}
        return self._event(
            "response.output_item.added",
            {"output_index": index, "item": items.message_item(None, "in_progress")},
        ) + self._event("response.content_part.added", {**where, "part": _output_text("")})

    def _second_done(self) -> bytes:
        answer, items = self._answer, self._items
        index = items.second_index
        call = answer.tool_call
        if call is not None:
            done = {
                "output_index": index,
                "item_id": items.call_id,
                "name": call.name,
                "arguments": call.arguments,
            }
            item = items.call_item(call.arguments, "completed")
            return self._event("response.function_call_arguments.done", done) + self._event(
                "response.output_item.done", {"output_index": index, "item": item}
            )
        text = answer.content
        where = {"output_index": index, "item_id": items.message_id, "content_index": 0}
        return (
            self._event("response.output_text.done", {**where, "text": text, "logprobs": []})
            + self._event("response.content_part.done", {**where, "part": _output_text(text)})
            + self._event(
                "response.output_item.done",
                {"output_index": index, "item": items.message_item(text, "completed")},
            )
        )

    def _event(self, kind: str, fields: dict[str, object]) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _base(request: ResponsesRequest, model: str) -> dict[str, object]:
    """The fields of a response that do not depend on its output."""
    return {
        "id": "resp_" + os.urandom(16).hex(),
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "previous_response_id": None,
        "service_tier": "auto",
        "text": {"format": {"type": "text"}},
        "top_logprobs": 0,
        "truncation": "disabled",
        **request.echo,
    }


def _finished(
    base: Mapping[str, object], answer: AgentAnswer, output: list[dict[str, object]], cached: int
) -> dict[str, object]:
    plan = answer.plan
    complete = answer.finish_reason != "length"
    return {
        **base,
        "status": "completed" if complete else "incomplete",
        "incomplete_details": None if complete else {"reason": "max_output_tokens"},
        "output": output,
        "usage": {
            "input_tokens": plan.prompt_tokens,
            # The SDK's type requires `cache_write_tokens` (vLLM leaves it out): nothing is
            # written to a paid cache here.
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": plan.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": answer.reasoning_tokens},
            "total_tokens": plan.prompt_tokens + plan.completion_tokens,
        },
    }


def _output_text(text: str) -> dict[str, object]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _number(value: object, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default


def _tools(tools: object) -> tuple[ToolSpec, ...]:
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise SimRequestError("tools must be a list", param="tools")
    specs: list[ToolSpec] = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            # Built-in tools (web search, MCP...) need a Harmony model in vLLM.
            raise SimRequestError(
                f"tools[{index}]: only function tools are supported", param=f"tools[{index}]"
            )
        name, parameters = tool.get("name"), tool.get("parameters")
        if not isinstance(name, str):
            raise SimRequestError(f"tools[{index}].name: Field required", param=f"tools[{index}]")
        specs.append(ToolSpec(name, parameters if isinstance(parameters, dict) else {}))
    return tuple(specs)


def _tool_choice(choice: object, tools: tuple[ToolSpec, ...]) -> str:
    if choice is None or choice == "auto":
        return "auto" if tools else "none"
    if choice in ("none", "required"):
        if choice == "required" and not tools:
            raise SimRequestError("tool_choice 'required' needs tools", param="tool_choice")
        return str(choice)
    name = choice.get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise SimRequestError(
            "tool_choice must be none, auto, required or {'type': 'function', 'name'}",
            param="tool_choice",
        )
    if all(tool.name != name for tool in tools):
        raise SimRequestError(f"Tool '{name}' has not been passed in `tools`.", param="tool_choice")
    return name


def _chat_messages(instructions: object, items: object) -> list[dict[str, object]]:
    """The chat conversation vLLM makes of `instructions` and `input` (for the prompt)."""
    messages: list[dict[str, object]] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise SimRequestError("instructions must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return messages
    if not isinstance(items, list) or not items:
        raise SimRequestError("input must be a string or a non-empty list of items", param="input")
    for index, item in enumerate(items):
        message = _chat_message(item, index)
        if message is not None:
            messages.append(message)
    if not messages or messages[-1]["role"] == "system":
        raise SimRequestError("input holds no conversation turn", param="input")
    return messages


def _chat_message(item: object, index: int) -> dict[str, object] | None:
    kind = item.get("type", "message") if isinstance(item, dict) else None
    if not isinstance(item, dict) or not isinstance(kind, str):
        raise SimRequestError(f"input[{index}] must be an item object", param=f"input[{index}]")
    if kind == "function_call":
        name, arguments = item.get("name"), item.get("arguments")
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise SimRequestError(
                f"input[{index}]: a function_call needs a name and arguments",
                param=f"input[{index}]",
            )
        call = {
            "id": item.get("call_id"),
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        return {"role": "assistant", "content": "", "tool_calls": [call]}
    if kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else orjson.dumps(output).decode()
        return {"role": "tool", "tool_call_id": item.get("call_id"), "content": text}
    if kind == "reasoning":
        return None  # a reasoning model's templates drop earlier turns' reasoning
    if kind != "message":
        raise SimRequestError(
            f"input[{index}]: unsupported item type {kind!r}", param=f"input[{index}]"
        )
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise SimRequestError(
            f"input[{index}].role: unknown role {role!r}", param=f"input[{index}]"
        )
    return {
        "role": "system" if role == "developer" else role,
        "content": _text(item.get("content"), index),
    }


def _text(content: object, index: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise SimRequestError(
            f"input[{index}].content must be a string or a list of parts", param=f"input[{index}]"
        )
    texts = [
        part["text"]
        for part in content
        if isinstance(part, dict)
        and part.get("type") in _TEXT_PARTS
        and isinstance(part.get("text"), str)
    ]
    return "\n".join(texts)

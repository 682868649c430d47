"""Deterministic agent behaviour of the sim: which tool it calls, with what arguments, and when it
thinks aloud first; the same for the chat, Messages and Responses endpoints.

A request with tools is answered with a call of one of them, except that `auto` answers a tool
result with text, so a call-then-answer round trip ends. The call's arguments are built from the
tool's JSON schema, and everything (tool, arguments, call id, reasoning words) derives from a
hash of the prompt: the same request gets the same answer, streamed or not.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import orjson

from gateway.sim.engine import CompletionPlan
from gateway.sim.tokens import output_rng, sample_words

__all__ = [
    "AgentAnswer",
    "AgentAsk",
    "Piece",
    "ReasoningEffort",
    "SimToolCall",
    "ToolChoice",
    "ToolSpec",
    "agent_answer",
    "chat_agent_ask",
    "reasoning_effort",
    "tool_arguments",
]

ReasoningEffort = Literal["minimal", "low", "medium", "high", "xhigh", "max"]
# "none" | "auto" | "required", or the name of the one tool to call.
ToolChoice = str
Piece = Literal["reasoning", "content", "tool"]

_EFFORTS: tuple[ReasoningEffort, ...] = ("minimal", "low", "medium", "high", "xhigh", "max")
# Reasoning length in words per effort: short, so tests stay fast, but ordered.
_REASONING_WORDS: Mapping[str, int] = {
    "minimal": 4,
    "low": 8,
    "medium": 16,
    "high": 32,
    "xhigh": 48,
    "max": 64,
}
# How a JSON text is cut into streamed pieces: each word or run of punctuation, with the
# whitespace before it, is one simulated token (joined, the pieces give the text back).
_PIECE_RE = re.compile(r"\s*(?:\w+|[^\w\s]+)")
_MAX_SCHEMA_DEPTH = 8


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function tool the request offers: its name and its parameters' JSON schema."""

    name: str
    parameters: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class AgentAsk:
    """What a request asks of the agent side: tools and tool choice, and reasoning.

    `after_tool_result`: the conversation ends with a tool's output, which `auto` answers with
    text. `show_reasoning` False still spends the reasoning tokens but leaves them out of the
    answer (vLLM's `include_reasoning: false`).
    """

    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = "none"
    after_tool_result: bool = False
    effort: ReasoningEffort | None = None
    show_reasoning: bool = True

    def tool_to_call(self) -> ToolSpec | None:
        """The tool this request is answered with a call of, if any."""
        if not self.tools or self.tool_choice == "none":
            return None
        if self.tool_choice == "auto":
            return None if self.after_tool_result else self.tools[0]
        if self.tool_choice == "required":
            return self.tools[0]
        return next(tool for tool in self.tools if tool.name == self.tool_choice)


@dataclass(frozen=True, slots=True)
class SimToolCall:
    """One deterministic function call: its id, name, JSON arguments and their streamed pieces."""

    call_id: str
    name: str
    arguments: str
    pieces: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AgentAnswer:
    """One choice's output: reasoning tokens first, then text tokens or a tool call's pieces.

    `plan` holds every output token in order, so the engine paces and counts them all; the first
    `reasoning_tokens` of them are reasoning. `finish_reason` is vLLM's: `tool_calls` for a
    call made under `auto` or `required`, `stop` for a named tool choice (OpenAI's rule, which
    vLLM's serving code states and follows).
    """

    plan: CompletionPlan
    reasoning_tokens: int = 0
    tool_call: SimToolCall | None = None
    show_reasoning: bool = True
    tool_choice: ToolChoice = "auto"

    @property
    def reasoning(self) -> str | None:
        """The reasoning text, or None when none was asked for (or it is hidden)."""
        if not self.reasoning_tokens or not self.show_reasoning:
            return None
        return "".join(self.plan.tokens[: self.reasoning_tokens])

    @property
    def content(self) -> str:
        """The answer's text; empty when it is a tool call."""
        if self.tool_call is not None:
            return ""
        return "".join(self.plan.tokens[self.reasoning_tokens :])

    @property
    def finish_reason(self) -> str:
        if self.tool_call is not None and self.tool_choice in ("auto", "required"):
            return "tool_calls"
        return self.plan.finish_reason

    @property
    def message_content(self) -> str | None:
        """A chat message's `content` as vLLM sets it: None beside an auto tool call, "" beside
        a forced one (its parser found no text either way)."""
        if self.tool_call is None:
            return self.content
        return None if self.tool_choice == "auto" else ""

    def piece(self, position: int) -> Piece:
        """What the output token at `position` is part of."""
        if position < self.reasoning_tokens:
            return "reasoning"
        return "content" if self.tool_call is None else "tool"


def agent_answer(
    plan: CompletionPlan, ask: AgentAsk | None, prompt: str, limit: int | None
) -> AgentAnswer:
    """Shape the engine's plain `plan` for `prompt` into what `ask` wants.

    Reasoning comes out of the same budget (`limit`, the request's max_tokens) as the text, as
    in vLLM: reasoning first, the text gets what is left and may be cut (`length`). A tool call
    is never cut: the sim always finishes the arguments it starts, so they parse.
    """
    if ask is None or (ask.effort is None and not ask.tools):
        return AgentAnswer(plan)
    reasoning: tuple[str, ...] = ()
    if ask.effort is not None:
        reasoning = _reasoning_words(prompt, ask.effort, limit)
    tool = ask.tool_to_call()
    if tool is not None:
        call = _tool_call(tool, prompt)
        return AgentAnswer(
            CompletionPlan((*reasoning, *call.pieces), plan.prompt_tokens, "stop"),
            len(reasoning),
            call,
            ask.show_reasoning,
            ask.tool_choice,
        )
    text, finish = plan.tokens, plan.finish_reason
    if limit is not None and len(reasoning) + len(text) > limit:
        text, finish = text[: limit - len(reasoning)], "length"
    answer_plan = CompletionPlan((*reasoning, *text), plan.prompt_tokens, finish)
    return AgentAnswer(answer_plan, len(reasoning), None, ask.show_reasoning)


def tool_arguments(schema: Mapping[str, object], seed: str) -> dict[str, object]:
    """A JSON object that satisfies `schema`'s required properties, derived from `seed`.

    Strings are words, numbers and booleans come from a hash, an `enum` takes its first value,
    nested objects get their own required properties and arrays one item (or `minItems`).
    """
    value = _value(schema, seed, 0)
    return value if isinstance(value, dict) else {}


def chat_agent_ask(body: Mapping[str, object], messages: object) -> AgentAsk | None:
    """The agent side of a /v1/chat/completions body (tools, tool_choice, reasoning fields).

    Raises ValueError naming the field for a tool choice the tools cannot satisfy.
    """
    tools = _chat_tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), tools)
    effort = reasoning_effort(
        body.get("reasoning_effort"), body.get("chat_template_kwargs"), default=None
    )
    if not tools and effort is None:
        return None
    last = messages[-1] if isinstance(messages, list) and messages else None
    after_tool = isinstance(last, dict) and last.get("role") == "tool"
    return AgentAsk(
        tools=tools,
        tool_choice=choice,
        after_tool_result=after_tool,
        effort=effort,
        show_reasoning=body.get("include_reasoning") is not False,
    )


def reasoning_effort(
    effort: object, template_kwargs: object, *, default: ReasoningEffort | None
) -> ReasoningEffort | None:
    """The reasoning a request asks for, from vLLM's fields; None for no reasoning.

    `reasoning_effort` (OpenAI's field, handed to the chat template) names a level, "none"
    turns reasoning off; `chat_template_kwargs.enable_thinking` (Qwen3, DeepSeek) or
    `.thinking` (Granite) switch a hybrid model's thinking on at medium effort.
    """
    if effort == "none":
        return None
    if isinstance(effort, str) and effort in _EFFORTS:
        return effort
    if isinstance(template_kwargs, dict):
        flag = template_kwargs.get("enable_thinking", template_kwargs.get("thinking"))
        if flag is True:
            return "medium"
        if flag is False:
            return None
    return default


def _chat_tools(tools: object) -> tuple[ToolSpec, ...]:
    if not isinstance(tools, list):
        return ()
    specs: list[ToolSpec] = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError("tools: each tool must be {'type': 'function', 'function': {name}}")
        parameters = function.get("parameters")
        specs.append(ToolSpec(function["name"], parameters if isinstance(parameters, dict) else {}))
    return tuple(specs)


def _tool_choice(choice: object, tools: Sequence[ToolSpec]) -> ToolChoice:
    if choice is None:
        # OpenAI's (and vLLM's) default: auto when tools are given, none otherwise.
        return "auto" if tools else "none"
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise ValueError("tool_choice: a named choice is {'function': {'name': ...}}")
        if all(tool.name != name for tool in tools):
            raise ValueError(f"tool_choice: tool {name!r} has not been passed in `tools`")
        return name
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise ValueError("tool_choice: 'required' needs at least one tool in `tools`")
        return str(choice)
    raise ValueError(
        f"tool_choice: must be none, auto, required or a named function, got {choice!r}"
    )


def _tool_call(tool: ToolSpec, prompt: str) -> SimToolCall:
    seed = f"{prompt}\x00{tool.name}"
    arguments = orjson.dumps(tool_arguments(tool.parameters, seed)).decode()
    pieces = tuple(_PIECE_RE.findall(arguments))
    digest = hashlib.blake2b(f"call\x00{seed}".encode(), digest_size=12).hexdigest()
    return SimToolCall(f"call_{digest}", tool.name, arguments, pieces)


def _reasoning_words(prompt: str, effort: str, limit: int | None) -> tuple[str, ...]:
    rng = output_rng(seed=0, model="reasoning", prompt=prompt, request_seed=None)
    count = _REASONING_WORDS[effort]
    if limit is not None:
        count = min(count, limit)
    return sample_words(rng, count)


def _value(schema: object, seed: str, depth: int) -> object:
    if not isinstance(schema, dict) or depth > _MAX_SCHEMA_DEPTH:
        return _word(seed)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return _value(options[0], seed, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((each for each in kind if each != "null"), "null")
    if kind is None and isinstance(schema.get("properties"), dict):
        kind = "object"
    number = _hash(seed)
    if kind == "object":
        properties = schema.get("properties")
        required = schema.get("required")
        if not isinstance(properties, dict) or not isinstance(required, list):
            return {}
        return {
            name: _value(properties.get(name), f"{seed}/{name}", depth + 1)
            for name in required
            if isinstance(name, str)
        }
    if kind == "array":
        minimum = schema.get("minItems")
        count = minimum if isinstance(minimum, int) and minimum > 0 else 1
        return [_value(schema.get("items"), f"{seed}/{i}", depth + 1) for i in range(count)]
    if kind == "integer":
        return _clamp(number % 100, schema)
    if kind == "number":
        return _clamp((number % 1000) / 10, schema)
    if kind == "boolean":
        return number % 2 == 0
    if kind == "null":
        return None
    return _word(seed)


def _clamp(value: float, schema: Mapping[str, object]) -> float:
    low, high = schema.get("minimum"), schema.get("maximum")
    if isinstance(low, int | float) and value < low:
        value = low
    if isinstance(high, int | float) and value > high:
        value = high
    return value


def _word(seed: str) -> str:
    rng = output_rng(seed=0, model="arguments", prompt=seed, request_seed=None)
    return "".join(sample_words(rng, 2))


def _hash(seed: str) -> int:
    return int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=8).digest(), "big")

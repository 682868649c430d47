"""Anthropic's context editing (`context_management`), done by the gateway.

Claude Code sends `{"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}` with
every request that thinks; gateways and clouds that refused the field broke it (Vertex,
LiteLLM, Envoy AI Gateway: "context_management: Extra inputs are not permitted"), and
passing it on breaks a backend that does not know it. No backend here edits context, so
the gateway applies the edits to the Messages body itself, as Anthropic's API does before
the prompt reaches the model, and the backend never sees the field: translated or passed
through, it gets the edited conversation. The client keeps its full history, as with
Anthropic. The answer reports what was applied (`applied_edits`).

Tokens are the gateway's estimate (characters / 4), as everywhere else it counts before
a backend has. `compact_20260112` (summarising old turns) needs a model to summarise with
and is refused with a 400 naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from gateway.dialects.messages_request import checked
from gateway.errors import InvalidRequest

__all__ = ["CLEARED_RESULT", "edit_context"]

# What a cleared tool result says in its place, so the model knows something was there.
CLEARED_RESULT = "[This tool result was cleared to save context.]"
_THINKING = ("thinking", "redacted_thinking")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Count(_Strict):
    type: Literal["input_tokens", "tool_uses"]
    value: int = Field(ge=0)


class _InputTokens(_Strict):
    type: Literal["input_tokens"]
    value: int = Field(ge=0)


class _ToolUses(_Strict):
    type: Literal["tool_uses"]
    value: int = Field(ge=0)


class _ThinkingTurns(_Strict):
    type: Literal["thinking_turns"]
    value: int = Field(ge=1)


class _AllTurns(_Strict):
    type: Literal["all"]


class _ClearToolUses(_Strict):
    type: Literal["clear_tool_uses_20250919"]
    trigger: _Count = _Count(type="input_tokens", value=100_000)  # Anthropic's defaults
    keep: _ToolUses = _ToolUses(type="tool_uses", value=3)
    clear_at_least: _InputTokens | None = None
    exclude_tools: list[str] | None = None
    clear_tool_inputs: bool | list[str] | None = None


class _ClearThinking(_Strict):
    type: Literal["clear_thinking_20251015"]
    keep: _ThinkingTurns | _AllTurns | Literal["all"] = _ThinkingTurns(
        type="thinking_turns", value=1
    )


class _Config(_Strict):
    edits: list[dict[str, Any]] = Field(default_factory=list, max_length=8)


_EDITS: dict[str, type[_ClearToolUses] | type[_ClearThinking]] = {
    "clear_tool_uses_20250919": _ClearToolUses,
    "clear_thinking_20251015": _ClearThinking,
}


def edit_context(body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """`body` with its `context_management` edits applied and the field removed, and the
    edits applied (Anthropic's `applied_edits`), or None when it asked for none (`body`
    itself, uncopied, when it has no such field). `InvalidRequest` names the field of an
    edit it cannot honour; bad input changes nothing (the caller's body is never modified)."""
    if "context_management" not in body:
        return body, None
    edited = {k: v for k, v in body.items() if k != "context_management"}
    config = body["context_management"]
    if config is None:
        return edited, None  # `null` asks for nothing, as Anthropic reads it
    edits = _parse(config, body.get("thinking"))
    messages = body.get("messages")
    if not isinstance(messages, list):
        return edited, []  # the request's own check names what is wrong with it
    messages = list(messages)
    applied: list[dict[str, Any]] = []
    for edit in edits:
        if isinstance(edit, _ClearThinking):
            result = _clear_thinking(messages, edit)
        else:
            result = _clear_tool_uses(messages, edit, _estimate(edited, messages))
        if result is not None:
            applied.append(result)
    edited["messages"] = messages
    return edited, applied


def _parse(config: object, thinking: object) -> list[_ClearToolUses | _ClearThinking]:
    parsed = checked(_Config, config, "context_management")
    edits: list[_ClearToolUses | _ClearThinking] = []
    for i, value in enumerate(parsed.edits):
        path = f"context_management.edits.{i}"
        kind = value.get("type")
        if kind == "compact_20260112":
            raise InvalidRequest(
                f"Unsupported value for '{path}.type': compaction summarises old turns with a"
                " model, and this gateway has none to do it; compact on the client instead.",
                param=f"{path}.type",
            )
        model = _EDITS.get(kind) if isinstance(kind, str) else None
        if model is None:
            names = ", ".join(sorted(_EDITS))
            raise InvalidRequest(
                f"Invalid value for '{path}.type': {kind!r} (expected one of {names}).",
                param=f"{path}.type",
            )
        edit = checked(model, value, path)
        if isinstance(edit, _ClearThinking):
            # Anthropic's two rules for this edit, kept so a request valid here is valid there.
            if i != 0:
                raise InvalidRequest(
                    f"Invalid value for '{path}': clear_thinking_20251015 must be the first edit.",
                    param=path,
                )
            if not isinstance(thinking, dict) or thinking.get("type") not in (
                "enabled",
                "adaptive",
            ):
                raise InvalidRequest(
                    f"Invalid value for '{path}': clear_thinking_20251015 requires thinking"
                    " to be enabled or adaptive.",
                    param=path,
                )
        edits.append(edit)
    return edits


def _clear_thinking(messages: list[Any], edit: _ClearThinking) -> dict[str, Any] | None:
    """Thinking blocks removed from all but the last `keep` assistant turns that have any."""
    keep = edit.keep
    if keep == "all" or isinstance(keep, _AllTurns):
        return None
    turns = [
        i
        for i, message in enumerate(messages)
        if _role(message) == "assistant" and any(_is_thinking(b) for b in _blocks(message))
    ]
    cleared = turns[: max(len(turns) - keep.value, 0)]
    chars = 0
    for i in cleared:
        message = messages[i]
        kept = [b for b in message["content"] if not _is_thinking(b)]
        chars += sum(_chars(b) for b in message["content"] if _is_thinking(b))
        # A turn that was all thinking keeps nothing to say; Anthropic drops it as well.
        messages[i] = {**message, "content": kept}
    if not cleared:
        return None
    messages[:] = [m for i, m in enumerate(messages) if i not in cleared or m["content"]]
    return {
        "type": "clear_thinking_20251015",
        "cleared_thinking_turns": len(cleared),
        "cleared_input_tokens": chars // 4,
    }


def _clear_tool_uses(
    messages: list[Any], edit: _ClearToolUses, input_tokens: int
) -> dict[str, Any] | None:
    """Once the trigger is passed, the results of all but the last `keep` tool uses (and,
    with `clear_tool_inputs`, their inputs) replaced by a placeholder, oldest first; only
    if that clears at least `clear_at_least` tokens."""
    uses = [
        (i, j, block)
        for i, message in enumerate(messages)
        if _role(message) == "assistant"
        for j, block in enumerate(_blocks(message))
        if isinstance(block, dict) and block.get("type") == "tool_use"
    ]
    trigger = edit.trigger
    reached = input_tokens if trigger.type == "input_tokens" else len(uses)
    if reached <= trigger.value:
        return None
    excluded = set(edit.exclude_tools or ())
    older = uses[: max(len(uses) - edit.keep.value, 0)]
    candidates = [(i, j, b) for i, j, b in older if b.get("name") not in excluded]
    results = _results_by_id(messages)
    plan: list[tuple[tuple[int, int] | None, tuple[int, int] | None]] = []
    chars = 0
    for i, j, use in candidates:
        where = results.get(use.get("id"))
        result = None
        if where is not None and _result_text(messages, where) != CLEARED_RESULT:
            result = where
            chars += _chars(messages[where[0]]["content"][where[1]].get("content"))
        inputs = None
        if _clears_inputs(edit.clear_tool_inputs, use.get("name")) and use.get("input"):
            inputs = (i, j)
            chars += len(orjson.dumps(use.get("input")))
        if result is not None or inputs is not None:
            plan.append((result, inputs))
    tokens = chars // 4
    if not plan or (edit.clear_at_least is not None and tokens < edit.clear_at_least.value):
        return None
    for result, inputs in plan:
        if result is not None:
            _replace_block(messages, result, content=CLEARED_RESULT)
        if inputs is not None:
            _replace_block(messages, inputs, input={})
    return {
        "type": "clear_tool_uses_20250919",
        "cleared_tool_uses": len(plan),
        "cleared_input_tokens": tokens,
    }


def _clears_inputs(setting: bool | list[str] | None, name: object) -> bool:
    if isinstance(setting, list):
        return name in setting
    return setting is True


def _results_by_id(messages: list[Any]) -> dict[object, tuple[int, int]]:
    found: dict[object, tuple[int, int]] = {}
    for i, message in enumerate(messages):
        if _role(message) != "user":
            continue
        for j, block in enumerate(_blocks(message)):
            if isinstance(block, dict) and block.get("type") == "tool_result":
                found[block.get("tool_use_id")] = (i, j)
    return found


def _result_text(messages: list[Any], where: tuple[int, int]) -> object:
    return messages[where[0]]["content"][where[1]].get("content")


def _replace_block(messages: list[Any], where: tuple[int, int], **fields: Any) -> None:
    """Copy-on-write: the message and its content list are new, the caller's untouched."""
    i, j = where
    message = messages[i]
    content = list(message["content"])
    content[j] = {**content[j], **fields}
    messages[i] = {**message, "content": content}


def _estimate(body: Mapping[str, Any], messages: list[Any]) -> int:
    parts = (body.get("system"), messages, body.get("tools"))
    return sum(len(orjson.dumps(part)) for part in parts if part is not None) // 4


def _role(message: object) -> object:
    return message.get("role") if isinstance(message, dict) else None


def _blocks(message: Mapping[str, Any]) -> list[Any]:
    content = message.get("content")
    return content if isinstance(content, list) else []


def _is_thinking(block: object) -> bool:
    return isinstance(block, dict) and block.get("type") in _THINKING


def _chars(value: object) -> int:
    if isinstance(value, str):
        return len(value)
    return len(orjson.dumps(value)) if value is not None else 0

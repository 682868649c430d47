"""Anthropic's context editing, applied by the gateway to a Messages body."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gateway.dialects.context_edits import CLEARED_RESULT, edit_context
from gateway.dialects.messages_request import to_chat
from gateway.errors import InvalidRequest

THINKING = {"type": "enabled", "budget_tokens": 2048}


def tool_turns(count: int, result: str = "x" * 400) -> list[dict[str, Any]]:
    """A user question, then `count` rounds of a tool call and its result."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "fix the build"}]
    for n in range(count):
        name = "read_file" if n % 2 == 0 else "run_tests"
        messages.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": f"step {n} " * 20, "signature": ""},
                    {"type": "tool_use", "id": f"t{n}", "name": name, "input": {"path": f"f{n}"}},
                ],
            }
        )
        messages.append(
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": f"t{n}", "content": result}],
            }
        )
    return messages


def request(edits: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    body = {
        "model": "m",
        "max_tokens": 4096,
        "thinking": THINKING,
        "messages": tool_turns(6),
        "context_management": {"edits": edits},
    }
    return {**body, **extra}


def results(body: dict[str, Any]) -> list[object]:
    return [
        block["content"]
        for message in body["messages"]
        if message["role"] == "user" and isinstance(message["content"], list)
        for block in message["content"]
        if block["type"] == "tool_result"
    ]


def inputs(body: dict[str, Any]) -> list[object]:
    return [
        block["input"]
        for message in body["messages"]
        if message["role"] == "assistant"
        for block in message["content"]
        if block["type"] == "tool_use"
    ]


def thinking_turns(body: dict[str, Any]) -> int:
    return sum(
        any(block["type"] == "thinking" for block in message["content"])
        for message in body["messages"]
        if message["role"] == "assistant"
    )


def test_no_field_no_change() -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    edited, applied = edit_context(body)
    assert edited == body and applied is None
    # An explicit null asks for nothing too, and the translation never sees the field.
    nulled, applied = edit_context({**body, "context_management": None})
    assert nulled == body and applied is None
    to_chat(nulled)


def test_claude_codes_own_edit_keeps_everything_and_the_backend_never_sees_the_field() -> None:
    body = request([{"type": "clear_thinking_20251015", "keep": "all"}])
    edited, applied = edit_context(body)
    assert applied == []
    assert "context_management" not in edited
    assert edited["messages"] == body["messages"]
    to_chat(edited)  # and the translation takes it


def test_clear_thinking_keeps_the_last_turns_and_leaves_the_callers_body_alone() -> None:
    body = request(
        [{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 2}}]
    )
    before = copy.deepcopy(body)
    edited, applied = edit_context(body)
    assert body == before
    assert thinking_turns(edited) == 2
    assert applied is not None and applied[0]["type"] == "clear_thinking_20251015"
    assert applied[0]["cleared_thinking_turns"] == 4 and applied[0]["cleared_input_tokens"] > 0
    # The default is Anthropic's: one turn.
    assert thinking_turns(edit_context(request([{"type": "clear_thinking_20251015"}]))[0]) == 1


def test_a_turn_that_was_all_thinking_is_dropped_not_left_empty() -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": ""}]},
        {"role": "user", "content": "b"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "u", "signature": ""},
                {"type": "text", "text": "c"},
            ],
        },
        {"role": "user", "content": "d"},
    ]
    body = request([{"type": "clear_thinking_20251015"}], messages=messages)
    edited, _ = edit_context(body)
    assert [m["role"] for m in edited["messages"]] == ["user", "user", "assistant", "user"]
    to_chat(edited)


def test_clear_tool_uses_waits_for_its_trigger_then_keeps_the_last_three() -> None:
    quiet = request([{"type": "clear_tool_uses_20250919"}])  # default trigger: 100k tokens
    assert edit_context(quiet)[1] == []
    body = request(
        [{"type": "clear_tool_uses_20250919", "trigger": {"type": "input_tokens", "value": 500}}]
    )
    edited, applied = edit_context(body)
    assert results(edited) == [CLEARED_RESULT] * 3 + ["x" * 400] * 3
    assert inputs(edited) == inputs(body)  # inputs stay unless asked
    assert applied == [
        {"type": "clear_tool_uses_20250919", "cleared_tool_uses": 3, "cleared_input_tokens": 300}
    ]
    to_chat(edited)


def test_clear_tool_uses_options() -> None:
    trigger = {"type": "tool_uses", "value": 2}
    edit = {
        "type": "clear_tool_uses_20250919",
        "trigger": trigger,
        "keep": {"type": "tool_uses", "value": 1},
    }
    kept = edit_context(request([{**edit, "exclude_tools": ["run_tests"]}]))[0]
    assert results(kept) == [
        CLEARED_RESULT,
        "x" * 400,
        CLEARED_RESULT,
        "x" * 400,
        CLEARED_RESULT,
        "x" * 400,
    ]
    cleared = edit_context(request([{**edit, "clear_tool_inputs": True}]))[0]
    assert inputs(cleared) == [{}] * 5 + [{"path": "f5"}]
    named = edit_context(request([{**edit, "clear_tool_inputs": ["read_file"]}]))[0]
    assert inputs(named)[:2] == [{}, {"path": "f1"}]
    # Less than `clear_at_least` to gain: nothing is touched.
    small = {**edit, "clear_at_least": {"type": "input_tokens", "value": 10_000}}
    untouched, applied = edit_context(request([small]))
    assert results(untouched) == ["x" * 400] * 6 and applied == []


def test_results_cleared_before_count_nothing_when_the_history_comes_back() -> None:
    edit = {"type": "clear_tool_uses_20250919", "trigger": {"type": "input_tokens", "value": 500}}
    once, _ = edit_context(request([edit]))
    again, applied = edit_context({**once, "context_management": {"edits": [edit]}})
    assert results(again) == results(once)
    assert applied == []


@pytest.mark.parametrize(
    ("edits", "extra", "param"),
    [
        ([{"type": "compact_20260112"}], {}, "context_management.edits.0.type"),
        ([{"type": "clear_everything"}], {}, "context_management.edits.0.type"),
        (
            [{"type": "clear_tool_uses_20250919", "keep": {"type": "tool_uses", "value": -1}}],
            {},
            "context_management.edits.0.keep.value",
        ),
        (
            [{"type": "clear_tool_uses_20250919", "forget": True}],
            {},
            "context_management.edits.0.forget",
        ),
        # Anthropic's rules for clear_thinking: thinking on, and first in the list.
        ([{"type": "clear_thinking_20251015"}], {"thinking": None}, "context_management.edits.0"),
        (
            [{"type": "clear_tool_uses_20250919"}, {"type": "clear_thinking_20251015"}],
            {},
            "context_management.edits.1",
        ),
        ("all", {}, "context_management.edits"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(
    edits: Any, extra: dict[str, Any], param: str
) -> None:
    body = request(edits, **extra)
    before = copy.deepcopy(body)
    with pytest.raises(InvalidRequest) as caught:
        edit_context(body)
    assert caught.value.param == param, caught.value
    assert body == before

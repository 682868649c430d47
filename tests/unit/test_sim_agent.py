"""The sim's deterministic agent behaviour: tool choice, arguments from a schema, reasoning."""

from __future__ import annotations

import orjson
import pytest

from gateway.sim.agent import AgentAsk, ToolSpec, agent_answer, chat_agent_ask, tool_arguments
from gateway.sim.engine import CompletionPlan

PLAN = CompletionPlan(tuple(["one"] + [" word"] * 19), 10, "stop")
LOOKUP = ToolSpec(
    "lookup", {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
)
OTHER = ToolSpec("other", {})


def test_arguments_fill_required_properties_by_type() -> None:
    schema = {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "e": {"enum": ["first", "second"]},
            "i": {"type": "integer", "minimum": 200},
            "n": {"type": ["null", "number"], "maximum": 0.5},
            "b": {"type": "boolean"},
            "a": {"type": "array", "items": {"type": "integer"}, "minItems": 3},
            "o": {"type": "object", "properties": {"x": {"const": 7}}, "required": ["x"]},
            "u": {"anyOf": [{"type": "boolean"}, {"type": "string"}]},
            "skipped": {"type": "string"},
        },
        "required": ["s", "e", "i", "n", "b", "a", "o", "u"],
    }
    arguments = tool_arguments(schema, "seed")
    assert set(arguments) == {"s", "e", "i", "n", "b", "a", "o", "u"}
    assert isinstance(arguments["s"], str) and arguments["s"]
    assert arguments["e"] == "first"
    assert arguments["i"] == 200  # clamped up to the minimum
    assert isinstance(arguments["n"], float) and arguments["n"] <= 0.5
    assert isinstance(arguments["b"], bool) and isinstance(arguments["u"], bool)
    assert len(arguments["a"]) == 3 and all(isinstance(x, int) for x in arguments["a"])
    assert arguments["o"] == {"x": 7}
    assert tool_arguments(schema, "seed") == arguments
    assert tool_arguments(schema, "other seed") != arguments
    assert tool_arguments({"type": "object", "properties": {"p": {}}}, "seed") == {}


@pytest.mark.parametrize(
    ("choice", "after_result", "called"),
    [
        ("auto", False, "lookup"),
        ("auto", True, None),
        ("required", True, "lookup"),
        ("other", True, "other"),
        ("none", False, None),
    ],
)
def test_the_tool_called(choice: str, after_result: bool, called: str | None) -> None:
    ask = AgentAsk(tools=(LOOKUP, OTHER), tool_choice=choice, after_tool_result=after_result)
    answer = agent_answer(PLAN, ask, "prompt", None)
    assert (answer.tool_call.name if answer.tool_call else None) == called
    if answer.tool_call is not None:
        assert "".join(answer.plan.tokens) == answer.tool_call.arguments
        assert orjson.loads(answer.tool_call.arguments) == tool_arguments(
            {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
            if called == "lookup"
            else {},
            f"prompt\x00{called}",
        )
        assert answer.finish_reason == ("stop" if choice == "other" else "tool_calls")
    else:
        assert answer.plan == PLAN


def test_reasoning_comes_first_and_shares_the_token_budget() -> None:
    ask = AgentAsk(effort="low")
    whole = agent_answer(PLAN, ask, "prompt", None)
    assert whole.reasoning_tokens == 8
    assert whole.plan.tokens[8:] == PLAN.tokens
    assert whole.content == PLAN.text and whole.finish_reason == "stop"
    cut = agent_answer(PLAN, ask, "prompt", 12)
    assert cut.plan.completion_tokens == 12 and cut.finish_reason == "length"
    assert cut.reasoning == whole.reasoning and cut.content == "".join(PLAN.tokens[:4])
    hidden = agent_answer(PLAN, AgentAsk(effort="low", show_reasoning=False), "prompt", None)
    assert hidden.reasoning is None and hidden.reasoning_tokens == 8


@pytest.mark.parametrize(
    ("body", "effort"),
    [
        ({"reasoning_effort": "high"}, "high"),
        ({"reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": True}}, None),
        ({"chat_template_kwargs": {"enable_thinking": True}}, "medium"),
        ({"chat_template_kwargs": {"thinking": True}}, "medium"),
        ({"chat_template_kwargs": {"enable_thinking": False}}, None),
        ({"include_reasoning": True}, None),
    ],
)
def test_chat_fields_that_ask_for_reasoning(body: dict[str, object], effort: str | None) -> None:
    ask = chat_agent_ask(body, [{"role": "user", "content": "x"}])
    assert (ask.effort if ask else None) == effort


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        ({"type": "function", "function": {"name": "missing"}}, "has not been passed"),
        ("sometimes", "must be none, auto, required"),
    ],
)
def test_impossible_tool_choices_are_refused(choice: object, message: str) -> None:
    tools = [{"type": "function", "function": {"name": "lookup"}}]
    with pytest.raises(ValueError, match=message):
        chat_agent_ask({"tools": tools, "tool_choice": choice}, [])
    with pytest.raises(ValueError, match="needs at least one tool"):
        chat_agent_ask({"tool_choice": "required"}, [])

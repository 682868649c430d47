"""What the agent-API tests share: the official SDKs' clients, the weather tool in each API's
shape, and a Messages tool round trip. The tests that use them differ in the gateway they
talk to (its keys, models and backend APIs), so they pass those in."""

from __future__ import annotations

from typing import Any

import anthropic
import openai

# Sims that answer at once, so agent tests wait on the gateway, not on simulated decoding.
FAST = ("--ttft-ms", "5", "--itl-ms", "1", "--prefill-ms-per-token", "0", "--jitter", "0")


def claude_client(url: str, api_key: str) -> anthropic.Anthropic:
    """The Anthropic SDK on a gateway at `url`; no retries, so a test sees the first answer."""
    return anthropic.Anthropic(base_url=url, api_key=api_key, max_retries=0)


def openai_client(url: str, api_key: str) -> openai.OpenAI:
    """The OpenAI SDK on a gateway at `url`; no retries, so a test sees the first answer."""
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)


def message_text(message: anthropic.types.Message) -> str:
    """A Messages answer's text blocks, joined."""
    return "".join(b.text for b in message.content if b.type == "text")


def weather_tool(**extra: dict[str, Any]) -> dict[str, Any]:
    """`get_weather` as a Messages tool: a required `city`, and `extra` properties, required
    too."""
    properties = {"city": {"type": "string"}, **extra}
    return {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": {"type": "object", "properties": properties, "required": [*properties]},
    }


def chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A Messages tool as a chat completions tool."""
    function = {
        "name": tool["name"],
        "description": tool["description"],
        "parameters": tool["input_schema"],
    }
    return {"type": "function", "function": function}


def responses_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A Messages tool as a Responses tool (flat: no `function` object)."""
    return {
        "type": "function",
        "name": tool["name"],
        "description": tool["description"],
        "parameters": tool["input_schema"],
    }


def messages_tool_round_trip(
    client: anthropic.Anthropic, model: str, tool: dict[str, Any]
) -> tuple[anthropic.types.Message, anthropic.types.ToolUseBlock, anthropic.types.Message]:
    """Ask about Lyon's weather with `tool`, then answer its call: the first answer, its tool
    call, and the answer to the result."""
    question: Any = {"role": "user", "content": "What is the weather in Lyon?"}
    first = client.messages.create(
        model=model,
        max_tokens=64,
        tools=[tool],  # type: ignore[list-item]
        messages=[question],
    )
    assert first.stop_reason == "tool_use"
    call = next(b for b in first.content if b.type == "tool_use")
    second = client.messages.create(
        model=model,
        max_tokens=64,
        tools=[tool],  # type: ignore[list-item]
        messages=[
            question,
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "21 C"}],
            },
        ],
    )
    assert second.stop_reason in {"end_turn", "max_tokens"}
    assert message_text(second)
    return first, call, second

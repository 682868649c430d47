"""The sim's agent side, over real sim processes: deterministic tool calls and reasoning on chat,
and native /v1/messages and /v1/responses, checked with the official SDKs and their types."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.sim.profile import PROFILES
from gateway.sim.server import start_sim_server
from tests.integration.conftest import SMALL, Service, Services, start_sim

pytestmark = pytest.mark.integration

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "detail": {"type": "boolean"},
        "where": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "note": {"type": "string"}},
            "required": ["lat"],
        },
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "optional": {"type": "string"},
    },
    "required": ["city", "unit", "days", "detail", "where", "tags"],
}
CHAT_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"q": {"type": "string"}},
                "required": ["q"],
            },
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris this week?"}]
_MESSAGE_EVENTS: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
_RESPONSE_EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module", params=["timed", "instant"])
def sim(request: pytest.FixtureRequest, log_dir: Path, services: Services) -> Service:
    """A vLLM-like sim process: with a little latency (token by token), or none (one write)."""
    if request.param == "instant":
        return services(start_sim(log_dir, "instant"))
    return services(start_sim(log_dir, "small", "--ttft-ms", "5", "--itl-ms", "0.5"))


@pytest.fixture
def chat(sim: Service) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
def claude(sim: Service) -> Iterator[anthropic.Anthropic]:
    root = sim.url.removesuffix("/v1")
    with anthropic.Anthropic(base_url=root, api_key="unused", max_retries=0) as client:
        yield client


def _raw(sim: Service, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(sim.url.removesuffix("/v1") + path, json=body, timeout=10)


def _sse(text: str) -> list[tuple[str | None, str]]:
    """The (event name, data) pairs of an SSE body."""
    pairs = []
    for block in text.split("\n\n"):
        if not block:
            continue
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
        assert data is not None, block
        pairs.append((name, data))
    return pairs


def _chunks(text: str) -> list[dict[str, Any]]:
    pairs = _sse(text)
    assert pairs[-1] == (None, "[DONE]")
    return [orjson.loads(data) for _, data in pairs[:-1]]


# -- chat: tool calls ----------------------------------------------------------------------


def test_tools_are_answered_with_a_deterministic_call_of_the_first_tool(
    chat: openai.OpenAI,
) -> None:
    first = chat.chat.completions.create(model=SMALL, messages=ASK, tools=CHAT_TOOLS)
    again = chat.chat.completions.create(model=SMALL, messages=ASK, tools=CHAT_TOOLS)
    [choice] = first.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    arguments = orjson.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit", "days", "detail", "where", "tags"}
    assert isinstance(arguments["city"], str) and arguments["city"]
    assert arguments["unit"] == "celsius"
    assert isinstance(arguments["days"], int) and 1 <= arguments["days"] <= 7
    assert isinstance(arguments["detail"], bool)
    assert set(arguments["where"]) == {"lat"} and isinstance(arguments["where"]["lat"], float)
    assert len(arguments["tags"]) == 2 and all(isinstance(tag, str) for tag in arguments["tags"])
    assert again.choices[0].message.tool_calls == choice.message.tool_calls
    assert first.usage is not None and first.usage.completion_tokens > 3


def test_a_streamed_tool_call_comes_in_pieces_that_make_the_plain_arguments(
    sim: Service, chat: openai.OpenAI
) -> None:
    body = {"model": SMALL, "messages": ASK, "tools": CHAT_TOOLS}
    plain = _raw(sim, "/v1/chat/completions", body).json()
    [plain_call] = plain["choices"][0]["message"]["tool_calls"]
    chunks = _chunks(_raw(sim, "/v1/chat/completions", {**body, "stream": True}).text)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    header = deltas[1]["tool_calls"][0]
    # vLLM's tool parsers: id, type and name first, with no arguments key.
    assert header == {
        "index": 0,
        "id": plain_call["id"],
        "type": "function",
        "function": {"name": "get_weather"},
    }
    pieces = [delta["tool_calls"][0]["function"]["arguments"] for delta in deltas[2:-1]]
    assert all(set(delta["tool_calls"][0]) == {"index", "function"} for delta in deltas[2:-1])
    assert len(pieces) >= 3
    assert "".join(pieces) == plain_call["function"]["arguments"]
    assert orjson.loads("".join(pieces)) == orjson.loads(plain_call["function"]["arguments"])
    assert deltas[-1] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # The SDK's own stream helper accumulates the same call.
    with chat.chat.completions.stream(model=SMALL, messages=ASK, tools=CHAT_TOOLS) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls or []
    assert call.function.arguments == plain_call["function"]["arguments"]
    assert final.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("tool_choice", "name", "finish"),
    [
        ({"type": "function", "function": {"name": "lookup"}}, "lookup", "stop"),
        ("required", "get_weather", "tool_calls"),
    ],
)
def test_a_forced_tool_choice_picks_its_tool(
    chat: openai.OpenAI, tool_choice: Any, name: str, finish: str
) -> None:
    response = chat.chat.completions.create(
        model=SMALL,
        messages=ASK,
        tools=CHAT_TOOLS,
        tool_choice=tool_choice,
    )
    [choice] = response.choices
    [call] = choice.message.tool_calls or []
    assert call.function.name == name
    # vLLM (as OpenAI): a named choice finishes with "stop", and content "" beside the call.
    assert choice.finish_reason == finish
    assert choice.message.content == ""


def test_tool_choice_none_and_unknown_tools(sim: Service) -> None:
    body = {"model": SMALL, "messages": ASK, "tools": CHAT_TOOLS, "tool_choice": "none"}
    answer = _raw(sim, "/v1/chat/completions", body).json()["choices"][0]
    assert answer["finish_reason"] == "stop"
    assert "tool_calls" not in answer["message"]
    assert answer["message"]["content"]
    named = {"type": "function", "function": {"name": "nope"}}
    refused = _raw(sim, "/v1/chat/completions", {**body, "tool_choice": named})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "tool_choice"


def test_a_tool_round_trip_ends_in_text(chat: openai.OpenAI) -> None:
    first = chat.chat.completions.create(model=SMALL, messages=ASK, tools=CHAT_TOOLS)
    [call] = first.choices[0].message.tool_calls or []
    history = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'},
    ]
    second = chat.chat.completions.create(model=SMALL, messages=history, tools=CHAT_TOOLS)
    [choice] = second.choices
    assert choice.finish_reason == "stop"
    assert not choice.message.tool_calls
    assert choice.message.content


# -- chat: reasoning -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "ask",
    [
        {"reasoning_effort": "low"},
        {"reasoning_effort": "high"},
        {"chat_template_kwargs": {"enable_thinking": True}},
    ],
)
def test_reasoning_comes_when_asked_and_counts_as_output(sim: Service, ask: dict[str, Any]) -> None:
    body = {"model": SMALL, "messages": ASK, **ask}
    plain = _raw(sim, "/v1/chat/completions", {"model": SMALL, "messages": ASK}).json()
    answer = _raw(sim, "/v1/chat/completions", body).json()
    message = answer["choices"][0]["message"]
    # Current vLLM's field name; the old `reasoning_content` is gone.
    assert "reasoning_content" not in message
    reasoning = message["reasoning"]
    assert reasoning
    words = len(reasoning.split())
    assert answer["usage"]["completion_tokens_details"] == {"reasoning_tokens": words}
    assert answer["usage"]["completion_tokens"] == words + len(message["content"].split())
    assert message["content"] == plain["choices"][0]["message"]["content"]
    assert "reasoning" not in plain["choices"][0]["message"]
    assert "completion_tokens_details" not in plain["usage"]


def test_reasoning_is_off_for_effort_none_and_hidden_without_include_reasoning(
    sim: Service,
) -> None:
    off = {"model": SMALL, "messages": ASK, "reasoning_effort": "none"}
    assert "reasoning" not in _raw(sim, "/v1/chat/completions", off).json()["choices"][0]["message"]
    hidden = {**off, "reasoning_effort": "low", "include_reasoning": False}
    answer = _raw(sim, "/v1/chat/completions", hidden).json()
    assert "reasoning" not in answer["choices"][0]["message"]
    # Spent all the same.
    assert answer["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0


def test_streamed_reasoning_comes_before_the_content(sim: Service) -> None:
    body = {"model": SMALL, "messages": ASK, "reasoning_effort": "medium", "max_tokens": 30}
    plain = _raw(sim, "/v1/chat/completions", body).json()
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks = _chunks(_raw(sim, "/v1/chat/completions", stream).text)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    kinds = [next(iter(delta)) for delta in deltas[1:-1]]
    assert kinds == sorted(kinds, key=lambda kind: kind != "reasoning")  # reasoning first
    message = plain["choices"][0]["message"]
    reasoning = "".join(d["reasoning"] for d in deltas if "reasoning" in d)
    assert reasoning == message["reasoning"]
    assert "".join(d.get("content", "") for d in deltas) == message["content"]
    assert chunks[-1]["usage"] == plain["usage"]
    assert plain["usage"]["completion_tokens"] == 30  # the budget covers both
    assert plain["choices"][0]["finish_reason"] == "length"


# -- /v1/messages --------------------------------------------------------------------------


ANTHROPIC_TOOLS: list[Any] = [{"name": "get_weather", "input_schema": WEATHER}]
THINK: Any = {"type": "enabled", "budget_tokens": 1024}


def test_messages_plain_and_streamed_agree_through_the_sdk(
    sim: Service, claude: anthropic.Anthropic
) -> None:
    ask: Any = {"model": SMALL, "max_tokens": 200, "messages": ASK, "thinking": THINK}
    plain = claude.messages.create(**ask)
    Message.model_validate(_raw(sim, "/v1/messages", ask).json())  # the SDK type, strictly
    assert [block.type for block in plain.content] == ["thinking", "text"]
    assert plain.stop_reason == "end_turn"
    with claude.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == plain.content[0].thinking
    assert final.content[1].text == plain.content[1].text
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert final.usage.input_tokens == plain.usage.input_tokens
    assert plain.usage.output_tokens == len(plain.content[0].thinking.split()) + len(
        plain.content[1].text.split()
    )
    # Every raw event is one of the SDK's types, in Anthropic's order.
    events = _sse(_raw(sim, "/v1/messages", {**ask, "stream": True}).text)
    parsed = [_MESSAGE_EVENTS.validate_json(data) for _, data in events]
    assert [name for name, _ in events] == [event.type for event in parsed]
    names = [event.type for event in parsed]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == 2
    assert parsed[-2].delta.stop_reason == "end_turn"


def test_messages_without_thinking_have_no_thinking_block(claude: anthropic.Anthropic) -> None:
    plain = claude.messages.create(model=SMALL, max_tokens=50, messages=ASK)
    assert [block.type for block in plain.content] == ["text"]


def test_messages_tool_round_trip_through_the_sdk(claude: anthropic.Anthropic) -> None:
    first = claude.messages.create(
        model=SMALL,
        max_tokens=200,
        messages=ASK,
        tools=ANTHROPIC_TOOLS,
    )
    assert first.stop_reason == "tool_use"
    [use] = [block for block in first.content if block.type == "tool_use"]
    assert use.name == "get_weather"
    assert use.input["unit"] == "celsius"
    with claude.messages.stream(
        model=SMALL,
        max_tokens=200,
        messages=ASK,
        tools=ANTHROPIC_TOOLS,
    ) as stream:
        streamed = stream.get_final_message()
    [streamed_use] = [block for block in streamed.content if block.type == "tool_use"]
    assert (streamed_use.id, streamed_use.input) == (use.id, use.input)
    result: Any = {"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}
    second = claude.messages.create(
        model=SMALL,
        max_tokens=200,
        messages=[
            *ASK,
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": [result]},
        ],
        tools=ANTHROPIC_TOOLS,
    )
    assert second.stop_reason == "end_turn"
    assert [block.type for block in second.content] == ["text"]


def test_messages_errors_map_to_the_sdk_exceptions(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="claude-opus-9", max_tokens=10, messages=ASK)
    assert missing.value.body == {
        "type": "error",
        "error": {"type": "NotFoundError", "message": missing.value.body["error"]["message"]},
    }
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=SMALL, max_tokens=0, messages=ASK)


def test_count_tokens_matches_the_answers_input_tokens(claude: anthropic.Anthropic) -> None:
    ask: Any = {"model": SMALL, "messages": ASK, "tools": ANTHROPIC_TOOLS, "system": "Be brief."}
    counted = claude.messages.count_tokens(**ask)
    answered = claude.messages.create(max_tokens=5, **ask)
    assert counted.input_tokens == answered.usage.input_tokens > 0


# -- /v1/responses -------------------------------------------------------------------------


RESPONSE_TOOLS: list[Any] = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]


def _output_summary(response: Response) -> list[tuple[str, str]]:
    summary = []
    for item in response.output:
        if item.type == "reasoning":
            summary.append(("reasoning", "".join(part.text for part in item.content or [])))
        elif item.type == "message":
            summary.append(("message", "".join(part.text for part in item.content)))
        elif item.type == "function_call":
            summary.append((item.name, item.arguments))
    return summary


@pytest.mark.parametrize("tools", [[], RESPONSE_TOOLS])
def test_responses_plain_and_streamed_agree_through_the_sdk(
    sim: Service, chat: openai.OpenAI, tools: list[Any]
) -> None:
    ask: Any = {"model": SMALL, "input": ASK[0]["content"], "reasoning": {"effort": "low"}}
    if tools:
        ask["tools"] = tools
    plain = chat.responses.create(**ask)
    Response.model_validate(_raw(sim, "/v1/responses", ask).json())  # the SDK type, strictly
    summary = _output_summary(plain)
    assert [kind for kind, _ in summary] == ["reasoning", "get_weather" if tools else "message"]
    assert plain.usage is not None and plain.status == "completed"
    assert plain.usage.output_tokens_details.reasoning_tokens == len(summary[0][1].split())
    with chat.responses.stream(**ask) as stream:
        final = stream.get_final_response()
    assert _output_summary(final) == summary
    assert final.usage is not None
    assert final.usage.output_tokens == plain.usage.output_tokens
    events = _sse(_raw(sim, "/v1/responses", {**ask, "stream": True}).text)
    parsed = [_RESPONSE_EVENTS.validate_json(data) for _, data in events]
    assert [name for name, _ in events] == [event.type for event in parsed]
    assert [event.sequence_number for event in parsed] == list(range(len(parsed)))
    kinds = [event.type for event in parsed]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    delta = "response.function_call_arguments.delta" if tools else "response.output_text.delta"
    assert kinds.count(delta) >= 3
    assert (
        kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 2
    )


def test_responses_tool_round_trip_ends_in_text(chat: openai.OpenAI) -> None:
    first = chat.responses.create(model=SMALL, input=ASK[0]["content"], tools=RESPONSE_TOOLS)
    [call] = [item for item in first.output if item.type == "function_call"]
    history: Any = [
        {"role": "user", "content": ASK[0]["content"]},
        {
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments,
        },
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]
    second = chat.responses.create(model=SMALL, input=history, tools=RESPONSE_TOOLS)
    assert [item.type for item in second.output] == ["message"]
    assert second.output_text


def test_responses_without_a_store_refuse_a_previous_response(chat: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as gone:
        chat.responses.create(model=SMALL, input="hi", previous_response_id="resp_gone")
    assert gone.value.param == "previous_response_id"
    assert "resp_gone" in gone.value.message


# -- shared engine ---------------------------------------------------------------------------


def test_agent_endpoints_are_counted_like_chat(log_dir: Path, services: Services) -> None:
    sim = services(start_sim(log_dir, "small", "--ttft-ms", "1", "--itl-ms", "0.1"))
    root = sim.url.removesuffix("/v1")
    question = " ".join(["Which of these forty words matters most to the weather?"] * 4)
    messages = {
        "model": SMALL,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": question}],
    }
    responses = {"model": SMALL, "input": question, "max_output_tokens": 8}
    assert _raw(sim, "/v1/messages", messages).status_code == 200
    answer = _raw(sim, "/v1/responses", responses).json()
    stats = httpx.get(root + "/admin/stats").json()
    assert stats["requests_completed"] == 2
    metrics = httpx.get(root + "/metrics").text
    assert f'vllm:e2e_request_latency_seconds_count{{model_name="{SMALL}"}} 2.0' in metrics
    # Both render the same conversation, so the second found the first's prompt blocks cached.
    cached = answer["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached >= 16
    assert stats["kv_cache"]["prefix_cache_hits"] == cached


@pytest.mark.parametrize(
    ("quirks", "messages", "responses"),
    [
        ("vllm", 200, 200),
        ("sglang", 404, 200),
        ("llama_cpp", 200, 404),
        ("llama_cpp_python", 404, 404),
        ("ollama", 200, 200),
        ("openai", 404, 200),
    ],
)
def test_only_servers_that_serve_agent_apis_answer_them(
    quirks: str, messages: int, responses: int
) -> None:
    from gateway.sim.quirks import QUIRKS

    async def statuses() -> tuple[int, int]:
        running = await start_sim_server(PROFILES["instant"], quirks=QUIRKS[quirks])
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                root = running.url.removesuffix("/v1")
                model = PROFILES["instant"].model
                a = await http.post(
                    root + "/v1/messages",
                    json={"model": model, "max_tokens": 4, "messages": ASK},
                )
                b = await http.post(root + "/v1/responses", json={"model": model, "input": "hi"})
                return a.status_code, b.status_code
        finally:
            await running.stop()

    assert asyncio.run(statuses()) == (messages, responses)


@pytest.mark.parametrize(
    ("quirks", "field"),
    [("vllm", "reasoning"), ("sglang", "reasoning_content"), ("llama_cpp", "reasoning_content")],
)
def test_each_server_kind_names_reasoning_its_own_way(quirks: str, field: str) -> None:
    from gateway.sim.quirks import QUIRKS

    async def message() -> dict[str, Any]:
        running = await start_sim_server(PROFILES["instant"], quirks=QUIRKS[quirks])
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                body = {"messages": ASK, "reasoning_effort": "low"}
                answer = await http.post(running.url + "/chat/completions", json=body)
                reply: dict[str, Any] = answer.json()["choices"][0]["message"]
                return reply
        finally:
            await running.stop()

    reply = asyncio.run(message())
    assert set(reply) == {"role", "content", field}
    assert len(reply[field].split()) == 8  # low effort

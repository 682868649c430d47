"""The Messages dialect both ways: requests to chat bodies, chat answers (JSON and SSE) to
Messages answers, errors to Anthropic's shape. The `anthropic` SDK's own types and stream
accumulator are the judges of the answers."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from pydantic import TypeAdapter

from gateway.dialects import Dialect, DialectContext
from gateway.dialects.messages import MessagesDialect, count_tokens_estimate
from gateway.errors import (
    AuthenticationFailed,
    BodyTooLarge,
    ClientClosedRequest,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    TriageError,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)

DIALECT: Dialect = MessagesDialect()
CONTEXT = DialectContext(request_id="req1", scope="tenant-a")
EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)


def request(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "hi"}],
    }
    body.update(fields)
    return body


TOOL = {
    "name": "get_weather",
    "description": "Weather by city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    "cache_control": {"type": "ephemeral"},
}


# --- requests ---------------------------------------------------------------------------


def test_a_full_request_becomes_the_chat_body() -> None:
    body = request(
        system=[
            {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Answer in French."},
        ],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Use the tool.", "signature": ""},
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Also this picture:"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [
                            {"type": "text", "text": "18C"},
                            {"type": "text", "text": "sun"},
                        ],
                    },
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
                ],
            },
        ],
        tools=[TOOL],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        stop_sequences=["END"],
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        stream=True,
        metadata={"user_id": "user-7"},
        cache_control={"type": "ephemeral"},
        service_tier="auto",
    )
    assert DIALECT.parse(body) == {
        "model": "claude-sonnet-4-5",
        "messages": [
            {"role": "system", "content": "You are terse.\n\nAnswer in French."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "reasoning": "Use the tool.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C\nsun"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Also this picture:"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                    {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}},
                ],
            },
        ],
        "max_tokens": 256,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "stop": ["END"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "user-7",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": TOOL["input_schema"],
                    "description": "Weather by city.",
                },
            }
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
    }


def test_an_error_result_says_so_and_its_images_follow_as_the_users() -> None:
    body = request(
        messages=[
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "is_error": True,
                        "content": [
                            {"type": "text", "text": "timeout"},
                            {
                                "type": "image",
                                "source": {"type": "url", "url": "https://x.test/s.png"},
                            },
                        ],
                    },
                ],
            },
        ]
    )
    messages = DIALECT.parse(body)["messages"]
    assert messages[2:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "Error: timeout"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://x.test/s.png"}}],
        },
    ]
    assert messages[1]["content"] is None


def test_consecutive_turns_of_one_role_are_one_turn_as_anthropic_joins_them() -> None:
    body = request(
        messages=[
            {"role": "user", "content": "a"},
            {"role": "user", "content": [{"type": "text", "text": "b"}]},
        ]
    )
    assert DIALECT.parse(body)["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]


def test_a_final_assistant_turn_is_continued() -> None:
    body = request(
        messages=[
            {"role": "user", "content": "Pick A or B"},
            {"role": "assistant", "content": "The answer is ("},
        ]
    )
    chat = DIALECT.parse(body)
    assert chat["messages"][-1] == {"role": "assistant", "content": "The answer is ("}
    assert chat["continue_final_message"] is True
    assert chat["add_generation_prompt"] is False
    assert "continue_final_message" not in DIALECT.parse(request())


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        (
            {"type": "tool", "name": "get_weather"},
            {"type": "function", "function": {"name": "get_weather"}},
        ),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: object) -> None:
    chat = DIALECT.parse(request(tools=[TOOL], tool_choice=choice))
    assert chat["tool_choice"] == expected
    assert "parallel_tool_calls" not in chat


def test_tool_input_examples_join_the_description() -> None:
    examples = [{"city": "Paris"}, {"city": "Lima"}]
    chat = DIALECT.parse(request(tools=[{**TOOL, "input_examples": examples}]))
    description = chat["tools"][0]["function"]["description"]
    assert description.startswith(TOOL["description"])
    assert description.endswith('Example inputs:\n{"city":"Paris"}\n{"city":"Lima"}')


@pytest.mark.parametrize(
    ("thinking", "expected"),
    [
        (
            {"type": "enabled", "budget_tokens": 1024},
            {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "low"},
        ),
        (
            {"type": "enabled", "budget_tokens": 10000},
            {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "medium"},
        ),
        (
            {"type": "enabled", "budget_tokens": 20000},
            {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "high"},
        ),
        ({"type": "adaptive"}, {"chat_template_kwargs": {"enable_thinking": True}}),
        ({"type": "disabled"}, {"chat_template_kwargs": {"enable_thinking": False}}),
    ],
)
def test_thinking(thinking: dict[str, Any], expected: dict[str, Any]) -> None:
    chat = DIALECT.parse(request(max_tokens=32000, thinking=thinking))
    assert {
        k: chat[k] for k in ("chat_template_kwargs", "reasoning_effort") if k in chat
    } == expected


def test_output_config_becomes_effort_and_structured_output() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    chat = DIALECT.parse(
        request(
            output_config={"effort": "max", "format": {"type": "json_schema", "schema": schema}}
        )
    )
    assert chat["reasoning_effort"] == "high"
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }


def _set(path: str, value: object) -> dict[str, Any]:
    body = request(tools=[copy.deepcopy(TOOL)])
    target: Any = body
    *parents, last = path.split(".")
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if isinstance(target, list):
        target[int(last)] = value
    elif value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return body


_DELETE = object()
_TOOL_USE = {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}
_USER_HI = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("path", "value", "param"),
    [
        ("max_tokens", _DELETE, "max_tokens"),
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", "256", "max_tokens"),
        ("model", _DELETE, "model"),
        ("messages", [], "messages"),
        ("temperature", 1.5, "temperature"),
        ("stream", "yes", "stream"),
        ("frobnicate", True, "frobnicate"),
        ("container", "c_1", "container"),
        ("mcp_servers", [{"type": "url", "url": "https://m.test"}], "mcp_servers"),
        ("service_tier", "priority", "service_tier"),
        ("speed", "fast", "speed"),
        ("metadata", {"user_id": "u", "team": "x"}, "metadata.team"),
        ("messages.0.role", "system", "messages.0.role"),
        ("messages.0.name", "bob", "messages.0.name"),
        ("messages.0.content", 7, "messages.0.content"),
        ("messages.0.content", [{"type": "document", "source": {}}], "messages.0.content.0.type"),
        (
            "messages.0.content",
            [{"type": "text", "text": "x", "extra": 1}],
            "messages.0.content.0.extra",
        ),
        (
            "messages.0.content",
            [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
            "messages.0.content.0.source.type",
        ),
        (
            "messages.0.content",
            [
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/bmp", "data": "x"},
                }
            ],
            "messages.0.content.0.source.media_type",
        ),
        ("messages.0.content", [_TOOL_USE], "messages.0.content.0.type"),
        (
            "messages.0.content",
            [{"type": "tool_result", "tool_use_id": "nope"}],
            "messages.0.content.0.tool_use_id",
        ),
        (
            "messages",
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": [_TOOL_USE]},
                {"role": "user", "content": "no result"},
            ],
            "messages.1",
        ),
        ("system", [{"type": "text", "text": 3}], "system.0.text"),
        ("tools.0.type", "web_search_20250305", "tools.0.type"),
        ("tools.0.name", "bad name!", "tools.0.name"),
        ("tools.0.input_examples", "not a list", "tools.0.input_examples"),
        ("tool_choice", {"type": "tool", "name": "missing"}, "tool_choice.name"),
        ("tool_choice", {"type": "sometimes"}, "tool_choice.type"),
        ("thinking", {"type": "enabled"}, "thinking.budget_tokens"),
        ("thinking", {"type": "enabled", "budget_tokens": 512}, "thinking.budget_tokens"),
        ("thinking", {"type": "enabled", "budget_tokens": 2048}, "thinking.budget_tokens"),
        ("output_config", {"format": {"type": "json_schema"}}, "output_config.format.schema"),
    ],
)
def test_invalid_requests_name_the_field(path: str, value: object, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        DIALECT.parse(_set(path, value))
    assert caught.value.param == param
    assert caught.value.status_code == 400


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": []}],
        [{"role": "user", "content": []}, {"role": "user", "content": []}],
        [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": []}, _USER_HI],
    ],
)
def test_only_a_final_assistant_turn_may_be_empty(messages: list[dict[str, Any]]) -> None:
    # Found by tests/integration/test_fuzz_dialects.py: turns that translate to no chat
    # message at all were an IndexError, a 500 (Anthropic refuses them with this 400).
    dialect = MessagesDialect()
    empty = next(i for i, m in enumerate(messages) if not m["content"])
    for parse in (dialect.parse, dialect.parse_count_tokens):
        with pytest.raises(InvalidRequest) as caught:
            parse(request(messages=messages))
        assert caught.value.param == f"messages.{empty}.content"
    prefill = [{"role": "user", "content": "a"}, {"role": "assistant", "content": []}]
    assert dialect.parse(request(messages=prefill))["messages"][-1]["role"] == "assistant"


def test_count_tokens_requests_need_no_max_tokens() -> None:
    dialect = MessagesDialect()
    body = request(tools=[TOOL])
    del body["max_tokens"]
    chat = dialect.parse_count_tokens(body)
    assert "max_tokens" not in chat
    with pytest.raises(InvalidRequest):
        dialect.parse(body)


def test_the_estimate_counts_tools_and_tool_calls_too() -> None:
    plain = {"messages": [{"role": "user", "content": "x" * 400}]}
    assert count_tokens_estimate(plain) == 101  # chars / 4 + 1, as ParsedRequest counts
    call = {"id": "t", "type": "function", "function": {"name": "f" * 4, "arguments": "a" * 40}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    fuller = {
        "messages": [
            *plain["messages"],
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ],
        "tools": tools,
    }
    assert count_tokens_estimate(fuller) == (400 + 44 + len(orjson.dumps(tools))) // 4 + 1


# --- answers ----------------------------------------------------------------------------


def chat_completion(**message: Any) -> dict[str, Any]:
    finish = message.pop("finish_reason", "stop")
    stop_reason = message.pop("stop_reason", None)
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "qwen3-8b",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", **message},
                "finish_reason": finish,
                "stop_reason": stop_reason,
            }
        ],
        "usage": {
            "prompt_tokens": 50,
            "completion_tokens": 20,
            "total_tokens": 70,
            "prompt_tokens_details": {"cached_tokens": 32},
        },
    }


def translate(chat: dict[str, Any], **body: Any) -> dict[str, Any]:
    translation = DIALECT.translation(request(**body), CONTEXT)
    answer: dict[str, Any] = orjson.loads(translation.json(orjson.dumps(chat)))
    Message.model_validate(answer)  # the SDK reads it
    return answer


TOOL_CHAT = chat_completion(
    content="Checking the weather.",
    reasoning_content="The user wants weather.",
    tool_calls=[
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ],
    finish_reason="tool_calls",
)


def test_a_chat_answer_becomes_a_message() -> None:
    assert translate(TOOL_CHAT) == {
        "id": "msg_req1",
        "type": "message",
        "role": "assistant",
        "model": "qwen3-8b",
        "content": [
            {"type": "thinking", "thinking": "The user wants weather.", "signature": ""},
            {"type": "text", "text": "Checking the weather."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 18,
            "output_tokens": 20,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 32,
        },
    }


@pytest.mark.parametrize(
    ("message", "stop_reason", "stop_sequence"),
    [
        ({"content": "done"}, "end_turn", None),
        ({"content": "cut", "finish_reason": "length"}, "max_tokens", None),
        ({"content": "a", "stop_reason": "END"}, "stop_sequence", "END"),
        ({"content": "a", "stop_reason": 151645}, "end_turn", None),  # the EOS token's id
        ({"content": "a", "stop_reason": "</s>"}, "end_turn", None),  # not the client's
        (
            {
                "content": None,
                "finish_reason": "stop",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            "tool_use",
            None,
        ),  # vLLM's named tool_choice ends with "stop"
        ({"content": "no", "finish_reason": "content_filter"}, "refusal", None),
    ],
)
def test_stop_reasons(message: dict[str, Any], stop_reason: str, stop_sequence: str | None) -> None:
    answer = translate(chat_completion(**message), stop_sequences=["END"])
    assert (answer["stop_reason"], answer["stop_sequence"]) == (stop_reason, stop_sequence)


def test_arguments_that_are_not_an_object_become_empty_input() -> None:
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}},
        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "[1]"}},
        {"id": "c3", "type": "function", "function": {"name": "h", "arguments": ""}},
    ]
    answer = translate(chat_completion(content=None, tool_calls=calls, finish_reason="tool_calls"))
    assert [block["input"] for block in answer["content"]] == [{}, {}, {}]


def test_an_answer_that_is_not_a_chat_completion_is_an_upstream_error() -> None:
    translation = DIALECT.translation(request(), CONTEXT)
    with pytest.raises(UpstreamError):
        translation.json(b'{"object": "list"}')


# --- streams ----------------------------------------------------------------------------


def sse(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, **extra}
    return sse(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "model": "qwen3-8b",
            "choices": [choice],
        }
    )


USAGE_CHUNK = sse(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "qwen3-8b",
        "choices": [],
        "usage": TOOL_CHAT["usage"],
    }
)
TOOL_STREAM = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "The user "}),
    chunk({"reasoning_content": "wants weather."}),
    chunk({"content": "Checking "}),
    chunk({"content": "the weather."}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    chunk({}, "tool_calls"),
    USAGE_CHUNK,
    b"data: [DONE]\n\n",
]


def parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        event_line, data_line = block.split(b"\n")
        assert event_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        payload = orjson.loads(data_line[6:])
        assert payload["type"] == event_line[7:].decode()  # Anthropic names each event twice
        events.append((event_line[7:].decode(), payload))
    return events


def run_stream(batches: list[bytes], **body: Any) -> bytes:
    translation = DIALECT.translation(request(stream=True, **body), CONTEXT)
    return b"".join(translation.events(batch) for batch in batches)


def test_a_tool_call_stream_is_the_exact_messages_event_sequence() -> None:
    # Several events per batch, as the gateway relays them.
    batches = [b"".join(TOOL_STREAM[:3]), b"".join(TOOL_STREAM[3:7]), b"".join(TOOL_STREAM[7:])]
    events = parse_sse(run_stream(batches))
    start = {
        "id": "msg_req1",
        "type": "message",
        "role": "assistant",
        "model": "qwen3-8b",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }

    def delta(index: int, **fields: str) -> tuple[str, dict[str, Any]]:
        return (
            "content_block_delta",
            {"type": "content_block_delta", "index": index, "delta": fields},
        )

    def stop(index: int) -> tuple[str, dict[str, Any]]:
        return ("content_block_stop", {"type": "content_block_stop", "index": index})

    def begin(index: int, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return (
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": block},
        )

    assert events == [
        ("message_start", {"type": "message_start", "message": start}),
        ("ping", {"type": "ping"}),
        begin(0, {"type": "thinking", "thinking": "", "signature": ""}),
        delta(0, type="thinking_delta", thinking="The user "),
        delta(0, type="thinking_delta", thinking="wants weather."),
        stop(0),
        begin(1, {"type": "text", "text": ""}),
        delta(1, type="text_delta", text="Checking "),
        delta(1, type="text_delta", text="the weather."),
        stop(1),
        begin(2, {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}),
        delta(2, type="input_json_delta", partial_json='{"city": '),
        delta(2, type="input_json_delta", partial_json='"Paris"}'),
        stop(2),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {
                    "input_tokens": 18,
                    "output_tokens": 20,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 32,
                },
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    for _, payload in events:
        if payload["type"] != "ping":
            EVENTS.validate_python(payload)


def accumulate(raw: bytes) -> dict[str, Any]:
    snapshot = None
    buffers: dict[int, bytes] = {}  # the SDK's tool-argument buffers, one per stream
    for kind, payload in parse_sse(raw):
        if kind != "ping":
            snapshot = accumulate_event(
                event=EVENTS.validate_python(payload), current_snapshot=snapshot, json_bufs=buffers
            )
    assert snapshot is not None
    return Message.model_validate(snapshot.to_dict()).model_dump()


def test_the_sdk_accumulates_the_stream_into_the_json_answer() -> None:
    streamed = accumulate(run_stream([b"".join(TOOL_STREAM)]))
    assert streamed == Message.model_validate(translate(TOOL_CHAT)).model_dump()


def test_a_stop_sequence_stream_and_its_json_answer_agree() -> None:
    stream = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "one two"}),
        chunk({}, "stop", stop_reason="END"),
        USAGE_CHUNK,
        b"data: [DONE]\n\n",
    ]
    streamed = accumulate(run_stream(stream, stop_sequences=["END"]))
    whole = translate(chat_completion(content="one two", stop_reason="END"), stop_sequences=["END"])
    assert streamed == Message.model_validate(whole).model_dump()
    assert streamed["stop_reason"] == "stop_sequence"
    assert streamed["stop_sequence"] == "END"


def test_a_stream_without_a_usage_chunk_still_ends_properly() -> None:
    events = parse_sse(
        run_stream([chunk({"content": "hi"}), chunk({}, "length"), b"data: [DONE]\n\n"])
    )
    assert [kind for kind, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"]["output_tokens"] == 0


def test_a_chat_error_event_becomes_an_error_event_and_ends_the_stream() -> None:
    translation = DIALECT.translation(request(stream=True), CONTEXT)
    first = translation.events(chunk({"content": "par"}))
    error = {"error": {"message": "engine died", "type": "api_error", "code": None}}
    last = translation.events(sse(error) + b"data: [DONE]\n\n")
    assert [kind for kind, _ in parse_sse(first)][-1] == "content_block_delta"
    assert parse_sse(last) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "engine died"}})
    ]
    assert translation.events(chunk({"content": "more"})) == b""
    assert translation.error_event(UpstreamError("late")) == b""


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (
            {"message": "shed", "type": "rate_limit_error", "code": "over_capacity"},
            "overloaded_error",
        ),
        ({"message": "busy", "type": "rate_limit_error", "code": None}, "rate_limit_error"),
        ({"message": "bad", "type": "BadRequestError", "code": 400}, "invalid_request_error"),
    ],
)
def test_chat_error_events_map_like_error_statuses(error: dict[str, Any], kind: str) -> None:
    translation = DIALECT.translation(request(stream=True), CONTEXT)
    events = parse_sse(translation.events(sse({"error": error})))
    assert events == [
        ("error", {"type": "error", "error": {"type": kind, "message": error["message"]}})
    ]


def test_a_stream_that_fails_after_it_started_ends_with_an_error_event() -> None:
    translation = DIALECT.translation(request(stream=True), CONTEXT)
    translation.events(chunk({"content": "par"}))
    events = parse_sse(translation.error_event(UpstreamTimeout("Backend timed out.")))
    assert events == [
        (
            "error",
            {"type": "error", "error": {"type": "timeout_error", "message": "Backend timed out."}},
        )
    ]
    assert translation.events(b"data: [DONE]\n\n") == b""


def test_a_finished_stream_gets_no_error_event() -> None:
    translation = DIALECT.translation(request(stream=True), CONTEXT)
    translation.events(b"".join(TOOL_STREAM))
    assert translation.error_event(UpstreamError("too late")) == b""


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (InvalidRequest("bad", param="x"), 400, "invalid_request_error"),
        (AuthenticationFailed("who"), 401, "authentication_error"),
        (PermissionDenied("no"), 403, "permission_error"),
        (NotFound("where"), 404, "not_found_error"),
        (BodyTooLarge("big"), 413, "request_too_large"),
        (RateLimited("slow down", retry_after=2.5), 429, "rate_limit_error"),
        (RateLimited("over", code="over_capacity", retry_after=1.0), 529, "overloaded_error"),
        (
            UpstreamUnavailable("late", code="deadline_expired", retry_after=1.0),
            529,
            "overloaded_error",
        ),
        (UpstreamUnavailable("no replica"), 529, "overloaded_error"),
        (ClientClosedRequest("gone"), 499, "invalid_request_error"),
        (TriageError("boom"), 500, "api_error"),
        (UpstreamError("bad gateway"), 502, "api_error"),
        (UpstreamTimeout("slow"), 504, "timeout_error"),
        (UpstreamStatus(422, "unprocessable"), 422, "invalid_request_error"),
        (UpstreamStatus(503, "backend busy"), 529, "overloaded_error"),
    ],
)
def test_errors_take_anthropics_shape_and_status(
    error: TriageError, status: int, kind: str
) -> None:
    answer = DIALECT.error(error)
    assert answer.status == status
    body = orjson.loads(answer.body)
    assert body == {"type": "error", "error": {"type": kind, "message": error.message}}
    if kind != "request_too_large":  # documented by Anthropic, absent from the SDK's union
        ErrorResponse.model_validate(body)
    expected = (
        {} if error.retry_after is None else {"retry-after": str(int(-(-error.retry_after // 1)))}
    )
    assert dict(answer.headers) == expected

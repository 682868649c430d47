"""The Responses dialect: requests to chat bodies, chat answers and streams back, checked
against the openai SDK's own types and its stream helper."""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.dialects import DialectContext
from gateway.dialects.response_store import ResponseStore
from gateway.dialects.responses import ResponsesDialect, ResponseTranslation
from gateway.errors import InvalidRequest, NotFound, RateLimited, TriageError, UpstreamError
from gateway.policy import StoreSettings
from gateway.store import EmbeddedStore

DIALECT = ResponsesDialect()
CONTEXT = DialectContext(request_id="r1", scope="tenant-a")
EVENTS = TypeAdapter(ResponseStreamEvent)
USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 7,
    "total_tokens": 18,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 3},
}


def parse(**body: Any) -> dict[str, Any]:
    return DIALECT.parse({"model": "m", **body})


def invalid(**body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse(**body)
    return caught.value


# --- requests ------------------------------------------------------------------------


def test_string_input_and_instructions_become_system_and_user_messages() -> None:
    chat = parse(input="hi", instructions="be brief")
    assert chat == {
        "model": "m",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    }


def test_message_items_of_every_role_and_part() -> None:
    chat = parse(
        input=[
            {"role": "developer", "content": "rules"},
            {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "s"}]},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "look"},
                    {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"},
                ],
            },
            {"role": "user", "content": [{"type": "input_text", "text": "only text"}]},
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": "a", "annotations": [], "logprobs": []},
                    {"type": "refusal", "refusal": "b"},
                ],
            },
        ]
    )
    assert chat["messages"] == [
        {"role": "system", "content": "rules"},
        {"role": "system", "content": "s"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
            ],
        },
        {"role": "user", "content": "only text"},
        {"role": "assistant", "content": "ab"},
    ]


def test_function_calls_join_the_assistant_turn_and_outputs_become_tool_messages() -> None:
    chat = parse(
        input=[
            {"role": "user", "content": "weather?"},
            {"type": "reasoning", "id": "rs_1", "summary": [], "content": []},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"a":1}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [
                    {"type": "input_text", "text": "x"},
                    {"type": "input_text", "text": "y"},
                ],
            },
            {"role": "assistant", "content": "done"},
            {"type": "function_call", "call_id": "c3", "name": "f", "arguments": "{}"},
        ]
    )
    call = lambda i, n, a: {"id": i, "type": "function", "function": {"name": n, "arguments": a}}  # noqa: E731
    assert chat["messages"] == [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call("c1", "f", "{}"), call("c2", "g", '{"a":1}')],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "xy"},
        {"role": "assistant", "content": "done", "tool_calls": [call("c3", "f", "{}")]},
    ]


def test_generation_settings_map_to_chat_fields() -> None:
    schema = {"type": "object", "properties": {}}
    chat = parse(
        input="x",
        tools=[
            {
                "type": "function",
                "name": "f",
                "description": "d",
                "parameters": schema,
                "strict": True,
            }
        ],
        tool_choice={"type": "function", "name": "f"},
        parallel_tool_calls=False,
        max_output_tokens=50,
        temperature=0.5,
        top_p=0.9,
        text={"format": {"type": "json_schema", "name": "n", "schema": schema, "strict": True}},
        reasoning={"effort": "low", "summary": "auto"},
        stream=True,
        safety_identifier="u1",
        metadata={"k": "v"},
        store=False,
        previous_response_id="resp_x",
        truncation="disabled",
        include=["reasoning.encrypted_content"],
        prompt_cache_key="k",
    )
    del chat["messages"]
    assert chat == {
        "model": "m",
        "tools": [
            {
                "type": "function",
                "function": {"name": "f", "description": "d", "parameters": schema, "strict": True},
            }
        ],
        "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "max_tokens": 50,
        "temperature": 0.5,
        "top_p": 0.9,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "n", "schema": schema, "strict": True},
        },
        "reasoning_effort": "low",
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u1",
    }


def test_simple_formats_and_tool_choices() -> None:
    tools = [{"type": "function", "name": "f"}]
    assert parse(input="x", text={"format": {"type": "json_object"}})["response_format"] == {
        "type": "json_object"
    }
    assert "response_format" not in parse(input="x", text={"format": {"type": "text"}})
    assert parse(input="x", tools=tools, tool_choice="required")["tool_choice"] == "required"
    assert "tool_choice" not in parse(input="x", tool_choice="none")  # no tools: nothing to do
    assert parse(input="x", user="u")["user"] == "u"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": "x", "tools": [{"type": "function"}]}, "tools.0.name"),
        ({"input": "x", "conversation": "c"}, "conversation"),
        ({"input": "x", "truncation": "auto"}, "truncation"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "temperature": "1"}, "temperature"),
        ({"input": "x", "temperature": 3}, "temperature"),
        ({"input": "x", "stream": "yes"}, "stream"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "text": {"verbosity": "high"}}, "text.verbosity"),
        (
            {"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}},
            "text.format.name",
        ),
        ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text.format.type"),
        ({"input": "x", "include": ["message.output_text.logprobs"]}, "include.0"),
        ({"input": "x", "top_logprobs": 2}, "top_logprobs"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": "x", "tool_choice": {"type": "file_search"}}, "tool_choice.type"),
        (
            {
                "input": "x",
                "tools": [{"type": "function", "name": "f"}],
                "tool_choice": {"type": "function", "name": "g"},
            },
            "tool_choice.name",
        ),
        ({"input": 5}, "input"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type"),
        ({"input": ["text"]}, "input.0"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
        ({"input": [{"role": "user", "content": "x", "name": "n"}]}, "input.0.name"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input.0.content.0.type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input.0.content.0.file_id",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input.0.content.0.image_url",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]},
            "input.0.content.0.type",
        ),
        (
            {"input": [{"role": "system", "content": [{"type": "input_image", "image_url": "u"}]}]},
            "input.0.content.0.type",
        ),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input.0.arguments"),
        (
            {
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "input_image", "image_url": "u"}],
                    }
                ]
            },
            "input.0.output.0.type",
        ),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(
    body: dict[str, Any], param: str
) -> None:
    assert invalid(**body).param == param


def test_a_missing_model_or_input_is_named() -> None:
    with pytest.raises(InvalidRequest) as caught:
        DIALECT.parse({"input": "x"})
    assert caught.value.param == "model"
    assert invalid().param == "input"
    assert invalid(input="x", conversation="c").message == "Unsupported parameter: 'conversation'."


@pytest.mark.parametrize(
    "items",
    [[], [{"type": "reasoning", "summary": []}], [{"type": "reasoning", "summary": []}] * 2],
)
def test_input_with_nothing_to_answer_is_named(items: list[dict[str, Any]]) -> None:
    # Found by tests/integration/test_fuzz_dialects.py: an empty chat conversation went to
    # the backend, whose own 400 came back in its words ("messages must be a non-empty list").
    assert invalid(input=items).param == "input"
    assert parse(input=items, instructions="Be brief.")["messages"][0]["role"] == "system"


# --- JSON answers --------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str = "stop") -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "backend-model",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": USAGE,
        }
    )


def answer(message: dict[str, Any], finish: str = "stop", **body: Any) -> dict[str, Any]:
    translation = DIALECT.translation({"model": "m", "input": "x", **body}, CONTEXT)
    result: dict[str, Any] = orjson.loads(translation.json(completion(message, finish)))
    Response.model_validate(result)
    return result


def test_json_text_answer_is_an_sdk_response() -> None:
    result = answer(
        {"role": "assistant", "content": "Hello"}, instructions="be kind", temperature=0.2
    )
    assert result["id"] == "resp_r1"
    assert result["object"] == "response"
    assert result["status"] == "completed"
    assert result["model"] == "backend-model"
    assert result["instructions"] == "be kind"
    assert result["temperature"] == 0.2
    assert result["output"] == [
        {
            "id": "msg_r1_0",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [
                {"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}
            ],
        }
    ]
    assert result["usage"] == {
        "input_tokens": 11,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 7,
        "output_tokens_details": {"reasoning_tokens": 3},
        "total_tokens": 18,
    }
    assert Response.model_validate(result).output_text == "Hello"


def test_json_reasoning_and_tool_calls_become_items_in_order() -> None:
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    result = answer(
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "think",
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"x":1}'},
                },
                {"id": "call_b", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            ],
        },
        finish="tool_calls",
        tools=tools,
    )
    assert result["tools"] == tools
    assert result["output"] == [
        {
            "id": "rs_r1_0",
            "type": "reasoning",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "think"}],
            "status": "completed",
        },
        {
            "id": "fc_r1_1",
            "type": "function_call",
            "call_id": "call_a",
            "name": "f",
            "arguments": '{"x":1}',
            "status": "completed",
        },
        {
            "id": "fc_r1_2",
            "type": "function_call",
            "call_id": "call_b",
            "name": "f",
            "arguments": "{}",
            "status": "completed",
        },
    ]


def test_json_answer_cut_by_the_token_limit_is_incomplete() -> None:
    result = answer({"role": "assistant", "content": "Hel", "reasoning": "r"}, finish="length")
    assert result["status"] == "incomplete"
    assert result["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [item["status"] for item in result["output"]] == ["completed", "incomplete"]
    assert "completed_at" not in result


# --- streams -------------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "backend-model",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
    }


def sse(*chunks: dict[str, Any], done: bool = True) -> bytes:
    out = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
    return out + (b"data: [DONE]\n\n" if done else b"")


USAGE_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "model": "backend-model",
    "choices": [],
    "usage": USAGE,
}


def events(raw: bytes, start: int = 0) -> list[dict[str, Any]]:
    """The SSE events, each checked: `event:` names its type, the SDK parses it, and the
    sequence numbers count on from `start`."""
    parsed = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        event_line, data_line = block.split("\n")
        data = orjson.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {data['type']}"
        EVENTS.validate_python(data)
        parsed.append(data)
    assert [e["sequence_number"] for e in parsed] == list(range(start, start + len(parsed)))
    return parsed


def stream(raw: bytes, **body: Any) -> tuple[ResponseTranslation, list[dict[str, Any]]]:
    translation = DIALECT.translation({"model": "m", "input": "x", "stream": True, **body}, CONTEXT)
    return translation, events(translation.events(raw))


TEXT_STREAM = sse(
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hel"}),
    chunk({"content": "lo"}),
    chunk(finish="stop"),
    USAGE_CHUNK,
)


def test_golden_text_stream() -> None:
    _, seen = stream(TEXT_STREAM)
    assert [e["type"] for e in seen] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert seen[0]["response"]["status"] == "in_progress" and seen[0]["response"]["output"] == []
    assert seen[2]["item"]["content"] == []
    assert [e["delta"] for e in seen[4:6]] == ["Hel", "lo"]
    assert seen[6]["text"] == "Hello"
    final = Response.model_validate(seen[-1]["response"])
    assert final.output_text == "Hello"
    assert final.usage is not None and final.usage.input_tokens_details.cached_tokens == 4


def test_golden_tool_call_stream_with_argument_pieces() -> None:
    raw = sse(
        chunk({"role": "assistant", "content": "Let me check."}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "f", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"x"}'}}]}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "g", "arguments": "{}"},
                    }
                ]
            }
        ),
        chunk(finish="tool_calls"),
        USAGE_CHUNK,
    )
    _, seen = stream(raw)
    assert [(e["type"], e.get("output_index")) for e in seen] == [
        ("response.created", None),
        ("response.in_progress", None),
        ("response.output_item.added", 0),
        ("response.content_part.added", 0),
        ("response.output_text.delta", 0),
        ("response.output_text.done", 0),
        ("response.content_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.done", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2),
        ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.done", 2),
        ("response.output_item.done", 2),
        ("response.completed", None),
    ]
    assert seen[8]["item"] == {
        "id": "fc_r1_1",
        "type": "function_call",
        "call_id": "call_a",
        "name": "f",
        "arguments": "",
        "status": "in_progress",
    }
    assert [e["delta"] for e in seen[9:11]] == ['{"ci', 'ty":"x"}']
    assert seen[11]["arguments"] == '{"city":"x"}'
    assert seen[12]["item"]["arguments"] == '{"city":"x"}'
    assert seen[12]["item"]["status"] == "completed"


def test_golden_reasoning_stream() -> None:
    raw = sse(
        chunk({"role": "assistant", "reasoning_content": "Think"}),
        chunk({"reasoning_content": "ing."}),
        chunk({"content": "Hi"}),
        chunk(finish="stop"),
        USAGE_CHUNK,
    )
    _, seen = stream(raw, reasoning={"effort": "high"})
    assert [e["type"] for e in seen] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert seen[3]["part"] == {"type": "reasoning_text", "text": ""}
    assert seen[6]["text"] == "Thinking."
    assert seen[-1]["response"]["reasoning"] == {"effort": "high", "summary": None}


@pytest.mark.parametrize(
    ("chunks", "message", "finish"),
    [
        (
            [chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk(finish="stop")],
            {"role": "assistant", "content": "Hello"},
            "stop",
        ),
        (
            [
                chunk({"reasoning": "r1"}),
                chunk({"content": "ok"}),
                chunk(
                    {
                        "tool_calls": [
                            {"index": 0, "id": "c", "function": {"name": "f", "arguments": "{}"}}
                        ]
                    }
                ),
                chunk(finish="tool_calls"),
            ],
            {
                "role": "assistant",
                "content": "ok",
                "reasoning": "r1",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            "tool_calls",
        ),
        (
            [chunk({"reasoning_content": "r"}), chunk(finish="length")],
            {"role": "assistant", "content": "", "reasoning_content": "r"},
            "length",
        ),
        (
            [chunk({"content": "a"}), chunk(finish="length")],
            {"role": "assistant", "content": "a"},
            "length",
        ),
        ([chunk(finish="stop")], {"role": "assistant", "content": None}, "stop"),
    ],
)
def test_streamed_final_response_equals_the_json_answer(
    chunks: list[dict[str, Any]], message: dict[str, Any], finish: str
) -> None:
    _, seen = stream(sse(*chunks, USAGE_CHUNK))
    final = seen[-1]["response"]
    plain = answer(message, finish)
    assert final["output"] == plain["output"]
    assert final["usage"] == plain["usage"]
    assert final["status"] == plain["status"]
    assert final["incomplete_details"] == plain["incomplete_details"]
    expected = "response.completed" if finish != "length" else "response.incomplete"
    assert seen[-1]["type"] == expected
    # Each item's `done` event says what the final response says of it.
    done = [e["item"] for e in seen if e["type"] == "response.output_item.done"]
    assert done == final["output"]


def test_stream_translates_the_same_whatever_the_batch_boundaries() -> None:
    whole = stream(TEXT_STREAM)[1]
    translation = DIALECT.translation({"model": "m", "input": "x"}, CONTEXT)
    out = b"".join(
        translation.events(TEXT_STREAM[i : i + 7]) for i in range(0, len(TEXT_STREAM), 7)
    )
    pieces = events(out)
    for event in (*whole, *pieces):
        event.get("response", {}).pop("created_at", None)
        event.get("response", {}).pop("completed_at", None)
    assert pieces == whole


def test_usage_chunk_ends_the_stream_before_done() -> None:
    translation = DIALECT.translation({"model": "m", "input": "x"}, CONTEXT)
    head = translation.events(sse(chunk({"content": "a"}), chunk(finish="stop"), done=False))
    assert b"response.completed" not in head
    tail = translation.events(sse(USAGE_CHUNK, done=False))
    assert b"event: response.completed" in tail
    assert translation.events(b"data: [DONE]\n\n") == b""


def test_the_sdk_stream_helper_accumulates_the_plain_answer() -> None:
    """The openai SDK, unmodified, reading the translated stream over an HTTP transport."""
    raw_tool = sse(
        chunk({"content": "Checking."}),
        chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "call_a", "function": {"name": "f", "arguments": '{"a"'}}
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}),
        chunk(finish="tool_calls"),
        USAGE_CHUNK,
    )
    for raw in (TEXT_STREAM, raw_tool):
        translation = DIALECT.translation({"model": "m", "input": "x", "stream": True}, CONTEXT)
        body = translation.events(raw)
        transport = httpx2.MockTransport(
            lambda request, body=body: httpx2.Response(
                200, content=body, headers={"content-type": "text/event-stream"}
            )
        )
        client = openai.OpenAI(
            api_key="k",
            base_url="http://gateway/v1",
            http_client=httpx2.Client(transport=transport),
        )
        with client.responses.stream(model="m", input="x") as events_seen:
            final = events_seen.get_final_response()
        assert translation.stored() is not None
        expected = translation.stored()["response"]  # type: ignore[index]
        assert final.model_dump(mode="json", exclude_none=True)["output"] == [
            {k: v for k, v in item.items() if v is not None} for item in expected["output"]
        ]


# --- failures ------------------------------------------------------------------------


def test_error_event_mid_stream_is_error_then_response_failed() -> None:
    translation, seen = stream(sse(chunk({"content": "par"}), done=False))
    tail = translation.error_event(UpstreamError("backend went away"))
    more = events(tail, start=len(seen))
    assert [e["type"] for e in more] == ["error", "response.failed"]
    assert more[0]["code"] == "upstream_error" and more[0]["message"] == "backend went away"
    failed = Response.model_validate(more[1]["response"])
    assert failed.status == "failed"
    assert failed.error is not None and failed.error.code == "server_error"
    assert failed.output_text == "par"
    assert more[1]["response"]["output"][0]["status"] == "incomplete"
    assert translation.stored() is None
    assert translation.events(sse(chunk({"content": "late"}))) == b""  # the stream is over
    assert translation.error_event(UpstreamError("again")) == b""


def test_error_before_anything_still_opens_the_response() -> None:
    translation = DIALECT.translation({"model": "m", "input": "x"}, CONTEXT)
    seen = events(translation.error_event(RateLimited("slow down", retry_after=3)))
    assert [e["type"] for e in seen] == [
        "response.created",
        "response.in_progress",
        "error",
        "response.failed",
    ]
    assert seen[-1]["response"]["error"] == {"code": "rate_limit_exceeded", "message": "slow down"}


def test_chat_error_object_in_the_stream_fails_the_response() -> None:
    error = {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "p", "code": "x"}
    }
    _, seen = stream(sse(chunk({"content": "a"}), error))
    assert [e["type"] for e in seen][-2:] == ["error", "response.failed"]
    assert seen[-2]["param"] == "p"
    assert seen[-1]["response"]["error"]["code"] == "invalid_prompt"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidRequest("no", param="input"), 400),
        (RateLimited("slow", retry_after=1.2), 429),
        (TriageError("x"), 500),
    ],
)
def test_errors_in_openai_shape(error: TriageError, status: int) -> None:
    answer_ = DIALECT.error(error)
    assert answer_.status == status
    body = orjson.loads(answer_.body)
    assert body["error"]["message"] == error.message
    assert body["error"]["param"] == error.param
    assert answer_.headers == ({"retry-after": "2"} if status == 429 else {})


# --- storing and continuing ----------------------------------------------------------


def test_stored_record_holds_the_response_and_the_input_items() -> None:
    translation = DIALECT.translation({"model": "m", "input": "hi"}, CONTEXT)
    assert translation.stored() is None  # nothing answered yet
    translation.json(completion({"role": "assistant", "content": "Hello"}))
    record = translation.stored()
    assert record is not None
    assert record["id"] == "resp_r1"
    assert record["input"] == [{"type": "message", "role": "user", "content": "hi"}]
    assert record["response"]["output"][0]["content"][0]["text"] == "Hello"
    unstored = DIALECT.translation({"model": "m", "input": "hi", "store": False}, CONTEXT)
    unstored.json(completion({"role": "assistant", "content": "Hello"}))
    assert unstored.stored() is None


def embedded_store() -> ResponseStore:
    return ResponseStore(EmbeddedStore(StoreSettings()), ttl_s=60)


async def test_previous_response_id_puts_the_stored_conversation_first() -> None:
    store = embedded_store()
    first = DIALECT.translation({"model": "m", "input": "weather?"}, CONTEXT)
    first.json(
        completion(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            "tool_calls",
        )
    )
    record = first.stored()
    assert record is not None
    await store.save(CONTEXT.scope, record)
    body = {
        "model": "m",
        "previous_response_id": "resp_r1",
        "instructions": "new rules",
        "input": [{"type": "function_call_output", "call_id": "c1", "output": "sunny"}],
    }
    expanded, conversation = await DIALECT.expand(body, CONTEXT, store)
    assert conversation == "resp_r1"  # the record has none: it began the conversation
    assert expanded["input"][0] == {"type": "message", "role": "user", "content": "weather?"}
    assert expanded["input"][1]["type"] == "function_call"
    assert DIALECT.parse(expanded)["messages"] == [
        {"role": "system", "content": "new rules"},
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    second = DIALECT.translation(expanded, DialectContext("r2", CONTEXT.scope))
    second.json(completion({"role": "assistant", "content": "It is sunny."}))
    again = second.stored()
    assert again is not None and again["response"]["previous_response_id"] == "resp_r1"
    assert len(again["input"]) == 3  # the whole conversation: a third turn needs one read
    await store.save(CONTEXT.scope, {**again, "conversation": "resp_r1"})
    third = {"model": "m", "previous_response_id": again["id"], "input": "and tomorrow?"}
    assert (await DIALECT.expand(third, CONTEXT, store))[1] == "resp_r1"
    # A first turn starts a conversation under its own id; one not stored starts none.
    first = {"model": "m", "input": "x"}
    assert await DIALECT.expand(first, CONTEXT, store) == (first, f"resp_{CONTEXT.request_id}")
    unstored = {**first, "store": False}
    assert await DIALECT.expand(unstored, CONTEXT, store) == (unstored, None)


async def test_another_tenants_or_an_unknown_response_is_not_found() -> None:
    store = embedded_store()
    translation = DIALECT.translation({"model": "m", "input": "x"}, CONTEXT)
    translation.json(completion({"role": "assistant", "content": "a"}))
    record = translation.stored()
    assert record is not None
    await store.save("tenant-a", record)
    for scope, response_id in [("tenant-b", "resp_r1"), ("tenant-a", "resp_nope")]:
        with pytest.raises(NotFound) as caught:
            body = {"model": "m", "input": "x", "previous_response_id": response_id}
            await DIALECT.expand(body, DialectContext("r2", scope), store)
        assert caught.value.param == "previous_response_id"
        assert caught.value.status_code == 404


class NoStore:
    async def load(self, scope: str, response_id: str) -> None:
        raise AssertionError("a bad request must not reach the store")


async def test_bad_input_is_refused_before_the_store_is_read() -> None:
    body = {"model": "m", "input": "x", "previous_response_id": "resp_1", "temperature": "hot"}
    with pytest.raises(InvalidRequest) as caught:
        await DIALECT.expand(body, CONTEXT, NoStore())  # type: ignore[arg-type]
    assert caught.value.param == "temperature"

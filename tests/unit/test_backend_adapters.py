"""The backend-side adapters (gateway/backend_api/): chat requests as Messages and
Responses requests, their answers (JSON and every stream event kind) as chat answers, and
the native pass-through's body, books and client side."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from gateway.backend_api import mode
from gateway.backend_api.messages_answer import MessagesStream, chat_from_message
from gateway.backend_api.messages_request import DEFAULT_MAX_TOKENS, messages_request
from gateway.backend_api.native import native_body, read_native, relay_native
from gateway.backend_api.passthrough import NativeMessages, NativeResponses
from gateway.backend_api.responses_answer import ResponsesStream, chat_from_response
from gateway.backend_api.responses_request import responses_request
from gateway.dialects import DialectContext
from gateway.dialects.messages_request import to_chat
from gateway.errors import UpstreamError, UpstreamStatus, UpstreamUnavailable
from gateway.policy import ModelSpec
from gateway.upstream import Outcome, model_rename, status_error

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be terse."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
        ],
    },
    {
        "role": "assistant",
        "content": "Checking.",
        "reasoning": "They want weather.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "4 C"},
    {"role": "user", "content": "And now?"},
]


def _sse(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _chunks(out: bytes) -> list[dict[str, Any]]:
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    return [orjson.loads(e[6:]) for e in events[:-1]]


async def _collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([batch async for batch in stream])


async def _batches(*batches: bytes) -> AsyncIterator[bytes]:
    for batch in batches:
        yield batch


def test_mode_follows_the_pool_and_the_client() -> None:
    assert mode("chat", "messages") == "chat"
    assert mode("messages", "messages") == "native"
    assert mode("messages", "chat") == "translate"
    assert mode("responses", "messages") == "translate"


# --- chat -> Messages request --------------------------------------------------------------


def test_chat_conversation_as_a_messages_request() -> None:
    chat = {
        "model": "auto",
        "messages": CONVERSATION,
        "stop": "END",
        "user": "u-1",
        "temperature": 0.2,
        "top_k": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "reasoning_effort": "high",
        "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": {}}},
    }
    body = orjson.loads(messages_request(chat, "served", 77))
    assert body["model"] == "served" and body["max_tokens"] == 77 and body["stream"] is True
    assert body["system"] == "Be terse."
    assert body["stop_sequences"] == ["END"] and body["metadata"] == {"user_id": "u-1"}
    assert body["temperature"] == 0.2 and body["top_k"] == 5
    user, assistant, results = body["messages"]
    assert [b["type"] for b in user["content"]] == ["text", "image", "image"]
    assert user["content"][1]["source"] == {
        "type": "base64",
        "media_type": "image/png",
        "data": "AAAA",
    }
    assert user["content"][2]["source"] == {"type": "url", "url": "https://x.test/a.png"}
    assert assistant["content"] == [
        {"type": "thinking", "thinking": "They want weather.", "signature": ""},
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}},
    ]
    # The tool result and the next user turn are one user turn, as Messages alternates.
    assert results["role"] == "user"
    assert results["content"] == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "4 C"},
        {"type": "text", "text": "And now?"},
    ]
    assert body["tools"] == [
        {
            "name": "get_weather",
            "input_schema": TOOL["function"]["parameters"],  # type: ignore[index]
            "description": "Weather.",
        }
    ]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["output_config"] == {
        "effort": "high",
        "format": {"type": "json_schema", "schema": {}},
    }


def test_messages_request_needs_max_tokens_and_maps_a_named_tool_choice() -> None:
    chat = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    body = orjson.loads(messages_request(chat, "m", None))
    assert body["max_tokens"] == DEFAULT_MAX_TOKENS
    assert body["tool_choice"] == {"type": "tool", "name": "get_weather"}


@pytest.mark.parametrize(
    ("field", "value"),
    [("logprobs", True), ("seed", 1), ("n", 2), ("presence_penalty", 0.5), ("mystery", 1)],
)
def test_a_chat_field_messages_cannot_carry_is_a_400_naming_it(field: str, value: object) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value}
    with pytest.raises(UpstreamStatus) as caught:
        messages_request(chat, "m", 8)
    assert caught.value.status_code == 400 and caught.value.param == field


def test_a_messages_request_survives_the_round_trip_through_chat() -> None:
    original = {
        "model": "claude",
        "max_tokens": 32,
        "system": "Sys.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {"c": 1}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}],
            },
        ],
    }
    again = orjson.loads(messages_request(to_chat(original), "claude", 32))
    assert again["system"] == "Sys."
    assert [m["role"] for m in again["messages"]] == ["user", "assistant", "user"]
    assert again["messages"][1]["content"][0]["input"] == {"c": 1}
    assert again["messages"][2]["content"][0]["tool_use_id"] == "t1"


# --- Messages answer -> chat ---------------------------------------------------------------


def test_a_whole_messages_answer_as_chat() -> None:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "served",
        "content": [
            {"type": "thinking", "thinking": "Hmm.", "signature": "s"},
            {"type": "redacted_thinking", "data": "x"},
            {"type": "text", "text": "Calling."},
            {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 3},
    }
    chat = orjson.loads(chat_from_message(orjson.dumps(message)))
    choice = chat["choices"][0]
    assert chat["object"] == "chat.completion" and chat["model"] == "served"
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Calling."
    assert choice["message"]["reasoning"] == "Hmm."
    assert choice["message"]["tool_calls"] == [
        {
            "id": "t1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
        }
    ]
    assert chat["usage"] == {
        "prompt_tokens": 8,
        "completion_tokens": 7,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 3},
    }


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_messages_stop_reasons(stop: str, finish: str) -> None:
    message = {"id": "m", "model": "x", "content": [], "stop_reason": stop}
    chat = orjson.loads(chat_from_message(orjson.dumps(message)))
    assert chat["choices"][0]["finish_reason"] == finish


def test_a_messages_error_body_is_an_upstream_error() -> None:
    body = {"type": "error", "error": {"type": "api_error", "message": "boom"}}
    with pytest.raises(UpstreamError, match="boom"):
        chat_from_message(orjson.dumps(body))


def _messages_events() -> list[bytes]:
    start = {"id": "msg_1", "model": "served", "usage": {"input_tokens": 9, "output_tokens": 0}}
    return [
        _sse("message_start", {"type": "message_start", "message": start}),
        _sse("ping", {"type": "ping"}),
        _sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": "", "signature": ""},
            },
        ),
        _sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "Hm."},
            },
        ),
        _sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": "sig"},
            },
        ),
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        _sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "text_delta", "text": "Hi"},
            },
        ),
        _sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
        _sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 2,
                "content_block": {"type": "tool_use", "id": "t1", "name": "w", "input": {}},
            },
        ),
        _sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": '{"c":'},
            },
        ),
        _sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": "1}"},
            },
        ),
        _sse("content_block_stop", {"type": "content_block_stop", "index": 2}),
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 6, "cache_read_input_tokens": 4},
            },
        ),
        _sse("message_stop", {"type": "message_stop"}),
    ]


def test_a_messages_stream_as_chat_chunks_even_split_mid_event() -> None:
    raw = b"".join(_messages_events())
    halves = (raw[:301], raw[301:])  # a batch boundary inside an event
    out = asyncio.run(_collect(MessagesStream().translate(_batches(*halves))))
    chunks = _chunks(out)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert {"reasoning": "Hm."} in deltas and {"content": "Hi"} in deltas
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0] == {
        "index": 0,
        "id": "t1",
        "type": "function",
        "function": {"name": "w", "arguments": ""},
    }
    assert "".join(c["function"]["arguments"] for c in calls) == '{"c":1}'
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 13,
        "completion_tokens": 6,
        "total_tokens": 19,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert all(c["id"] == "msg_1" and c["model"] == "served" for c in chunks)


def test_a_messages_stream_error_event_or_early_end_fails() -> None:
    error = _sse(
        "error", {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    )
    with pytest.raises(UpstreamError, match="busy"):
        asyncio.run(_collect(MessagesStream().translate(_batches(_messages_events()[0], error))))
    with pytest.raises(UpstreamError, match="message_stop"):
        asyncio.run(_collect(MessagesStream().translate(_batches(*_messages_events()[:5]))))


# --- chat -> Responses request -------------------------------------------------------------


def test_chat_conversation_as_a_responses_request() -> None:
    chat = {
        "model": "auto",
        "messages": CONVERSATION,
        "stream": True,
        "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "reasoning_effort": "low",
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "o", "schema": {"type": "object"}, "strict": True},
        },
    }
    body = orjson.loads(responses_request(chat, "served", 50))
    assert body["model"] == "served" and body["max_output_tokens"] == 50
    assert body["store"] is False and body["stream"] is True
    assert body["instructions"] == "Be terse."
    kinds = [(i["type"], i.get("role")) for i in body["input"]]
    assert kinds == [
        ("message", "user"),
        ("message", "assistant"),
        ("function_call", None),
        ("function_call_output", None),
        ("message", "user"),
    ]
    parts = body["input"][0]["content"]
    assert [p["type"] for p in parts] == ["input_text", "input_image", "input_image"]
    assert body["input"][2] == {
        "type": "function_call",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": '{"city":"Oslo"}',
    }
    assert body["input"][3] == {
        "type": "function_call_output",
        "call_id": "call_1",
        "output": "4 C",
    }
    assert body["tools"][0]["name"] == "get_weather" and body["tools"][0]["type"] == "function"
    assert body["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert body["reasoning"] == {"effort": "low"}
    assert body["text"]["format"] == {
        "type": "json_schema",
        "name": "o",
        "schema": {"type": "object"},
        "strict": True,
    }


def test_stop_has_no_place_in_a_responses_request() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["x"]}
    with pytest.raises(UpstreamStatus) as caught:
        responses_request(chat, "m", None)
    assert caught.value.param == "stop"


# --- Responses answer -> chat --------------------------------------------------------------


def _response(status: str = "completed", **fields: Any) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "model": "served",
        "status": status,
        "output": [
            {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "Hm."}]},
            {
                "type": "message",
                "content": [
                    {"type": "output_text", "text": "Hi"},
                    {"type": "refusal", "refusal": "No."},
                ],
            },
        ],
        "usage": {
            "input_tokens": 7,
            "input_tokens_details": {"cached_tokens": 2},
            "output_tokens": 3,
            "output_tokens_details": {"reasoning_tokens": 1},
            "total_tokens": 10,
        },
        **fields,
    }


def test_a_whole_response_as_chat() -> None:
    chat = orjson.loads(chat_from_response(orjson.dumps(_response())))
    message = chat["choices"][0]["message"]
    assert message["content"] == "Hi" and message["reasoning"] == "Hm."
    assert message["refusal"] == "No."
    assert chat["choices"][0]["finish_reason"] == "stop"
    assert chat["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 2},
        "completion_tokens_details": {"reasoning_tokens": 1},
    }
    call = {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "w", "arguments": "{}"}
    called = orjson.loads(chat_from_response(orjson.dumps(_response(output=[call]))))
    assert called["choices"][0]["finish_reason"] == "tool_calls"
    assert called["choices"][0]["message"]["tool_calls"][0]["id"] == "c1"
    cut = _response("incomplete", incomplete_details={"reason": "max_output_tokens"})
    assert orjson.loads(chat_from_response(orjson.dumps(cut)))["choices"][0]["finish_reason"] == (
        "length"
    )
    failed = _response("failed", error={"code": "server_error", "message": "oops"})
    with pytest.raises(UpstreamError, match="oops"):
        chat_from_response(orjson.dumps(failed))


def _responses_events(end: str = "response.completed") -> list[bytes]:
    frame = {"id": "resp_1", "model": "served", "status": "in_progress"}
    call = {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "w", "arguments": ""}
    finished = {**_response(), "output": [call]}
    if end == "response.incomplete":
        finished = {**finished, "status": "incomplete"}
    events = [
        ("response.created", {"response": frame}),
        ("response.in_progress", {"response": frame}),
        ("response.output_item.added", {"output_index": 0, "item": {"type": "reasoning"}}),
        ("response.reasoning_text.delta", {"item_id": "rs", "delta": "Hm."}),
        ("response.reasoning_summary_text.delta", {"item_id": "rs", "delta": "!"}),
        ("response.output_item.added", {"output_index": 1, "item": {"type": "message"}}),
        ("response.content_part.added", {"item_id": "msg", "part": {"type": "output_text"}}),
        ("response.output_text.delta", {"item_id": "msg", "delta": "Hi"}),
        ("response.refusal.delta", {"item_id": "msg", "delta": "No"}),
        ("response.output_text.done", {"item_id": "msg", "text": "Hi"}),
        ("response.output_item.added", {"output_index": 2, "item": call}),
        ("response.function_call_arguments.delta", {"item_id": "fc_1", "delta": "{}"}),
        ("response.function_call_arguments.done", {"item_id": "fc_1", "arguments": "{}"}),
        ("response.output_item.done", {"output_index": 2, "item": call}),
        (end, {"response": finished}),
    ]
    return [
        _sse(kind, {"type": kind, "sequence_number": i, **fields})
        for i, (kind, fields) in enumerate(events)
    ]


def test_a_responses_stream_as_chat_chunks() -> None:
    out = asyncio.run(_collect(ResponsesStream().translate(_batches(*_responses_events()))))
    chunks = _chunks(out)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert {"reasoning": "Hm."} in deltas and {"reasoning": "!"} in deltas
    assert {"content": "Hi"} in deltas and {"refusal": "No"} in deltas
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["id"] == "c1" and calls[0]["function"]["name"] == "w"
    assert calls[1] == {"index": 0, "function": {"arguments": "{}"}}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["prompt_tokens"] == 7


def test_a_responses_stream_that_fails_or_ends_early_raises() -> None:
    failed = _sse(
        "response.failed",
        {"type": "response.failed", "response": {"error": {"message": "kaput"}}},
    )
    with pytest.raises(UpstreamError, match="kaput"):
        asyncio.run(_collect(ResponsesStream().translate(_batches(_responses_events()[0], failed))))
    error = _sse("error", {"type": "error", "message": "bad", "code": None})
    with pytest.raises(UpstreamError, match="bad"):
        asyncio.run(_collect(ResponsesStream().translate(_batches(error))))
    with pytest.raises(UpstreamError, match=r"before response\.completed"):
        asyncio.run(_collect(ResponsesStream().translate(_batches(*_responses_events()[:4]))))


# --- native pass-through -------------------------------------------------------------------


def test_native_bodies_keep_the_clients_fields() -> None:
    messages = {
        "model": "claude",
        "max_tokens": 9,
        "messages": [],
        "thinking": {"type": "adaptive"},
    }
    sent = orjson.loads(native_body("messages", messages, "served", 100))
    assert sent == {**messages, "model": "served"}  # max_tokens is the client's, required
    responses = {
        "model": "gpt",
        "input": [{"role": "user", "content": "x"}],
        "previous_response_id": "r",
    }
    sent = orjson.loads(native_body("responses", responses, "served", 100))
    assert sent == {
        "model": "served",
        "input": responses["input"],
        "store": False,
        "max_output_tokens": 100,
    }


def test_native_messages_stream_books_the_sims_usage_and_renames_the_model() -> None:
    outcome = Outcome()
    rename = model_rename("served", "policy-name")
    out = asyncio.run(
        _collect(relay_native("messages", _batches(*_messages_events()), outcome, rename))
    )
    assert b'"model":"policy-name"' in out and b'"served"' not in out
    assert outcome.completed and outcome.error is None
    assert outcome.usage is not None
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (13, 6)
    assert outcome.finish_reasons == ("tool_calls",)


def test_native_responses_stream_books_the_final_usage() -> None:
    outcome = Outcome()
    events = _responses_events("response.incomplete")
    asyncio.run(_collect(relay_native("responses", _batches(*events), outcome, None)))
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (7, 3)
    assert outcome.finish_reasons == ("length",)


def test_a_native_stream_that_fails_or_is_cut_sets_the_error() -> None:
    outcome = Outcome()
    error = _sse("error", {"type": "error", "error": {"type": "api_error", "message": "x"}})
    stream = relay_native("messages", _batches(_messages_events()[0], error), outcome, None)
    with pytest.raises(UpstreamError):
        asyncio.run(_collect(stream))
    assert outcome.error is not None and not outcome.completed
    outcome = Outcome()
    stream = relay_native("responses", _batches(*_responses_events()[:3]), outcome, None)
    with pytest.raises(UpstreamError, match="before its last event"):
        asyncio.run(_collect(stream))


def test_a_whole_native_answer_is_read_for_its_usage() -> None:
    outcome = Outcome()
    body = orjson.dumps(_response())
    assert read_native("responses", body, outcome, None) == body
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (7, 3)
    outcome = Outcome()
    message = {
        "type": "message",
        "stop_reason": "max_tokens",
        "usage": {"input_tokens": 2, "output_tokens": 4},
    }
    read_native("messages", orjson.dumps(message), outcome, None)
    assert (outcome.prompt_tokens, outcome.completion_tokens, outcome.finish_reasons) == (
        2,
        4,
        ("length",),
    )


def test_native_responses_answer_gets_the_gateways_id_and_is_stored() -> None:
    body = {"model": "gpt", "input": "hi", "previous_response_id": "resp_prev"}
    native = NativeResponses(body, DialectContext("abc", "tenant"))
    backend = {**_response(), "store": False, "previous_response_id": None}
    answer = orjson.loads(native.json(orjson.dumps(backend)))
    assert answer["id"] == "resp_abc"
    assert answer["store"] is True and answer["previous_response_id"] == "resp_prev"
    stored = native.stored()
    assert stored is not None and stored["id"] == "resp_abc"
    assert stored["response"]["output"] == backend["output"]
    assert stored["input"] == [{"type": "message", "role": "user", "content": "hi"}]


def test_native_responses_stream_is_stored_and_its_error_events_continue_the_numbers() -> None:
    native = NativeResponses({"model": "gpt", "input": "hi"}, DialectContext("abc", "t"))
    out = b"".join(native.events(event) for event in _responses_events())
    assert b'"resp_1"' not in out and b'"resp_abc"' in out
    stored = native.stored()
    assert stored is not None and stored["response"]["id"] == "resp_abc"
    cut = NativeResponses({"model": "gpt", "input": "hi"}, DialectContext("abc", "t"))
    cut.events(b"".join(_responses_events()[:3]))
    tail = [
        orjson.loads(e.split(b"data: ")[1])
        for e in cut.error_event(UpstreamError("x")).split(b"\n\n")
        if e
    ]
    assert [e["type"] for e in tail] == ["error", "response.failed"]
    assert [e["sequence_number"] for e in tail] == [3, 4]
    assert cut.stored() is None
    assert (
        NativeResponses({"input": "x", "store": False}, DialectContext("a", "t")).stored() is None
    )


def test_native_messages_pass_untouched_and_fail_with_the_messages_error_event() -> None:
    native = NativeMessages()
    assert native.json(b'{"a":1}') == b'{"a":1}' and native.events(b"x\n\n") == b"x\n\n"
    event = native.error_event(UpstreamUnavailable("gone"))
    assert event.startswith(b"event: error\ndata: ")
    assert orjson.loads(event.split(b"data: ")[1])["error"]["type"] == "overloaded_error"


def test_backend_error_bodies_of_either_api_become_the_gateways_errors() -> None:
    messages = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad tool"}}
    error = status_error(400, orjson.dumps(messages), None)
    assert error.status_code == 400 and error.message == "bad tool"
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    assert status_error(529, orjson.dumps(overloaded), None).status_code == 503
    responses = {
        "error": {
            "message": "nope",
            "type": "invalid_request_error",
            "param": "input",
            "code": None,
        }
    }
    error = status_error(400, orjson.dumps(responses), None)
    assert error.param == "input" and error.message == "nope"


# --- policy ----------------------------------------------------------------------------


def test_an_agent_api_model_serves_chat_only() -> None:
    spec = ModelSpec.model_validate({"replicas": ["http://h:1/v1"], "api": "messages"})
    assert spec.endpoints == ("chat",) and spec.api == "messages"
    assert ModelSpec.model_validate({"replicas": ["http://h:1/v1"]}).api == "chat"
    with pytest.raises(ValidationError, match="serves chat only"):
        ModelSpec.model_validate(
            {
                "replicas": ["http://h:1/v1"],
                "api": "responses",
                "endpoints": ["chat", "completions"],
            }
        )
    with pytest.raises(ValidationError):
        ModelSpec.model_validate({"replicas": ["http://h:1/v1"], "api": "anthropic"})

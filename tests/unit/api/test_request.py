from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
import pytest
from starlette.requests import Request

from gateway.api.hints import NO_HINTS, RequestHints
from gateway.api.request import read_request
from gateway.api.schemas import RequestKind
from gateway.errors import BodyTooLarge, InvalidRequest


def request_with(
    body: bytes, chunks: int = 1, headers: Iterable[tuple[bytes, bytes]] = ()
) -> Request:
    size = max(1, len(body) // chunks)
    parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
        for i, p in enumerate(parts)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "headers": list(headers), "path": "/"}
    return Request(scope, receive)


async def parse(body: Any, kind: RequestKind = "chat", limit: int = 1 << 20) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return await read_request(request_with(raw), kind, limit)


CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}


async def test_valid_chat_keeps_unknown_fields() -> None:
    parsed = await parse({**CHAT, "tools": [{"type": "function"}], "vendor_x": {"a": 1}})
    assert parsed.model == "auto" and not parsed.stream
    forwarded = orjson.loads(parsed.upstream_body("llama"))
    assert forwarded["model"] == "llama"
    assert forwarded["vendor_x"] == {"a": 1} and forwarded["tools"] == [{"type": "function"}]
    assert "stream_options" not in forwarded


async def test_stream_without_usage_asks_backend_for_usage() -> None:
    parsed = await parse({**CHAT, "stream": True, "stream_options": {"other": 1}})
    assert parsed.stream and not parsed.client_wants_usage
    forwarded = orjson.loads(parsed.upstream_body("m"))
    assert forwarded["stream_options"] == {"other": 1, "include_usage": True}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "max_tokens": -5}, "max_tokens"),
        ({**CHAT, "max_tokens": "12"}, "max_tokens"),
        ({**CHAT, "temperature": 9}, "temperature"),
        ({**CHAT, "n": 0}, "n"),
    ],
)
async def test_invalid_fields_are_named(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        await parse(body)
    assert info.value.param == param
    assert info.value.status_code == 400
    assert param in info.value.message


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[1, 2]", b""])
async def test_malformed_bodies(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        await parse(raw)


async def test_completions_and_embeddings_shapes() -> None:
    parsed = await parse({"model": "m", "prompt": "once upon"}, "completions")
    assert parsed.prompt_chars() == len("once upon")
    await parse({"model": "m", "input": ["a", "b"]}, "embeddings")
    with pytest.raises(InvalidRequest):
        await parse({"model": "m", "prompt": {"x": 1}}, "completions")


async def test_body_limit_by_header_and_by_stream() -> None:
    raw = orjson.dumps({**CHAT, "pad": "x" * 5000})
    declared = request_with(raw, headers=[(b"content-length", str(len(raw)).encode())])
    with pytest.raises(BodyTooLarge):
        await read_request(declared, "chat", 1000)
    with pytest.raises(BodyTooLarge) as info:
        await read_request(request_with(raw, chunks=10), "chat", 1000)
    assert info.value.status_code == 413


async def test_prompt_chars_counts_text_parts() -> None:
    parts = [{"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {"url": "u"}}]
    parsed = await parse(
        {
            "model": "m",
            "messages": [{"role": "system", "content": "12"}, {"role": "user", "content": parts}],
        }
    )
    assert parsed.prompt_chars() == 6


async def test_prompt_chars_count_what_an_agent_sends_besides_text() -> None:
    """Tool definitions and earlier tool calls are prompt too: a coding agent's tools run to
    tens of thousands of characters, and budgets reserve by this count."""
    tools = [{"type": "function", "function": {"name": "edit", "parameters": {"x": "y" * 4000}}}]
    call = {"id": "c", "type": "function", "function": {"name": "edit", "arguments": "z" * 300}}
    body = {
        "model": "m",
        "tools": tools,
        "messages": [
            {"role": "user", "content": "fix it"},
            {"role": "assistant", "content": None, "tool_calls": [call], "reasoning": "r" * 50},
            {"role": "tool", "tool_call_id": "c", "content": "done"},
        ],
    }
    parsed = await parse(body)
    expected = len("fix it") + len("edit") + 300 + 50 + len("done") + len(orjson.dumps(tools))
    assert parsed.prompt_chars() == expected
    assert parsed.estimated_prompt_tokens() > 1000  # the text alone is 4 tokens


@pytest.mark.parametrize("depth", [260, 1000])
async def test_json_the_gateway_could_not_write_again_is_refused(depth: int) -> None:
    raw = orjson.dumps({**CHAT, "x": "DEEP"}).replace(b'"DEEP"', b"[" * depth + b"]" * depth)
    with pytest.raises(InvalidRequest, match="nested deeper"):
        await parse(raw)


async def test_many_shallow_containers_are_fine() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}]}] * 300
    parsed = await parse({**CHAT, "messages": messages})
    assert len(parsed.body["messages"]) == 300


@pytest.mark.parametrize(
    ("kind", "extra", "choices"),
    [
        ("chat", {}, 1),
        ("chat", {"n": 4}, 4),
        ("completions", {"n": 2, "best_of": 5}, 5),
        ("completions", {"best_of": 3}, 3),
    ],
)
async def test_choices_counts_every_generated_completion(
    kind: RequestKind, extra: dict[str, Any], choices: int
) -> None:
    base = CHAT if kind == "chat" else {"model": "auto", "prompt": "hi"}
    parsed = await parse({**base, **extra}, kind)
    assert parsed.choices == choices


async def test_too_many_messages_is_refused_before_validating_them() -> None:
    from gateway.api.schemas import MAX_MESSAGES

    junk = [{"not": "a message"}] * (MAX_MESSAGES + 1)
    with pytest.raises(InvalidRequest, match=f"at most {MAX_MESSAGES}") as caught:
        await parse({**CHAT, "messages": junk})
    assert caught.value.param == "messages"


async def test_a_body_in_chunks_is_read_whole_and_a_client_leaving_midway_is_refused() -> None:
    raw = orjson.dumps({**CHAT, "pad": "x" * 5000})
    parsed = await read_request(request_with(raw, chunks=7), "chat", 1 << 20)
    assert parsed.body["pad"] == "x" * 5000
    first = {"type": "http.request", "body": raw[:100], "more_body": True}
    messages: list[dict[str, Any]] = [first, {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "headers": [], "path": "/"}
    with pytest.raises(InvalidRequest, match="disconnected"):
        await read_request(Request(scope, receive), "chat", 1 << 20)


# --- every value the gateway acts on is read here, once ------------------------------------


@pytest.mark.parametrize(
    ("kind", "extra", "max_tokens"),
    [
        ("chat", {}, None),
        ("chat", {"max_tokens": 7}, 7),
        ("chat", {"max_completion_tokens": 5, "max_tokens": 7}, 5),  # the newer name wins
        ("chat", {"max_completion_tokens": None, "max_tokens": 7}, 7),  # null is unset
        ("completions", {"max_tokens": 3}, 3),
        ("completions", {"max_completion_tokens": 4}, 4),
        ("embeddings", {"max_tokens": 9}, 0),  # an embedding generates no tokens
    ],
)
async def test_max_tokens_has_one_rule(
    kind: RequestKind, extra: dict[str, Any], max_tokens: int | None
) -> None:
    base = {
        "chat": CHAT,
        "completions": {"model": "m", "prompt": "hi"},
        "embeddings": {"model": "m", "input": "hi"},
    }[kind]
    parsed = await parse({**base, **extra}, kind)
    assert parsed.max_tokens == max_tokens


async def test_a_budget_cap_is_sent_only_when_the_client_set_no_limit() -> None:
    unset = await parse(CHAT)
    assert orjson.loads(unset.upstream_body("m", 64))["max_tokens"] == 64
    limited = await parse({**CHAT, "max_completion_tokens": 5})
    assert "max_tokens" not in orjson.loads(limited.upstream_body("m", 64))


async def test_the_gateways_headers_come_with_the_request() -> None:
    raw = orjson.dumps(CHAT)
    headers = {"x-triage-priority": "sheddable", "x-slo-ttft-ms": "250", "x-triage-tier": "t"}
    parsed = await read_request(request_with(raw), "chat", 1 << 20, headers)
    assert parsed.hints == RequestHints("t", "sheddable", 0.25, None)
    assert (await read_request(request_with(raw), "chat", 1 << 20, {})).hints is NO_HINTS


@pytest.mark.parametrize(
    ("header", "value", "message"),
    [
        (
            "x-triage-priority",
            "urgent",
            "x-triage-priority must be one of critical, standard, sheddable; got 'urgent'.",
        ),
        (
            "x-slo-ttft-ms",
            "soon",
            "x-slo-ttft-ms must be a positive number of milliseconds; got 'soon'.",
        ),
        ("x-slo-e2e-ms", "-1", "x-slo-e2e-ms must be a positive number of milliseconds; got '-1'."),
    ],
)
async def test_a_bad_header_is_a_400_naming_it(header: str, value: str, message: str) -> None:
    raw = orjson.dumps(CHAT)
    with pytest.raises(InvalidRequest) as caught:
        await read_request(request_with(raw), "chat", 1 << 20, {header: value})
    assert (caught.value.status_code, caught.value.param, caught.value.message) == (
        400,
        header,
        message,
    )


@pytest.mark.parametrize(
    ("kind", "extra", "param", "message"),
    [
        (
            "chat",
            {"frequency_penalty": 2.5},
            "frequency_penalty",
            "Invalid value for 'frequency_penalty': Input should be less than or equal to 2",
        ),
        (
            "chat",
            {"presence_penalty": "high"},
            "presence_penalty",
            "Invalid value for 'presence_penalty': Input should be a valid number",
        ),
        (
            "chat",
            {"presence_penalty": -2.01},
            "presence_penalty",
            "Invalid value for 'presence_penalty': Input should be greater than or equal to -2",
        ),
        (
            "chat",
            {"logprobs": 1},
            "logprobs",
            "Invalid value for 'logprobs': Input should be a valid boolean",
        ),
        (
            "chat",
            {"top_logprobs": 21},
            "top_logprobs",
            "Invalid value for 'top_logprobs': Input should be less than or equal to 20",
        ),
        (
            "chat",
            {"stop": ["a", "b", "c", "d", "e"]},
            "stop",
            "Invalid value for 'stop': List should have at most 4 items after validation, not 5",
        ),
        (
            "chat",
            {"stop": [1]},
            "stop.0",
            "Invalid value for 'stop.0': Input should be a valid string",
        ),
        ("chat", {"user": 7}, "user", "Invalid value for 'user': Input should be a valid string"),
        (
            "chat",
            {"logit_bias": {"50256": "ban"}},
            "logit_bias.50256",
            "Invalid value for 'logit_bias.50256': Input should be a valid number",
        ),
        (
            "chat",
            {"logit_bias": {"50256": -101}},
            "logit_bias.50256",
            "Invalid value for 'logit_bias.50256': Input should be greater than or equal to -100",
        ),
        (
            "chat",
            {"max_completion_tokens": 0},
            "max_completion_tokens",
            "Invalid value for 'max_completion_tokens': Input should be greater than or equal to 1",
        ),
        (
            "completions",
            {"logprobs": 6},
            "logprobs",
            "Invalid value for 'logprobs': Input should be less than or equal to 5",
        ),
        (
            "completions",
            {"best_of": "5"},
            "best_of",
            "Invalid value for 'best_of': Input should be a valid integer",
        ),
        (
            "completions",
            {"max_completion_tokens": "9"},
            "max_completion_tokens",
            "Invalid value for 'max_completion_tokens': Input should be a valid integer",
        ),
    ],
)
async def test_sampling_fields_are_held_to_openais_types_and_ranges(
    kind: RequestKind, extra: dict[str, Any], param: str, message: str
) -> None:
    base = CHAT if kind == "chat" else {"model": "m", "prompt": "hi"}
    with pytest.raises(InvalidRequest) as caught:
        await parse({**base, **extra}, kind)
    assert (caught.value.status_code, caught.value.param, caught.value.message) == (
        400,
        param,
        message,
    )


async def test_valid_sampling_fields_and_vendor_extensions_pass_through() -> None:
    extra = {
        "frequency_penalty": -2,
        "presence_penalty": 1.5,
        "logprobs": True,
        "top_logprobs": 0,
        "stop": ["\n", "END"],
        "user": "u-1",
        "logit_bias": {"50256": -100, "11": 2.5},
        # Vendor extensions: the backend's to judge, whatever they hold.
        "top_k": "forty",
        "min_tokens": -3,
        "repetition_penalty": [1],
    }
    parsed = await parse({**CHAT, **extra})
    assert orjson.loads(parsed.upstream_body("m")) == {**CHAT, **extra, "model": "m"}
    completion = {"model": "m", "prompt": "hi", "logprobs": 5, "echo": True, "stop": "x"}
    assert (await parse(completion, "completions")).body == completion

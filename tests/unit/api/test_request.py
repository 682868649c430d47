from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
import pytest
from starlette.requests import Request

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
    assert parsed.choices() == choices


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

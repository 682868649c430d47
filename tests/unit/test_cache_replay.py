"""Entries from streams and bodies, and their replay as JSON or as SSE, in both directions."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.cache.entry import (
    CachedEntry,
    CachedUsage,
    decode_entry,
    encode_entry,
    entry_from_body,
    entry_from_stream,
)
from gateway.cache.replay import render_events, render_json

USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
HEAD = {
    "id": "chatcmpl-abc",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "system_fingerprint": "fp_1",
}


def chunk(delta: dict[str, Any], finish: str | None = None, **choice: Any) -> dict[str, Any]:
    return {
        **HEAD,
        "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **choice}
        ],
        "usage": None,
    }


def chat_stream(pieces: list[str], finish: str = "stop") -> list[dict[str, Any]]:
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in pieces]
    chunks.append(chunk({}, finish))
    chunks.append({**HEAD, "choices": [], "usage": USAGE})
    return chunks


def datas(chunks: list[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps(c) for c in chunks]


def parse(events: list[bytes]) -> list[Any]:
    """SSE events -> their JSON payloads; checks the framing and the final [DONE]."""
    assert events[-1] == b"data: [DONE]\n\n"
    payloads = []
    for event in events[:-1]:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
        payloads.append(orjson.loads(event[6:]))
    return payloads


def stream_entry(
    chunks: list[dict[str, Any]], kind: Any = "chat", usage: Any = None
) -> CachedEntry:
    entry = entry_from_stream(kind, "llama-8b", datas(chunks), usage, now=1.0)
    assert entry is not None
    return entry


def body_entry(response: dict[str, Any], kind: Any = "chat") -> CachedEntry:
    entry = entry_from_body(kind, "llama-8b", orjson.dumps(response), now=1.0)
    assert entry is not None
    return entry


def reassembled(events: list[bytes], kind: Any = "chat") -> dict[str, Any]:
    """What a client (or a second gateway) assembles from replayed events."""
    payloads = [orjson.dumps(p) for p in parse(events)]
    entry = entry_from_stream(kind, "m", payloads, None, now=0.0)
    assert entry is not None
    return dict(entry.response)


# --- a streamed original -------------------------------------------------------------


def test_stream_to_json_assembles_the_completion() -> None:
    entry = stream_entry(chat_stream(["Hel", "lo", " there"]))
    response = orjson.loads(render_json(entry))
    assert response == {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "system_fingerprint": "fp_1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
    assert entry.usage == CachedUsage(12, 5, 17)


def test_stream_replay_with_usage_follows_openai() -> None:
    original = chat_stream(["Hel", "lo"], finish="length")
    payloads = parse(render_events(stream_entry(original), include_usage=True))
    assert payloads == original  # the very chunks, usage null on each, then the usage chunk


def test_stream_replay_without_usage_has_no_usage_anywhere() -> None:
    original = chat_stream(["Hel", "lo"])
    payloads = parse(render_events(stream_entry(original), include_usage=False))
    assert all("usage" not in p for p in payloads)
    expected = [{k: v for k, v in c.items() if k != "usage"} for c in original[:-1]]
    assert payloads == expected


def test_stripped_usage_chunk_is_taken_from_the_outcome() -> None:
    # The relay drops the usage chunk when the client did not ask for it.
    entry = stream_entry(chat_stream(["Hi"])[:-1], usage=USAGE)
    assert orjson.loads(render_json(entry))["usage"] == USAGE
    assert parse(render_events(entry, include_usage=True))[-1]["usage"] == USAGE


def test_stream_without_any_usage_still_replays() -> None:
    entry = stream_entry(chat_stream(["Hi"])[:-1])
    assert "usage" not in orjson.loads(render_json(entry)) and entry.usage is None
    payloads = parse(render_events(entry, include_usage=True))
    assert payloads[-1]["choices"][0]["finish_reason"] == "stop"


def test_streamed_tool_call_fragments_assemble() -> None:
    call = {"index": 0, "id": "call_1", "type": "function"}
    chunks = [
        chunk(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{**call, "function": {"name": "get_weather", "arguments": ""}}],
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "now", "arguments": "{}"},
                    }
                ]
            }
        ),
        chunk({}, "tool_calls"),
    ]
    message = stream_entry(chunks).response["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
        ],
    }


def test_streamed_logprobs_concatenate() -> None:
    def token(text: str) -> dict[str, Any]:
        return {"token": text, "logprob": -0.1, "bytes": list(text.encode()), "top_logprobs": []}

    chunks = [
        chunk({"role": "assistant", "content": "A"}, logprobs={"content": [token("A")]}),
        chunk({"content": "B"}, logprobs={"content": [token("B")], "refusal": None}),
        chunk({}, "stop"),
    ]
    choice = stream_entry(chunks).response["choices"][0]
    assert choice["message"]["content"] == "AB"
    assert choice["logprobs"] == {"content": [token("A"), token("B")], "refusal": None}


def test_backend_extras_survive_assembly() -> None:
    chunks = [
        chunk({"role": "assistant", "reasoning_content": "Think"}),
        chunk({"reasoning_content": "ing.", "content": "42"}),
        chunk({}, "stop", stop_reason=None),
    ]
    choice = stream_entry(chunks).response["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "42",
        "reasoning_content": "Thinking.",
    }
    assert choice["stop_reason"] is None


def test_completions_stream_to_json() -> None:
    head = {**HEAD, "object": "text_completion"}
    chunks = [
        {**head, "choices": [{"index": 0, "text": t, "logprobs": None, "finish_reason": None}]}
        for t in ("Once", " upon")
    ]
    chunks.append(
        {**head, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]}
    )
    entry = stream_entry(chunks, kind="completions", usage=USAGE)
    response = entry.response
    assert response["object"] == "text_completion"
    assert response["choices"] == [
        {"index": 0, "text": "Once upon", "logprobs": None, "finish_reason": "length"}
    ]
    assert parse(render_events(entry, include_usage=False)) == chunks


# --- a JSON original ----------------------------------------------------------------

CHAT_RESPONSE: dict[str, Any] = {
    "id": "chatcmpl-xyz",
    "object": "chat.completion",
    "created": 1700000001,
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "The quick brown fox jumps over the lazy dog, and then it runs "
                "far away into the deep green forest where nobody can find it.",
                "refusal": None,
            },
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
        }
    ],
    "usage": USAGE,
}


def test_json_to_json_is_the_original() -> None:
    assert orjson.loads(render_json(body_entry(CHAT_RESPONSE))) == CHAT_RESPONSE


@pytest.mark.parametrize("include_usage", [True, False])
def test_json_to_stream_synthesizes_chunks(include_usage: bool) -> None:
    payloads = parse(render_events(body_entry(CHAT_RESPONSE), include_usage))
    choices = [p["choices"] for p in payloads]
    assert all(p["id"] == "chatcmpl-xyz" and p["created"] == 1700000001 for p in payloads)
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert choices[0][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    content = [c[0]["delta"]["content"] for c in choices[1 : -2 if include_usage else -1]]
    assert (
        len(content) > 3 and "".join(content) == CHAT_RESPONSE["choices"][0]["message"]["content"]
    )
    last_choice = choices[-2 if include_usage else -1][0]
    assert last_choice["finish_reason"] == "stop" and last_choice["delta"] == {}
    assert all(c[0]["finish_reason"] is None for c in choices[: -2 if include_usage else -1])
    if include_usage:
        assert all(p["usage"] is None for p in payloads[:-1])
        assert payloads[-1]["choices"] == [] and payloads[-1]["usage"] == USAGE
    else:
        assert all("usage" not in p for p in payloads)


def test_json_to_stream_reassembles_to_the_original() -> None:
    events = render_events(body_entry(CHAT_RESPONSE), include_usage=True)
    assert reassembled(events) == CHAT_RESPONSE


def test_json_tool_calls_to_stream_and_back() -> None:
    response = {
        **CHAT_RESPONSE,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        },
                        {
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "now", "arguments": ""},
                        },
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
    }
    events = render_events(body_entry(response), include_usage=True)
    assert reassembled(events) == response
    deltas = [p["choices"][0]["delta"] for p in parse(events)[:-1]]
    assert deltas[1]["tool_calls"][0]["index"] == 0 and deltas[2]["tool_calls"][0]["index"] == 1


def test_json_with_logprobs_keeps_them_whole_in_the_stream() -> None:
    logprobs = {
        "content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}]
    }
    response = {
        **CHAT_RESPONSE,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi"},
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
        ],
    }
    events = render_events(body_entry(response), include_usage=True)
    assert reassembled(events) == response


def test_json_completion_to_stream_and_back() -> None:
    response = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 5,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "text": "one two three four five six seven eight nine ten",
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": USAGE,
    }
    events = render_events(body_entry(response, "completions"), include_usage=True)
    payloads = parse(events)
    assert all(p["object"] == "text_completion" for p in payloads)
    assert len(payloads) >= 4
    assert reassembled(events, "completions") == response


def test_embeddings_replay_as_json_only() -> None:
    response = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -1.5]}],
        "model": "e5",
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    entry = body_entry(response, "embeddings")
    assert orjson.loads(render_json(entry)) == response
    assert entry.usage == CachedUsage(3, 0, 3)
    with pytest.raises(ValueError, match="never streamed"):
        render_events(entry, include_usage=False)


# --- what never becomes an entry -----------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"error": {"message": "bad", "type": "x"}}',
        orjson.dumps({**CHAT_RESPONSE, "choices": []}),
        orjson.dumps({**CHAT_RESPONSE, "choices": [{"index": 0, "finish_reason": None}]}),
        orjson.dumps({**CHAT_RESPONSE, "choices": [{"index": 0, "finish_reason": "abort"}]}),
    ],
)
def test_bodies_that_are_not_answers(body: bytes) -> None:
    assert entry_from_body("chat", "m", body, now=0) is None


def test_embeddings_body_needs_data() -> None:
    assert entry_from_body("embeddings", "m", b'{"object": "list"}', now=0) is None


@pytest.mark.parametrize(
    "chunks",
    [
        [],
        chat_stream(["Hi"], finish="")[:-2],  # no finish_reason anywhere
        [*chat_stream(["Hi"])[:2], {"error": {"message": "backend died"}}],
        [*chat_stream(["Hi"])[:2], {"object": "error", "message": "backend died"}],
        [*chat_stream(["Hi"])[:1], {**HEAD, "choices": None}],
    ],
    ids=["empty", "unfinished", "error-event", "vllm-error-object", "bad-choices"],
)
def test_streams_that_are_not_answers(chunks: list[dict[str, Any]]) -> None:
    assert entry_from_stream("chat", "m", datas(chunks), None, now=0) is None


def test_stream_with_a_broken_event_is_not_an_answer() -> None:
    assert entry_from_stream("chat", "m", [b"{not json"], None, now=0) is None
    assert entry_from_stream("embeddings", "m", datas(chat_stream(["x"])), None, now=0) is None


# --- the stored form ------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    for entry in (stream_entry(chat_stream(["a", "b"])), body_entry(CHAT_RESPONSE)):
        decoded = decode_entry(encode_entry(entry))
        assert decoded is not None
        assert render_events(decoded, True) == render_events(entry, True)
        assert render_json(decoded) == render_json(entry)
        assert (decoded.kind, decoded.model, decoded.stored_at) == ("chat", "llama-8b", 1.0)


def test_stream_entry_stores_shared_fields_once() -> None:
    entry = stream_entry(chat_stream(["x"] * 50))
    assert entry.chunk_lines is not None
    assert all(line.startswith(b',"choices":') for line in entry.chunk_lines.split(b"\n"))
    raw_stream = sum(len(d) for d in datas(chat_stream(["x"] * 50)))
    assert len(encode_entry(entry)) < raw_stream / 2


def test_chunks_that_differ_from_the_first_replay_whole() -> None:
    chunks = chat_stream(["a", "b"])
    chunks[2] = {**chunks[2], "system_fingerprint": "fp_2", "obfuscation": "xyz"}
    entry = stream_entry(chunks)
    assert entry.chunk_lines is not None and entry.chunk_lines.split(b"\n")[2].startswith(b"{")
    assert parse(render_events(entry, include_usage=True)) == chunks
    decoded = decode_entry(encode_entry(entry))
    assert decoded is not None and parse(render_events(decoded, include_usage=True)) == chunks


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"junk",
        b"{}",
        orjson.dumps({"v": 99, "kind": "chat"}),
        orjson.dumps({"v": 1, "kind": "nope", "model": "m", "stored_at": 0, "response": {}}),
        orjson.dumps(
            {"v": 1, "kind": "chat", "model": "m", "stored_at": 0, "response": {}, "envelope": {}}
        )
        + b"\n",  # says it was streamed, but has no chunks
    ],
)
def test_foreign_bytes_decode_to_nothing(raw: bytes) -> None:
    assert decode_entry(raw) is None

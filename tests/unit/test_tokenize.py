"""Counting usage a backend did not report: each server's tokenize endpoint, and estimates."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import orjson
import pytest
import respx

from gateway.api.request import ParsedRequest
from gateway.api.schemas import RequestKind
from gateway.backends import DEFAULTS, ServerKind
from gateway.pools import Pool
from gateway.tokenize import (
    Answer,
    Tokenizer,
    Usage,
    answer_from_body,
    answer_from_events,
    estimate,
    render_chat,
    template_tokens,
)

ROOT = "http://replica:8000"
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
]
ANSWER = Answer(("one two three",), pieces=3)


def chat(**extra: Any) -> ParsedRequest:
    body = {"model": "public", "messages": MESSAGES, **extra}
    return ParsedRequest("chat", body, "public", stream=True, client_wants_usage=True)


def pool(kind: ServerKind, key: str | None = None) -> Pool:
    return Pool.from_urls("public", [ROOT + "/v1"], "srv", key, backend=DEFAULTS[kind])


def sent(route: respx.Route) -> list[dict[str, Any]]:
    return [json.loads(call.request.content) for call in route.calls]


async def count(
    kind: ServerKind,
    parsed: ParsedRequest | None = None,
    answer: Answer = ANSWER,
    tokenizer: Tokenizer | None = None,
    **options: Any,
) -> Usage:
    tokenizer = tokenizer or Tokenizer()
    target = pool(kind, options.pop("key", None))
    try:
        return await tokenizer.usage(
            parsed or chat(), target, target.replicas[0], answer, **options
        )
    finally:
        await tokenizer.close()


# --- each server's endpoint ----------------------------------------------------------------


@respx.mock
async def test_vllm_counts_the_chat_template_and_the_completion_without_bos() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        n = 21 if "messages" in body else len(body["prompt"].split())
        return httpx.Response(200, json={"count": n, "max_model_len": 4096, "tokens": [0] * n})

    route = respx.post(ROOT + "/tokenize").mock(side_effect=answer)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    usage = await count("vllm", chat(tools=tools), key="sk-backend")
    assert usage == Usage(21, 3, "tokenized")
    prompt, completion = sent(route)
    assert prompt == {"model": "srv", "messages": MESSAGES, "tools": tools}
    assert completion == {"model": "srv", "prompt": "one two three", "add_special_tokens": False}
    assert route.calls[0].request.headers["authorization"] == "Bearer sk-backend"
    assert route.calls[0].request.headers["content-type"] == "application/json"


@respx.mock
async def test_a_tokenize_endpoint_without_messages_gets_the_rendered_chat() -> None:
    """SGLang's /tokenize has vLLM's shape but takes a prompt only."""

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if "messages" in body:
            return httpx.Response(400, json={"object": "error", "message": "prompt: missing"})
        return httpx.Response(200, json={"count": len(body["prompt"].split()), "tokens": []})

    respx.post(ROOT + "/tokenize").mock(side_effect=answer)
    usage = await count("sglang")
    rendered = len(render_chat(MESSAGES).split())
    assert usage == Usage(rendered + template_tokens(MESSAGES), 3, "tokenized")


@respx.mock
async def test_llama_cpp_applies_its_template_then_counts_with_special_tokens() -> None:
    template = respx.post(ROOT + "/apply-template").respond(json={"prompt": "<s>[templated]"})
    tokenize = respx.post(ROOT + "/tokenize").mock(
        side_effect=lambda request: httpx.Response(
            200,
            json={"tokens": list(range(11 if json.loads(request.content)["add_special"] else 3))},
        )
    )
    assert await count("llama_cpp") == Usage(11, 3, "tokenized")
    assert sent(template) == [{"messages": MESSAGES}]
    assert sent(tokenize) == [
        {"content": "<s>[templated]", "add_special": True},
        {"content": "one two three", "add_special": False},
    ]


@respx.mock
async def test_llama_cpp_python_counts_text_and_takes_off_the_bos_it_adds() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json={"count": len(json.loads(request.content)["input"].split()) + 1}
        )

    route = respx.post(ROOT + "/extras/tokenize/count").mock(side_effect=answer)
    tokenizer = Tokenizer()
    target = pool("llama_cpp_python")
    try:
        first = await tokenizer.usage(chat(), target, target.replicas[0], ANSWER)
        again = await tokenizer.usage(chat(), target, target.replicas[0], ANSWER)
    finally:
        await tokenizer.close()
    prompt = len(render_chat(MESSAGES).split()) + 1 + template_tokens(MESSAGES)
    assert first == again == Usage(prompt, 3, "tokenized")
    inputs = [body["input"] for body in sent(route)]
    assert inputs.count("") == 1  # what the BOS adds is asked once per replica
    assert {body["model"] for body in sent(route)} == {"srv"}


@respx.mock
async def test_completions_prompts_count_token_ids_without_asking() -> None:
    route = respx.post(ROOT + "/tokenize").respond(json={"count": 3, "tokens": [1, 2, 3]})
    body = {"model": "public", "prompt": [[5, 6, 7, 8], [9]]}
    parsed = ParsedRequest("completions", body, "public", stream=False, client_wants_usage=False)
    assert await count("vllm", parsed) == Usage(5, 3, "tokenized")
    assert len(route.calls) == 1  # the completion only


# --- when it cannot ask --------------------------------------------------------------------


async def test_a_server_without_a_tokenizer_gets_the_estimate() -> None:
    assert await count("ollama") == estimate(chat(), ANSWER)
    assert estimate(chat(), ANSWER).source == "estimated"


@respx.mock
async def test_a_busy_llama_cpp_python_replica_is_not_asked() -> None:
    """A request waiting for its lock would end the stream it is serving."""
    route = respx.post(ROOT + "/extras/tokenize/count").respond(json={"count": 1})
    usage = await count("llama_cpp_python", others_in_flight=1)
    assert usage.source == "estimated" and not route.called


@respx.mock
@pytest.mark.parametrize(
    "failure",
    [
        httpx.Response(500, json={"error": {"message": "boom"}}),
        httpx.Response(200, text="<html>"),
        httpx.Response(200, json={"tokens": "many"}),
        httpx.ConnectError("refused"),
    ],
    ids=["500", "not json", "no count", "refused"],
)
async def test_a_failing_tokenizer_leaves_the_estimate(failure: object) -> None:
    route = respx.post(ROOT + "/tokenize")
    if isinstance(failure, Exception):
        route.mock(side_effect=failure)
    else:
        route.mock(return_value=failure)
    assert await count("vllm") == estimate(chat(), ANSWER)


@respx.mock
async def test_a_slow_tokenizer_leaves_the_estimate_in_time() -> None:
    never = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        await never.wait()
        raise AssertionError("unreachable")

    respx.post(ROOT + "/tokenize").mock(side_effect=hang)
    usage = await asyncio.wait_for(count("vllm", tokenizer=Tokenizer(timeout_s=0.05)), 5)
    assert usage == estimate(chat(), ANSWER)


async def test_a_stream_whose_text_was_not_kept_is_estimated_from_its_events() -> None:
    usage = await count("vllm", answer=Answer(None, pieces=7))  # no HTTP mock: not asked
    assert usage.completion_tokens == 7 and usage.source == "estimated"


# --- estimates and what was generated ------------------------------------------------------


def test_the_chat_estimate_counts_the_template_not_only_characters() -> None:
    parsed = ParsedRequest(
        "chat",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        "m",
        stream=False,
        client_wants_usage=False,
    )
    usage = estimate(parsed, Answer(("a longer answer of some words",)))
    assert usage.prompt_tokens == 2 + template_tokens([{}])  # "user\nhi": 7 chars
    assert usage.prompt_tokens > parsed.estimated_prompt_tokens()
    assert usage.completion_tokens == 8  # 29 characters / 4, rounded up


def test_a_streams_answer_counts_content_deltas_and_assembles_its_text() -> None:
    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return b"data: " + orjson.dumps({"id": "x", "choices": [choice]}) + b"\n\n"

    call = {"index": 0, "id": "c1", "function": {"name": "f", "arguments": '{"a":'}}
    batches = [
        event({"role": "assistant"}) + event({"content": "Hel"}),
        event({"content": "lo"}) + event({"tool_calls": [call]}),
        event({}, "stop") + b"data: [DONE]\n\n",
    ]
    answer = answer_from_events("chat", batches)
    assert answer.pieces == 3
    assert answer.texts == ('Hello\nf\n{"a":',)


def test_chunks_of_another_shape_leave_the_text_unknown() -> None:
    odd = b'data: {"choices": ["x", {"index": 0, "delta": "y"}]}\n\ndata: [DONE]\n\n'
    assert answer_from_events("chat", [odd]) == Answer(None, 0)
    assert answer_from_events("chat", [b"data: {not json\n\n"]) == Answer(None, 0)


@pytest.mark.parametrize(
    ("kind", "body", "texts"),
    [
        ("chat", {"choices": [{"message": {"role": "assistant", "content": "yes"}}]}, ("yes",)),
        ("completions", {"choices": [{"text": "a"}, {"text": "b"}]}, ("a", "b")),
        ("embeddings", {"data": [{"embedding": [0.1]}]}, ()),
    ],
)
def test_a_json_answers_text(
    kind: RequestKind, body: dict[str, Any], texts: tuple[str, ...]
) -> None:
    assert answer_from_body(kind, orjson.dumps(body)).texts == texts


def test_usage_as_openai_writes_it() -> None:
    usage = Usage(5, 2, "tokenized")
    assert usage.as_dict("chat") == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert usage.as_dict("embeddings") == {"prompt_tokens": 5, "total_tokens": 7}

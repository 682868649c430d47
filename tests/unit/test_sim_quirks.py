"""Unit tests for gateway.sim.quirks: each server kind's endpoints, errors, usage and `n`."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from gateway.backends import DEFAULTS
from gateway.sim.profile import PROFILES
from gateway.sim.quirks import QUIRKS, Quirks, quirks_from_name
from gateway.sim.server import build_sim_app

PROFILE = dataclasses.replace(PROFILES["instant"], model="unit-model", max_model_len=4096)
CHAT = {"model": "unit-model", "messages": [{"role": "user", "content": "Say hi, please."}]}


@pytest.fixture(params=sorted(QUIRKS))
def quirks(request: pytest.FixtureRequest) -> Quirks:
    return QUIRKS[request.param]


@pytest.fixture
async def client(quirks: Quirks) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_sim_app(PROFILE, quirks=quirks))
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as http:
        yield http


def _sse_chunks(body: bytes) -> list[dict[str, object]]:
    lines = [line.removeprefix(b"data: ") for line in body.split(b"\n\n") if line]
    assert lines[-1] == b"[DONE]"
    return [orjson.loads(line) for line in lines[:-1]]


def test_unknown_quirks_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid quirks: llama_cpp, llama_cpp_python, ollama"):
        quirks_from_name("tgi")


def test_every_server_kind_has_a_profile() -> None:
    assert set(QUIRKS) == set(DEFAULTS)
    assert all(QUIRKS[name].name == name for name in QUIRKS)


def test_the_gateway_defaults_match_the_profiles() -> None:
    """gateway/backends.py and the sim describe the same servers."""
    for name, quirks in QUIRKS.items():
        backend = DEFAULTS[name]  # type: ignore[index]
        assert backend.health_path == quirks.health_path, name
        assert backend.stream_usage == quirks.stream_usage, name
        assert (backend.metrics_path is not None) == (quirks.metrics is not None), name
        assert (backend.tokenize_path is None) == (not quirks.tokenize_paths), name
        if backend.tokenize_path is not None:
            assert backend.tokenize_path in quirks.tokenize_paths, name


async def test_health_endpoint_exists_only_where_the_server_has_one(
    client: httpx.AsyncClient, quirks: Quirks
) -> None:
    if quirks.health_path is None:
        assert (await client.get("/health")).status_code == 404
        return
    if quirks.health_delay_s:
        quirks = dataclasses.replace(quirks, health_delay_s=0.0)  # SGLang's 1 s wait aside
        transport = httpx.ASGITransport(app=build_sim_app(PROFILE, quirks=quirks))
        client = httpx.AsyncClient(transport=transport, base_url="http://sim")
    response = await client.get(quirks.health_path)
    assert (response.status_code, response.content) == (200, quirks.health_body)
    if quirks.health_path != "/health":
        assert (await client.get("/health")).status_code == 404


async def test_metrics_use_the_servers_names(client: httpx.AsyncClient, quirks: Quirks) -> None:
    response = await client.get("/metrics")
    expected = {
        "vllm": b"vllm:num_requests_running",
        "sglang": b"sglang:num_queue_reqs",
        "llama_cpp": b"llamacpp:requests_deferred",
        None: None,
    }[quirks.metrics]
    if expected is None:
        assert response.status_code == quirks.metrics_off_status
    else:
        assert response.status_code == 200
        assert expected in response.content


async def test_tokenize_counts_what_usage_reports(
    client: httpx.AsyncClient, quirks: Quirks
) -> None:
    """A prompt's count from the tokenize endpoint equals the completion's prompt_tokens."""
    text = "Count these words, please."
    answer = await client.post("/v1/completions", json={"prompt": text, "max_tokens": 2})
    prompt_tokens = answer.json()["usage"]["prompt_tokens"]
    if not quirks.tokenize_paths:
        assert (await client.post("/tokenize", json={"prompt": text})).status_code == 404
        return
    path = quirks.tokenize_paths[0]
    if quirks.tokenize == "llama_cpp":
        reply = (await client.post(path, json={"content": text})).json()
        assert len(reply["tokens"]) == prompt_tokens
        assert all(isinstance(token, int) for token in reply["tokens"])
    elif quirks.tokenize == "llama_cpp_python":
        reply = (await client.post(path, json={"input": text, "model": "unit-model"})).json()
        assert reply == {"count": prompt_tokens}
    else:
        reply = (await client.post(path, json={"model": "unit-model", "prompt": text})).json()
        assert reply["count"] == len(reply["tokens"]) == prompt_tokens
        assert reply["max_model_len"] == PROFILE.max_model_len


async def test_vllm_tokenize_counts_chat_messages_like_the_completion() -> None:
    transport = httpx.ASGITransport(app=build_sim_app(PROFILE))
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        counted = (await client.post("/tokenize", json=CHAT)).json()["count"]
        answer = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
    assert counted == answer.json()["usage"]["prompt_tokens"]


async def test_stream_usage_only_where_honoured(client: httpx.AsyncClient, quirks: Quirks) -> None:
    payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    chunks = _sse_chunks((await client.post("/v1/chat/completions", json=payload)).content)
    usage_chunks = [chunk for chunk in chunks if chunk.get("usage")]
    if quirks.stream_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == []
        assert chunks[-1] is usage_chunks[0]
        assert ("usage" in chunks[0]) == quirks.null_usage_in_chunks
    else:
        assert usage_chunks == [] and all("usage" not in chunk for chunk in chunks)


async def test_non_stream_answers_carry_usage(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})).json()
    usage = body["usage"]
    assert usage["completion_tokens"] <= 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_n_is_served_ignored_or_refused(client: httpx.AsyncClient, quirks: Quirks) -> None:
    response = await client.post("/v1/chat/completions", json={**CHAT, "n": 3, "max_tokens": 4})
    if quirks.n == "refused":
        assert response.status_code == quirks.n_status == 500  # llama.cpp: a runtime_error
        assert response.json()["error"]["message"] == "Only one completion choice is allowed"
        return
    body = response.json()
    expected = 3 if quirks.n == "supported" else 1
    assert [choice["index"] for choice in body["choices"]] == list(range(expected))
    lengths = sum(count_words(choice["message"]["content"]) for choice in body["choices"])
    assert body["usage"]["completion_tokens"] == lengths


def count_words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize(
    "quirks", [q for _, q in sorted(QUIRKS.items()) if q.n == "supported"], ids=lambda q: q.name
)
async def test_streamed_n_interleaves_the_choices(quirks: Quirks) -> None:
    transport = httpx.ASGITransport(app=build_sim_app(PROFILE, quirks=quirks))
    payload = {**CHAT, "n": 2, "max_tokens": 5, "stream": True}
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        chunks = _sse_chunks((await client.post("/v1/chat/completions", json=payload)).content)
    finished = [
        choice["index"]  # type: ignore[index]
        for chunk in chunks
        for choice in chunk["choices"]  # type: ignore[attr-defined]
        if choice["finish_reason"]
    ]
    assert sorted(finished) == [0, 1]


def _error(body: dict[str, object]) -> dict[str, object]:
    error = body.get("error", body)
    assert isinstance(error, dict)
    return error


async def test_validation_errors_have_the_servers_status_and_shape(
    client: httpx.AsyncClient, quirks: Quirks
) -> None:
    response = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": "many"})
    if quirks.lenient_types:
        assert response.status_code == 200  # llama.cpp falls back to the default
        return
    assert response.status_code == quirks.validation_status
    body = response.json()
    error = _error(body)
    assert "max_tokens" in str(error["message"])
    if quirks.errors == "sglang":
        assert (body["object"], body["code"]) == ("error", 400)  # flat legacy body
    elif quirks.errors == "vllm":
        assert (error["type"], error["code"]) == ("BadRequestError", 400)
    elif quirks.errors == "llama_cpp_python":
        assert (response.status_code, error["type"]) == (500, "internal_server_error")
    else:
        assert error["type"] == "invalid_request_error"


async def test_missing_messages(client: httpx.AsyncClient, quirks: Quirks) -> None:
    response = await client.post("/v1/chat/completions", json={"model": "unit-model"})
    if not quirks.messages_required:
        assert response.status_code == 200  # llama-cpp-python: messages default to []
        return
    assert response.status_code == 400
    if quirks.errors == "llama_cpp":
        assert set(response.json()["error"]) == {"code", "message", "type"}


async def test_unknown_models(client: httpx.AsyncClient, quirks: Quirks) -> None:
    response = await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"})
    if quirks.check_model:
        assert response.status_code == 404
        if quirks.errors == "ollama":
            assert _error(response.json())["type"] == "not_found_error"
    else:
        assert response.status_code == 200
        assert response.json()["model"] == "gpt-4o"  # echoed, served by the one model


async def test_output_beyond_the_context(client: httpx.AsyncClient, quirks: Quirks) -> None:
    response = await client.post(
        "/v1/chat/completions", json={**CHAT, "max_tokens": PROFILE.max_model_len}
    )
    if quirks.context_check == "prompt_and_output":
        assert response.status_code == 400
    else:
        assert response.status_code == 200  # cut at the window's end instead


async def test_stream_options_without_a_stream(client: httpx.AsyncClient, quirks: Quirks) -> None:
    payload = {**CHAT, "stream_options": {"include_usage": True}}
    response = await client.post("/v1/chat/completions", json=payload)
    assert response.status_code == (400 if quirks.stream_options_need_stream else 200)


def test_error_bodies_per_style() -> None:
    bodies = {
        name: orjson.loads(quirks.error_body(400, "bad", "invalid_request_error", "n", None))
        for name, quirks in QUIRKS.items()
    }
    assert bodies["vllm"] == {
        "error": {"message": "bad", "type": "BadRequestError", "param": "n", "code": 400}
    }
    assert bodies["sglang"] == {
        "object": "error",
        "message": "bad",
        "type": "Bad Request",
        "param": "n",
        "code": 400,
    }
    assert bodies["llama_cpp"] == {
        "error": {"code": 400, "message": "bad", "type": "invalid_request_error"}
    }
    assert bodies["ollama"]["error"]["param"] is None
    assert bodies["openai"]["error"]["param"] == "n"

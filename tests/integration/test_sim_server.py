"""Real sim servers on loopback, driven over HTTP with httpx (and aiohttp for resets)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import aiohttp
import httpx
import orjson
import pytest

from gateway.sim.faults import FaultConfig
from gateway.sim.profile import PROFILES, SimProfile
from gateway.sim.server import RunningSim, start_sim_server

pytestmark = pytest.mark.integration

MODEL = "sim-test-model"
FAST = SimProfile(
    model=MODEL, ttft_ms=20.0, prefill_ms_per_token=0.0, itl_ms=2.0, max_num_seqs=8, seed=1
)
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say something, please."}]}


@pytest.fixture
async def sim() -> AsyncIterator[RunningSim]:
    running = await start_sim_server(FAST)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def client(sim: RunningSim) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sim.port}", timeout=5.0) as http:
        yield http


def _events(body: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    assert body.endswith("\n\n")
    blocks = body.split("\n\n")[:-1]
    assert all(block.startswith("data: ") for block in blocks)
    return [block.removeprefix("data: ") for block in blocks]


def _chunks(body: str) -> list[dict[str, object]]:
    events = _events(body)
    assert events[-1] == "[DONE]"
    return [orjson.loads(event) for event in events[:-1]]


async def _stats(client: httpx.AsyncClient) -> dict[str, object]:
    response = await client.get("/admin/stats")
    assert response.status_code == 200
    stats: dict[str, object] = response.json()
    return stats


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _set_faults(client: httpx.AsyncClient, **faults: object) -> None:
    response = await client.post("/admin/faults", json=faults)
    assert response.status_code == 200, response.text


# -- shapes --------------------------------------------------------------------------------


async def test_sim_url_is_an_openai_base_url(sim: RunningSim) -> None:
    assert sim.url == f"http://127.0.0.1:{sim.port}/v1"
    assert sim.port > 0


async def test_chat_completion_shape(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    usage = body["usage"]
    assert usage["prompt_tokens"] == 5 + 4
    assert usage["completion_tokens"] == len(choice["message"]["content"].split())
    assert 20 <= usage["completion_tokens"] <= 120
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_text_completion_shape(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "One two"})
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert set(choice) == {"index", "text", "finish_reason", "logprobs"}
    assert body["usage"]["prompt_tokens"] == 2


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_is_honoured(client: httpx.AsyncClient, field: str) -> None:
    response = await client.post("/v1/chat/completions", json={**CHAT, field: 3})
    body = response.json()
    assert body["usage"]["completion_tokens"] == 3
    assert len(body["choices"][0]["message"]["content"].split()) == 3
    assert body["choices"][0]["finish_reason"] == "length"


async def test_the_same_request_gets_the_same_answer(client: httpx.AsyncClient) -> None:
    async def text(payload: Mapping[str, object]) -> str:
        response = await client.post("/v1/chat/completions", json=payload)
        content: str = response.json()["choices"][0]["message"]["content"]
        return content

    first = await text(CHAT)
    assert await text(CHAT) == first
    assert await text({**CHAT, "seed": 42}) != first


async def test_chat_stream_shape(client: httpx.AsyncClient) -> None:
    whole = (await client.post("/v1/chat/completions", json=CHAT)).json()
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = _chunks(response.text)
    ids = {chunk["id"] for chunk in chunks}
    created = {chunk["created"] for chunk in chunks}
    assert len(ids) == 1
    assert len(created) == 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]  # type: ignore[index]
    reasons = [chunk["choices"][0]["finish_reason"] for chunk in chunks]  # type: ignore[index]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[-1] == {}
    assert reasons[:-1] == [None] * (len(chunks) - 1)
    assert reasons[-1] == "stop"
    text = "".join(delta["content"] for delta in deltas[1:-1])
    assert len(deltas) - 2 == whole["usage"]["completion_tokens"]
    assert text == whole["choices"][0]["message"]["content"]


async def test_stream_usage_follows_openai_rules(client: httpx.AsyncClient) -> None:
    payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 4}
    response = await client.post("/v1/chat/completions", json=payload)
    chunks = _chunks(response.text)
    *answer, last = chunks
    assert all(chunk["usage"] is None for chunk in answer)
    assert answer[-1]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    assert len(answer) == 1 + 4 + 1  # role, four tokens, finish
    assert last["id"] == answer[0]["id"]


async def test_text_completion_stream(client: httpx.AsyncClient) -> None:
    payload = {"model": MODEL, "prompt": "Hi", "stream": True, "max_tokens": 5}
    chunks = _chunks((await client.post("/v1/completions", json=payload)).text)
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    choices = [chunk["choices"][0] for chunk in chunks]  # type: ignore[index]
    assert len(choices) == 5 + 1
    assert [choice["finish_reason"] for choice in choices] == [None] * 5 + ["length"]
    assert len("".join(choice["text"] for choice in choices).split()) == 5


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/chat/completions", {**CHAT, "model": "gpt-4o"}),
        ("/v1/completions", {"model": "gpt-4o", "prompt": "x"}),
        ("/v1/embeddings", {"model": "gpt-4o", "input": "x"}),
    ],
)
async def test_unknown_model_is_a_404_in_vllm_shape(
    client: httpx.AsyncClient, path: str, payload: dict[str, object]
) -> None:
    response = await client.post(path, json=payload)
    assert response.status_code == 404
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "gpt-4o" in error["message"]
    assert MODEL in error["message"]
    # vLLM's ErrorInfo: the type names the error class, the code is the HTTP status.
    assert (error["type"], error["code"], error["param"]) == ("NotFoundError", 404, "model")


async def test_missing_model_means_the_served_one(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert response.status_code == 200
    assert response.json()["model"] == MODEL


@pytest.mark.parametrize(
    "content",
    [b"{oops", b"[]", orjson.dumps({**CHAT, "n": 0}), orjson.dumps({"model": MODEL})],
)
async def test_bad_requests_are_400_in_vllm_shape(
    client: httpx.AsyncClient, content: bytes
) -> None:
    response = await client.post("/v1/chat/completions", content=content)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("BadRequestError", 400)


async def test_context_overflow_is_a_400(client: httpx.AsyncClient) -> None:
    payload = {**CHAT, "max_tokens": FAST.max_model_len}
    response = await client.post("/v1/chat/completions", json=payload)
    assert response.status_code == 400
    assert "maximum context length" in response.json()["error"]["message"]


# -- other endpoints -----------------------------------------------------------------------


async def test_health_is_an_empty_200(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.content == b""


async def test_models_lists_the_served_model(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [model["id"] for model in body["data"]] == [MODEL]
    assert body["data"][0]["object"] == "model"


async def test_embeddings_are_deterministic_unit_vectors(client: httpx.AsyncClient) -> None:
    payload = {"model": MODEL, "input": ["alpha beta", "gamma", "alpha beta"]}
    body = (await client.post("/v1/embeddings", json=payload)).json()
    assert body["object"] == "list"
    assert body["model"] == MODEL
    vectors = [item["embedding"] for item in body["data"]]
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert all(len(vector) == 16 for vector in vectors)
    assert all(math.isclose(math.hypot(*vector), 1.0) for vector in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    assert body["usage"] == {"prompt_tokens": 2 + 1 + 2, "total_tokens": 5}
    single = (await client.post("/v1/embeddings", json={"input": "gamma"})).json()
    assert single["data"][0]["embedding"] == vectors[1]


async def test_metrics_use_vllm_names(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    label = f'model_name="{MODEL}"'
    for gauge in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ):
        assert f"{gauge}{{{label}}} 0.0" in text
    assert f"vllm:time_to_first_token_seconds_count{{{label}}} 1.0" in text
    assert f"vllm:e2e_request_latency_seconds_count{{{label}}} 1.0" in text
    assert "vllm:e2e_request_latency_seconds_bucket{le=" in text
    # The prefix cache counters, in prompt tokens: 9 queried, nothing cached yet.
    assert f"vllm:prefix_cache_queries_total{{{label}}} 9.0" in text
    assert f"vllm:prefix_cache_hits_total{{{label}}} 0.0" in text


async def test_stats_count_requests_and_keep_the_last_body(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1, "user": "u1"})
    await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    stats = await _stats(client)
    assert stats["requests_total"] == 2
    assert stats["requests_completed"] == 1
    assert stats["requests_failed"] == 1
    assert stats["requests_cancelled"] == 0
    assert (stats["running"], stats["waiting"]) == (0, 0)
    assert stats["last_request"] == {**CHAT, "model": "nope"}


async def test_two_sims_run_side_by_side() -> None:
    small = await start_sim_server(PROFILES["instant"])
    large = await start_sim_server(dataclasses.replace(PROFILES["large"], ttft_ms=1.0, itl_ms=1.0))
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            for running in (small, large):
                models = (await http.get(f"{running.url}/models")).json()
                assert models["data"][0]["id"] == running.service.profile.model
                assert (await http.get(f"http://127.0.0.1:{running.port}/metrics")).is_success
    finally:
        await small.stop()
        await large.stop()


# -- latency and queueing ------------------------------------------------------------------


async def test_first_chunk_arrives_after_the_profile_ttft() -> None:
    profile = SimProfile(
        model=MODEL, ttft_ms=200.0, prefill_ms_per_token=0.0, itl_ms=5.0, max_num_seqs=4
    )
    running = await start_sim_server(profile)
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=5.0) as http:
            started = time.perf_counter()
            payload = {**CHAT, "stream": True, "max_tokens": 3}
            async with http.stream("POST", "/chat/completions", json=payload) as response:
                assert response.status_code == 200
                async for _ in response.aiter_bytes():
                    first_chunk_s = time.perf_counter() - started
                    break
        assert 0.18 <= first_chunk_s < 2.0
    finally:
        await running.stop()


async def test_requests_beyond_max_num_seqs_wait_in_line() -> None:
    profile = SimProfile(
        model=MODEL, ttft_ms=600.0, prefill_ms_per_token=0.0, itl_ms=1.0, max_num_seqs=2
    )
    running = await start_sim_server(profile)
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=5.0) as http:
            payload = {**CHAT, "max_tokens": 1}
            calls = [
                asyncio.create_task(http.post("/chat/completions", json=payload)) for _ in range(4)
            ]

            async def two_by_two() -> bool:
                stats = await _stats_at(http, running)
                return (stats["running"], stats["waiting"]) == (2, 2)

            await _eventually(two_by_two, timeout=2.0)
            metrics = (await http.get(f"http://127.0.0.1:{running.port}/metrics")).text
            assert f'vllm:num_requests_waiting{{model_name="{MODEL}"}} 2.0' in metrics
            assert f'vllm:num_requests_running{{model_name="{MODEL}"}} 2.0' in metrics
            started = time.perf_counter()
            responses = await asyncio.gather(*calls)
            assert all(response.status_code == 200 for response in responses)
            # The second pair waited for the first pair's prefill before starting its own.
            assert time.perf_counter() - started >= 0.5
    finally:
        await running.stop()


async def _stats_at(http: httpx.AsyncClient, running: RunningSim) -> dict[str, object]:
    stats: dict[str, object] = (
        await http.get(f"http://127.0.0.1:{running.port}/admin/stats")
    ).json()
    return stats


# -- cancellation ----------------------------------------------------------------------------


async def test_a_client_leaving_mid_stream_is_counted_cancelled(
    client: httpx.AsyncClient,
) -> None:
    payload = {**CHAT, "stream": True, "max_tokens": 400, "ignore_eos": True}
    async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data: ")
    # Leaving the block closed the half-read response, and with it the connection.

    async def cancelled() -> bool:
        stats = await _stats(client)
        return stats["requests_cancelled"] == 1 and stats["running"] == 0

    await _eventually(cancelled)
    stats = await _stats(client)
    assert stats["requests_completed"] == 0


async def test_a_client_leaving_while_generating_is_counted_cancelled(
    client: httpx.AsyncClient,
) -> None:
    payload = {**CHAT, "max_tokens": 1000, "ignore_eos": True}  # about two seconds
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/v1/chat/completions", json=payload, timeout=0.2)

    async def cancelled() -> bool:
        stats = await _stats(client)
        return stats["requests_cancelled"] == 1 and stats["running"] == 0

    await _eventually(cancelled)


# -- faults --------------------------------------------------------------------------------


async def test_faults_are_read_and_replaced_at_run_time(client: httpx.AsyncClient) -> None:
    assert (await client.get("/admin/faults")).json() == FaultConfig().model_dump()
    await _set_faults(client, rate=0.25, kind="503")
    faults = (await client.get("/admin/faults")).json()
    assert (faults["rate"], faults["kind"]) == (0.25, "503")
    bad = await client.post("/admin/faults", json={"rate": 2, "kind": "teapot"})
    assert bad.status_code == 400
    message = bad.json()["error"]["message"]
    assert "rate:" in message
    assert "kind:" in message


async def test_fault_429_carries_retry_after(client: httpx.AsyncClient) -> None:
    await _set_faults(client, rate=1.0, kind="429", retry_after_s=2.5)
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.headers["retry-after-ms"] == "2500"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize("status", [500, 503])
async def test_fault_server_errors(client: httpx.AsyncClient, status: int) -> None:
    await _set_faults(client, rate=1.0, kind=str(status))
    for path, payload in (("/v1/completions", {"prompt": "x"}), ("/v1/embeddings", {"input": "x"})):
        response = await client.post(path, json=payload)
        assert response.status_code == status
        assert response.json()["error"]["type"] == "server_error"
    assert (await _stats(client))["requests_failed"] == 2


async def test_fault_rate_fails_some_requests(client: httpx.AsyncClient) -> None:
    await _set_faults(client, rate=0.5, kind="500")
    payload = {"prompt": "x", "max_tokens": 1}
    statuses = [(await client.post("/v1/completions", json=payload)).status_code for _ in range(40)]
    assert 5 <= statuses.count(500) <= 35
    assert statuses.count(200) + statuses.count(500) == 40


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
async def test_fault_reset_drops_the_connection(
    sim: RunningSim, client: httpx.AsyncClient, path: str
) -> None:
    await _set_faults(client, rate=1.0, kind="reset")
    payload = {**CHAT, "input": "x"}
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.post(f"http://127.0.0.1:{sim.port}{path}", json=payload) as response:
                await response.read()
    # The server itself is fine, and counted the request as failed.
    await _set_faults(client, rate=0.0)
    assert (await client.get("/health")).status_code == 200
    assert (await _stats(client))["requests_failed"] == 1


async def test_fault_hang_never_answers(client: httpx.AsyncClient) -> None:
    await _set_faults(client, rate=1.0, kind="hang")
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, timeout=0.3)

    async def cancelled() -> bool:
        return (await _stats(client))["requests_cancelled"] == 1

    await _eventually(cancelled)


async def test_fault_stall_stops_a_stream_after_some_tokens(client: httpx.AsyncClient) -> None:
    await _set_faults(client, rate=1.0, kind="stall", stall_after_tokens=3)
    payload = {**CHAT, "stream": True}
    received: list[str] = []
    timeout = httpx.Timeout(5.0, read=0.4)
    with pytest.raises(httpx.ReadTimeout):
        async with client.stream(
            "POST", "/v1/chat/completions", json=payload, timeout=timeout
        ) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line:
                    received.append(line)
    chunks = [orjson.loads(line.removeprefix("data: ")) for line in received]
    contents = [chunk["choices"][0]["delta"]["content"] for chunk in chunks]
    assert contents[0] == ""  # the role chunk
    assert len(contents) == 1 + 3

    async def cancelled() -> bool:
        stats = await _stats(client)
        return stats["requests_cancelled"] == 1 and stats["running"] == 0

    await _eventually(cancelled)


async def test_fault_stall_without_a_stream_hangs(client: httpx.AsyncClient) -> None:
    await _set_faults(client, rate=1.0, kind="stall")
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/v1/completions", json={"prompt": "x"}, timeout=0.3)


async def test_faults_given_at_start_apply() -> None:
    running = await start_sim_server(FAST, faults=FaultConfig(rate=1.0, kind="503"))
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=5.0) as http:
            assert (await http.post("/chat/completions", json=CHAT)).status_code == 503
            assert (await http.get("/models")).status_code == 200
    finally:
        await running.stop()


async def test_stop_is_quick_with_a_hung_client(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url, timeout=10.0) as http:
        await http.post(
            f"http://127.0.0.1:{sim.port}/admin/faults", json={"rate": 1, "kind": "hang"}
        )
        hung = asyncio.create_task(http.post("/chat/completions", json=CHAT))

        async def arrived() -> bool:
            return (await _stats_at(http, sim))["requests_total"] == 1

        await _eventually(arrived)
        started = time.perf_counter()
        await sim.stop()
        assert time.perf_counter() - started < 0.9
        with pytest.raises(httpx.TransportError):
            await hung


async def test_instant_profile_answers_streams_and_plain_requests() -> None:
    running = await start_sim_server(dataclasses.replace(PROFILES["instant"], model=MODEL))
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=5.0) as http:
            payload = {**CHAT, "max_tokens": 300, "ignore_eos": True}
            plain = (await http.post("/chat/completions", json=payload)).json()
            assert plain["usage"]["completion_tokens"] == 300
            streamed = await http.post("/chat/completions", json={**payload, "stream": True})
            assert len(_chunks(streamed.text)) == 1 + 300 + 1
    finally:
        await running.stop()


async def test_a_shared_system_prompt_is_served_from_the_prefix_cache() -> None:
    profile = dataclasses.replace(FAST, prefill_ms_per_token=1.0)
    running = await start_sim_server(profile)
    system = {"role": "system", "content": " ".join(["policy"] * 400)}
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=5.0) as http:
            for question in ("first question?", "second question?"):
                body = {"model": MODEL, "max_tokens": 1, "messages": [system, _user(question)]}
                assert (await http.post("/chat/completions", json=body)).status_code == 200
            root = f"http://127.0.0.1:{running.port}"
            metrics = (await http.get(root + "/metrics")).text
            stats = (await http.get(root + "/admin/stats")).json()
    finally:
        await running.stop()
    label = f'model_name="{MODEL}"'
    # 411 prompt tokens each; the second finds the system prompt's 25 whole blocks cached.
    assert f"vllm:prefix_cache_queries_total{{{label}}} 822.0" in metrics
    assert f"vllm:prefix_cache_hits_total{{{label}}} 400.0" in metrics
    assert stats["kv_cache"]["prefix_cache_hits"] == 400
    assert stats["kv_cache"]["blocks_in_use"] == 0


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}

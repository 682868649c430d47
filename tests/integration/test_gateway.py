"""The gateway end to end: the openai SDK and raw httpx against real sim replicas."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.integration.conftest import (
    LARGE,
    SMALL,
    Service,
    Services,
    policy_for,
    set_faults,
    sim_stats,
    start_gateway,
    start_sim,
)

FAST = ("--ttft-ms", "5", "--itl-ms", "1")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sims(log_dir: Path, services: Services) -> dict[str, list[Service]]:
    return {
        "small": [services(start_sim(log_dir, "small", *FAST)) for _ in range(2)],
        "large": [services(start_sim(log_dir, "large", *FAST)) for _ in range(2)],
    }


@pytest.fixture(scope="module")
def gateway(log_dir: Path, services: Services, sims: dict[str, list[Service]]) -> Service:
    policy = policy_for([s.url for s in sims["small"]], [s.url for s in sims["large"]])
    # The sims embed too; a model serves embeddings only where the policy says so.
    policy["models"][SMALL]["endpoints"] = ["chat", "completions", "embeddings"]
    return services(start_gateway(log_dir, policy))


@pytest.fixture(autouse=True)
def no_faults(sims: dict[str, list[Service]]) -> None:
    for sim in sims["small"] + sims["large"]:
        set_faults(sim, rate=0.0)


@pytest.fixture
def client(gateway: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": "Say hello."}], **extra}


@pytest.mark.parametrize(
    ("model", "tier", "concrete"),
    [
        ("auto", "cheap", SMALL),
        ("cheap", "cheap", SMALL),
        ("large", "large", LARGE),
        (LARGE, "large", LARGE),
    ],
)
def test_sdk_chat_by_auto_tier_and_model(
    client: openai.OpenAI, model: str, tier: str, concrete: str
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    completion = raw.parse()
    assert raw.headers["x-triage-tier"] == tier
    assert raw.headers["x-triage-model"] == concrete
    assert len(raw.headers["x-triage-request-id"]) == 24
    assert completion.model == concrete
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    assert completion.choices[0].message.content


def test_sdk_stream_matches_non_stream(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(model="cheap", messages=messages, max_tokens=12)
    chunks = list(
        client.chat.completions.create(model="cheap", messages=messages, max_tokens=12, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    # The gateway asked the backend for usage, and took that chunk out again.
    assert all(c.choices for c in chunks)
    assert len({c.id for c in chunks}) == 1


def test_injected_usage_leaves_no_trace(gateway: Service) -> None:
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=chat(stream=True, max_tokens=4)
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert not any("usage" in line for line in lines)


def test_stream_with_usage_keeps_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="cheap",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="auto", prompt="Once upon a time", max_tokens=6)
    assert whole.usage is not None and whole.usage.completion_tokens == 6
    chunks = list(
        client.completions.create(
            model="auto", prompt="Once upon a time", max_tokens=6, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["auto", "cheap", "large", SMALL, LARGE]


def test_embeddings_pass_through(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=SMALL, input=["a", "b"])
    assert len(result.data) == 2 and result.model == SMALL
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="auto", input="a")
    with pytest.raises(openai.NotFoundError, match="Tiers that serve embeddings: cheap"):
        client.embeddings.create(model=LARGE, input="a")  # not declared to serve embeddings


def test_unused_fields_reach_backend_untouched(
    gateway: Service, sims: dict[str, list[Service]]
) -> None:
    extra = {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "seed": 7,
        "vendor_ext": {"priority": 3},
        "max_tokens": 3,
    }
    response = httpx.post(gateway.url + "/v1/chat/completions", json=chat(model="large", **extra))
    assert response.status_code == 200
    seen = [sim_stats(s).get("last_request") or {} for s in sims["large"]]
    forwarded = next(r for r in seen if r.get("vendor_ext"))
    assert forwarded["model"] == LARGE
    for key, value in extra.items():
        assert forwarded[key] == value


def test_stream_is_relayed_not_buffered(log_dir: Path, services: Services) -> None:
    slow = services(start_sim(log_dir, "small", "--ttft-ms", "100", "--itl-ms", "40"))
    gw = services(start_gateway(log_dir, policy_for([slow.url], [slow.url])))
    body = chat(model=SMALL, stream=True, max_tokens=25)

    def first_chunk_and_total(url: str) -> tuple[float, float]:
        start = time.perf_counter()
        first = None
        with httpx.stream("POST", url + "/chat/completions", json=body, timeout=10) as response:
            for line in response.iter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.perf_counter() - start
        assert first is not None
        return first, time.perf_counter() - start

    direct = sorted(first_chunk_and_total(slow.url)[0] for _ in range(3))[1]
    through = [first_chunk_and_total(gw.url + "/v1") for _ in range(3)]
    first, total = sorted(through)[1]
    # ~25 tokens x 40 ms of decoding remain after the first chunk arrives.
    assert total - first > 0.5
    # Time to first token through the gateway tracks the backend's own.
    assert first - direct < 0.05, (first, direct)


def test_client_disconnect_cancels_upstream(log_dir: Path, services: Services) -> None:
    slow = services(start_sim(log_dir, "small", "--ttft-ms", "5", "--itl-ms", "50"))
    gw = services(start_gateway(log_dir, policy_for([slow.url], [slow.url])))
    before = sim_stats(slow)["requests_cancelled"]
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json=chat(stream=True, max_tokens=200), timeout=10
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sim_stats(slow)["requests_cancelled"] == before:
        time.sleep(0.05)
    assert sim_stats(slow)["requests_cancelled"] == before + 1
    assert sim_stats(slow)["running"] == 0


@pytest.mark.parametrize("prompt_chars", [11, 300_000])
def test_client_timeout_on_a_plain_request_cancels_upstream(
    log_dir: Path, services: Services, prompt_chars: int
) -> None:
    """A non-streamed answer is sent only at the end: a client that gives up before then
    (an SDK timeout) must free the GPU slot, not leave it generating for nobody. A body
    larger than the server's read buffer must not hide the disconnect."""
    sim_args = ["--ttft-ms", "5", "--itl-ms", "50", "--max-model-len", "1000000"]
    slow = services(start_sim(log_dir, "small", *sim_args))
    gw = services(start_gateway(log_dir, policy_for([slow.url], [slow.url])))
    before = sim_stats(slow)["requests_cancelled"]
    body = chat(model="cheap", max_tokens=200, ignore_eos=True)
    body["messages"][0]["content"] = "x " * (prompt_chars // 2)
    with pytest.raises(httpx.ReadTimeout):  # 200 tokens take 10 s
        httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sim_stats(slow)["requests_cancelled"] == before:
        time.sleep(0.05)
    assert sim_stats(slow)["requests_cancelled"] == before + 1
    assert sim_stats(slow)["running"] == 0
    metrics = httpx.get(gw.url + "/metrics", timeout=5).text
    assert 'status="499"' in metrics
    in_flight = [m for m in metrics.splitlines() if m.startswith("triage_requests_in_flight")]
    assert in_flight and float(in_flight[0].split()[-1]) == 0


# --- errors ---------------------------------------------------------------------------------


def test_malformed_json_is_400(gateway: Service) -> None:
    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=b"{oops",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


def test_invalid_field_is_named(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="auto", messages=[], max_tokens=3)
    assert info.value.param == "messages"  # type: ignore[attr-defined]


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-7", messages=[{"role": "user", "content": "x"}])
    assert "cheap, large" in str(info.value)


def test_body_over_limit_is_413(gateway: Service) -> None:
    big = chat(padding="x" * (11 * 1024 * 1024))
    response = httpx.post(gateway.url + "/v1/chat/completions", content=orjson.dumps(big))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_unknown_route_is_openai_shaped(gateway: Service) -> None:
    response = httpx.get(gateway.url + "/v1/nothing")
    assert response.status_code == 404
    assert "error" in response.json()


@pytest.mark.parametrize(
    ("kind", "error_class", "status"),
    [
        ("429", openai.RateLimitError, 429),
        ("500", openai.InternalServerError, 502),
        ("503", openai.InternalServerError, 503),
    ],
)
def test_backend_errors_map_to_sdk_exceptions(
    client: openai.OpenAI,
    sims: dict[str, list[Service]],
    kind: str,
    error_class: type[openai.APIStatusError],
    status: int,
) -> None:
    for sim in sims["large"]:
        set_faults(sim, rate=1.0, kind=kind, retry_after_s=7)
    with pytest.raises(error_class) as info:
        client.chat.completions.create(model="large", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == status
    if kind == "429":
        assert info.value.response.headers["retry-after"] == "7"


def test_body_over_limit_is_sdk_status_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "x" * (11 * 1024 * 1024)}]
        )
    assert info.value.status_code == 413


def test_connection_reset_is_502(client: openai.OpenAI, sims: dict[str, list[Service]]) -> None:
    for sim in sims["large"]:
        set_faults(sim, rate=1.0, kind="reset")
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="large", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502


def test_backend_hang_is_504(log_dir: Path, services: Services) -> None:
    hung = services(start_sim(log_dir, "small", *FAST, "--fault-rate", "1", "--fault-kind", "hang"))
    policy = policy_for([hung.url], [hung.url], server={"upstream_timeout_s": 0.5})
    gw = services(start_gateway(log_dir, policy))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="cheap", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 504


def test_stall_mid_stream_ends_with_error_event(log_dir: Path, services: Services) -> None:
    stalls = services(
        start_sim(log_dir, "small", *FAST, "--fault-rate", "1", "--fault-kind", "stall")
    )
    policy = policy_for([stalls.url], [stalls.url], server={"upstream_timeout_s": 0.5})
    gw = services(start_gateway(log_dir, policy))
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json=chat(stream=True), timeout=10
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.status_code == 200
    assert lines[-1] == "data: [DONE]"
    assert orjson.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "upstream_timeout"
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
            model="cheap", messages=[{"role": "user", "content": "x"}], stream=True
        ):
            pass


def test_refused_replica_is_retried_on_another(
    log_dir: Path, services: Services, sims: dict[str, list[Service]]
) -> None:
    dead = f"http://127.0.0.1:{_dead_port()}/v1"
    policy = policy_for(
        [dead, sims["small"][0].url], [sims["large"][0].url], server={"health_check_interval_s": 60}
    )
    gw = services(start_gateway(log_dir, policy))
    for _ in range(4):
        response = httpx.post(
            gw.url + "/v1/chat/completions", json=chat(model="cheap", max_tokens=2)
        )
        assert response.status_code == 200
        assert response.headers["x-triage-tier"] == "cheap"


def test_no_replica_anywhere_is_503(log_dir: Path, services: Services) -> None:
    dead = f"http://127.0.0.1:{_dead_port()}/v1"
    gw = services(start_gateway(log_dir, policy_for([dead], [dead])))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 503
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and httpx.get(gw.url + "/readyz").status_code == 200:
        time.sleep(0.1)
    ready = httpx.get(gw.url + "/readyz")
    assert ready.status_code == 503 and ready.json()["tiers"] == {"cheap": False, "large": False}


def test_fallback_tier_serves_when_default_is_down(
    log_dir: Path, services: Services, sims: dict[str, list[Service]]
) -> None:
    dead = f"http://127.0.0.1:{_dead_port()}/v1"
    gw = services(start_gateway(log_dir, policy_for([dead], [sims["large"][0].url])))
    response = httpx.post(gw.url + "/v1/chat/completions", json=chat(max_tokens=2))
    assert response.status_code == 200
    assert response.headers["x-triage-tier"] == "large"


def test_health_endpoints(gateway: Service) -> None:
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["tiers"] == {"cheap": True, "large": True}


def test_auto_routes_by_classifier(
    log_dir: Path, services: Services, sims: dict[str, list[Service]]
) -> None:
    # The shipped model ranks by prompt length until traffic teaches it more (its card):
    # the hard prompt is a long review request, the easy one a greeting.
    routing = {
        "default_tier": "cheap",
        "classifier": "classifiers/models/default",
        "strong_fraction": 0.5,
    }
    policy = policy_for([sims["small"][0].url], [sims["large"][0].url], routing=routing)
    gw = services(start_gateway(log_dir, policy))
    easy = httpx.post(
        gw.url + "/v1/chat/completions",
        json=chat(max_tokens=2, messages=[{"role": "user", "content": "hi, how are you?"}]),
    )
    hard = httpx.post(
        gw.url + "/v1/chat/completions",
        json=chat(
            max_tokens=2,
            messages=[
                {
                    "role": "user",
                    "content": "Review this Rust crate for soundness: every `unsafe` block, "
                    "the `Send`/`Sync` impls, and the lock ordering between the cache and "
                    "the writer thread. For each problem, give the failing interleaving, a "
                    "minimal test that shows it under loom or miri, and the smallest fix. " * 6,
                }
            ],
        ),
    )
    assert easy.headers["x-triage-tier"] == "cheap"
    assert hard.headers["x-triage-tier"] == "large"
    assert float(easy.headers["x-triage-difficulty"]) < float(hard.headers["x-triage-difficulty"])


def _dead_port() -> int:
    from tests.integration.conftest import free_port

    return free_port()

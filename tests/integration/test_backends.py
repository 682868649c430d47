"""The gateway against every kind of server it claims to support, as the sim's quirk profiles
play them: routing, health, SLO admission, usage accounting and errors.

One gateway and two sims (`--quirks KIND`) per kind, started once for the module; each
model's `server:` names the kind, so the gateway uses that kind's health, metrics and
tokenize paths.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.sim.quirks import QUIRKS, Quirks
from tests.integration.conftest import (
    LARGE,
    SMALL,
    TRIAGE,
    Service,
    policy_for,
    request_line,
    start_gateway,
    start_service,
)
from tests.support.processes import free_port

CHAT = {"messages": [{"role": "user", "content": "Say something short, please."}]}
# Fast sims: the whole module should take well under a minute for all six kinds.
FAST = ("--ttft-ms", "5", "--itl-ms", "1", "--prefill-ms-per-token", "0", "--jitter", "0")


def _start_sim(log_dir: Path, profile: str, kind: str) -> Service:
    port = free_port()
    args = [*TRIAGE, "sim", "--profile", profile, "--port", str(port), "--quirks", kind, *FAST]
    root = f"http://127.0.0.1:{port}"
    # /admin/stats, not /health: several kinds have no health endpoint.
    return start_service(f"sim-{kind}-{port}", args, root + "/admin/stats", root + "/v1", log_dir)


class Kind:
    """One server kind's gateway and sims."""

    def __init__(self, quirks: Quirks, gateway: Service, sims: list[Service]) -> None:
        self.quirks = quirks
        self.gateway = gateway
        self.sims = sims

    def post(self, body: dict[str, Any], **headers: str) -> httpx.Response:
        return httpx.post(
            self.gateway.url + "/v1/chat/completions",
            json=body,
            headers={"authorization": "Bearer unused", **headers},
            timeout=15,
        )

    def gateway_ready(self) -> bool:
        response = httpx.get(self.gateway.url + "/readyz", timeout=5)
        return response.status_code == 200 and bool(response.json()["ready"])


@pytest.fixture(scope="module", params=sorted(QUIRKS))
def kind(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Kind]:
    name: str = request.param
    log_dir = tmp_path_factory.mktemp(f"backends-{name}")
    started: list[Service] = []
    try:
        small = _start_sim(log_dir, "small", name)
        started.append(small)
        large = _start_sim(log_dir, "large", name)
        started.append(large)
        policy = policy_for([small.url], [large.url])
        for model in (SMALL, LARGE):
            policy["models"][model]["server"] = name
        policy["tiers"]["cheap"]["slo"] = {"ttft_ms": 2000, "e2e_ms": 10000}
        gateway = start_gateway(log_dir, policy)
        started.append(gateway)
        yield Kind(QUIRKS[name], gateway, [small, large])
    finally:
        for service in reversed(started):
            service.stop()


def _stream_chunks(response: httpx.Response) -> list[dict[str, Any]]:
    lines = [line for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return [orjson.loads(line.removeprefix("data: ")) for line in lines[:-1]]


# -- routing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["auto", "cheap", SMALL])
def test_routing_serves_auto_tier_and_model(kind: Kind, model: str) -> None:
    response = kind.post({**CHAT, "model": model, "max_tokens": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] <= 4


# -- health ----------------------------------------------------------------------------------


def test_replicas_stay_in_service_at_steady_traffic(kind: Kind) -> None:
    """Over several health intervals (0.5 s), every request is served and /readyz stays true,
    whether the server has a health endpoint, has none (404), or answers it slowly (SGLang)."""
    statuses, ready = [], []
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        statuses.append(kind.post({**CHAT, "model": "cheap", "max_tokens": 2}).status_code)
        readyz = httpx.get(kind.gateway.url + "/readyz", timeout=5)
        ready.append(readyz.status_code == 200)
        time.sleep(0.1)
    assert set(statuses) == {200}, statuses
    assert all(ready), ready


# -- SLO admission ---------------------------------------------------------------------------


def test_a_tier_with_an_slo_serves_its_requests(kind: Kind) -> None:
    statuses = [
        kind.post({**CHAT, "model": "cheap", "max_tokens": 8, "stream": stream}).status_code
        for stream in (False, True, False, True, False)
    ]
    assert statuses == [200] * 5


# -- usage accounting ------------------------------------------------------------------------


def test_the_request_log_counts_the_backends_usage(kind: Kind) -> None:
    response = kind.post({**CHAT, "model": "cheap", "max_tokens": 6})
    assert response.status_code == 200
    usage = response.json()["usage"]
    line = request_line(kind.gateway, response.headers["x-triage-request-id"])
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )


def test_a_stream_gets_the_usage_chunk_it_asked_for(kind: Kind) -> None:
    """From the backend, or (llama-cpp-python ignores stream_options) counted by the gateway
    with the backend's tokenizer."""
    body = {**CHAT, "model": "cheap", "max_tokens": 5, "stream": True}
    response = kind.post({**body, "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    chunks = _stream_chunks(response)
    usage = chunks[-1].get("usage")
    assert chunks[-1]["choices"] == [] and usage, chunks[-1]
    assert 0 < usage["completion_tokens"] <= 5
    line = request_line(kind.gateway, response.headers["x-triage-request-id"])
    assert line["completion_tokens"] == usage["completion_tokens"]
    assert line["usage_source"] == ("backend" if kind.quirks.stream_usage else "tokenized")


# -- errors ----------------------------------------------------------------------------------


def test_a_backend_validation_error_reaches_the_client_in_openai_shape(kind: Kind) -> None:
    """A field the gateway passes on unchecked (vLLM's `min_tokens`) and the backend refuses:
    every kind answers its own way (400; llama-cpp-python 500; llama.cpp ignores it). The
    client gets the backend's message in OpenAI's shape: a 4xx as the backend said it, a
    backend's 500 as 502 (the gateway cannot know a 500 was the request's fault), and the
    replicas stay in service either way."""
    response = kind.post({**CHAT, "model": SMALL, "min_tokens": "many"})
    if kind.quirks.lenient_types:
        assert response.status_code == 200  # llama.cpp falls back to the default
        return
    expected = 502 if kind.quirks.validation_status >= 500 else kind.quirks.validation_status
    assert response.status_code == expected, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert "min_tokens" in error["message"]
    for _ in range(3):
        ok = kind.post({**CHAT, "model": SMALL, "max_tokens": 2})
        assert ok.status_code == 200, ok.text
    assert kind.gateway_ready()

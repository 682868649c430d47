"""Usage a backend did not report, and the model name answers carry, through the gateway.

The backend is `tests/support/fake_llama_cpp_python.py`, a real server in its own process
that behaves as llama-cpp-python does here: no usage in streams, whatever the request's
`stream_options`, and a tokenize-count endpoint.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.tokenize import render_chat, template_tokens
from tests.integration.conftest import (
    Service,
    Services,
    request_line,
    start_gateway,
    start_service,
)
from tests.support.fake_llama_cpp_python import count_tokens
from tests.support.processes import free_port

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "how many tokens is this"}]
TOKENIZED_PROMPT = count_tokens(render_chat(MESSAGES)) + template_tokens(MESSAGES)


def start_fake(log_dir: Path, *flags: str) -> Service:
    port = free_port()
    args = [sys.executable, "-m", "tests.support.fake_llama_cpp_python", "--port", str(port)]
    root = f"http://127.0.0.1:{port}"
    return start_service(
        f"fake-lcp-{port}", [*args, *flags], root + "/health", root + "/v1", log_dir
    )


@pytest.fixture(scope="module")
def fake(log_dir: Path, services: Services) -> Service:
    return services(start_fake(log_dir))


@pytest.fixture(scope="module")
def fake_no_json_usage(log_dir: Path, services: Services) -> Service:
    return services(start_fake(log_dir, "--no-json-usage"))


@pytest.fixture(scope="module")
def gateway(
    log_dir: Path, services: Services, fake: Service, fake_no_json_usage: Service
) -> Service:
    lcp = {"server": "llama_cpp_python", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}
    policy = {
        "version": 1,
        "server": {"upstream_timeout_s": 5, "health_check_interval_s": 0.5},
        "models": {
            "tiny-large": {**lcp, "replicas": [fake.url], "served_name": "tiny-large-srv"},
            "tiny-guess": {**lcp, "replicas": [fake.url], "tokenize_path": None},
            "tiny-bare": {**lcp, "replicas": [fake_no_json_usage.url]},
        },
        "tiers": {
            "large": {"models": ["tiny-large"]},
            "guess": {"models": ["tiny-guess"]},
            "bare": {"models": ["tiny-bare"]},
        },
        "routing": {"default_tier": "large"},
    }
    return services(start_gateway(log_dir, policy))


# --- helpers -------------------------------------------------------------------------------


def chat(gateway: Service, **body: Any) -> httpx.Response:
    payload = {"model": "large", "messages": MESSAGES, "max_tokens": 3, **body}
    return httpx.post(gateway.url + "/v1/chat/completions", json=payload, timeout=10)


def stream(gateway: Service, **body: Any) -> tuple[httpx.Headers, list[bytes]]:
    """The response headers and the `data:` payloads of a streamed chat request."""
    payload = {"model": "large", "messages": MESSAGES, "max_tokens": 3, "stream": True, **body}
    url = gateway.url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=payload, timeout=10) as response:
        assert response.status_code == 200, response.read()
        data = [line[6:].encode() for line in response.iter_lines() if line.startswith("data: ")]
        return response.headers, data


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_until(gateway: Service, ready: Callable[[Samples], bool]) -> Samples:
    deadline = time.monotonic() + 5
    while True:
        text = httpx.get(gateway.url + "/metrics", timeout=5).text
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def unreported(samples: Samples, model: str, source: str, kind: str) -> float:
    """`triage_tokens_unreported_total` of one model, source and type, over its other labels."""
    wanted = {("model", model), ("source", source), ("type", kind)}
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "triage_tokens_unreported_total" and wanted <= labels
    )


def tokenize_calls(fake: Service) -> int:
    stats = httpx.get(fake.url.removesuffix("/v1") + "/stats", timeout=5).json()
    return int(stats["tokenize"])


# --- usage the backend did not report ------------------------------------------------------


def test_a_stream_that_asked_for_usage_gets_the_tokenized_usage_chunk(
    gateway: Service, fake: Service
) -> None:
    headers, data = stream(gateway, stream_options={"include_usage": True})
    assert data[-1] == b"[DONE]"
    last = orjson.loads(data[-2])
    assert last["choices"] == []
    assert last["usage"] == {
        "prompt_tokens": TOKENIZED_PROMPT,
        "completion_tokens": 3,
        "total_tokens": TOKENIZED_PROMPT + 3,
    }
    assert last["id"] == "chatcmpl-fake" and last["object"] == "chat.completion.chunk"
    assert last["model"] == "tiny-large"
    line = request_line(gateway, headers["x-triage-request-id"])
    assert line["usage_source"] == "tokenized"
    assert (line["prompt_tokens"], line["completion_tokens"]) == (TOKENIZED_PROMPT, 3)


def test_a_stream_that_did_not_ask_gets_no_usage_chunk_but_is_still_counted(
    gateway: Service, fake: Service
) -> None:
    before = tokenize_calls(fake)
    counted = unreported(scrape_until(gateway, bool), "tiny-large", "tokenized", "output")
    headers, data = stream(gateway)
    chunks = [orjson.loads(d) for d in data[:-1]]
    assert all(chunk["choices"] for chunk in chunks)
    assert not any(chunk.get("usage") for chunk in chunks)
    line = request_line(gateway, headers["x-triage-request-id"])
    assert line["usage_source"] == "tokenized"
    assert (line["prompt_tokens"], line["completion_tokens"]) == (TOKENIZED_PROMPT, 3)
    assert tokenize_calls(fake) > before
    samples = scrape_until(
        gateway, lambda s: unreported(s, "tiny-large", "tokenized", "output") > counted
    )
    assert unreported(samples, "tiny-large", "tokenized", "output") == counted + 3
    assert unreported(samples, "tiny-large", "estimated", "output") == 0


def test_without_a_tokenizer_the_estimate_is_marked_and_counts_content_chunks(
    gateway: Service,
) -> None:
    counted = unreported(scrape_until(gateway, bool), "tiny-guess", "estimated", "output")
    headers, data = stream(
        gateway, model="guess", max_tokens=5, stream_options={"include_usage": True}
    )
    usage = orjson.loads(data[-2])["usage"]
    assert usage["completion_tokens"] == 5  # one per content delta
    assert usage["prompt_tokens"] > len(MESSAGES[0]["content"]) // 4 + 1  # not chars/4 + 1
    line = request_line(gateway, headers["x-triage-request-id"])
    assert line["usage_source"] == "estimated"
    assert line["completion_tokens"] == 5
    samples = scrape_until(
        gateway, lambda s: unreported(s, "tiny-guess", "estimated", "output") > counted
    )
    assert unreported(samples, "tiny-guess", "estimated", "output") == counted + 5


def test_a_non_streamed_answer_without_usage_is_tokenized_after_it_is_sent(
    gateway: Service,
) -> None:
    response = chat(gateway, model="bare")
    assert response.status_code == 200
    assert "usage" not in response.json()  # the client gets the backend's answer as it is
    line = request_line(gateway, response.headers["x-triage-request-id"])
    assert line["usage_source"] == "tokenized"
    assert (line["prompt_tokens"], line["completion_tokens"]) == (TOKENIZED_PROMPT, 3)


def test_usage_the_backend_reported_is_marked_as_the_backends(gateway: Service) -> None:
    response = chat(gateway)
    line = request_line(gateway, response.headers["x-triage-request-id"])
    assert line["usage_source"] == "backend"
    assert line["completion_tokens"] == response.json()["usage"]["completion_tokens"]


# --- the name answers carry ----------------------------------------------------------------


@pytest.mark.parametrize("asked", ["large", "tiny-large", "auto"])
def test_answers_carry_the_policy_model_name_not_the_served_one(
    gateway: Service, asked: str
) -> None:
    response = chat(gateway, model=asked)
    assert response.status_code == 200
    assert response.json()["model"] == "tiny-large" == response.headers["x-triage-model"]
    assert b"tiny-large-srv" not in response.content
    _, data = stream(gateway, model=asked, stream_options={"include_usage": True})
    chunks = [orjson.loads(d) for d in data[:-1]]
    assert len(chunks) == 6  # role, three tokens, finish, usage
    assert {chunk["model"] for chunk in chunks} == {"tiny-large"}


def test_the_served_name_is_not_a_name_clients_can_ask_for(gateway: Service) -> None:
    response = chat(gateway, model="tiny-large-srv")
    # The backend's name for a model stays between the gateway and the backend: one name
    # per model for clients, and the 404 lists the names to use instead.
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert "tiny-large" in message.removeprefix("The model 'tiny-large-srv'")
    assert "tiny-large-srv" not in message.removeprefix("The model 'tiny-large-srv'")


def test_cached_replays_carry_the_policy_model_name(gateway: Service) -> None:
    words = {"messages": [{"role": "user", "content": "cache this name"}], "temperature": 0}
    first, again = chat(gateway, **words), chat(gateway, **words)
    assert again.headers["x-triage-cache"] == "hit"
    assert first.json()["model"] == again.json()["model"] == "tiny-large"
    body = {**words, "max_tokens": 2}
    _, streamed = stream(gateway, **body)
    headers, replayed = stream(gateway, **body, stream_options={"include_usage": True})
    assert headers["x-triage-cache"] == "hit"
    chunks = [orjson.loads(d) for d in streamed[:-1] + replayed[:-1]]
    assert {chunk["model"] for chunk in chunks} == {"tiny-large"}
    assert orjson.loads(replayed[-2])["usage"]["completion_tokens"] == 2

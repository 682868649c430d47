"""The prefix balancer on real sims: sessions stay, hot prefixes spill, ejected replicas'
sessions move, and the sims' own prefix-cache hits rise against round robin."""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway.prefix import replica_id
from tests.integration.conftest import (
    SMALL,
    Service,
    Services,
    metric,
    request_line,
    start_gateway,
    start_sim,
)

FAST = ("--ttft-ms", "1", "--itl-ms", "1", "--prefill-ms-per-token", "0", "--jitter", "0")


def system(name: str) -> str:
    return f"You are the assistant of tenant {name}. " * 200  # ~8k characters


def policy(urls: list[str], balancer: str, model_balancer: str | None = None) -> dict[str, Any]:
    model: dict[str, Any] = {"replicas": urls}
    if model_balancer is not None:
        model["balancer"] = model_balancer
    return {
        "version": 1,
        "server": {
            "balancer": balancer,
            "upstream_timeout_s": 10,
            "health_check_interval_s": 0.2,
            "prefix": {"replica_header": True},
        },
        "models": {SMALL: model},
        "tiers": {"cheap": {"models": [SMALL]}},
        "cache": {"enabled": False},
    }


def ask(gateway: Service, messages: list[dict[str, str]], **extra: Any) -> httpx.Response:
    body = {"model": "auto", "messages": messages, "max_tokens": 4, **extra.pop("body", {})}
    response = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=20, **extra)
    assert response.status_code == 200, response.text
    return response


def prefix_hits(sims: list[Service]) -> tuple[float, float]:
    hits = queries = 0.0
    for sim in sims:
        for line in httpx.get(sim.url[:-3] + "/metrics", timeout=5).text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                hits += float(line.split()[-1])
            elif line.startswith("vllm:prefix_cache_queries_total"):
                queries += float(line.split()[-1])
    return hits, queries


@pytest.fixture(scope="module")
def sims(log_dir: Path, services: Services) -> list[Service]:
    return [services(start_sim(log_dir, "small", *FAST, "--seed", str(i))) for i in range(4)]


@pytest.fixture(scope="module")
def gateway(log_dir: Path, services: Services, sims: list[Service]) -> Service:
    return services(start_gateway(log_dir, policy([s.url for s in sims], "prefix")))


def test_the_turns_of_a_session_land_on_one_replica(gateway: Service) -> None:
    messages = [{"role": "system", "content": "short"}]
    replicas = []
    for turn in range(6):
        messages.append({"role": "user", "content": f"turn {turn} " * 30})
        answer = ask(gateway, messages, headers={"x-session-id": "conversation-1"})
        replicas.append(answer.headers["x-triage-replica"])
        messages.append(
            {"role": "assistant", "content": answer.json()["choices"][0]["message"]["content"]}
        )
    assert len(set(replicas)) == 1
    line = request_line(gateway, answer.headers["x-triage-request-id"])
    assert line["prefix_chars"] > 0  # the conversation so far was expected cached there


def test_a_messages_api_conversation_keys_its_session_on_metadata_user_id(
    gateway: Service,
) -> None:
    # The Messages dialect carries `metadata.user_id` as the chat body's `user`: a session
    # key the policy trusts (`session: any`). Each turn's system prompt is new (~2k
    # characters), so its prefix matches nowhere and would go to the replica holding least:
    # only the session keeps the turns together.
    client = anthropic.Anthropic(base_url=gateway.url, api_key="sk-any", max_retries=0)
    messages: list[anthropic.types.MessageParam] = []
    replicas = []
    for turn in range(6):
        messages.append({"role": "user", "content": f"turn {turn} of s1"})
        raw = client.messages.with_raw_response.create(
            model="auto",
            max_tokens=4,
            system=f"context of turn {turn}. " * 100,
            messages=messages,
            metadata={"user_id": "s1"},
        )
        replicas.append(raw.headers["x-triage-replica"])
        answer = raw.parse()
        text = "".join(block.text for block in answer.content if block.type == "text")
        messages.append({"role": "assistant", "content": text or "ok"})
    assert len(set(replicas)) == 1


def test_a_model_opts_into_the_prefix_balancer_under_the_slo_default(
    log_dir: Path, services: Services, sims: list[Service]
) -> None:
    urls = [s.url for s in sims]
    gateway = services(start_gateway(log_dir, policy(urls, "slo", model_balancer="prefix")))
    messages = [{"role": "system", "content": "short"}]
    replicas = set()
    for turn in range(6):
        messages.append({"role": "user", "content": f"turn {turn} " * 30})
        answer = ask(gateway, messages, headers={"x-session-id": "conversation-3"})
        replicas.add(answer.headers["x-triage-replica"])
    assert len(replicas) == 1
    assert request_line(gateway, answer.headers["x-triage-request-id"])["prefix_chars"] > 0


def test_the_sims_hit_their_prefix_cache_more_than_under_round_robin(
    log_dir: Path, services: Services, sims: list[Service], gateway: Service
) -> None:
    robin = services(start_gateway(log_dir, policy([s.url for s in sims], "round_robin")))
    rates = {}
    for name, target in (("round_robin", robin), ("prefix", gateway)):
        before = prefix_hits(sims)
        for tenant in range(3):  # each tenant's requests in a row: round robin spreads them
            for n in range(4):
                messages = [
                    {"role": "system", "content": system(f"{name}-{tenant}")},
                    {"role": "user", "content": f"question {n}"},
                ]
                ask(target, messages)
        after = prefix_hits(sims)
        rates[name] = (after[0] - before[0]) / (after[1] - before[1])
    assert rates["round_robin"] < 0.1
    assert rates["prefix"] > 0.5
    assert metric(gateway, "triage_prefix_predicted_chars_total", kind="hit") > 0


def test_a_hot_prefix_spills_over_at_the_load_bound(
    log_dir: Path, services: Services, sims: list[Service]
) -> None:
    slow = [
        services(start_sim(log_dir, "small", "--itl-ms", "40", "--jitter", "0")) for _ in range(4)
    ]
    gateway = services(start_gateway(log_dir, policy([s.url for s in slow], "prefix")))
    messages = [{"role": "system", "content": system("hot")}, {"role": "user", "content": "q"}]
    ask(gateway, messages)  # the prefix is now on one replica

    def one(n: int) -> str:
        body = {"max_tokens": 30, "messages": [*messages[:1], {"role": "user", "content": f"q{n}"}]}
        return ask(gateway, [], body=body).headers["x-triage-replica"]

    with ThreadPoolExecutor(12) as pool:
        chosen = collections.Counter(pool.map(one, range(12)))
    assert len(chosen) >= 2  # it spilled over
    assert max(chosen.values()) < 12


def test_an_ejected_replicas_session_moves_without_errors(
    gateway: Service, sims: list[Service]
) -> None:
    messages = [{"role": "system", "content": "short"}, {"role": "user", "content": "hello"}]
    headers = {"x-session-id": "conversation-2"}
    first = ask(gateway, messages, headers=headers).headers["x-triage-replica"]
    # Stop the sim the session is on (the header is opaque: recompute each sim's id).
    victim = next(s for s in sims if replica_id(s.url) == first)
    victim.stop()
    moved = ask(gateway, messages, headers=headers).headers["x-triage-replica"]
    assert moved != first
    assert ask(gateway, messages, headers=headers).headers["x-triage-replica"] == moved


def test_a_responses_conversation_stays_on_one_replica(gateway: Service) -> None:
    """Each turn names the last response (`previous_response_id`, a new id every turn) and
    brings new `instructions` (not carried over, OpenAI's rule): the prompt's prefix matches
    nowhere, and only the stored conversation keeps the turns on one replica."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-any", max_retries=0)
    previous: str | None = None
    replicas = []
    for turn in range(6):
        raw = client.responses.with_raw_response.create(
            model="auto",
            max_output_tokens=4,
            instructions=f"rules of turn {turn}. " * 100,
            input=f"turn {turn} of r1",
            **({} if previous is None else {"previous_response_id": previous}),
        )
        replicas.append(raw.headers["x-triage-replica"])
        previous = raw.parse().id
    assert len(set(replicas)) == 1


def test_a_stateless_agent_keys_its_session_on_prompt_cache_key(gateway: Service) -> None:
    """Codex-style: `store: false`, the whole conversation resent each turn, new
    instructions each turn, and the thread's id in `prompt_cache_key`."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-any", max_retries=0)
    items: list[Any] = []
    replicas = []
    for turn in range(6):
        items.append({"role": "user", "content": f"turn {turn} of thread-9"})
        raw = client.responses.with_raw_response.create(
            model="auto",
            max_output_tokens=4,
            store=False,
            instructions=f"environment at turn {turn}. " * 100,
            input=items,
            prompt_cache_key="thread-9",
        )
        replicas.append(raw.headers["x-triage-replica"])
        items.append({"role": "assistant", "content": raw.parse().output_text or "ok"})
    assert len(set(replicas)) == 1

"""Tiers serve endpoints: `auto` never sends chat to a tier of embedding models declared last."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import (
    Service,
    Services,
    policy_for,
    sim_stats,
    start_gateway,
    start_sim,
)

FAST = ("--ttft-ms", "5", "--itl-ms", "1")
EMBED = "tiny-embed"
# Difficulty scores under classifiers/models/default: 0.183 (below the 0.244 threshold that
# `strong_fraction: 0.9` gives) and 0.268 (above it).
EASY = "Say hello."
HARD = (
    "Prove that there are infinitely many primes p such that p ≡ 3 (mod 4), "
    "and explain why the same argument fails for p ≡ 1 (mod 4). Then state Dirichlet's "
    "theorem on primes in arithmetic progressions, sketch how L-functions enter its proof, "
    "and say which step has no elementary replacement."
)
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embed_sim(log_dir: Path, services: Services) -> Service:
    return services(start_sim(log_dir, "small", "--model", EMBED, *FAST))


@pytest.fixture(scope="module")
def gateway(log_dir: Path, services: Services, embed_sim: Service) -> Service:
    small = services(start_sim(log_dir, "small", *FAST))
    large = services(start_sim(log_dir, "large", *FAST))
    policy = policy_for([small.url], [large.url])
    policy["models"][EMBED] = {"replicas": [embed_sim.url], "endpoints": ["embeddings"]}
    policy["tiers"]["embed"] = {"models": [EMBED]}  # declared last: after the strongest chat tier
    policy["routing"] |= {"classifier": "classifiers/models/default", "strong_fraction": 0.9}
    return services(start_gateway(log_dir, policy))


def chat(gateway: Service, prompt: str, model: str = "auto") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10)


def test_auto_sends_hard_chat_to_the_strongest_chat_tier(
    gateway: Service, embed_sim: Service
) -> None:
    """Defect: `strong_fraction` took the last tier, of embedding models, as the strongest."""
    tiers = {}
    for prompt in (EASY, HARD, HARD):
        answer = chat(gateway, prompt)
        assert answer.status_code == 200, answer.text
        tiers[prompt] = answer.headers["x-triage-tier"]
    assert tiers == {EASY: "cheap", HARD: "large"}
    assert sim_stats(embed_sim)["requests_total"] == 0


def test_the_embeddings_tier_serves_embeddings(gateway: Service, embed_sim: Service) -> None:
    before = sim_stats(embed_sim)["requests_total"]
    for model in ("embed", EMBED):
        body = {"model": model, "input": [f"{model} a", f"{model} b"]}  # no cache hit
        answer = httpx.post(gateway.url + "/v1/embeddings", json=body, timeout=10)
        assert answer.status_code == 200, answer.text
        assert (answer.headers["x-triage-tier"], answer.headers["x-triage-model"]) == (
            "embed",
            EMBED,
        )
        assert len(answer.json()["data"]) == 2
    assert sim_stats(embed_sim)["requests_total"] == before + 2


def test_chat_named_to_the_embeddings_tier_is_404(gateway: Service, embed_sim: Service) -> None:
    before = sim_stats(embed_sim)["requests_total"]
    for model in ("embed", EMBED):
        answer = chat(gateway, EASY, model)
        assert answer.status_code == 404
        error = answer.json()["error"]
        assert error["message"].endswith(
            "serves embeddings, not chat (POST /v1/chat/completions). "
            "Tiers that serve chat: cheap, large."
        )
        assert (error["type"], error["param"], error["code"]) == (
            "invalid_request_error",
            "model",
            "endpoint_not_served",
        )
    body = {"model": "cheap", "input": "a"}
    answer = httpx.post(gateway.url + "/v1/embeddings", json=body, timeout=10)
    assert answer.status_code == 404
    assert answer.json()["error"]["message"] == (
        "The tier 'cheap' serves chat and completions, not embeddings (POST /v1/embeddings). "
        "Tiers that serve embeddings: embed."
    )
    assert sim_stats(embed_sim)["requests_total"] == before

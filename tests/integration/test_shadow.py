"""Shadow comparisons and POST /v1/feedback through real gateway, sim and redis processes.

The sims hold the hidden truth (gateway/sim/judge.py): each question's difficulty against
each model's skill says which answers are right, and a third sim judges. A label is right
when it matches that truth; the judge's lean to position A on a tie is what the two orders
must cancel.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.policy import StoreSettings, parse_policy
from gateway.shadow import SHADOW_TENANT, cap_ledger
from gateway.sim.judge import answer_passes
from gateway.store.redis import RedisStore
from tests.integration.conftest import (
    LARGE,
    SMALL,
    Service,
    Services,
    assert_openai_error,
    eventually,
    policy_for,
    set_faults,
    sim_stats,
    start_gateway,
    start_sim,
)
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

JUDGE = "judge-model"
FAST = ("--ttft-ms", "5", "--itl-ms", "1", "--jitter", "0")


def question(kind: str, start: int = 0) -> str:
    """A question the hidden truth puts in `kind`: `gain` (only the strong model is right),
    `tie` (both right)."""
    for n in range(start, start + 10_000):
        text = f"Question {n}: what is the sum of {n} and {n * 7 % 13} in base ten?"
        weak, strong = answer_passes(text, SMALL), answer_passes(text, LARGE)
        if (kind == "gain" and strong and not weak) or (kind == "tie" and weak and strong):
            return text
    raise AssertionError(f"no {kind} question")


def truth(text: str) -> tuple[int, int]:
    """The (weak, strong) label the hidden truth gives: 0/1 when one is right, 1/1 a tie."""
    weak, strong = answer_passes(text, SMALL), answer_passes(text, LARGE)
    if weak == strong:
        return 1, 1
    return int(weak), int(strong)


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "cheap", "messages": [{"role": "user", "content": text}], **extra}


def rows(path: Path, label: str = "shadow") -> list[dict[str, Any]]:
    if not path.exists():
        return []
    found = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return [row for row in found if row.get("label") == label]


def requests(sim: Service) -> int:
    return int(sim_stats(sim)["requests_total"])


def shadow_policy(
    small: Service, large: Service, judge: Service, path: Path, **shadow: Any
) -> dict[str, Any]:
    return policy_for(
        [small.url],
        [large.url],
        models={JUDGE: {"replicas": [judge.url], "served_name": SMALL}},
        tiers={"judging": {"models": [JUDGE]}},
        routing={
            "default_tier": "cheap",
            "feedback": {"path": str(path)},
            "shadow": {
                "weak": "cheap",
                "strong": "large",
                "sample_rate": 1.0,
                "judge": JUDGE,
                "usd_per_day": 10.0,
                "prompts": "text",
                **shadow,
            },
        },
    )


@pytest.fixture(scope="module")
def sims(log_dir: Path, services: Services) -> tuple[Service, Service, Service]:
    small = services(start_sim(log_dir, "small", *FAST, "--itl-ms", "4"))
    large = services(start_sim(log_dir, "large", *FAST))
    judge = services(start_sim(log_dir, "instant", "--model", SMALL))
    return small, large, judge


@pytest.fixture(scope="module")
def gateway(
    log_dir: Path, services: Services, sims: tuple[Service, Service, Service]
) -> tuple[Service, Path]:
    path = log_dir / "shadow.jsonl"
    return services(start_gateway(log_dir, shadow_policy(*sims, path))), path


def wait_row(path: Path, request_id: str) -> dict[str, Any]:
    assert eventually(lambda: any(r["request_id"] == request_id for r in rows(path)), 10)
    return next(r for r in rows(path) if r["request_id"] == request_id)


@pytest.mark.parametrize("kind", ["gain", "tie"])
def test_a_sampled_answer_is_compared_once_and_labelled_as_the_hidden_truth_says(
    gateway: tuple[Service, Path], sims: tuple[Service, Service, Service], kind: str
) -> None:
    service, path = gateway
    text = question(kind)
    before = [requests(sim) for sim in sims]
    answer = httpx.post(service.url + "/v1/chat/completions", json=chat(text), timeout=10)
    assert answer.status_code == 200 and answer.headers["x-triage-tier"] == "cheap"
    request_id = answer.headers["x-triage-request-id"]
    row = wait_row(path, request_id)
    # One shadow request to the other tier, two judge calls, nothing else.
    assert [requests(sim) - b for sim, b in zip(sims, before, strict=True)] == [1, 1, 2]
    assert (row["weak"], row["strong"]) == truth(text)
    assert row["tier"] == "cheap" and row["shadow_tier"] == "large"
    assert row["prompt"] == text and row["request"]["messages"][0]["content"] == text
    # The sim's judge leans to position A on a tie: asked in both orders, the lean cancels.
    assert row["verdicts"] == (["B", "A"] if kind == "gain" else ["A", "A"])
    assert row["cost_usd"] > 0 and row["models"] == {"weak": SMALL, "strong": LARGE}


def test_a_stream_is_compared_after_the_client_has_all_of_it(
    log_dir: Path, services: Services, sims: tuple[Service, Service, Service], tmp_path: Path
) -> None:
    # Tokens 40 ms apart: the client reads each one (and asks the large sim for its count,
    # on a kept-alive connection) long before the next is sent, so what it sees mid-stream
    # is what the gateway had done by then.
    slow = services(start_sim(log_dir, "small", *FAST, "--itl-ms", "40"))
    _, large, judge = sims
    path = tmp_path / "stream.jsonl"
    service = services(start_gateway(log_dir, shadow_policy(slow, large, judge, path)))
    text = question("gain", start=5000)
    stats = large.url.removesuffix("/v1") + "/admin/stats"
    with httpx.Client(timeout=10) as client:
        before = client.get(stats).json()["requests_total"]
        seen: list[int] = []
        body = chat(text, stream=True)
        with client.stream("POST", service.url + "/v1/chat/completions", json=body) as r:
            request_id = r.headers["x-triage-request-id"]
            for line in r.iter_lines():
                if '"content":"' in line and '"finish_reason":null' in line:
                    seen.append(client.get(stats).json()["requests_total"] - before)
    # The last token is sent with the end of the stream: only those before it count.
    assert len(seen) > 10 and set(seen[:-1]) == {0}, seen
    row = wait_row(path, request_id)
    assert requests(large) - before == 1
    assert (row["weak"], row["strong"]) == truth(text) == (0, 1)


def test_answered_by_the_strong_tier_the_weak_one_is_asked(
    gateway: tuple[Service, Path], sims: tuple[Service, Service, Service]
) -> None:
    service, path = gateway
    small, _, _ = sims
    text = question("gain", start=7000)
    before = requests(small)
    answer = httpx.post(
        service.url + "/v1/chat/completions", json={**chat(text), "model": "large"}, timeout=10
    )
    row = wait_row(path, answer.headers["x-triage-request-id"])
    assert requests(small) - before == 1
    assert row["tier"] == "large" and row["shadow_tier"] == "cheap"
    assert (row["weak"], row["strong"]) == (0, 1)


def test_a_failing_shadow_never_touches_the_client(
    gateway: tuple[Service, Path], sims: tuple[Service, Service, Service]
) -> None:
    service, path = gateway
    _, large, _ = sims
    set_faults(large, rate=1.0, kind="500")
    try:
        before = requests(large)
        answers = [
            httpx.post(service.url + "/v1/chat/completions", json=chat(question("gain", n)))
            for n in (100, 200, 300)
        ]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert all(a.json()["choices"][0]["message"]["content"] for a in answers)
        assert eventually(lambda: requests(large) - before >= 3)
    finally:
        set_faults(large, rate=0.0)
    ids = {a.headers["x-triage-request-id"] for a in answers}
    assert not ids & {row["request_id"] for row in rows(path)}
    # And the gateway still compares once the backend answers again.
    answer = httpx.post(service.url + "/v1/chat/completions", json=chat(question("tie", 400)))
    wait_row(path, answer.headers["x-triage-request-id"])


def test_with_prompts_hashed_no_prompt_text_reaches_the_rows(
    log_dir: Path, services: Services, sims: tuple[Service, Service, Service], tmp_path: Path
) -> None:
    path = tmp_path / "hashed.jsonl"
    policy = shadow_policy(*sims, path, prompts="hash")
    service = services(start_gateway(log_dir, policy))
    text = question("gain", start=9000)
    answer = httpx.post(service.url + "/v1/chat/completions", json=chat(text), timeout=10)
    row = wait_row(path, answer.headers["x-triage-request-id"])
    assert row["prompt"] is None and row["request"] is None
    assert row["features"]["dense"] and row["prompt_sha256"]
    assert (row["weak"], row["strong"]) == (0, 1)
    raw = path.read_bytes()
    assert text.encode() not in raw and b"sum of" not in raw


def shadow_spend(redis_url: str, prefix: str, policy: dict[str, Any], cap: float) -> dict[str, Any]:
    """The shadow tenant's day as the shared store has it: spent and still held."""

    async def read() -> dict[str, Any]:
        store = RedisStore(StoreSettings(redis_url=redis_url, key_prefix=prefix))
        try:
            ledger = cap_ledger(store, parse_policy(policy), cap)
            report = await ledger.usage(SHADOW_TENANT)
            day: dict[str, Any] = report["budgets"][0]
            return day
        finally:
            await store.close()

    return asyncio.run(read())


def test_the_cap_holds_across_two_gateways_sharing_redis(
    log_dir: Path,
    services: Services,
    sims: tuple[Service, Service, Service],
    redis_server: RedisServer,
    prefix: str,
    tmp_path: Path,
) -> None:
    # About three comparisons' worst case: each call holds its max_tokens of output.
    cap = 0.0003
    store = {"redis_url": redis_server.url, "key_prefix": prefix, "timeout_ms": 1000}
    gateways = []
    for name in ("a", "b"):
        policy = shadow_policy(*sims, tmp_path / f"{name}.jsonl", usd_per_day=cap)
        policy["store"] = store
        gateways.append(services(start_gateway(log_dir, policy)))
    sent = 0
    for n in range(16):
        target = gateways[n % 2]
        body = chat(question("gain", 20_000 + 50 * n), max_tokens=60)
        assert httpx.post(target.url + "/v1/chat/completions", json=body).status_code == 200
        sent += 1

    def settled() -> bool:
        day = shadow_spend(redis_server.url, prefix, policy, cap)
        return day["reserved_usd"] == 0 and day["spent_usd"] > 0

    assert eventually(settled, 15)
    day = shadow_spend(redis_server.url, prefix, policy, cap)
    written = rows(tmp_path / "a.jsonl") + rows(tmp_path / "b.jsonl")
    assert 0 < day["spent_usd"] <= cap, day
    assert 0 < len(written) < sent  # the cap stopped comparisons, in both gateways together
    assert sum(row["cost_usd"] for row in written) <= day["spent_usd"] + 1e-12
    assert day["limit_usd"] == cap


def test_feedback_is_scoped_to_the_callers_tenant_and_validated(
    log_dir: Path, services: Services, sims: tuple[Service, Service, Service], tmp_path: Path
) -> None:
    from gateway.policy import hash_key

    path = tmp_path / "feedback.jsonl"
    policy = shadow_policy(*sims, path)
    del policy["routing"]["shadow"]
    policy["auth"] = {"anonymous": None}
    policy["tenants"] = {
        "acme": {"keys": [hash_key("key-acme")]},
        "globex": {"keys": [hash_key("key-globex")]},
    }
    service = services(start_gateway(log_dir, policy))
    acme = {"authorization": "Bearer key-acme"}
    globex = {"authorization": "Bearer key-globex"}
    answer = httpx.post(service.url + "/v1/chat/completions", json=chat("hi"), headers=acme)
    request_id = answer.headers["x-triage-request-id"]
    url = service.url + "/v1/feedback"

    refused = httpx.post(url, json={"request_id": request_id, "score": 1}, headers=globex)
    assert_openai_error(refused, 403, "request_id")
    assert_openai_error(httpx.post(url, json={"request_id": request_id, "score": 1}), 401)
    for bad, param in [
        ({"score": 1}, "request_id"),
        ({"request_id": request_id}, "score"),
        ({"request_id": request_id, "score": 2}, "score"),
        ({"request_id": request_id, "score": -0.5}, "score"),
        ({"request_id": request_id, "score": "up"}, "score"),
        ({"request_id": "", "score": 1}, "request_id"),
        ({"request_id": request_id, "score": 1, "note": "x"}, "note"),
    ]:
        assert_openai_error(httpx.post(url, json=bad, headers=acme), 400, param)
    assert_openai_error(httpx.post(url, content=b"[1]", headers=acme), 400)
    assert rows(path, "feedback") == []  # bad input changes nothing

    scores: list[bool | float] = [True, -1, 0.25]
    for score in scores:
        ok = httpx.post(url, json={"request_id": request_id, "score": score}, headers=acme)
        assert ok.status_code == 200, ok.text
    elsewhere = httpx.post(url, json={"request_id": "from-another-replica", "score": False},
                           headers=globex)  # fmt: skip
    assert elsewhere.json() == {
        "object": "feedback",
        "request_id": "from-another-replica",
        "score": False,
        "quality": 0.0,
    }
    written = rows(path, "feedback")
    assert [(r["request_id"], r["tenant"], r["score"], r["quality"]) for r in written] == [
        (request_id, "acme", True, 1.0),
        (request_id, "acme", -1, 0.0),
        (request_id, "acme", 0.25, 0.25),
        ("from-another-replica", "globex", False, 0.0),
    ]
    routed = [
        orjson.loads(line)
        for line in path.read_bytes().splitlines()
        if orjson.loads(line).get("label") is None
    ]
    assert [(r["request_id"], r["tenant"]) for r in routed] == [(request_id, "acme")]

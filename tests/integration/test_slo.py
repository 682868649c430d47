"""SLO mechanisms end to end on sim replicas with injected faults: hedging, the breaker,
retries, deadlines, shedding by priority, and the baseline balancers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.policy import Server
from tests.integration.conftest import (
    SMALL,
    Service,
    eventually,
    set_faults,
    sim_stats,
    start_gateway,
    start_sim,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        "balancer" not in Server.model_fields,
        reason="needs the SLO policy fields and dispatcher wiring (see gateway/dispatch/)",
    ),
]

FAST = ("--ttft-ms", "5", "--itl-ms", "2", "--jitter", "0")


@pytest.fixture
def stack(
    log_dir: Path, services: Callable[[Service], Service]
) -> Iterator[Callable[..., tuple[list[Service], Service]]]:
    """Start `count` small sims (each with its own flags) and a gateway over them."""
    started: list[Service] = []

    def start(
        sims: list[tuple[str, ...]], slo: dict[str, Any], **sections: Any
    ) -> tuple[list[Service], Service]:
        replicas = [services(start_sim(log_dir, "small", *flags)) for flags in sims]
        started.extend(replicas)
        policy: dict[str, Any] = {
            "version": 1,
            "server": {
                "balancer": "slo",
                "upstream_timeout_s": 10,
                "health_check_interval_s": 0.5,
                "metrics_interval_s": 0.1,
                **sections.pop("server", {}),
            },
            "models": {SMALL: {"replicas": [r.url for r in replicas]}},
            "tiers": {"cheap": {"models": [SMALL], "slo": slo}},
            "cache": {"enabled": False},
            # Every caller may be critical; requests lower that with x-triage-priority.
            "auth": {"anonymous": {"priority": "critical"}},
            **sections,
        }
        gateway = services(start_gateway(log_dir, policy))
        started.append(gateway)
        return replicas, gateway

    yield start
    for service in started:
        service.stop()


def chat(stream: bool = True, max_tokens: int = 8) -> dict[str, Any]:
    return {
        "model": "cheap",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def ask(
    client: httpx.AsyncClient,
    gateway: Service,
    headers: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
) -> tuple[httpx.Response, bytes, float]:
    """One request: the response, its whole body, and how long it took."""
    started = time.monotonic()
    url = gateway.url + "/v1/chat/completions"
    async with client.stream("POST", url, json=body or chat(), headers=headers) as response:
        content = await response.aread()
    return response, content, time.monotonic() - started


def completed(content: bytes) -> bool:
    return content.rstrip().endswith(b"data: [DONE]") and b'"error"' not in content


async def warm_up(client: httpx.AsyncClient, gateway: Service, count: int = 6) -> None:
    for _ in range(count):
        response, content, _ = await ask(client, gateway)
        assert response.status_code == 200 and completed(content)
    await asyncio.sleep(0.3)  # a load scrape or two


async def test_a_hedge_wins_against_a_hung_replica(stack: Callable[..., Any]) -> None:
    (hung, healthy), gateway = stack(
        [FAST, FAST],
        {"ttft_ms": 300, "e2e_ms": 5000},
        routing={"hedging": {"max_extra": 1.0}},
    )
    set_faults(hung, rate=1.0, kind="hang")
    async with httpx.AsyncClient(timeout=10) as client:
        results = await asyncio.gather(*(ask(client, gateway) for _ in range(8)))
    for response, content, elapsed in results:
        assert response.status_code == 200 and completed(content)
        assert elapsed < 1.0  # the hedge went at 300 ms at the latest, the TTFT SLO
    hedged = [r for r, _, _ in results if r.headers.get("x-triage-hedged") == "1"]
    assert hedged, "no request was hedged"
    # Each loser was cancelled: the hung replica sees its clients leave.
    assert eventually(lambda: sim_stats(hung)["requests_cancelled"] >= len(hedged))
    assert sim_stats(healthy)["requests_completed"] == 8


def _outlier_ejections(gateway: Service, replica: Service) -> float:
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        wanted = ('reason="outlier"', f'replica="{replica.url}"')
        if line.startswith("triage_replica_ejections_total{") and all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_the_breaker_opens_then_a_probe_closes_it(stack: Callable[..., Any]) -> None:
    """A replica answering 500 to everything is ejected as an outlier against its healthy
    peer (answered 500s are not consecutive failures any more), gets nothing while out,
    and comes back through a probe once it is fixed."""
    (flaky, _), gateway = stack(
        [FAST, FAST],
        {"ttft_ms": 1000, "e2e_ms": 5000},
        server={"breaker": {"min_requests": 5, "cooldown_s": 3.0, "slow_start_s": 0}},
    )
    set_faults(flaky, rate=1.0, kind="500")
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(80):  # P2C sends it about half; 5 answers each make it an outlier
            response, _, _ = await ask(client, gateway, body=chat(stream=False))
            assert response.status_code == 200  # retried on the steady replica
            if _outlier_ejections(gateway, flaky) >= 1:
                break
        assert _outlier_ejections(gateway, flaky) == 1
        seen = sim_stats(flaky)["requests_total"]
        assert 5 <= seen <= 8  # ejected as soon as the window allowed, not later
        for _ in range(5):  # well inside the 3 s cooldown
            response, _, _ = await ask(client, gateway, body=chat(stream=False))
            assert response.status_code == 200
        assert sim_stats(flaky)["requests_total"] == seen  # out of rotation
        set_faults(flaky, rate=0.0)
        await asyncio.sleep(3.2)  # past the cooldown: the next request may probe
        for _ in range(20):
            response, _, _ = await ask(client, gateway, body=chat(stream=False))
            assert response.status_code == 200
    # The probe passed and the replica takes its share again.
    assert sim_stats(flaky)["requests_completed"] >= 3
    assert _outlier_ejections(gateway, flaky) == 1


async def test_429_is_retried_elsewhere_and_retry_after_honoured(
    stack: Callable[..., Any],
) -> None:
    (limited, other), gateway = stack([FAST, FAST], {"ttft_ms": 1000, "e2e_ms": 5000})
    httpx.post(
        limited.url.removesuffix("/v1") + "/admin/faults",
        json={"rate": 1.0, "kind": "429", "retry_after_s": 30},
        timeout=5,
    ).raise_for_status()
    async with httpx.AsyncClient(timeout=10) as client:
        # Until the balancer has tried the limited replica once (which one it tries first
        # is its business), every request is answered: its 429 is retried on the other.
        for _ in range(20):
            response, content, _ = await ask(client, gateway)
            assert response.status_code == 200 and completed(content)
            if sim_stats(limited)["requests_total"] == 1:
                break
        assert sim_stats(limited)["requests_total"] == 1
        answered = sim_stats(other)["requests_completed"]
        for _ in range(10):
            response, content, _ = await ask(client, gateway)
            assert response.status_code == 200 and completed(content)
    # Once told to come back in 30 s, the gateway stays away.
    assert sim_stats(limited)["requests_total"] == 1
    assert sim_stats(other)["requests_completed"] == answered + 10


async def test_the_ttft_deadline_cuts_a_hung_request(stack: Callable[..., Any]) -> None:
    (hung,), gateway = stack([FAST], {"ttft_ms": 1000, "e2e_ms": 5000})
    set_faults(hung, rate=1.0, kind="hang")
    async with httpx.AsyncClient(timeout=10) as client:
        response, content, elapsed = await ask(client, gateway, {"x-slo-ttft-ms": "200"})
    assert response.status_code == 504
    assert orjson.loads(content)["error"]["code"] == "upstream_timeout"
    assert 0.35 <= elapsed < 1.5  # timeout_factor 2 x 200 ms


async def test_the_e2e_deadline_ends_a_stalled_stream(stack: Callable[..., Any]) -> None:
    (stalled,), gateway = stack([FAST], {"ttft_ms": 1000, "e2e_ms": 5000})
    set_faults(stalled, rate=1.0, kind="stall")
    async with httpx.AsyncClient(timeout=10) as client:
        response, content, elapsed = await ask(client, gateway, {"x-slo-e2e-ms": "400"})
    assert response.status_code == 200  # the stream had started
    assert b'"code":"upstream_timeout"' in content
    assert content.rstrip().endswith(b"data: [DONE]")
    assert 0.75 <= elapsed < 2.0  # timeout_factor 2 x 400 ms


async def test_shedding_order_follows_priority(stack: Callable[..., Any]) -> None:
    slow_small = ("--ttft-ms", "20", "--itl-ms", "25", "--max-num-seqs", "2", "--jitter", "0")
    # Upstream timeouts far beyond what the queue can take (e2e 30 s, first token at 5x the
    # TTFT SLO): on a loaded machine a slow admitted answer must not turn into a 504 and
    # blur what this test is about, the order of shedding.
    slo = {"ttft_ms": 2000, "e2e_ms": 30000, "max_queue_ms": 1500}
    (_,), gateway = stack([slow_small], slo)
    body = chat(max_tokens=20)  # about 0.5 s of a sequence slot each
    async with httpx.AsyncClient(timeout=45) as client:
        await warm_up(client, gateway, 4)
        # Three at once on two slots: a load report with a queue in it tells the gateway
        # the replica's capacity. Without one, a burst that lands before any report shows a
        # queue is admitted whole (the gateway knows of no limit yet), and nothing is shed.
        await asyncio.gather(*(ask(client, gateway, body=body) for _ in range(3)))
        await asyncio.sleep(0.3)
        priorities = ["critical", "standard", "sheddable"] * 2 + ["standard", "sheddable"] * 6
        results = await asyncio.gather(
            *(ask(client, gateway, {"x-triage-priority": p}, body) for p in priorities)
        )
    served = dict.fromkeys(("critical", "standard", "sheddable"), 0)
    shed = dict(served)
    for priority, (response, content, _) in zip(priorities, results, strict=True):
        if response.status_code == 200:
            assert completed(content)
            served[priority] += 1
            continue
        assert response.status_code in (429, 503), content
        assert orjson.loads(content)["error"]["code"] in ("over_capacity", "deadline_expired")
        assert int(response.headers["retry-after"]) >= 1
        shed[priority] += 1
    assert shed["critical"] == 0  # never shed while the tier can serve
    assert shed["sheddable"] >= 4 and served["standard"] >= 2
    assert shed["sheddable"] / 8 >= shed["standard"] / 8


async def test_a_deadline_that_passes_while_queued_is_a_503(stack: Callable[..., Any]) -> None:
    slow_start = ("--ttft-ms", "400", "--itl-ms", "2", "--jitter", "0")
    slo = {"ttft_ms": 2000, "e2e_ms": 5000, "max_queue_ms": 1000}
    (_,), gateway = stack([slow_start], slo)
    async with httpx.AsyncClient(timeout=10) as client:
        await warm_up(client, gateway, 3)  # the replica's TTFT is known: 400 ms
        tight = {"x-slo-ttft-ms": "250"}
        standard, content, elapsed = await ask(
            client, gateway, {**tight, "x-triage-priority": "standard"}
        )
        sheddable, _, shed_after = await ask(
            client, gateway, {**tight, "x-triage-priority": "sheddable"}
        )
        critical, critical_content, _ = await ask(client, gateway, tight)
    assert standard.status_code == 503
    assert orjson.loads(content)["error"]["code"] == "deadline_expired"
    assert 0.22 <= elapsed < 0.7  # it waited for its 250 ms, no longer
    assert sheddable.status_code == 429 and shed_after < 0.1  # refused at once
    # A critical request is sent anyway, and answered late rather than refused.
    assert critical.status_code == 200 and completed(critical_content)


@pytest.mark.parametrize("balancer", ["round_robin", "least_outstanding"])
async def test_baselines_take_turns_and_do_not_retry(
    stack: Callable[..., Any], balancer: str
) -> None:
    (failing, working), gateway = stack(
        [FAST, FAST], {"ttft_ms": 1000, "e2e_ms": 5000}, server={"balancer": balancer}
    )
    set_faults(failing, rate=1.0, kind="500")
    async with httpx.AsyncClient(timeout=10) as client:
        statuses = [(await ask(client, gateway, body=chat(stream=False)))[0].status_code
                    for _ in range(4)]  # fmt: skip
    assert sorted(statuses) == [200, 200, 502, 502]
    assert sim_stats(failing)["requests_total"] == 2
    assert sim_stats(working)["requests_total"] == 2

"""Faults through the whole gateway, on simulated backends and a real redis-server: a replica
that fails in each way it can, clients that leave mid-stream, Redis paused or killed while
requests run, and the policy reloaded under load.

test_gateway.py checks how each backend fault maps to a status; here each fault must also
leave nothing behind: no cache entry or single-flight lock for the failed request, no budget
reservation still held, nothing counted in flight, and the next request served normally.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from gateway.cache.plan import cache_key
from gateway.policy import hash_key
from tests.integration.conftest import (
    SMALL,
    Service,
    Services,
    SimPair,
    assert_openai_error,
    eventually,
    metric,
    policy_for,
    set_faults,
    sim_stats,
    start_gateway,
    start_sim,
    start_sim_pair,
)
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

FAST = ("--ttft-ms", "5", "--itl-ms", "2")
TENANT, KEY, ADMIN = "acme", "sk-acme-0123456789", "sk-admin-0123456789"
UPSTREAM_TIMEOUT_S = 0.5


def fault_policy(small: str, large: str, **sections: Any) -> dict[str, Any]:
    """One tenant with a budget and rate limits, the response cache on, an admin key."""
    tenant = {
        "keys": [hash_key(KEY)],
        "budget": {"usd_per_day": 100.0},
        "limits": {"rpm": 100_000, "tpm": 100_000_000},
    }
    server = {
        "admin_key": hash_key(ADMIN),
        "upstream_timeout_s": UPSTREAM_TIMEOUT_S,
        "health_check_interval_s": 0.2,
        **sections.pop("server", {}),
    }
    return policy_for(
        [small],
        [large],
        tenants={TENANT: tenant},
        auth={"anonymous": None},
        server=server,
        **sections,
    )


@pytest.fixture(scope="module")
def sims(log_dir: Path, services: Services) -> SimPair:
    return start_sim_pair(log_dir, services, *FAST)


@pytest.fixture(autouse=True)
def no_faults(sims: SimPair) -> Iterator[None]:
    yield
    for sim in sims:
        set_faults(sim, rate=0.0)


@pytest.fixture(scope="module")
def gateway(
    log_dir: Path, services: Services, sims: SimPair, store_section: dict[str, Any]
) -> Service:
    policy = fault_policy(sims[0].url, sims[1].url, store=store_section)
    return services(start_gateway(log_dir, policy))


# --- helpers ---------------------------------------------------------------------------------


def chat(content: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
    body = {"model": "cheap", "temperature": 0, "max_tokens": 6, "stream": stream, **extra}
    return {**body, "messages": [{"role": "user", "content": content}]}


def send(gateway: Service, body: dict[str, Any], timeout: float = 10) -> httpx.Response:
    headers = {"authorization": f"Bearer {KEY}"}
    url = gateway.url + "/v1/chat/completions"
    return httpx.post(url, json=body, headers=headers, timeout=timeout)


def stream_lines(response: httpx.Response) -> list[str]:
    return [line for line in response.text.splitlines() if line]


def usage(gateway: Service) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {ADMIN}"}
    response = httpx.get(gateway.url + f"/admin/tenants/{TENANT}/usage", headers=headers, timeout=5)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def held(gateway: Service) -> tuple[float, int]:
    """USD and requests/tokens still reserved for the tenant, across every window."""
    report = usage(gateway)
    usd = sum(row["reserved_usd"] for row in report["budgets"])
    counts = sum(row["reserved"] for row in report["rate_limits"])
    return usd, counts


def assert_settled(gateway: Service) -> None:
    """Nothing in flight, no reservation held, no settlement waiting for the store."""
    assert eventually(lambda: metric(gateway, "triage_requests_in_flight") == 0)
    assert metric(gateway, "triage_replica_in_flight") == 0
    assert eventually(lambda: held(gateway) == (0, 0)), usage(gateway)
    assert eventually(lambda: usage(gateway)["pending_settlements"] == 0), usage(gateway)


def entry_keys(prefix: str, body: dict[str, Any]) -> list[str]:
    key = prefix + cache_key(TENANT, SMALL, "chat", body)
    return [key, key + ":lock"]


# --- each backend fault leaves nothing behind -------------------------------------------------

# (fault, status the client gets, whether a stream starts before the fault shows)
FAULTS = [
    ("500", 502, False),
    ("503", 503, False),
    ("429", 429, False),
    ("reset", 502, False),
    ("hang", 504, False),
    ("stall", 504, True),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("kind", "status", "mid_stream"), FAULTS, ids=[f[0] for f in FAULTS])
def test_backend_fault_leaves_nothing_behind(
    gateway: Service,
    sims: SimPair,
    redis_server: RedisServer,
    prefix: str,
    kind: str,
    status: int,
    mid_stream: bool,
    stream: bool,
) -> None:
    body = chat(f"fault {kind} {uuid.uuid4().hex}", stream=stream)
    spent_before = usage(gateway)["budgets"][0]["spent_usd"]
    set_faults(sims[0], rate=1.0, kind=kind, retry_after_s=3)
    start = time.monotonic()
    response = send(gateway, body)
    assert time.monotonic() - start < UPSTREAM_TIMEOUT_S + 2
    if stream and mid_stream:
        assert response.status_code == 200
        lines = stream_lines(response)
        assert lines[-1] == "data: [DONE]"
        error = orjson.loads(lines[-2].removeprefix("data: "))["error"]
        assert error["code"] == "upstream_timeout"
    else:
        error = assert_openai_error(response, status)
        if kind == "429":
            assert response.headers["retry-after"] == "3"
    set_faults(sims[0], rate=0.0)

    # Nothing cached, no single-flight lock left, no hold, nothing in flight.
    assert redis_server.client().exists(*entry_keys(prefix, body)) == 0
    assert_settled(gateway)
    spent = usage(gateway)["budgets"][0]["spent_usd"]
    if stream and mid_stream:
        assert spent > spent_before  # the tokens relayed before the stall are billed
    else:
        assert spent == pytest.approx(spent_before)  # nothing was generated: nothing billed

    # The gateway recovers by itself: the same request is served, then answered from cache.
    def served() -> bool:
        return send(gateway, body).status_code == 200

    assert eventually(served, seconds=5)
    again = send(gateway, body)
    assert again.status_code == 200 and again.headers["x-triage-cache"] == "hit"
    assert_settled(gateway)


# --- clients that leave mid-stream ------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_gateway(
    log_dir: Path, services: Services, sims: SimPair, store_section: dict[str, Any]
) -> tuple[Service, Service, str]:
    """A gateway over a replica that takes 200 ms, then 30 ms a token: time to leave."""
    slow = services(start_sim(log_dir, "small", "--ttft-ms", "200", "--itl-ms", "30"))
    prefix = f"leave-{uuid.uuid4().hex[:8]}:"
    store = {**store_section, "key_prefix": prefix}
    policy = fault_policy(slow.url, sims[1].url, store=store, server={"upstream_timeout_s": 10})
    return services(start_gateway(log_dir, policy)), slow, prefix


def test_clients_leaving_mid_stream_leave_nothing_behind(
    slow_gateway: tuple[Service, Service, str], redis_server: RedisServer
) -> None:
    gateway, slow, prefix = slow_gateway
    shared = chat(f"left behind {uuid.uuid4().hex}", stream=True, max_tokens=100)
    bodies = [shared] * 4 + [
        chat(f"left alone {i} {uuid.uuid4().hex}", stream=True, max_tokens=100) for i in range(6)
    ]

    def leave_after_two_events(body: dict[str, Any]) -> int:
        headers = {"authorization": f"Bearer {KEY}"}
        url = gateway.url + "/v1/chat/completions"
        seen = 0
        with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if seen == 2:
                        break
        return seen

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        assert list(pool.map(leave_after_two_events, bodies)) == [2] * len(bodies)

    assert eventually(lambda: sim_stats(slow)["running"] == 0)
    assert_settled(gateway)
    client = redis_server.client()
    for body in bodies:
        assert client.exists(*entry_keys(prefix, body)) == 0, "a partial answer was stored"
    # No stale lock or waiter: the same request right away is a quick miss, then a hit.
    start = time.monotonic()
    complete = send(gateway, {**shared, "max_tokens": 5})
    assert complete.status_code == 200 and complete.headers["x-triage-cache"] == "miss"
    assert time.monotonic() - start < 2
    assert send(gateway, {**shared, "max_tokens": 5}).headers["x-triage-cache"] == "hit"
    assert_settled(gateway)


def test_clients_leaving_before_a_json_answer_leave_nothing_behind(
    slow_gateway: tuple[Service, Service, str], redis_server: RedisServer
) -> None:
    gateway, slow, prefix = slow_gateway
    shared = chat(f"gone before the answer {uuid.uuid4().hex}", max_tokens=20)
    bodies = [shared] * 3 + [chat(f"gone too {i} {uuid.uuid4().hex}") for i in range(3)]

    def leave_early(body: dict[str, Any]) -> None:
        with pytest.raises(httpx.TimeoutException):  # gone while the backend still works
            send(gateway, body, timeout=0.1)

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        list(pool.map(leave_early, bodies))
    assert eventually(lambda: sim_stats(slow)["running"] == 0)
    assert_settled(gateway)
    client = redis_server.client()
    for body in bodies:
        assert client.exists(body_lock(prefix, body)) == 0, "a single-flight lock was left"
    start = time.monotonic()
    assert send(gateway, shared).status_code == 200
    assert time.monotonic() - start < 2


def body_lock(prefix: str, body: dict[str, Any]) -> str:
    return entry_keys(prefix, body)[1]


# --- Redis paused, killed and restarted mid-run ------------------------------------------------


class Load:
    """Threads sending a mix of repeated and unique requests until stopped."""

    def __init__(self, gateway: Service, threads: int = 4) -> None:
        self.gateway = gateway
        self.results: list[tuple[float, float, int, str]] = []  # start, seconds, status, code
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, worker: int) -> None:
        headers = {"authorization": f"Bearer {KEY}"}
        with httpx.Client(timeout=10, headers=headers) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                repeated = n % 2 == 0
                content = f"repeated {n % 3}" if repeated else f"unique {worker} {n} {uuid.uuid4()}"
                body = chat(content, stream=n % 3 == 0, model="auto")
                start = time.monotonic()
                response = client.post(self.gateway.url + "/v1/chat/completions", json=body)
                seconds = time.monotonic() - start
                code = ""
                if response.status_code != 200:
                    code = response.json()["error"]["code"] or ""
                elif body["stream"]:
                    lines = stream_lines(response)
                    code = "" if lines[-1] == "data: [DONE]" and "error" not in lines[-2] else "cut"
                self.results.append((start, seconds, response.status_code, code))

    def during(self, start: float, end: float) -> list[tuple[float, float, int, str]]:
        return [r for r in self.results if start <= r[0] < end]


def redis_gateway(
    log_dir: Path,
    services: Services,
    sims: SimPair,
    server: RedisServer,
    failure_mode: str,
) -> Service:
    store = {"redis_url": server.url, "timeout_ms": 100, "breaker_reset_s": 0.3}
    policy = fault_policy(
        sims[0].url,
        sims[1].url,
        store=store,
        budgets={"failure_mode": failure_mode},
        server={"upstream_timeout_s": 5},
    )
    return services(start_gateway(log_dir, policy))


def wait_for_hits(gateway: Service, body: dict[str, Any]) -> bool:
    send(gateway, body)
    return eventually(lambda: send(gateway, body).headers.get("x-triage-cache") == "hit", 5)


PAUSE_S = 3.0


def test_redis_paused_mid_run_fails_open_and_recovers(
    log_dir: Path,
    services: Services,
    sims: SimPair,
    fresh_redis: RedisServer,
) -> None:
    gateway = redis_gateway(log_dir, services, sims, fresh_redis, "fail_open")
    with Load(gateway) as load:
        time.sleep(0.8)
        paused_at = time.monotonic()
        with fresh_redis.frozen():
            time.sleep(PAUSE_S)
        time.sleep(1.0)
    statuses = {status for _, _, status, _ in load.results}
    assert statuses == {200}, [r for r in load.results if r[2] != 200][:5]
    assert not [r for r in load.results if r[3]], "a stream was cut"
    during = load.during(paused_at, paused_at + PAUSE_S)
    assert during, "no request ran while Redis was paused"
    # Bounded by the store's timeout and breaker, not by the pause.
    assert max(seconds for _, seconds, _, _ in load.results) < PAUSE_S / 2
    # Back to normal by itself: cache hits, settlements replayed, no stale single-flight lock.
    assert wait_for_hits(gateway, chat(f"after the pause {uuid.uuid4()}"))
    start = time.monotonic()
    assert send(gateway, chat("repeated 1", model="auto")).status_code == 200
    assert time.monotonic() - start < 1
    assert_settled(gateway)


def test_redis_killed_mid_stream_then_restarted(
    log_dir: Path,
    services: Services,
    sims: SimPair,
    fresh_redis: RedisServer,
) -> None:
    gateway = redis_gateway(log_dir, services, sims, fresh_redis, "fail_closed")
    set_faults(sims[0], rate=0.0)
    slow = {"max_tokens": 400, "ignore_eos": True}  # ~0.8 s of stream at 2 ms a token
    bodies = [chat(f"killed under me {i} {uuid.uuid4()}", stream=True, **slow) for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        streams = [pool.submit(send, gateway, body) for body in bodies]
        assert eventually(lambda: sim_stats(sims[0])["running"] >= len(bodies), 3)
        fresh_redis.kill()
        during = send(gateway, chat(f"while Redis is down {uuid.uuid4()}"))
        finished = [future.result() for future in streams]
    # Streams already going finish whole; they settle once Redis is back.
    for response in finished:
        assert response.status_code == 200
        lines = stream_lines(response)
        assert lines[-1] == "data: [DONE]" and "error" not in lines[-2], lines[-3:]
    # fail_closed: a new request is refused cleanly and quickly, not hung or 500.
    error = assert_openai_error(during, 503)
    assert error["code"] == "budget_store_unavailable"
    fresh_redis.restart()
    assert eventually(lambda: send(gateway, chat(f"back {uuid.uuid4()}")).status_code == 200)
    assert wait_for_hits(gateway, chat(f"after the restart {uuid.uuid4()}"))
    assert_settled(gateway)
    # The restarted Redis lost everything; the replayed settlements put the streams back.
    assert usage(gateway)["budgets"][0]["spent_usd"] > 0


# --- policy reloaded under load -----------------------------------------------------------------


def test_policy_reloaded_under_load_fails_no_request(
    log_dir: Path, services: Services, sims: SimPair
) -> None:
    policies = [fault_policy(sims[0].url, sims[1].url) for _ in range(2)]
    policies[1]["routing"]["default_tier"] = "large"
    policies[1]["cache"] = {"ttl_s": 60}
    gateway = services(start_gateway(log_dir, policies[0]))
    assert gateway.config is not None
    reloads = 0
    with Load(gateway, threads=6) as load:
        started = time.monotonic()
        # 3 s at least, and however long a loaded machine takes to get 10 reloads in among
        # 50 requests: a count reached in a fixed time would test the machine's speed.
        while time.monotonic() < started + 3 or reloads < 10 or len(load.results) < 50:
            assert time.monotonic() < started + 60, (reloads, len(load.results))
            reloads += 1
            gateway.config.write_text(yaml.safe_dump(policies[reloads % 2], sort_keys=False))
            headers = {"authorization": f"Bearer {ADMIN}"}
            response = httpx.post(gateway.url + "/admin/reload", headers=headers, timeout=10)
            assert response.json()["reloaded"] is True
            time.sleep(0.1)
    failed = [r for r in load.results if r[2] != 200 or r[3]]
    assert reloads >= 10 and len(load.results) >= 50
    assert not failed, failed[:5]
    assert_settled(gateway)

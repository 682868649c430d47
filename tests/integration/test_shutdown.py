"""Graceful shutdown: on SIGTERM the gateway stops accepting, lets requests and streams in
flight finish up to its deadline (`--timeout-graceful-shutdown`), ends what is still running
at the deadline with an error event, settles every budget reservation, and exits 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import signal
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from gateway.budgets.ledger import Ledger
from gateway.policy import hash_key, parse_policy
from gateway.store import RedisStore
from tests.integration.conftest import (
    TRIAGE,
    Service,
    eventually,
    free_port,
    policy_for,
    sim_stats,
    start_service,
    start_sim,
)
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

TENANT, KEY = "acme", "sk-acme-0123456789"
ITL_MS = 20


@pytest.fixture(scope="module")
def slow(log_dir: Path, services: Callable[[Service], Service]) -> Service:
    return services(start_sim(log_dir, "small", "--ttft-ms", "5", "--itl-ms", str(ITL_MS)))


def shutdown_policy(sim: Service, redis_url: str, prefix: str) -> dict[str, Any]:
    tenant = {"keys": [hash_key(KEY)], "budget": {"usd_per_day": 100.0}, "limits": {"rpm": 10_000}}
    store = {"redis_url": redis_url, "key_prefix": prefix, "timeout_ms": 1000}
    return policy_for(
        [sim.url], [sim.url], tenants={TENANT: tenant}, auth={"anonymous": None}, store=store
    )


def start_gateway_with_grace(
    log_dir: Path, policy: dict[str, Any], grace_s: int, workers: int = 1
) -> tuple[Service, Path]:
    port = free_port()
    path = log_dir / f"policy-{port}.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    args = [*TRIAGE, "serve", "--policy", str(path), "--port", str(port)]
    args += ["--timeout-graceful-shutdown", str(grace_s), "--workers", str(workers)]
    root = f"http://127.0.0.1:{port}"
    return start_service(f"gateway-{port}", args, root + "/healthz", root, log_dir), path


def request(gateway: Service, tokens: int, stream: bool) -> httpx.Response:
    body = {
        "model": "cheap",
        "max_tokens": tokens,
        "ignore_eos": True,  # the sim generates exactly `tokens`, never stopping early
        "stream": stream,
        "messages": [{"role": "user", "content": f"shutdown {uuid.uuid4()}"}],
    }
    headers = {"authorization": f"Bearer {KEY}"}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def eventually_refused(gateway: Service, seconds: float = 1.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            httpx.get(gateway.url + "/healthz", timeout=0.2)
        except httpx.ConnectError:
            return True
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    return False


def ledger_usage(policy_path: Path) -> dict[str, Any]:
    """The tenant's usage read straight from Redis, after the gateway is gone."""

    async def read() -> dict[str, Any]:
        policy = parse_policy(yaml.safe_load(policy_path.read_text()))
        store = RedisStore(policy.store)
        try:
            return await Ledger(store, policy).usage(TENANT)
        finally:
            await store.close()

    return asyncio.run(read())


def reserved(usage: dict[str, Any]) -> float:
    return sum(row["reserved_usd"] for row in usage["budgets"]) + sum(
        row["reserved"] for row in usage["rate_limits"]
    )


def spent(usage: dict[str, Any]) -> float:
    return sum(row["spent_usd"] for row in usage["budgets"] if row["window"] == "day")


def test_sigterm_drains_requests_and_streams_then_settles(
    log_dir: Path, slow: Service, redis_server: RedisServer
) -> None:
    prefix = f"drain-{uuid.uuid4().hex[:8]}:"
    gateway, path = start_gateway_with_grace(
        log_dir, shutdown_policy(slow, redis_server.url, prefix), grace_s=10
    )
    try:
        tokens = 60  # 1.2 s each at 20 ms a token
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(request, gateway, tokens, i % 2 == 0) for i in range(6)]
            # All six are being generated before the signal: on a loaded machine a fixed
            # pause let the listener close before some had connected.
            assert eventually(lambda: sim_stats(slow)["running"] == 6, seconds=10)
            signalled = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            # It stops accepting while the requests in flight are still being answered.
            assert eventually_refused(gateway)
            assert not all(future.done() for future in futures)
            responses = [f.result() for f in futures]
        gateway.process.wait(timeout=10)
        assert time.monotonic() - signalled < 5
    finally:
        gateway.stop()
    for response in responses:
        assert response.status_code == 200, response.text[:300]
        if response.headers["content-type"].startswith("text/event-stream"):
            lines = [line for line in response.text.splitlines() if line]
            assert lines[-1] == "data: [DONE]" and '"error"' not in lines[-2]
            assert sum('"content"' in line for line in lines) >= tokens  # + the role chunk
        else:
            assert response.json()["usage"]["completion_tokens"] == tokens
    usage = ledger_usage(path)
    assert reserved(usage) == 0, usage
    assert spent(usage) > 0


def test_sigterm_exits_zero(log_dir: Path, slow: Service, redis_server: RedisServer) -> None:
    prefix = f"exit-{uuid.uuid4().hex[:8]}:"
    gateway, _ = start_gateway_with_grace(
        log_dir, shutdown_policy(slow, redis_server.url, prefix), grace_s=5
    )
    try:
        assert request(gateway, 2, stream=False).status_code == 200
        gateway.process.send_signal(signal.SIGTERM)
        code = gateway.process.wait(timeout=10)
    finally:
        gateway.stop()
    assert code == 0, f"exit status {code}\n{gateway.output()[-1500:]}"


@pytest.mark.parametrize("workers", [1, 2])
def test_stream_still_running_at_the_deadline_ends_with_an_error_event(
    log_dir: Path, slow: Service, redis_server: RedisServer, workers: int
) -> None:
    """With `--workers 2` the stream is served by a worker process, where uvicorn runs its
    own server class: the deadline must start there too."""
    prefix = f"deadline-{uuid.uuid4().hex[:8]}:"
    gateway, path = start_gateway_with_grace(
        log_dir, shutdown_policy(slow, redis_server.url, prefix), grace_s=1, workers=workers
    )
    lines: list[str] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:

            def consume() -> None:
                body = {
                    "model": "cheap",
                    "max_tokens": 300,  # 6 s at 20 ms a token: past the 1 s deadline
                    "ignore_eos": True,
                    "stream": True,
                    "messages": [{"role": "user", "content": "a long story"}],
                }
                headers = {"authorization": f"Bearer {KEY}"}
                url = gateway.url + "/v1/chat/completions"
                with httpx.stream("POST", url, json=body, headers=headers, timeout=30) as r:
                    try:
                        lines.extend(line for line in r.iter_lines() if line)
                    except httpx.HTTPError as exc:
                        lines.append(f"cut: {exc!r}")

            future = pool.submit(consume)
            assert eventually(lambda: sim_stats(slow)["running"] == 1, seconds=10)
            signalled = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            future.result(timeout=15)
        gateway.process.wait(timeout=10)
        assert time.monotonic() - signalled < 4
    finally:
        gateway.stop()
    # What the stream did generate is settled, not left held until the reservation expires.
    usage = ledger_usage(path)
    assert reserved(usage) == 0, usage
    assert spent(usage) > 0
    # The client learns the stream was cut: an error event and [DONE], not a torn connection.
    assert lines[-1] == "data: [DONE]", lines[-2:]
    assert '"error"' in lines[-2], lines[-2:]


def http_request(content: str) -> bytes:
    body = orjson.dumps(
        {"model": "cheap", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
    )
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def read_one_response(conn: socket.socket) -> bytes:
    """Read a response with a content-length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    assert length is not None, head
    while len(rest) < int(length[1]):
        rest += conn.recv(65536)
    return head + b"\r\n\r\n" + rest


def read_to_eof(conn: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := conn.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("sent_before", ["nothing", "half the next request"])
def test_a_request_on_its_way_at_sigterm_is_answered(
    log_dir: Path, slow: Service, redis_server: RedisServer, sent_before: str
) -> None:
    """uvicorn closes every connection without a request in progress when it stops
    accepting: a request still on the wire was cut off ("server disconnected"), which
    under `--workers N` a policy reload (each worker replaced) did to clients."""
    prefix = f"onitsway-{uuid.uuid4().hex[:8]}:"
    gateway, _ = start_gateway_with_grace(
        log_dir, shutdown_policy(slow, redis_server.url, prefix), grace_s=5
    )
    try:
        address = httpx.URL(gateway.url)
        conn = socket.create_connection((address.host, address.port), timeout=10)
        pending = http_request("on its way")
        if sent_before == "nothing":
            # Accepted: the server accepts in arrival order, so once a later connection is
            # answered this one has been accepted too.
            assert request(gateway, 2, stream=False).status_code == 200
        else:
            # Sent with the first request, in one segment: the server has read the start
            # of the second once it answers the first.
            conn.sendall(http_request("first") + pending[:40])
            pending = pending[40:]
            assert read_one_response(conn).startswith(b"HTTP/1.1 200")
        gateway.process.send_signal(signal.SIGTERM)
        # The listener closes in the same step as uvicorn shuts every connection down.
        assert eventually_refused(gateway)
        conn.sendall(pending)
        answer = read_to_eof(conn)
        conn.close()
        assert gateway.process.wait(timeout=10) == 0
    finally:
        gateway.stop()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"connection: close" in answer.lower()
